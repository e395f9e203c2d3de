"""Creating, importing and loading CAs: the two-tier hierarchy and trusted OEM CAs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection

from fleetward.audit import AuditLog
from fleetward.ca.authority import Authority, CAHandle, require_signer
from fleetward.ca.pipeline import IssueRequest, revocation_pointers
from fleetward.ca.profiles import profiles_from_config
from fleetward.crypto.signer import Signer, generate_private_key, signature_hash
from fleetward.crypto.x509util import fingerprint_sha256, random_serial, to_pem
from fleetward.errors import InvalidInput, NotFound, PolicyViolation
from fleetward.model import AuditEvent, CertificateRecord
from fleetward.store import cas as ca_rows
from fleetward.store import certificates as cert_rows
from fleetward.store import devices as device_rows
from fleetward.store.cas import CARow

CA_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
ROOT_NAME = "root"
ISSUING_NAME = "issuing"


def _ca_name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    # digitalSignature: the CA signs its own OCSP responses (RFC 6960 §4.2.2.2).
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root_certificate(
    signer: Signer, organization: str, validity_days: int, now: dt.datetime
) -> x509.Certificate:
    name = _ca_name(f"{organization} Root CA", organization)
    public_key = signer.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(signer.private_key, signature_hash(public_key))
    )


def build_issuing_certificate(
    root: CAHandle,
    public_key: CertificateIssuerPublicKeyTypes,
    organization: str,
    validity_days: int,
    now: dt.datetime,
    public_url: str,
    serial: int,
) -> x509.Certificate:
    root_signer = require_signer(root)
    cdp, aia = revocation_pointers(public_url, root.name)
    root_ski = root.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    not_after = min(now + dt.timedelta(days=validity_days), root.certificate.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_ca_name(f"{organization} Issuing CA", organization))
        .issuer_name(root.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        # pathLen 0: the issuing CA signs end entities only (RFC 5280 §4.2.1.9).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski.value),
            critical=False,
        )
        .add_extension(cdp, critical=False)
        .add_extension(aia, critical=False)
        .sign(root_signer.private_key, signature_hash(root_signer.public_key()))
    )


def _row(
    name: str,
    kind: str,
    cert: x509.Certificate,
    key_ref: Mapping[str, str] | None,
    now: dt.datetime,
    *,
    parent: str | None = None,
    device_type: str | None = None,
    imported: bool = False,
) -> CARow:
    return CARow(
        name=name,
        kind=kind,
        parent_name=parent,
        subject=cert.subject.rfc4514_string(),
        cert_pem=to_pem(cert),
        fingerprint_sha256=fingerprint_sha256(cert),
        key_ref=dict(key_ref) if key_ref else None,
        device_type=device_type,
        imported=imported,
        created_at=now,
        crl_number=0,
        crl_der=None,
        crl_this_update=None,
        crl_next_update=None,
    )


def create_hierarchy(
    conn: Connection,
    *,
    root_signer: Signer,
    issuing_signer: Signer,
    organization: str,
    root_validity_days: int,
    issuing_validity_days: int,
    public_url: str,
    now: dt.datetime,
    audit: AuditLog,
) -> tuple[CAHandle, CAHandle]:
    """Create the root and issuing CAs; the issuing CA certificate is stored as issued by root."""
    root_cert = build_root_certificate(root_signer, organization, root_validity_days, now)
    ca_rows.insert_ca(conn, _row(ROOT_NAME, "root", root_cert, root_signer.key_ref, now))
    root = CAHandle(ROOT_NAME, "root", root_cert, root_signer)
    audit.append(
        conn,
        AuditEvent(
            action="ca.created",
            actor="system",
            target=f"ca:{ROOT_NAME}",
            details={
                "subject": root_cert.subject.rfc4514_string(),
                "fingerprint_sha256": fingerprint_sha256(root_cert),
                "key_backend": root_signer.key_ref["backend"],
            },
        ),
    )
    serial = random_serial()
    issuing_cert = build_issuing_certificate(
        root,
        issuing_signer.public_key(),
        organization,
        issuing_validity_days,
        now,
        public_url,
        serial,
    )
    ca_rows.insert_ca(
        conn,
        _row(ISSUING_NAME, "issuing", issuing_cert, issuing_signer.key_ref, now, parent=ROOT_NAME),
    )
    _store_ca_certificate(conn, ROOT_NAME, issuing_cert, now)
    audit.append(
        conn,
        AuditEvent(
            action="ca.created",
            actor="system",
            target=f"ca:{ISSUING_NAME}",
            details={
                "subject": issuing_cert.subject.rfc4514_string(),
                "fingerprint_sha256": fingerprint_sha256(issuing_cert),
                "serial": format(serial, "x"),
                "key_backend": issuing_signer.key_ref["backend"],
            },
        ),
    )
    return root, CAHandle(ISSUING_NAME, "issuing", issuing_cert, issuing_signer)


def import_hierarchy(
    conn: Connection,
    *,
    issuing_cert: x509.Certificate,
    issuing_signer: Signer,
    root_cert: x509.Certificate,
    now: dt.datetime,
    audit: AuditLog,
) -> tuple[CAHandle, CAHandle]:
    """Adopt an existing issuing CA (certificate + key) and its root (certificate only).

    Raises:
        InvalidInput: the key does not match, the certificate is not a CA, or the root
            did not sign it.
    """
    _require_ca_certificate(issuing_cert, "issuing CA")
    _require_ca_certificate(root_cert, "root CA")
    if issuing_cert.public_key() != issuing_signer.public_key():
        raise InvalidInput(
            "the imported key does not belong to the issuing CA certificate",
            hint="pass the key file that matches --ca-cert",
        )
    try:
        issuing_cert.verify_directly_issued_by(root_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidInput(
            f"the root certificate did not sign the issuing CA: {exc}",
            hint="pass the issuing CA's parent as --root-cert",
        ) from None
    try:
        issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise InvalidInput(
            "imported CA certificates must carry a subjectKeyIdentifier",
            hint="RFC 5280 §4.2.1.2 requires it for CA certificates",
        ) from None
    # The root's key stays wherever it is: we hold only its certificate.
    ca_rows.insert_ca(conn, _row(ROOT_NAME, "root", root_cert, None, now, imported=True))
    ca_rows.insert_ca(
        conn,
        _row(
            ISSUING_NAME,
            "issuing",
            issuing_cert,
            issuing_signer.key_ref,
            now,
            parent=ROOT_NAME,
            imported=True,
        ),
    )
    for name, cert in ((ROOT_NAME, root_cert), (ISSUING_NAME, issuing_cert)):
        audit.append(
            conn,
            AuditEvent(
                action="ca.imported",
                actor="system",
                target=f"ca:{name}",
                details={
                    "subject": cert.subject.rfc4514_string(),
                    "fingerprint_sha256": fingerprint_sha256(cert),
                },
            ),
        )
    return (
        CAHandle(ROOT_NAME, "root", root_cert, None),
        CAHandle(ISSUING_NAME, "issuing", issuing_cert, issuing_signer),
    )


def register_oem_ca(
    conn: Connection,
    *,
    name: str,
    cert_pem: bytes,
    device_type: str,
    actor: str,
    now: dt.datetime,
    audit: AuditLog,
    enrollment_approval: bool = False,
) -> CARow:
    """Trust a manufacturer CA whose device certificates (IDevIDs) enrollment will accept.

    Raises:
        InvalidInput: not a PEM CA certificate, or expired.
        NotFound: the device type does not exist.
        Conflict: the name or certificate is already registered.
    """
    if not CA_NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"invalid CA name {name!r}",
                           hint="1-64 characters: lower-case letters, digits, _ and - "
                           "(it appears in URLs such as /ca/<name>.pem)")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidInput(
            "the OEM CA certificate is not valid PEM",
            hint="pass the manufacturer's CA certificate in PEM",
        ) from None
    _require_ca_certificate(cert, "OEM CA")
    if device_rows.get_type(conn, device_type) is None:
        raise NotFound(f"device type {device_type!r} does not exist",
                       hint=f"create it first: fleetward type add {device_type}")
    if cert.not_valid_after_utc <= now:
        raise InvalidInput(
            "the OEM CA certificate has expired", hint="ask the OEM for a current one"
        )
    row = replace(_row(name, "oem", cert, None, now, device_type=device_type),
                  enrollment_approval=enrollment_approval)
    ca_rows.insert_ca(conn, row)
    audit.append(
        conn,
        AuditEvent(
            action="ca.oem_registered",
            actor=actor,
            target=f"ca:{name}",
            details={
                "subject": row.subject,
                "fingerprint_sha256": row.fingerprint_sha256,
                "device_type": device_type,
                "enrollment_approval": enrollment_approval,
            },
        ),
    )
    return row


def load_handles(
    conn: Connection, open_signer: Callable[[Mapping[str, Any]], Signer | None]
) -> dict[str, CAHandle]:
    """Every stored CA, with a signer where ``open_signer`` can open its key."""
    handles = {}
    for row in ca_rows.list_cas(conn):
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
        signer = open_signer(row.key_ref) if row.key_ref and row.kind != "oem" else None
        handles[row.name] = CAHandle(row.name, row.kind, cert, signer)
    return handles


# --- the TLS server certificate ------------------------------------------------------

# Every server certificate names these, so that CLI commands and agents on the server
# host reach the listeners by "localhost" whatever address they bind.
SERVER_BASE_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _normal_name(name: str) -> str:
    """IP addresses in their canonical text form ("0:0::1" is "::1"); DNS names as given."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def check_server_names(hostnames: Sequence[str]) -> None:
    """Refuse names that would only fail later, half-way through issuing.

    Raises:
        InvalidInput: a name is neither an IP address nor an ASCII DNS name.
    """
    for name in hostnames:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not _DNS_NAME.fullmatch(name):
                raise InvalidInput(
                    f"--hostname {name!r} is neither an IP address nor a DNS name",
                    hint="use an ASCII host name (IDNA-encode international names) or an IP",
                ) from None


