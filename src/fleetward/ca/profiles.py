"""Certificate profiles: what each kind of certificate may be used for and for how long."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from fleetward.config import CAConfig
from fleetward.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    extended_key_usages: tuple[ObjectIdentifier, ...]
    validity_days: int
    names_a_device: bool  # SAN is the device URI; otherwise DNS/IP names of a server


def profiles_from_config(ca: CAConfig) -> dict[str, Profile]:
    client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    return {
        "device": Profile("device", client, ca.device_validity_days, True),
        # A gateway authenticates as itself; acting for leaf devices comes from policy.
        "gateway": Profile("gateway", client, ca.gateway_validity_days, True),
        "bootstrap": Profile("bootstrap", client, ca.bootstrap_validity_days, True),
        "server": Profile(
            "server", (ExtendedKeyUsageOID.SERVER_AUTH,), ca.server_validity_days, False
        ),
    }


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        raise InvalidInput(
            f"unknown certificate profile {name!r}", hint=f"use one of: {', '.join(profiles)}"
        ) from None
