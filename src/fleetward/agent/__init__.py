"""Device side of Fleetward: keystore, EST enrollment, renewal (issue 3, part 1).

Depends on ``fleetward.model``, ``fleetward.crypto``, ``fleetward.errors`` and
``fleetward.clock`` only: the agent runs on devices, never next to the server code.
"""

from fleetward.agent.enroll import EnrollOptions, Pkcs11Options, enroll
from fleetward.agent.errors import (
    AgentStateError,
    EnrollmentPending,
    ServerRefused,
    ServerUnreachable,
    TrustBootstrapFailed,
)
from fleetward.agent.est_client import EstClient, parse_fingerprint, select_trusted
from fleetward.agent.keystore import FileKeystore, Keystore, Pkcs11Keystore
from fleetward.agent.renewal import Agent, backoff_delay, open_agent, plan_retry, renewal_time
from fleetward.agent.state import StateLayout
from fleetward.agent.transport import CurlTransport, HttpxTransport, Transport

__all__ = [
    "Agent",
    "AgentStateError",
    "CurlTransport",
    "EnrollOptions",
    "EnrollmentPending",
    "EstClient",
    "FileKeystore",
    "HttpxTransport",
    "Keystore",
    "Pkcs11Keystore",
    "Pkcs11Options",
    "ServerRefused",
    "ServerUnreachable",
    "StateLayout",
    "Transport",
    "TrustBootstrapFailed",
    "backoff_delay",
    "enroll",
    "open_agent",
    "parse_fingerprint",
    "plan_retry",
    "renewal_time",
    "select_trusted",
]
