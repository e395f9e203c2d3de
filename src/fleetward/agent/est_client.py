"""EST client (RFC 7030) for Fleetward's device listener, over any ``Transport``.

Wire format (RFC 7030 §4, with RFC 8951's clarification that bodies are base64):

- ``GET  /.well-known/est/cacerts``        → certs-only PKCS#7 (issuing CA + root)
- ``POST /.well-known/est[/label]/simpleenroll``   PKCS#10, HTTP Basic device-id:token
- ``POST /.well-known/est[/label]/simplereenroll`` PKCS#10, authenticated by mTLS (or,
  for an expired certificate, by a CSR signed with the same key)

200 carries a certs-only PKCS#7; 202 + Retry-After means "waiting for an operator"
(§4.2.3); errors are RFC 9457 problem details with ``detail`` and ``hint``.

Trust bootstrap (§4.1.1): the first ``cacerts`` is fetched without authenticating the
server; ``select_trusted`` accepts the answer only if a CA in it matches the fingerprint
the operator pinned out of band, and trusts only that CA and the CAs it certifies.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetward.agent.errors import (
    EnrollmentPending,
    ServerRefused,
    ServerUnreachable,
    TrustBootstrapFailed,
)
from fleetward.agent.transport import HttpResponse, Transport
from fleetward.errors import InvalidInput

EST_PREFIX = "/.well-known/est"
PKCS10 = "application/pkcs10"  # RFC 7030 §4.2.1
PKCS7_MIME = "application/pkcs7-mime"  # RFC 7030 §4.1.3, §4.2.3
MAX_PENDING_ATTEMPTS = 30  # 202 answers accepted before giving up (operator approval)
RETRY_AFTER_BOUNDS_SECONDS = (1, 3600)  # a server cannot make us spin, or sleep for days
SHA256_HEX_LENGTH = 64
# A device clock a little behind the CA's must not make a fresh certificate look
# not-yet-valid (RFC 5280 §4.1.2.5 leaves skew handling to the relying party).
CLOCK_SKEW = dt.timedelta(minutes=5)

Sleep = Callable[[float], Any]


# --- fingerprints and the pinned trust anchor ---------------------------------------------


def parse_fingerprint(text: str) -> bytes:
    """SHA-256 fingerprint from hex (any case, colons/spaces allowed, an optional
    ``sha256:`` / ``SHA256 Fingerprint=`` prefix as ``openssl x509 -fingerprint`` prints).

    Raises:
        InvalidInput: not 32 bytes of hex.
    """
    cleaned = text.strip().lower()
    for prefix in ("sha256 fingerprint=", "sha2-256:", "sha256:", "sha256="):
        cleaned = cleaned.removeprefix(prefix)
    cleaned = "".join(cleaned.replace(":", "").split())
    if len(cleaned) != SHA256_HEX_LENGTH or any(c not in "0123456789abcdef" for c in cleaned):
        raise InvalidInput(
            "the CA fingerprint must be a SHA-256 digest: 64 hex digits, colons allowed",
            hint="on the server host: openssl x509 -noout -fingerprint -sha256 "
                 "-in <data dir>/certs/root-ca.pem")
    return bytes.fromhex(cleaned)


def cert_fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def format_fingerprint(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _subjects(certs: Sequence[x509.Certificate]) -> str:
    return "; ".join(c.subject.rfc4514_string() for c in certs) or "none"


def select_trusted(bundle: Sequence[x509.Certificate], pinned: bytes,
                   now: dt.datetime) -> list[x509.Certificate]:
    """The CAs of ``bundle`` to trust: the pinned one and the CAs it (transitively)
    certifies — never a certificate merely sitting next to it in the bundle.

    An attacker in the middle of the unauthenticated first request could add a CA of
    their own to a bundle that also holds the genuine root; the fingerprint would still
    match, so a bare "one of them matches" check would end up trusting the attacker.

    Raises:
        TrustBootstrapFailed: no CA in the bundle has the pinned fingerprint, or it is not
            a CA certificate, or it is not valid now.
    """
    anchor = next((c for c in bundle if hmac.compare_digest(cert_fingerprint(c), pinned)), None)
    if anchor is None:
        raise TrustBootstrapFailed(
            f"none of the server's {len(bundle)} CA certificate(s) has the pinned "
            f"fingerprint {format_fingerprint(pinned)} (it offered: {_subjects(bundle)})",
            hint="nothing was written. Check --ca-fingerprint against the root CA on the "
                 "server host (openssl x509 -noout -fingerprint -sha256 -in "
                 "<data dir>/certs/root-ca.pem); if it is right, something between this "
                 "device and the server is impersonating it")
    if not _is_ca(anchor):
        raise TrustBootstrapFailed("the pinned certificate is not a CA certificate",
                                   hint="pin the root (or issuing) CA, not a server or "
                                        "device certificate")
    if not anchor.not_valid_before_utc <= now < anchor.not_valid_after_utc:
        raise TrustBootstrapFailed(
            f"the pinned CA {anchor.subject.rfc4514_string()} is not valid now "
            f"(valid {anchor.not_valid_before_utc:%Y-%m-%d} to "
            f"{anchor.not_valid_after_utc:%Y-%m-%d})",
            hint="check this device's clock, or pin the server's current CA")
    trusted = [anchor]
    changed = True
    while changed:
        changed = False
        for cert in bundle:
            if cert in trusted or not _is_ca(cert):
                continue
            if any(_issued_by(cert, t) for t in trusted) and (
                    cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
                trusted.append(cert)
                changed = True
    return trusted


def certs_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --- CSR and the issued certificate -------------------------------------------------------


def build_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """PKCS#10 for ``device_id``: subject CN only (the CA adds the SAN URI itself),
    ECDSA with SHA-256. ``key`` may be a token-backed key: the builder calls its sign()."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def check_issued(certs: Sequence[x509.Certificate], *, device_id: str,
                 public_key: ec.EllipticCurvePublicKey,
                 trusted: Sequence[x509.Certificate], now: dt.datetime) -> x509.Certificate:
    """The certificate for ``public_key`` in an EST answer, checked before it is stored.

    Raises:
        ServerUnreachable: the answer holds no certificate for our key, or one that
            names another device, is not valid now, lacks clientAuth, or was not issued
            by a pinned CA (a broken or malicious answer must not replace a good cert).
    """
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ours = public_key.public_bytes(*spki)
    leaf = next((c for c in certs if c.public_key().public_bytes(*spki) == ours), None)
    if leaf is None:
        raise ServerUnreachable("the server's answer holds no certificate for this device's key",
                                hint="this is a server bug or a tampered answer; retry")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != device_id:
        raise ServerUnreachable(f"the issued certificate names {leaf.subject.rfc4514_string()}, "
                                f"not the device {device_id!r}")
    if not leaf.not_valid_before_utc - CLOCK_SKEW <= now < leaf.not_valid_after_utc:
        raise ServerUnreachable(
            f"the issued certificate is not valid now (valid {leaf.not_valid_before_utc} to "
            f"{leaf.not_valid_after_utc})", hint="check this device's clock")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ServerUnreachable("the issued certificate is not valid for TLS client auth")
    if not any(_issued_by(leaf, ca) for ca in trusted):
        raise ServerUnreachable("the issued certificate was not signed by a pinned CA",
                                hint="the server's CA changed or the answer was tampered with")
    return leaf


