"""Real EST requests against a running server: a device with a bootstrap token, or with a
manufacturer certificate (IDevID) from a test OEM CA. No Fleetward code on the client side."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer

SIMPLEENROLL = "/.well-known/est/simpleenroll"
OEM_TRUST_WAIT_SECONDS = 20  # the device listener picks up new OEM CAs every few seconds


def openssl_csr(directory: Path, name: str, cn: str | None = None,
                der: bool = False) -> tuple[Path, Path]:
    """A P-256 key and CSR made by the openssl CLI, as a factory line would."""
    key = directory / f"{name}.key"
    csr = directory / (f"{name}.der" if der else f"{name}.csr")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", f"/CN={cn or name}", *(["-outform", "DER"] if der else [])],
                   check=True, capture_output=True)
    return key, csr


def csr_der(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def est_enroll(server: RunningServer, csr: bytes, *, basic: tuple[str, str] | None = None,
               client_cert: tuple[Path, Path] | None = None) -> httpx.Response:
    """POST simpleenroll (RFC 7030 §4.2.1: base64 DER body) to the device listener."""
    ctx = ssl.create_default_context(cafile=str(server.chain))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    with httpx.Client(base_url=f"https://localhost:{server.device_port}", verify=ctx,
                      timeout=30) as client:
        return client.post(SIMPLEENROLL, content=base64.encodebytes(csr),
                           headers={"Content-Type": "application/pkcs10"},
                           auth=httpx.BasicAuth(*basic) if basic else None)


@dataclass
class OemCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def idevid(self, directory: Path, device_id: str) -> tuple[Path, Path]:
        """An IEEE 802.1AR IDevID naming ``device_id`` in serialNumber; (cert, key) files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test OEM")]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                # IEEE 802.1AR §8.5: an IDevID has no meaningful expiry (99991231235959Z).
                .not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = directory / f"{device_id}.idevid.pem", directory / f"{device_id}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file


def make_oem_ca(name: str) -> OemCA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return OemCA(key, cert)


def enroll_with_idevid(server: RunningServer, idevid: tuple[Path, Path],
                       csr: bytes) -> httpx.Response:
    """simpleenroll with the IDevID, waiting until the listener trusts its (new) OEM CA."""
    deadline = time.monotonic() + OEM_TRUST_WAIT_SECONDS
    while True:
        try:
            return est_enroll(server, csr, client_cert=idevid)
        except httpx.TransportError:
            # The handshake fails until the listener has loaded the OEM CA.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
