"""Device identities for secure-channel tests: a registered device with a certificate
from the server's CA, as files that openssl, curl, mosquitto and paho can use."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    device_type: str
    cert: Path  # the device certificate (PEM)
    key: Path  # its unencrypted P-256 key (PEM)
    cafile: Path  # the server's CA chain (PEM): verifies the server and the device
    serial_hex: str

    def tls_context(self) -> ssl.SSLContext:
        """A client context presenting this identity and trusting only our CA."""
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def make_device(server: RunningServer, directory: Path, device_id: str, *,
                device_type: str = "default", owner: str = "acme") -> DeviceIdentity:
    """Register ``device_id`` through the admin API and issue it a certificate (the
    device becomes active); write cert and key under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    with server.admin() as admin:
        created = admin.post("/v1/devices", json={"id": device_id, "type": device_type,
                                                  "owner": owner})
        assert created.status_code == 201, created.text
        issued = admin.post(f"/v1/devices/{device_id}/certificates", json={
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
        assert issued.status_code == 201, issued.text
    body = issued.json()
    cert_path = directory / f"{device_id}.pem"
    key_path = directory / f"{device_id}.key"
    cert_path.write_text(body["pem"])
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return DeviceIdentity(device_id, device_type, cert_path, key_path, server.chain,
                          body["serial"])
