"""Device side of Fleetward: keystore, EST enrollment, renewal (issue 3), the secure
channel: MQTT/HTTPS sessions, telemetry sources, command handlers and the ``run``
supervisor (issue 4), and credentials besides the certificate: access tokens (bound to
the certificate or, with DPoP, to the device key) and SAS tokens, set up by ``init``
(issue 11).

Depends on ``fleetward.model``, ``fleetward.crypto``, ``fleetward.errors`` and
``fleetward.clock`` only: the agent runs on devices, never next to the server code.
"""

from fleetward.agent.commands import Command, CommandResult, CommandRunner, parse_command
from fleetward.agent.connect import ChannelRefused, Outbound, Outcome, Session
from fleetward.agent.enroll import EnrollOptions, Pkcs11Options, enroll
from fleetward.agent.errors import (
    AgentStateError,
    EnrollmentPending,
    ServerRefused,
    ServerUnreachable,
    TrustBootstrapFailed,
)
from fleetward.agent.est_client import EstClient, parse_fingerprint, select_trusted
from fleetward.agent.https_client import HttpsSession
from fleetward.agent.keystore import FileKeystore, Keystore, NoKeystore, Pkcs11Keystore
from fleetward.agent.mqtt_auth import AuthClient
from fleetward.agent.mqtt_client import MqttSession, MqttSettings
from fleetward.agent.provision import InitOptions, InitResult, init_device
from fleetward.agent.renewal import Agent, backoff_delay, open_agent, plan_retry, renewal_time
from fleetward.agent.run import EXIT_REFUSED, RunOptions, RunStats, run_agent
from fleetward.agent.state import StateLayout
from fleetward.agent.telemetry import (
    LineSource,
    OfflineBuffer,
    Record,
    ScriptSource,
    SimulatedSensor,
    Source,
    make_source,
)
from fleetward.agent.tokens import (
    AccessToken,
    Credentials,
    SasProvider,
    TokenEndpointRefused,
    TokenProvider,
    make_credentials,
)
from fleetward.agent.transport import CurlTransport, HttpxTransport, Transport

__all__ = [
    "EXIT_REFUSED",
    "AccessToken",
    "Agent",
    "AgentStateError",
    "AuthClient",
    "ChannelRefused",
    "Command",
    "CommandResult",
    "CommandRunner",
    "Credentials",
    "CurlTransport",
    "EnrollOptions",
    "EnrollmentPending",
    "EstClient",
    "FileKeystore",
    "HttpsSession",
    "HttpxTransport",
    "InitOptions",
    "InitResult",
    "Keystore",
    "LineSource",
    "MqttSession",
    "MqttSettings",
    "NoKeystore",
    "OfflineBuffer",
    "Outbound",
    "Outcome",
    "Pkcs11Keystore",
    "Pkcs11Options",
    "Record",
    "RunOptions",
    "RunStats",
    "SasProvider",
    "ScriptSource",
    "ServerRefused",
    "ServerUnreachable",
    "Session",
    "SimulatedSensor",
    "Source",
    "StateLayout",
    "TokenEndpointRefused",
    "TokenProvider",
    "Transport",
    "TrustBootstrapFailed",
    "backoff_delay",
    "enroll",
    "init_device",
    "make_credentials",
    "make_source",
    "open_agent",
    "parse_command",
    "parse_fingerprint",
    "plan_retry",
    "renewal_time",
    "run_agent",
    "select_trusted",
]
