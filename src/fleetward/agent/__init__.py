"""Device side of Fleetward: keystore, EST enrollment, renewal (issue 3), and the
secure channel: MQTT/HTTPS sessions, telemetry sources, command handlers and the ``run``
supervisor (issue 4).

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
from fleetward.agent.keystore import FileKeystore, Keystore, Pkcs11Keystore
from fleetward.agent.mqtt_client import MqttSession, MqttSettings
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
from fleetward.agent.transport import CurlTransport, HttpxTransport, Transport

__all__ = [
    "EXIT_REFUSED",
    "Agent",
    "AgentStateError",
    "ChannelRefused",
    "Command",
    "CommandResult",
    "CommandRunner",
    "CurlTransport",
    "EnrollOptions",
    "EnrollmentPending",
    "EstClient",
    "FileKeystore",
    "HttpsSession",
    "HttpxTransport",
    "Keystore",
    "LineSource",
    "MqttSession",
    "MqttSettings",
    "OfflineBuffer",
    "Outbound",
    "Outcome",
    "Pkcs11Keystore",
    "Pkcs11Options",
    "Record",
    "RunOptions",
    "RunStats",
    "ScriptSource",
    "ServerRefused",
    "ServerUnreachable",
    "Session",
    "SimulatedSensor",
    "Source",
    "StateLayout",
    "Transport",
    "TrustBootstrapFailed",
    "backoff_delay",
    "enroll",
    "make_source",
    "open_agent",
    "parse_command",
    "parse_fingerprint",
    "plan_retry",
    "renewal_time",
    "run_agent",
    "select_trusted",
]
