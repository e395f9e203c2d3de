"""The one TLS configuration every Fleetward listener uses.

TLS 1.2 and 1.3 only; on 1.2 only ECDHE key exchange with AEAD ciphers (RFC 9325 §4.2);
renegotiation and compression off (RFC 9325 §3.5, §3.3).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

# ECDHE + AEAD only for TLS 1.2; TLS 1.3 suites are fixed by OpenSSL and all AEAD.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
])


def server_context(cert_file: Path, key_file: Path, password: bytes | None = None,
                   *, client_ca_file: Path | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert_file), str(key_file), password=password)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate of this connection, if the client sent one.

    OpenSSL has verified its chain to a CA in the listener's trust store (ours or a
    registered OEM CA) and its validity period, nothing more: revocation and the
    device's lifecycle state are NOT checked here, so a route that grants anything must
    check both.
    """
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def peer_certificate_der(transport: Any) -> bytes | None:
    """The client certificate (DER) of a TLS transport, asyncio's or uvloop's (duck-typed:
    uvloop's is no ``asyncio.Transport``), or None."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    getpeercert = getattr(ssl_object, "getpeercert", None)
    if getpeercert is None:
        return None
    der = getpeercert(binary_form=True)
    return bytes(der) if der else None
