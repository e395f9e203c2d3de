"""CRL building (RFC 5280 §5)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetward.ca.reasons import REASONS
from fleetward.crypto.signer import Signer, signature_hash


def build_crl(
    issuer: x509.Certificate,
    signer: Signer,
    entries: list[tuple[int, dt.datetime, str]],
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> bytes:
    """Sign a complete CRL for ``issuer`` and return it DER-encoded.

    The revoked list goes to the builder in one piece: chaining
    ``add_revoked_certificate`` copies the list each time (quadratic at 100k entries).
    """
    revoked = []
    for serial, at, reason in entries:
        builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at)
        # RFC 5280 §5.3.1: the reasonCode SHOULD be absent rather than "unspecified".
        if reason != "unspecified":
            builder = builder.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
        revoked.append(builder.build())
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    crl_builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update,
        next_update=next_update,
        revoked_certificates=revoked,
        extensions=[
            # RFC 5280 §5.2.1 and §5.2.3: both MUST be present in a conforming CRL.
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid,
                False,
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            ),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
        ],
    )
    crl = crl_builder.sign(signer.private_key, signature_hash(signer.public_key()))
    return crl.public_bytes(serialization.Encoding.DER)
