"""The issuance pipeline: validators → modifiers → enforcers, in that fixed order.

Modelled on smallstep's ``signX509``: validators look only at the request and refuse
what is malformed or not allowed; modifiers build the certificate template from the
registry and the profile (never from the CSR); enforcers check the finished template
against invariants no modifier may break. Any failure refuses the whole request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, NameOID

from fleetward.ca.profiles import Profile
from fleetward.errors import InvalidInput, PolicyViolation
from fleetward.model import Device, device_uri

ALLOWED_CURVES = {"secp256r1", "secp384r1"}
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # beyond this signing cost becomes a denial-of-service lever

# Extensions a CSR may *request* (they are ignored: the profile decides). Anything else
# is refused, so that a request can never smuggle in an option we do not understand.
_TOLERATED_REQUEST_EXTENSIONS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
}


@dataclass(frozen=True, slots=True)
class IssueRequest:
    public_key: CertificatePublicKeyTypes
    profile: Profile
    device: Device | None = None  # the registry's record: the only source of the name
    server_names: tuple[str, ...] = ()  # DNS names / IPs for the server profile
    csr: x509.CertificateSigningRequest | None = None


@dataclass(frozen=True, slots=True)
class IssuerContext:
    ca_name: str
    certificate: x509.Certificate
    public_url: str  # base for CDP / AIA
    backdate: dt.timedelta
    now: dt.datetime


@dataclass(frozen=True, slots=True)
class Template:
    subject: x509.Name
    not_before: dt.datetime
    not_after: dt.datetime
    extensions: tuple[x509.Extension[x509.ExtensionType], ...] = field(default=())

    def with_extension(self, value: x509.ExtensionType, *, critical: bool) -> Template:
        ext = x509.Extension(value.oid, critical, value)
        return replace(self, extensions=(*self.extensions, ext))

    def extension(self, oid: x509.ObjectIdentifier) -> x509.ExtensionType | None:
        for ext in self.extensions:
            if ext.oid == oid:
                return ext.value
        return None


Validator = Callable[[IssueRequest], None]
Modifier = Callable[[IssueRequest, IssuerContext, Template], Template]
Enforcer = Callable[[IssueRequest, IssuerContext, Template], None]


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER PKCS#10 request (RFC 2986) and decode every part issuance reads.

    Raises:
        InvalidInput: the bytes are not a CSR, or its subject, key or extensions are
            malformed.
        PolicyViolation: the key uses an algorithm or curve that cannot be handled.
    """
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise InvalidInput(
            f"malformed certificate signing request: {exc}",
            hint="send a PKCS#10 CSR in PEM or DER, e.g. from `openssl req -new`",
        ) from None
    decode_csr(csr)
    return csr


def decode_csr(csr: x509.CertificateSigningRequest) -> None:
    """Decode the lazily parsed parts of ``csr`` (subject, key, extensions) now.

    cryptography decodes these on first access, so without this a malformed extension,
    a duplicated extension (RFC 5280 §4.2) or an unsupported curve such as SM2 would
    surface as a bare ValueError / UnsupportedAlgorithm deep inside issuance: a 500
    instead of a refusal, and no refusal in the audit log.

    Raises:
        InvalidInput: a part is malformed.
        PolicyViolation: the key algorithm or curve is not supported at all.
    """
    hint = "send a PKCS#10 CSR in PEM or DER, e.g. from `openssl req -new`"
    try:
        _ = csr.subject
    except ValueError as exc:
        raise InvalidInput(f"the CSR subject is malformed: {exc}", hint=hint) from None
    try:
        csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise PolicyViolation(
            f"the CSR key type is not supported: {exc}",
            hint="use an ECDSA P-256 key (recommended), P-384 or RSA ≥ 2048",
        ) from None
    except ValueError as exc:
        raise InvalidInput(f"the CSR public key is malformed: {exc}", hint=hint) from None
    try:
        _ = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise InvalidInput(
            f"the CSR extensions are malformed: {exc}",
            hint="request each extension at most once, DER-encoded; or request none",
        ) from None


# --- validators: the request alone --------------------------------------------------


