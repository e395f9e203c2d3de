"""HTTPS transports for the EST client: one interface, two ways to hold the TLS key.

- ``HttpxTransport``: Python's ``ssl`` with the key in a file (or no client key at all).
- ``CurlTransport``: ``curl`` with OpenSSL's pkcs11 engine, for a key that lives on a
  PKCS#11 token (Python's ``ssl`` module cannot use a key it cannot read). The PIN and
  request headers reach curl on stdin (``-K -``), never on its command line, which
  every user of the machine can read in ``/proc``.

Both verify the server against the pinned CA certificates only (no system trust store),
speak TLS 1.2 or newer, and never follow redirects.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from fleetward.agent.errors import ServerUnreachable, TrustBootstrapFailed
from fleetward.errors import InvalidInput, KeyUnavailable

MAX_RESPONSE_BYTES = 1024 * 1024  # bytes; an EST response is a few KiB of PKCS#7
DEFAULT_TIMEOUT_SECONDS = 30.0
CURL = "curl"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Transport(Protocol):
    """Sends one HTTPS request to the server (``path`` is relative to its base URL)."""

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResponse: ...

    def close(self) -> None: ...


# --- Python ssl + httpx ------------------------------------------------------------------


def client_tls_context(*, cadata: str, cert_file: Path | None = None,
                       key_file: Path | None = None,
                       password: bytes | None = None) -> ssl.SSLContext:
    """Client TLS trusting exactly ``cadata`` (PEM), optionally with a client certificate.

    ``VERIFY_X509_PARTIAL_CHAIN`` lets a pinned issuing CA (not self-signed) be the
    anchor: RFC 5280 §6.1.1 leaves the choice of trust anchor to the relying party.

    Raises:
        KeyUnavailable: the certificate or key cannot be loaded (e.g. wrong passphrase).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_verify_locations(cadata=cadata)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if cert_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None,
                                password=password)
        except (ssl.SSLError, OSError) as exc:
            raise KeyUnavailable(
                f"cannot load the device certificate {cert_file} with its key: {exc}",
                hint="the key passphrase file may be wrong, or the key does not match the "
                     "certificate") from exc
    return ctx


def bootstrap_tls_context() -> ssl.SSLContext:
    """TLS WITHOUT server authentication, for the one ``/cacerts`` request of the
    explicit trust bootstrap (RFC 7030 §4.1.1). Its answer is trusted only if a CA in it
    matches the fingerprint the operator pinned out of band."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HttpxTransport:
    def __init__(self, base_url: str, context: ssl.SSLContext,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._client = httpx.Client(base_url=base_url, verify=context, timeout=timeout_seconds,
                                    follow_redirects=False, trust_env=False)

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResponse:
        try:
            with self._client.stream(method, path, content=body,
                                     headers=dict(headers or {})) as response:
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise ServerUnreachable(
                            f"the server's answer is larger than {MAX_RESPONSE_BYTES} bytes",
                            hint="is the URL the Fleetward device listener?")
                return HttpResponse(response.status_code,
                                    {k.lower(): v for k, v in response.headers.items()},
                                    bytes(data))
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc

    def close(self) -> None:
        self._client.close()


def _httpx_error(exc: httpx.HTTPError) -> Exception:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TrustBootstrapFailed(
                f"the server's TLS certificate is not trusted: {cause.verify_message}",
                hint="the server does not hold a certificate issued by the pinned CA; if "
                     "the server's CA really changed, enroll again with the new fingerprint")
        if isinstance(cause, ssl.SSLError):
            return ServerUnreachable(
                f"TLS with the server failed: {cause.reason or cause}",
                hint="the server may have refused the device certificate (expired, revoked "
                     "or from another CA)")
        cause = cause.__cause__ or cause.__context__
    return ServerUnreachable(f"cannot reach the server: {type(exc).__name__}: {exc}")


# --- curl + OpenSSL pkcs11 engine ------------------------------------------------------------


def curl_config_line(name: str, value: str) -> str:
    """One ``name = "value"`` line of a curl config file (curl(1), -K).

    Raises:
        InvalidInput: the value holds control characters (they could end the line and
            smuggle in another option).
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidInput(f"the value for curl's {name} holds control characters",
                           hint="PINs and header values must be printable")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name} = "{escaped}"\n'


