"""Small X.509 helpers shared by the CA, OCSP and CLI."""

from __future__ import annotations

import hashlib
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

SERIAL_BITS = 128  # CA/B Forum BR §7.1 asks for ≥ 64 bits of CSPRNG output; we use 128


def random_serial() -> int:
    """A positive 128-bit serial from the OS CSPRNG (RFC 5280 §4.1.2.2: ≤ 20 octets)."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def spki_sha256(key: CertificatePublicKeyTypes) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo: names a key whatever certificate carries it."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def public_key_bits(key: CertificatePublicKeyTypes) -> bytes:
    """The subjectPublicKey BIT STRING contents (what RFC 6960 §4.1.1 issuerKeyHash hashes)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def issuer_hashes(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of ``cert`` as an issuer, for an OCSP CertID."""
    name = cert.subject.public_bytes()
    key = public_key_bits(cert.public_key())
    return _digest(algorithm, name), _digest(algorithm, key)


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(algorithm.name, data).digest()


def load_certificate(data: bytes) -> x509.Certificate:
    """PEM or DER."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
