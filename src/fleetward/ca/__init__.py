"""The certificate authority: issuance pipeline, profiles, revocation, CRL and OCSP."""

from fleetward.ca.authority import Authority, CAHandle
from fleetward.ca.ocsp import OcspResponder
from fleetward.ca.pipeline import IssueRequest, parse_csr
from fleetward.ca.profiles import Profile, get_profile, profiles_from_config
from fleetward.ca.reasons import REASONS, parse_reason

__all__ = [
    "REASONS",
    "Authority",
    "CAHandle",
    "IssueRequest",
    "OcspResponder",
    "Profile",
    "get_profile",
    "parse_csr",
    "parse_reason",
    "profiles_from_config",
]
