"""Device identities for secure-channel tests: a registered device with a certificate
from the server's CA, as files that openssl, curl, mosquitto and paho can use."""

from __future__ import annotations

import socket
import ssl
import time
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


def write_cert_and_key(directory: Path, name: str, cert_pem: str,
                       key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """``<name>.pem`` and an unencrypted ``<name>.key`` (0600) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_text(cert_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert, key_file


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
    cert_path, key_path = write_cert_and_key(directory, device_id, body["pem"], key)
    return DeviceIdentity(device_id, device_type, cert_path, key_path, server.chain,
                          body["serial"])


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection on a raw TLS socket, so its close is visible
    (an HTTP client library would hide it by reconnecting)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.closed_at = 0.0  # time.monotonic() when wait_closed saw the close

    def get(self, path: str) -> int:
        """``GET path`` on this connection; the status code (the body is read)."""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed before the response"
            head += chunk
        header_block, _, body = head.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in header_block.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(4096)
        return int(head.split(b" ", 2)[1])

    def wait_closed(self, timeout: float) -> bool:
        """True once the server has closed the connection, False if still open after
        ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            data = b""
        if data == b"":
            self.closed_at = time.monotonic()
            return True
        return False

    def close(self) -> None:
        self.sock.close()