# --- HTTP ---------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: dt.datetime) -> int:
    """Seconds to wait (RFC 9110 §10.2.3: delay-seconds or an HTTP-date), clamped."""
    low, high = RETRY_AFTER_BOUNDS_SECONDS
    seconds: float = 60
    if value:
        value = value.strip()
        if value.isdigit():
            seconds = int(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is not None:
                seconds = (when - now).total_seconds()
    return int(min(max(seconds, low), high))


def decode_certs_only(response: HttpResponse) -> list[x509.Certificate]:
    """The certificates of a base64 certs-only PKCS#7 body (RFC 7030 §4.1.3, RFC 8951).

    Raises:
        ServerUnreachable: wrong media type, not base64, or not a PKCS#7 bundle.
    """
    content_type = (response.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != PKCS7_MIME:
        raise ServerUnreachable(
            f"expected {PKCS7_MIME} from the server, got {content_type or 'nothing'}",
            hint="is the URL the Fleetward device listener (default port 8443)?")
    try:
        der = base64.b64decode(b"".join(response.body.split()), validate=True)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError) as exc:
        raise ServerUnreachable(f"the server's PKCS#7 answer cannot be parsed: {exc}") from exc
    if not certs:
        raise ServerUnreachable("the server's PKCS#7 answer holds no certificate")
    return list(certs)


def refusal(response: HttpResponse) -> ServerRefused:
    """The server's own explanation of a 4xx/5xx (RFC 9457 problem details if given)."""
    detail = hint = None
    content_type = (response.header("content-type") or "").split(";")[0].strip().lower()
    if content_type in ("application/problem+json", "application/json"):
        try:
            problem = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            problem = None
        if isinstance(problem, dict):
            detail = problem.get("detail") or problem.get("title")
            hint = problem.get("hint")
    if not isinstance(detail, str):
        text = response.body.decode("utf-8", errors="replace")
        detail = " ".join("".join(c for c in text if c.isprintable()).split())[:300]
        detail = detail or "no explanation given"
    return ServerRefused(response.status, detail, hint if isinstance(hint, str) else None)


class EstClient:
    """RFC 7030 operations over one transport; 202 answers are retried after Retry-After."""

    def __init__(self, transport: Transport, *, label: str | None = None,
                 sleep: Sleep = time.sleep, now: Callable[[], dt.datetime] | None = None,
                 max_pending_attempts: int = MAX_PENDING_ATTEMPTS) -> None:
        self.transport = transport
        self._prefix = f"{EST_PREFIX}/{label}" if label else EST_PREFIX
        self._sleep = sleep
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self._max_pending = max_pending_attempts

    def cacerts(self) -> list[x509.Certificate]:
        """``GET /cacerts`` (RFC 7030 §4.1)."""
        response = self.transport.request("GET", f"{self._prefix}/cacerts")
        if response.status != 200:
            raise refusal(response)
        return decode_certs_only(response)

    def simpleenroll(self, csr: x509.CertificateSigningRequest, device_id: str,
                     token: str) -> list[x509.Certificate]:
        """``POST /simpleenroll`` with HTTP Basic device-id:token (RFC 7030 §3.2.3, §4.2.1).

        Raises:
            ServerRefused: the server said no (its detail and hint are kept).
            EnrollmentPending: still waiting for approval after the last attempt.
        """
        if ":" in device_id:
            # RFC 7617 §2: a Basic user-id cannot contain ':'. A device-bound token names
            # its device by itself, so the bearer form (RFC 6750 §2.1) carries it.
            return self._enroll("simpleenroll", csr, {"Authorization": f"Bearer {token}"})
        basic = base64.b64encode(f"{device_id}:{token}".encode()).decode()
        return self._enroll("simpleenroll", csr, {"Authorization": f"Basic {basic}"})

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """``POST /simplereenroll`` (RFC 7030 §4.2.2); the transport carries the identity."""
        return self._enroll("simplereenroll", csr, {})

    def _enroll(self, operation: str, csr: x509.CertificateSigningRequest,
                auth: dict[str, str]) -> list[x509.Certificate]:
        body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
        headers = {"Content-Type": PKCS10, "Content-Transfer-Encoding": "base64", **auth}
        for _attempt in range(self._max_pending):
            response = self.transport.request("POST", f"{self._prefix}/{operation}",
                                              body=body, headers=headers)
            if response.status == 200:
                return decode_certs_only(response)
            if response.status != 202:
                raise refusal(response)
            # RFC 7030 §4.2.3: accepted but not yet issued; send the same request again.
            self._sleep(parse_retry_after(response.header("retry-after"), self._now()))
        raise EnrollmentPending(
            f"the server still holds the request for approval after {self._max_pending} "
            "attempts")


__all__ = ["EstClient", "build_csr", "cert_fingerprint", "certs_to_pem", "check_issued",
           "decode_certs_only", "format_fingerprint", "parse_fingerprint", "parse_retry_after",
           "refusal", "select_trusted"]