def validate_csr_decodes(request: IssueRequest) -> None:
    # Callers that built the CSR object themselves did not go through parse_csr.
    if request.csr is not None:
        decode_csr(request.csr)


def validate_csr_signature(request: IssueRequest) -> None:
    # RFC 2986 §3: the signature proves possession of the private key.
    if request.csr is None:
        return
    try:
        valid = request.csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise InvalidInput(
            "the CSR signature does not verify",
            hint="the CSR must be signed by the private key whose public key it carries",
        )


def validate_key_type(request: IssueRequest) -> None:
    key = request.public_key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ALLOWED_CURVES:
            return
        raise PolicyViolation(
            f"EC curve {key.curve.name} is not allowed", hint="use P-256 (recommended) or P-384"
        )
    if isinstance(key, rsa.RSAPublicKey):
        if MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            return
        raise PolicyViolation(
            f"RSA key of {key.key_size} bits is not allowed",
            hint=f"use P-256, or RSA of {MIN_RSA_BITS}-{MAX_RSA_BITS} bits",
        )
    raise PolicyViolation(
        f"key type {type(key).__name__.removeprefix('_')} is not allowed",
        hint="use an ECDSA P-256 key (recommended), P-384 or RSA ≥ 2048",
    )


def validate_requested_extensions(request: IssueRequest) -> None:
    if request.csr is None:
        return
    for ext in request.csr.extensions:
        if ext.oid not in _TOLERATED_REQUEST_EXTENSIONS:
            raise PolicyViolation(
                f"the CSR requests extension {ext.oid.dotted_string} which is not allowed",
                hint="remove requested extensions; the certificate profile sets them",
            )
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise PolicyViolation(
                "the CSR asks for CA rights (basicConstraints cA=TRUE)",
                hint="device certificates can never be CA certificates",
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise PolicyViolation(
                "the CSR asks for certificate or CRL signing key usage",
                hint="device certificates can never sign certificates",
            )


def validate_requested_names(request: IssueRequest) -> None:
    """The CSR may name the device it is for, or nothing; never anything else."""
    if request.csr is None or request.device is None:
        return
    device_id = request.device.id
    for attr in request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if attr.value != device_id:
            raise PolicyViolation(
                f"the CSR subject names {attr.value!r}, not device {device_id!r}",
                hint="leave the subject empty or set CN to the device id",
            )
    try:
        san = request.csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    expected = x509.UniformResourceIdentifier(device_uri(device_id))
    for name in san:
        if name != expected:
            raise PolicyViolation(
                f"the CSR asks for the name {name.value!r}, which is not this device's",
                hint=f"omit the SAN or request exactly {expected.value}",
            )


VALIDATORS: tuple[Validator, ...] = (
    validate_csr_decodes,
    validate_csr_signature,
    validate_key_type,
    validate_requested_extensions,
    validate_requested_names,
)


# --- modifiers: build the template from registry + profile ---------------------------


def set_subject_and_names(request: IssueRequest, ctx: IssuerContext, t: Template) -> Template:
    if request.profile.names_a_device:
        if request.device is None:
            raise InvalidInput(f"profile {request.profile.name} needs a device")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.device.id)])
        san: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(device_uri(request.device.id))
        ]
    else:
        if not request.server_names:
            raise InvalidInput("a server certificate needs at least one host name")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.server_names[0])])
        san = [_server_name(n) for n in request.server_names]
    t = replace(t, subject=subject)
    # RFC 5280 §4.2.1.6: SAN is non-critical when the subject is not empty.
    return t.with_extension(x509.SubjectAlternativeName(san), critical=False)


def set_validity(request: IssueRequest, ctx: IssuerContext, t: Template) -> Template:
    not_before = ctx.now - ctx.backdate
    not_after = ctx.now + dt.timedelta(days=request.profile.validity_days)
    # Never outlive the issuer (RFC 5280 §6.1.3 would reject the chain at that point).
    not_after = min(not_after, ctx.certificate.not_valid_after_utc)
    return replace(t, not_before=not_before, not_after=not_after)