def parse_header_dump(data: bytes) -> dict[str, str]:
    """Headers of the LAST response in a ``curl -D`` dump (earlier blocks are interim
    1xx responses)."""
    text = data.decode("latin-1").replace("\r\n", "\n")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if not blocks:
        return {}
    headers: dict[str, str] = {}
    for line in blocks[-1].split("\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers


def openssl_engine_config(module: str) -> str:
    """OpenSSL config loading libp11's pkcs11 engine with ``module``.

    Raises:
        InvalidInput: the module path holds characters OpenSSL's config parser treats
            specially (``$`` expands variables, ``#`` starts a comment).
    """
    if not module or not all(c.isalnum() or c in "/._+-" for c in module):
        raise InvalidInput(f"unsupported PKCS#11 module path {module!r}",
                           hint="use a plain path such as /usr/lib/softhsm/libsofthsm2.so")
    return ("openssl_conf = openssl_init\n"
            "[openssl_init]\nengines = engine_section\n"
            "[engine_section]\npkcs11 = pkcs11_section\n"
            "[pkcs11_section]\nengine_id = pkcs11\n"
            f"MODULE_PATH = {module}\ninit = 0\n")


# curl(1) EXIT CODES that mean something to the user of the agent.
_CURL_TRUST = {51, 60}  # peer certificate / hostname not verified
_CURL_KEY = {53, 54, 58}  # engine missing, engine unusable, local certificate/key unusable


class CurlTransport:
    """The same interface as ``HttpxTransport``, with the client key on a PKCS#11 token."""

    def __init__(self, base_url: str, *, ca_file: Path, cert_file: Path, key_uri: str,
                 pin: bytes, openssl_conf: Path,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, curl: str = CURL) -> None:
        self._base_url = base_url.rstrip("/")
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_uri = key_uri
        self._pin = pin.decode()
        self._openssl_conf = openssl_conf
        self._timeout = timeout_seconds
        self._curl = curl

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResponse:
        with tempfile.TemporaryDirectory(prefix="fleetward-agent-") as tmp:  # 0700
            work = Path(tmp)
            config = [curl_config_line("url", self._base_url + path),
                      curl_config_line("pass", self._pin),
                      curl_config_line("request", method),
                      # like HttpxTransport(trust_env=False): no proxy from the environment
                      curl_config_line("noproxy", "*"),
                      # no "Expect: 100-continue" round trip (RFC 9110 §10.1.1)
                      curl_config_line("header", "Expect:")]
            for name, value in (headers or {}).items():
                config.append(curl_config_line("header", f"{name}: {value}"))
            if body is not None:
                (work / "body").write_bytes(body)
                config.append(curl_config_line("data-binary", f"@{work / 'body'}"))
            argv = [self._curl, "--disable",  # --disable first: never read ~/.curlrc
                    "--silent", "--show-error", "--config", "-",
                    "--proto", "=https", "--tlsv1.2",
                    "--cacert", str(self._ca_file),
                    "--engine", "pkcs11", "--key-type", "ENG", "--key", self._key_uri,
                    "--cert", str(self._cert_file),
                    "--max-time", str(int(self._timeout)),
                    "--max-filesize", str(MAX_RESPONSE_BYTES),
                    "--output", str(work / "response"), "--dump-header", str(work / "headers"),
                    "--write-out", "%{http_code}"]
            env = dict(os.environ)
            env["OPENSSL_CONF"] = str(self._openssl_conf)
            try:
                done = subprocess.run(argv, input="".join(config).encode(), env=env,
                                      capture_output=True, timeout=self._timeout + 15,
                                      check=False)
            except FileNotFoundError:
                raise ServerUnreachable(f"{self._curl} is not installed",
                                        hint="install curl and libengine-pkcs11-openssl") from None
            except subprocess.TimeoutExpired:
                raise ServerUnreachable(f"no answer from {self._base_url} in time") from None
            if done.returncode != 0:
                raise _curl_error(done.returncode, done.stderr.decode(errors="replace"))
            status_text = done.stdout.decode(errors="replace").strip()
            if not status_text.isdigit() or status_text == "000":
                raise ServerUnreachable(f"curl reported no HTTP status ({status_text!r})")
            response = work / "response"
            return HttpResponse(
                int(status_text),
                parse_header_dump((work / "headers").read_bytes()),
                response.read_bytes() if response.exists() else b"")

    def close(self) -> None:
        """Nothing to release: every request is its own curl process."""


def _curl_error(code: int, stderr: str) -> Exception:
    detail = " ".join(stderr.split())[:300] or f"curl exit code {code}"
    if code in _CURL_TRUST:
        return TrustBootstrapFailed(
            f"the server's TLS certificate is not trusted: {detail}",
            hint="the server does not hold a certificate issued by the pinned CA")
    if code in _CURL_KEY:
        return KeyUnavailable(
            f"curl cannot use the device key on the PKCS#11 token: {detail}",
            hint="check the PIN file, the token and key labels in agent.toml, and that "
                 "libengine-pkcs11-openssl is installed")
    if code == 35:
        return ServerUnreachable(
            f"TLS with the server failed: {detail}",
            hint="the server may have refused the device certificate (expired, revoked or "
                 "from another CA)")
    return ServerUnreachable(f"cannot reach the server: {detail}")


__all__ = ["CurlTransport", "HttpResponse", "HttpxTransport", "Transport",
           "bootstrap_tls_context", "client_tls_context", "curl_config_line",
           "openssl_engine_config", "parse_header_dump"]
