"""The agent's HTTPS transports, against a real local TLS server.

Threats: a transport that trusts the system store (or anything) instead of only the
pinned CA; TLS below 1.2; curl options smuggled in through a PIN or header value (curl's
config syntax is line-based); a 100-continue block mistaken for the final answer;
OpenSSL config injection through the module path.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetward.agent.errors import ServerUnreachable, TrustBootstrapFailed
from fleetward.agent.est_client import certs_to_pem
from fleetward.agent.transport import (
    HttpxTransport,
    bootstrap_tls_context,
    client_tls_context,
    curl_config_line,
    openssl_engine_config,
    parse_header_dump,
)
from fleetward.errors import InvalidInput
from tests.conftest import free_port
from tests.unit.test_agent_est_client import Pki


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _server_cert(pki: Pki, tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(pki.issuing.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(pki.issuing_key, hashes.SHA256()))
    cert_file, key_file = tmp / "server.pem", tmp / "server.key"
    cert_file.write_bytes(certs_to_pem([cert, pki.issuing]))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _serve(pki: Pki, tmp: Path, maximum: ssl.TLSVersion | None = None) -> Iterator[str]:
    cert_file, key_file = _server_cert(pki, tmp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    port = free_port()
    httpd = http.server.HTTPServer(("127.0.0.1", port), _Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def pki() -> Pki:
    return Pki.create(now=dt.datetime.now(dt.UTC))


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path) -> Iterator[str]:
    yield from _serve(pki, tmp_path)


def test_pinned_ca_is_the_only_trust_anchor(pki: Pki, tls_server: str) -> None:
    pinned = client_tls_context(cadata=certs_to_pem([pki.root]).decode())
    transport = HttpxTransport(tls_server, pinned)
    assert transport.request("GET", "/").body == b"hello"
    transport.close()
    other = Pki.create(now=dt.datetime.now(dt.UTC), prefix="Other")
    wrong = HttpxTransport(tls_server, client_tls_context(cadata=certs_to_pem(
        [other.root]).decode()))
    with pytest.raises(TrustBootstrapFailed, match="not trusted"):
        wrong.request("GET", "/")


def test_a_pinned_issuing_ca_alone_is_enough(pki: Pki, tls_server: str) -> None:
    """VERIFY_X509_PARTIAL_CHAIN: the operator may pin the issuing CA."""
    ctx = client_tls_context(cadata=certs_to_pem([pki.issuing]).decode())
    assert HttpxTransport(tls_server, ctx).request("GET", "/").status == 200


def test_bootstrap_context_skips_verification_for_the_first_request_only(
        tls_server: str) -> None:
    assert HttpxTransport(tls_server, bootstrap_tls_context()).request("GET", "/").status == 200
    assert client_tls_context(cadata=certs_to_pem([Pki.create().root]).decode()
                              ).verify_mode == ssl.CERT_REQUIRED


@pytest.fixture
def tls11_server(pki: Pki, tmp_path: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1, on purpose
        yield from _serve(pki, tmp_path, maximum=ssl.TLSVersion.TLSv1_1)


def _tls11_handshake(url: str) -> str | None:
    """Negative control: a client that does speak TLS 1.1 gets through."""
    host, port = url.removeprefix("https://").split(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        return tls.version()


def test_tls_1_1_is_refused(pki: Pki, tls11_server: str) -> None:
    assert _tls11_handshake(tls11_server) == "TLSv1.1"  # the server really offers 1.1
    pinned = client_tls_context(cadata=certs_to_pem([pki.root]).decode())
    for ctx in (pinned, bootstrap_tls_context()):
        with pytest.raises(ServerUnreachable, match="TLS"):
            HttpxTransport(tls11_server, ctx).request("GET", "/")


def test_a_closed_port_is_server_unreachable() -> None:
    transport = HttpxTransport(f"https://127.0.0.1:{free_port()}", bootstrap_tls_context())
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        transport.request("GET", "/")


# --- curl helpers --------------------------------------------------------------------------


def test_curl_config_quoting_survives_quotes_and_backslashes(tmp_path: Path) -> None:
    """curl itself parses the line: the output file gets exactly the odd name."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    source = tmp_path / "source"
    source.write_text("payload")
    odd = tmp_path / 'we"ird\\name $x'
    config = curl_config_line("url", f"file://{source}") + curl_config_line("output", str(odd))
    subprocess.run([curl, "--disable", "-sS", "--config", "-"], input=config.encode(),
                   check=True, timeout=30)
    assert odd.read_text() == "payload"


@pytest.mark.parametrize("value", ["1234\nurl = \"https://evil\"", "12\r34", "a\x00b", "\x7f"])
def test_control_characters_cannot_start_another_curl_option(value: str) -> None:
    with pytest.raises(InvalidInput, match="control characters"):
        curl_config_line("pass", value)


def test_header_dump_keeps_the_final_response_only() -> None:
    dump = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 202 Accepted\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n\r\n")
    assert parse_header_dump(dump) == {"retry-after": "5", "content-type": "text/plain"}
    assert parse_header_dump(b"") == {}


@pytest.mark.parametrize("module", ["$ENV::HOME/lib.so", "/usr/lib/a#b.so", "a b.so", ""])
def test_openssl_config_refuses_special_characters_in_the_module_path(module: str) -> None:
    with pytest.raises(InvalidInput):
        openssl_engine_config(module)


def test_openssl_config_names_the_module() -> None:
    text = openssl_engine_config("/usr/lib/softhsm/libsofthsm2.so")
    assert "MODULE_PATH = /usr/lib/softhsm/libsofthsm2.so\n" in text
    assert "engine_id = pkcs11" in text