def server_names(hostnames: Sequence[str]) -> tuple[str, ...]:
    """The SAN list of a server certificate: the base names, then ``hostnames``, once each."""
    return tuple(dict.fromkeys([*SERVER_BASE_NAMES, *(_normal_name(n) for n in hostnames)]))


def extra_server_names(cert: x509.Certificate) -> list[str]:
    """The names of a server certificate beyond ``SERVER_BASE_NAMES``, in SAN order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(value) for general in san
             if isinstance(general, x509.DNSName | x509.IPAddress)
             for value in (general.value,)]
    return [name for name in dict.fromkeys(names) if name not in SERVER_BASE_NAMES]


def issue_server_certificate(
    conn: Connection, authority: Authority, hostnames: Sequence[str], actor: str
) -> tuple[CertificateRecord, ec.EllipticCurvePrivateKey]:
    """Issue a TLS server certificate with a new P-256 key for ``server_names(hostnames)``.

    The key is returned, not stored: the caller writes it once the transaction commits.

    Raises:
        InvalidInput: a host name is not valid.
    """
    check_server_names(hostnames)
    key = generate_private_key()
    record = authority.issue(conn, IssueRequest(
        public_key=key.public_key(), profile=profiles_from_config(authority.config)["server"],
        server_names=server_names(hostnames)), actor)
    return record, key


def _require_ca_certificate(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PolicyViolation(
            f"the {what} certificate is not a CA certificate",
            hint="it must carry basicConstraints cA=TRUE",
        )


def _store_ca_certificate(
    conn: Connection, issuer_name: str, cert: x509.Certificate, now: dt.datetime
) -> None:
    """Keep a sub-CA certificate with the issued ones so its issuer can revoke it."""
    cert_rows.insert_certificate(
        conn,
        CertificateRecord(
            serial=cert.serial_number,
            fingerprint_sha256=fingerprint_sha256(cert),
            ca_name=issuer_name,
            profile="ca",
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            issued_at=now,
        ),
    )
