"""Shared access signatures in Azure IoT Hub's format, for devices that hold only a
symmetric key::

    SharedAccessSignature sr=<URL-encoded resource>&sig=<URL-encoded base64 HMAC>&se=<expiry>

``sig`` is base64(HMAC-SHA256(key, "<sr as sent>\\n<se>")) — the resource is signed in
the URL-encoded form it is sent in, as Azure's SDKs do — with the device's primary or
secondary key. The resource must name the device (``<host>/devices/<device id>``); the
host part is not compared (TLS already checked which server the device reached). An
optional ``skn`` (a hub-level policy name in Azure) is refused: Fleetward has no
shared policy keys, only per-device keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "SharedAccessSignature "
MAX_SAS_CHARS = 2048
FIELDS = frozenset({"sr", "sig", "se", "skn"})


class SasRefused(Exception):
    """Why a SAS token is not accepted; ``reason`` is safe to send back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SharedAccessSignature:
    encoded_resource: str  # sr exactly as sent (what was signed)
    resource: str  # sr decoded
    signature: bytes
    expiry: int

    @property
    def string_to_sign(self) -> bytes:
        return f"{self.encoded_resource}\n{self.expiry}".encode()

    def __repr__(self) -> str:  # never the signature
        return f"SharedAccessSignature(resource={self.resource!r}, expiry={self.expiry})"


def is_sas(text: str) -> bool:
    return text.startswith(PREFIX)


def parse_sas(text: str) -> SharedAccessSignature:
    """Parse ``SharedAccessSignature sr=…&sig=…&se=…``.

    Raises:
        SasRefused: not that shape (names the part that is wrong, never the signature).
    """
    if not text.startswith(PREFIX) or len(text) > MAX_SAS_CHARS:
        raise SasRefused("not a SAS token ('SharedAccessSignature sr=…&sig=…&se=…')")
    fields: dict[str, str] = {}
    for part in text[len(PREFIX):].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name not in FIELDS or name in fields:
            raise SasRefused("a SAS token has the fields sr, sig and se, each once")
        fields[name] = value
    if "skn" in fields:
        raise SasRefused("shared access policies (skn) do not exist here; sign with the "
                         "device's own key")
    if set(fields) != {"sr", "sig", "se"}:
        raise SasRefused("a SAS token needs sr, sig and se")
    expiry = fields["se"]
    if not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12:
        raise SasRefused("se must be the expiry in whole seconds since the epoch")
    try:
        signature = base64.b64decode(urllib.parse.unquote(fields["sig"]), validate=True)
    except (binascii.Error, ValueError):
        raise SasRefused("sig is not base64") from None
    if len(signature) != hashlib.sha256().digest_size:
        raise SasRefused("sig is not an HMAC-SHA256")
    return SharedAccessSignature(fields["sr"], urllib.parse.unquote(fields["sr"]),
                                 signature, int(expiry))


def sign_sas(resource: str, key: bytes, expiry: int) -> str:
    """A SAS token for ``resource`` (e.g. ``host/devices/d1``) valid until ``expiry``,
    in the form Azure's SDKs produce (the agent uses this)."""
    encoded = urllib.parse.quote(resource, safe="")
    digest = hmac.new(key, f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode("ascii"), safe="")
    return f"{PREFIX}sr={encoded}&sig={signature}&se={expiry}"


def check_sas(sas: SharedAccessSignature, device_id: str,
              keys: Sequence[tuple[str, bytes, int]], *, now: float,
              max_validity_seconds: int) -> str:
    """Which key slot signed ``sas`` for ``device_id``.

    Args:
        keys: (slot, key, version) of each of the device's keys.

    Raises:
        SasRefused: another device's resource, expired, valid for too long, or signed
            by none of the keys.
    """
    resource = sas.resource.rstrip("/")
    if not resource.endswith(f"/devices/{device_id}") and resource != f"devices/{device_id}":
        raise SasRefused(f"the SAS token is for another resource; it must be "
                         f"<host>/devices/{device_id}")
    if sas.expiry <= now:
        raise SasRefused("the SAS token has expired (se is in the past)")
    if sas.expiry > now + max_validity_seconds:
        raise SasRefused(f"the SAS token is valid for more than {max_validity_seconds} s; "
                         "make shorter-lived tokens")
    message = sas.string_to_sign
    matched = None
    for slot, key, _version in keys:
        expected = hmac.new(key, message, hashlib.sha256).digest()
        # Every slot is compared (constant time, no early exit on a match), so timing
        # tells nothing about which key or how much of a signature was right.
        if hmac.compare_digest(expected, sas.signature) and matched is None:
            matched = slot
    if matched is None:
        raise SasRefused("the SAS signature does not match the device's keys")
    return matched