def set_usage_extensions(request: IssueRequest, ctx: IssuerContext, t: Template) -> Template:
    rsa_key = isinstance(request.public_key, rsa.RSAPublicKey)
    t = t.with_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    t = t.with_extension(
        x509.KeyUsage(
            digital_signature=True,
            # RSA key transport in TLS 1.2 needs keyEncipherment (RFC 5246 §7.4.2).
            key_encipherment=rsa_key,
            content_commitment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    return t.with_extension(
        x509.ExtendedKeyUsage(list(request.profile.extended_key_usages)), critical=False
    )


def set_key_identifiers(request: IssueRequest, ctx: IssuerContext, t: Template) -> Template:
    t = t.with_extension(
        x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False
    )
    issuer_ski = ctx.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return t.with_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
        critical=False,
    )


def revocation_pointers(
    public_url: str, ca_name: str
) -> tuple[x509.CRLDistributionPoints, x509.AuthorityInformationAccess]:
    """CDP and AIA for a certificate issued by ``ca_name`` (RFC 5280 §4.2.1.13, §4.2.2.1)."""
    base = public_url.rstrip("/")
    cdp = x509.CRLDistributionPoints([
        x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(f"{base}/crl/{ca_name}.crl")],
            relative_name=None, reasons=None, crl_issuer=None,
        )
    ])
    aia = x509.AuthorityInformationAccess([
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                               x509.UniformResourceIdentifier(f"{base}/ocsp")),
        x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                               x509.UniformResourceIdentifier(f"{base}/ca/{ca_name}.der")),
    ])
    return cdp, aia


def set_revocation_pointers(request: IssueRequest, ctx: IssuerContext, t: Template) -> Template:
    cdp, aia = revocation_pointers(ctx.public_url, ctx.ca_name)
    return t.with_extension(cdp, critical=False).with_extension(aia, critical=False)


MODIFIERS: tuple[Modifier, ...] = (
    set_subject_and_names,
    set_validity,
    set_usage_extensions,
    set_key_identifiers,
    set_revocation_pointers,
)


# --- enforcers: invariants of the finished template ------------------------------------


def enforce_not_ca(request: IssueRequest, ctx: IssuerContext, t: Template) -> None:
    bc = t.extension(ExtensionOID.BASIC_CONSTRAINTS)
    if not isinstance(bc, x509.BasicConstraints) or bc.ca:
        raise PolicyViolation("refusing to issue a CA certificate through the device pipeline")


def enforce_validity(request: IssueRequest, ctx: IssuerContext, t: Template) -> None:
    if not t.not_before < t.not_after:
        raise PolicyViolation(
            "the issuing CA expires before the certificate could become valid",
            hint="renew the issuing CA",
        )


def enforce_device_name(request: IssueRequest, ctx: IssuerContext, t: Template) -> None:
    if not request.profile.names_a_device or request.device is None:
        return
    san = t.extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    expected = [x509.UniformResourceIdentifier(device_uri(request.device.id))]
    if not isinstance(san, x509.SubjectAlternativeName) or list(san) != expected:
        raise PolicyViolation("the certificate would not name exactly its device")


def enforce_unique_extensions(request: IssueRequest, ctx: IssuerContext, t: Template) -> None:
    oids = [e.oid for e in t.extensions]
    if len(oids) != len(set(oids)):
        raise PolicyViolation("the template repeats an extension (RFC 5280 §4.2)")


ENFORCERS: tuple[Enforcer, ...] = (
    enforce_not_ca,
    enforce_validity,
    enforce_device_name,
    enforce_unique_extensions,
)


def run_pipeline(
    request: IssueRequest,
    ctx: IssuerContext,
    validators: Sequence[Validator] = VALIDATORS,
    modifiers: Sequence[Modifier] = MODIFIERS,
    enforcers: Sequence[Enforcer] = ENFORCERS,
) -> Template:
    """Run every phase in order; the first refusal aborts issuance."""
    for validate in validators:
        validate(request)
    template = Template(subject=x509.Name([]), not_before=ctx.now, not_after=ctx.now)
    for modify in modifiers:
        template = modify(request, ctx, template)
    for enforce in enforcers:
        enforce(request, ctx, template)
    return template


def _server_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
