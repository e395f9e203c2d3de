"""Clients for the MQTT acceptance tests: Debian's mosquitto_pub / mosquitto_sub and
paho-mqtt 2.x, each presenting a device certificate to a real `fleetward serve`.

The ``lab`` policy used throughout lets each device of type ``lab`` act on its own
tree and status topic and read everyone's status::

    mqtt:connect                      ${device.id}
    mqtt:publish/subscribe/receive    devices/${device.id}/#
    mqtt:publish                      status/${device.id}
    mqtt:subscribe/receive            status/+

so "another device's topic" is always a refusal the policy has to make, not an
accident of the default policy.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.conftest import RunningServer
from tests.integration.channel_helpers import DeviceIdentity, make_device

LAB_TYPE = "lab"
LAB_POLICY: dict[str, Any] = {"statements": [
    {"sid": "connect-as-self", "effect": "allow", "actions": ["mqtt:connect"],
     "resources": ["${device.id}"]},
    {"sid": "own-tree", "effect": "allow",
     "actions": ["mqtt:publish", "mqtt:subscribe", "mqtt:receive"],
     "resources": ["devices/${device.id}/#"]},
    {"sid": "own-status", "effect": "allow", "actions": ["mqtt:publish"],
     "resources": ["status/${device.id}"]},
    {"sid": "fleet-status", "effect": "allow", "actions": ["mqtt:subscribe", "mqtt:receive"],
     "resources": ["status/+"]},
]}

TOOL_TIMEOUT_SECONDS = 15.0  # bound on every mosquitto_* subprocess; normal runs take ms
WAIT_SECONDS = 10.0  # bound on waiting for a packet that is expected to come
MQTT5 = "mqttv5"
MQTT311 = "mqttv311"
VERSIONS = (MQTT311, MQTT5)


def setup_lab(server: RunningServer) -> None:
    """Create device type ``lab`` and attach the ``lab`` policy to it (once per server)."""
    with server.admin() as admin:
        created = admin.post("/v1/device-types", json={"name": LAB_TYPE})
        assert created.status_code in (201, 409), created.text
        put = admin.put("/v1/policies/lab", json=LAB_POLICY)
        assert put.status_code in (200, 201), put.text
        attached = admin.post("/v1/policies/lab/attachments", json={"type": LAB_TYPE})
        assert attached.status_code in (200, 201), attached.text


def lab_device(server: RunningServer, directory: Path, device_id: str) -> DeviceIdentity:
    """A registered, active ``lab`` device with its certificate files."""
    return make_device(server, directory, device_id, device_type=LAB_TYPE)


# --- mosquitto_pub / mosquitto_sub ---------------------------------------------------------


def tool_args(server: RunningServer, identity: DeviceIdentity, version: str, *,
              client_cert: bool = True) -> list[str]:
    """Connection options: our CA for the server, the device's certificate and key,
    client id = device id, and debug output (-d) so packets and reason codes show."""
    args = ["-h", "localhost", "-p", str(server.mqtt_port), "-V", version,
            "--cafile", str(identity.cafile), "-i", identity.device_id, "-d"]
    if client_cert:
        args += ["--cert", str(identity.cert), "--key", str(identity.key)]
    return args


def mosquitto_pub(server: RunningServer, identity: DeviceIdentity, version: str,
                  *args: str, client_cert: bool = True) -> subprocess.CompletedProcess[str]:
    """Run mosquitto_pub (bounded by TOOL_TIMEOUT_SECONDS) and return its result."""
    return subprocess.run(
        ["mosquitto_pub", *tool_args(server, identity, version, client_cert=client_cert),
         *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)


@dataclass(frozen=True)
class Received:
    retain: bool
    qos: int
    topic: str
    payload: str


# -F: one line per message; the payload last so that it may contain the separator.
_FORMAT = "MSG|%r|%q|%t|%p"


class MosquittoSub:
    """A mosquitto_sub process whose output is read line by line as it comes.

    With -d the tool prints ``Subscribed (mid: 1): <codes>`` when the SUBACK arrives, so
    a test publishes only once the subscription exists (no sleeps).
    """

    def __init__(self, server: RunningServer, identity: DeviceIdentity, version: str,
                 *args: str) -> None:
        # stdbuf: mosquitto_sub block-buffers stdout into a pipe; we need each line now.
        self.command = ["stdbuf", "-oL", "mosquitto_sub", *tool_args(server, identity, version),
                        "-F", _FORMAT, *args]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_until(self, predicate: Callable[[list[str]], bool],
                   timeout: float = WAIT_SECONDS) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None
                                 and not self._reader.is_alive()):
                    return predicate(self.lines)
                self._changed.wait(min(left, 0.1))
            return True

    def suback(self) -> list[int]:
        """Wait for the SUBACK; its reason codes (granted QoS or refusal)."""
        assert self.wait_until(lambda ls: any(x.startswith("Subscribed (mid:") for x in ls)), (
            f"no SUBACK: {self.output()}")
        line = next(x for x in self.lines if x.startswith("Subscribed (mid:"))
        return [int(code) for code in line.split(":", 2)[2].replace(",", " ").split()]

    @property
    def messages(self) -> list[Received]:
        with self._changed:
            lines = list(self.lines)
        out = []
        for line in lines:
            if line.startswith("MSG|"):
                _, retain, qos, topic, payload = line.split("|", 4)
                out.append(Received(retain == "1", int(qos), topic, payload))
        return out

    def wait_messages(self, count: int, timeout: float = WAIT_SECONDS) -> list[Received]:
        self.wait_until(lambda ls: sum(x.startswith("MSG|") for x in ls) >= count, timeout)
        return self.messages

    def wait_payload(self, payload: str, timeout: float = WAIT_SECONDS) -> list[Received]:
        """Messages up to and including the first with ``payload`` (a marker)."""
        self.wait_until(lambda ls: any(x.startswith("MSG|") and x.endswith(f"|{payload}")
                                       for x in ls), timeout)
        messages = self.messages
        for index, message in enumerate(messages):
            if message.payload == payload:
                return messages[:index + 1]
        raise AssertionError(f"marker {payload!r} never arrived: {self.output()}")

    def wait_exit(self, timeout: float = TOOL_TIMEOUT_SECONDS) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)

    def __enter__(self) -> MosquittoSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- paho-mqtt 2.x -----------------------------------------------------------------------


@dataclass(frozen=True)
class PahoMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class PahoClient:
    """One paho connection (3.1.1 or 5) presenting ``identity``; records CONNACK,
    SUBACK, PUBACK and DISCONNECT reason codes and queues the messages it receives.

    Args:
        persistent: 3.1.1 Clean Session 0 (§3.1.2.4); 5.0 Clean Start 0 with a
            Session Expiry Interval of ``session_expiry_seconds`` (§3.1.2.4, §3.1.2.11.2).
    """

    def __init__(self, server: RunningServer, identity: DeviceIdentity, *, v5: bool,
                 persistent: bool = False, session_expiry_seconds: int = 300,
                 connect: bool = True, client_id: str | None = None) -> None:
        self.v5 = v5
        self.connack = threading.Event()
        self.disconnected = threading.Event()
        self.connack_code: int | None = None
        self.session_present: bool | None = None
        self.disconnect_code: int | None = None
        self.disconnected_at = 0.0  # time.monotonic() of the DISCONNECT or close
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self._acked = threading.Condition()
        self.received: queue.Queue[PahoMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or identity.device_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent,
            reconnect_on_failure=False)
        self.client.tls_set_context(identity.tls_context())
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._server = server
        self._persistent = persistent
        self._expiry = session_expiry_seconds
        if connect:
            self.connect()

    def connect(self) -> None:
        properties = None
        kwargs: dict[str, Any] = {}
        if self.v5:
            kwargs["clean_start"] = not self._persistent
            if self._persistent:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self._expiry
        self.client.connect("localhost", self._server.mqtt_port, keepalive=30,
                            properties=properties, **kwargs)
        self.client.loop_start()

    # paho callbacks (its network thread) ---------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connack_code = reason.value
        self.session_present = bool(flags.session_present)
        self.connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self.disconnect_code = reason.value
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._acked:
            self.acks[mid] = reason.value
            self._acked.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        with self._acked:
            self.subacks[mid] = [r.value for r in reasons]
            self._acked.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received.put(PahoMessage(message.topic, bytes(message.payload), message.qos,
                                      bool(message.retain)))

    # test-facing ------------------------------------------------------------------------

    def wait_connack(self) -> int:
        assert self.connack.wait(WAIT_SECONDS), "no CONNACK"
        assert self.connack_code is not None
        return self.connack_code

    def _wait_ack(self, table: dict[int, Any], mid: int, what: str) -> Any:
        deadline = time.monotonic() + WAIT_SECONDS
        with self._acked:
            while mid not in table:
                left = deadline - time.monotonic()
                assert left > 0, f"no {what} for mid {mid}"
                self._acked.wait(left)
            return table[mid]

    def subscribe(self, topic_filter: str, qos: int) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK; its reason codes."""
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, result
        codes: list[int] = self._wait_ack(self.subacks, mid, "SUBACK")
        return codes

    def publish(self, topic: str, payload: bytes, qos: int) -> int:
        """PUBLISH; for QoS 1 wait for the PUBACK and return its reason code, for QoS 0
        wait until paho has written it."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            info.wait_for_publish(WAIT_SECONDS)
            assert info.is_published(), "QoS 0 PUBLISH not written"
            return 0
        code: int = self._wait_ack(self.acks, info.mid, "PUBACK")
        return code

    def take(self, count: int, timeout: float = WAIT_SECONDS) -> list[PahoMessage]:
        """The next ``count`` messages (fewer if they do not come within ``timeout``)."""
        out: list[PahoMessage] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out.append(self.received.get(timeout=left))
            except queue.Empty:
                break
        return out

    def take_until(self, payload: bytes, timeout: float = WAIT_SECONDS) -> list[PahoMessage]:
        """Messages up to and including the first carrying ``payload`` (a marker)."""
        out: list[PahoMessage] = []
        deadline = time.monotonic() + timeout
        while not out or out[-1].payload != payload:
            left = deadline - time.monotonic()
            try:
                out.append(self.received.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(f"marker {payload!r} never arrived; got {out}") from None
        return out

    def close(self) -> None:
        """A normal DISCONNECT (0x00: the will is discarded, the session kept if it is
        persistent), then stop paho's thread."""
        if self.client.is_connected():
            self.client.disconnect()
            self.disconnected.wait(WAIT_SECONDS)
        self.client.loop_stop()
