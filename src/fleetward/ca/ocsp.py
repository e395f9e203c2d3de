"""OCSP responder (RFC 6960), signed directly by the CA that issued the certificate.

The CA signs its own responses (RFC 6960 §4.2.2.2 case 1), so clients need nothing but
the issuer certificate to verify them. Nonces are echoed (RFC 8954 §2.1, at most 32
octets; a longer one is refused as malformed).
"""

from __future__ import annotations

import datetime as dt

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import Connection

from fleetward.ca.authority import Authority, CAHandle
from fleetward.ca.reasons import REASONS
from fleetward.crypto.signer import signature_hash
from fleetward.crypto.x509util import issuer_hashes
from fleetward.store import certificates as cert_rows

log = structlog.get_logger("fleetward.ocsp")

MAX_REQUEST_BYTES = 16 * 1024  # bytes; a single-certificate request is ~100 bytes
MAX_NONCE_BYTES = 32  # RFC 8954 §2.1


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


class OcspResponder:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    def respond(self, conn: Connection, request_der: bytes) -> bytes:
        """Answer one DER OCSP request with a DER OCSP response (never raises on bad input)."""
        if len(request_der) > MAX_REQUEST_BYTES:
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            nonce = _nonce(request)
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        # RFC 8954 §2.1: a nonce of 1..32 octets; anything else is a malformed request.
        if nonce is not None and not 1 <= len(nonce) <= MAX_NONCE_BYTES:
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        handle = self._find_issuer(request)
        if handle is None or handle.signer is None:
            # RFC 6960 §2.3: "unauthorized" when we are not a responder for that CA.
            return unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        now = self._authority.clock.now()
        next_update = now + dt.timedelta(hours=self._authority.config.ocsp_validity_hours)
        record = cert_rows.get_certificate(conn, request.serial_number)
        revocation_time: dt.datetime | None = None
        reason: x509.ReasonFlags | None = None
        if record is None or record.ca_name != handle.name:
            status = ocsp.OCSPCertStatus.UNKNOWN
        elif record.revoked_at is not None:
            status = ocsp.OCSPCertStatus.REVOKED
            revocation_time = record.revoked_at
            reason_name = record.revocation_reason or "unspecified"
            reason = None if reason_name == "unspecified" else REASONS[reason_name]
        else:
            status = ocsp.OCSPCertStatus.GOOD
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=request.issuer_name_hash,
                issuer_key_hash=request.issuer_key_hash,
                serial_number=request.serial_number,
                algorithm=request.hash_algorithm,
                cert_status=status,
                this_update=now,
                next_update=next_update,
                revocation_time=revocation_time,
                revocation_reason=reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, handle.certificate)
        )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = builder.sign(
            handle.signer.private_key, signature_hash(handle.signer.public_key())
        )
        log.info(
            "ocsp",
            ca=handle.name,
            serial=format(request.serial_number, "x"),
            status=status.name.lower(),
        )
        return response.public_bytes(serialization.Encoding.DER)

    def _find_issuer(self, request: ocsp.OCSPRequest) -> CAHandle | None:
        algorithm = request.hash_algorithm
        if not isinstance(algorithm, hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            return None
        for handle in self._authority.own_cas():
            name_hash, key_hash = issuer_hashes(handle.certificate, algorithm)
            if name_hash == request.issuer_name_hash and key_hash == request.issuer_key_hash:
                return handle
        return None


def _nonce(request: ocsp.OCSPRequest) -> bytes | None:
    try:
        return request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None
