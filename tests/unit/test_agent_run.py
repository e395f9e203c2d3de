"""The ``fleetward-agent run`` supervisor, command handlers and backoff, without a network.

Sessions here are scripted stand-ins for the server's side of a connection (the real
MQTT and HTTPS sessions are exercised against Mosquitto and a TLS server in
tests/integration/test_agent_channel.py).

Threats:
- a refused device (revoked, banned) that reconnects in a tight loop, flooding the
  server and its audit log — or that gives up for good after one transient failure;
- a fleet reconnecting in lock-step after an outage (no jitter);
- telemetry lost while the server is away, resent out of order, or buffered without
  bound; a poison record that blocks every record behind it;
- a command that runs twice because its delivery was repeated (QoS 1 redelivery), a
  command id that smuggles a topic level or path segment into the result's address,
  a handler that hangs or sees the bootstrap token;
- a renewed certificate that is not used until the next restart (the server revokes
  the superseded one and the device drops off the network).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from fleetward.agent.commands import (
    FAILED,
    SUCCEEDED,
    BadCommand,
    Command,
    CommandRunner,
    parse_command,
)
from fleetward.agent.connect import (
    ChannelRefused,
    Outbound,
    Outcome,
    tls_alert_refusal,
)
from fleetward.agent.errors import ServerUnreachable
from fleetward.agent.renewal import (
    MIN_RETRY_SECONDS,
    Agent,
    RenewOutcome,
    install_certificate,
)
from fleetward.agent.run import (
    EXIT_OK,
    EXIT_REFUSED,
    RunOptions,
    RunStats,
    Supervisor,
    pick_channel,
    reconnect_delay,
    refusal_delay,
    run_agent,
)
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    dump_config,
    load_config,
    save_config,
    validate_mqtt_url,
)
from fleetward.agent.telemetry import Record
from fleetward.clock import FrozenClock
from fleetward.errors import InvalidInput
from tests.unit.test_agent_est_client import NOW, Pki
from tests.unit.test_agent_state import enrolled_file_state

FAST = {"reconnect_base_seconds": 0.01, "reconnect_cap_seconds": 0.05,
        "refusal_min_seconds": 0.05, "refusal_cap_seconds": 0.1}


# --- backoff ------------------------------------------------------------------------------


def test_reconnect_delays_stay_under_a_doubling_ceiling_and_above_the_floor() -> None:
    options = RunOptions()
    rng = random.Random(11)
    for failures in range(1, 16):
        ceiling = min(options.reconnect_cap_seconds,
                      options.reconnect_base_seconds * 2 ** (failures - 1))
        draws = [reconnect_delay(failures, rng, options) for _ in range(200)]
        assert all(MIN_RETRY_SECONDS <= d <= max(ceiling, MIN_RETRY_SECONDS) for d in draws)
    # the cap is reached and held (five minutes), not exceeded
    assert max(reconnect_delay(40, rng, options) for _ in range(500)) > 250


def test_a_fleet_does_not_reconnect_in_lock_step() -> None:
    """Full jitter: 100 devices after their 8th failure spread over [0, 128 s]."""
    options = RunOptions()
    delays = [reconnect_delay(8, random.Random(seed), options) for seed in range(100)]
    assert statistics.pstdev(delays) > 20
    assert len({round(d) for d in delays}) > 50


def test_a_refusal_waits_at_least_a_minute_and_at_most_an_hour() -> None:
    options = RunOptions()
    rng = random.Random(5)
    refusals = [refusal_delay(n, rng, options) for n in range(1, 30) for _ in range(50)]
    assert min(refusals) >= options.refusal_min_seconds == 60
    assert max(refusals) <= options.refusal_cap_seconds == 3600
    # negative control: an ordinary first reconnect is far quicker than a refusal
    firsts = [reconnect_delay(1, rng, options) for _ in range(200)]
    assert statistics.median(refusals) > 30 * statistics.median(firsts)


# --- options and channel choice --------------------------------------------------------------


@pytest.mark.parametrize(("requested", "keystore", "expected"), [
    (None, "file", "mqtt"),
    (None, "pkcs11", "https"),  # paho cannot use a token key
    ("https", "file", "https"),
    ("https", "pkcs11", "https"),
    ("mqtt", "file", "mqtt"),
])
def test_channel_choice(requested: str | None, keystore: str, expected: str) -> None:
    assert pick_channel(requested, keystore) == expected


def test_mqtt_with_a_token_key_fails_with_a_hint_to_use_https() -> None:
    with pytest.raises(InvalidInput) as caught:
        pick_channel("mqtt", "pkcs11")
    assert "PKCS#11" in caught.value.message
    assert "--https" in caught.value.hint


@pytest.mark.parametrize(("changes", "match"), [
    ({"channel": "coap"}, "unknown channel"),
    ({"qos": 2}, "QoS 2"),
    ({"count": 0}, "--count"),
    ({"buffer_max_records": 0}, "--buffer-size"),
    ({"interval_seconds": 0}, "interval"),
    ({"message_type": "a/b"}, "invalid message type"),
    ({"renew_fraction": 1.0}, "between 0 and 1"),
    ({"reconnect_base_seconds": 10, "reconnect_cap_seconds": 1}, "backoff"),
])
def test_run_options_refuse_nonsense(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        RunOptions(**changes)


# --- mqtt_url in agent.toml ------------------------------------------------------------------


def test_the_mqtt_url_is_kept_in_agent_toml_and_defaults_to_the_server_host(
        tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    config = AgentConfig(server_url="https://fw.example:8443", device_id="d",
                         keystore=KeystoreConfig(kind="file", passphrase_file="/p"))
    assert config.effective_mqtt_url() == "mqtts://fw.example:8883"
    assert b"mqtt_url" not in dump_config(config)  # unchanged file for part-1 states
    save_config(layout, AgentConfig(server_url=config.server_url, device_id="d",
                                    keystore=config.keystore,
                                    mqtt_url="mqtts://broker.example:9883"))
    assert load_config(layout).effective_mqtt_url() == "mqtts://broker.example:9883"
    v6 = AgentConfig(server_url="https://[::1]:8443", device_id="d", keystore=config.keystore)
    assert v6.effective_mqtt_url() == "mqtts://[::1]:8883"


@pytest.mark.parametrize("url", [
    "mqtt://h:1883",  # plain text: the certificate would be the only thing not protected
    "tcp://h", "https://h", "mqtts://", "mqtts://u:p@h", "mqtts://h/x", "mqtts://h?q=1",
    "mqtts://h:0", "mqtts://h:99999"])
def test_bad_mqtt_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        validate_mqtt_url(url)


# --- commands: parsing -----------------------------------------------------------------------


def test_a_command_parses_with_its_times() -> None:
    command = parse_command(json.dumps({
        "id": "c1", "name": "ping", "payload": {"a": 1},
        "created_at": "2026-06-01T12:00:00Z", "expires_at": "2026-06-01T13:00:00+00:00",
    }).encode())
    assert command == Command("c1", "ping", {"a": 1}, NOW, NOW + dt.timedelta(hours=1))


@pytest.mark.parametrize(("raw", "threat"), [
    ({"id": "a/b", "name": "ping"}, "a second topic level in command-results/<id>"),
    ({"id": "+", "name": "ping"}, "a wildcard in a PUBLISH topic"),
    ({"id": "#", "name": "ping"}, "a wildcard in a PUBLISH topic"),
    ({"id": "../../devices/other/result", "name": "ping"}, "path traversal"),
    ({"id": "", "name": "ping"}, "empty"),
    ({"id": "x" * 65, "name": "ping"}, "too long"),
    ({"id": 7, "name": "ping"}, "not a string"),
    ({"name": "ping"}, "missing"),
])
def test_commands_whose_id_cannot_address_a_result_are_not_answered(
        raw: dict[str, Any], threat: str) -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(json.dumps(raw).encode())
    assert caught.value.command_id is None


@pytest.mark.parametrize("raw", [
    {"id": "c1", "name": "a/b"},
    {"id": "c1", "name": ""},
    {"id": "c1"},
    {"id": "c1", "name": "ping", "expires_at": "tomorrow"},
    {"id": "c1", "name": "ping", "expires_at": "2026-06-01T12:00:00"},  # no zone
])
def test_a_malformed_command_with_a_usable_id_is_answered_failed(raw: dict[str, Any]) -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(json.dumps(raw).encode())
    assert caught.value.command_id == "c1"


@pytest.mark.parametrize("data", [b"", b"[]", b"null", b"{", b"\xff", b"x" * 70000])
def test_garbage_is_not_a_command(data: bytes) -> None:
    with pytest.raises(BadCommand):
        parse_command(data)


# --- commands: handlers ----------------------------------------------------------------------


@dataclass
class Interval:
    seconds: float = 10.0
    calls: list[float] = field(default_factory=list)

    def set(self, seconds: float) -> float:
        self.calls.append(seconds)
        self.seconds = seconds
        return seconds


def runner(tmp_path: Path | None = None, handler: str | None = None,
           interval: Interval | None = None, timeout: float = 10.0) -> CommandRunner:
    path = None
    if handler is not None and tmp_path is not None:
        path = tmp_path / "handler.sh"
        path.write_text("#!/bin/sh\n" + handler + "\n")
        path.chmod(0o755)
    return CommandRunner(device_id="dev-1", set_interval=(interval or Interval()).set,
                         handler=path, handler_timeout_seconds=timeout,
                         clock=FrozenClock(NOW))


def cmd(name: str, payload: Any = None, cid: str = "c1", **times: dt.datetime) -> Command:
    return Command(cid, name, {} if payload is None else payload, times.get("created_at"),
                   times.get("expires_at"))


def test_ping_answers_pong() -> None:
    result = runner().answer(cmd("ping"))
    assert (result.status, result.result) == (SUCCEEDED, {"pong": True})


def test_set_interval_changes_the_interval() -> None:
    interval = Interval()
    result = runner(interval=interval).answer(cmd("set-interval", {"seconds": 2.5}))
    assert (result.status, result.result) == (SUCCEEDED, {"interval_seconds": 2.5})
    assert interval.calls == [2.5]


@pytest.mark.parametrize("payload", [
    {}, {"seconds": "5"}, {"seconds": 0}, {"seconds": -3}, {"seconds": 10 ** 9},
    {"seconds": True}, [5], "5", None])
def test_set_interval_with_a_bad_payload_fails_and_changes_nothing(payload: Any) -> None:
    interval = Interval()
    result = runner(interval=interval).answer(
        Command("c1", "set-interval", payload))
    assert result.status == FAILED
    assert interval.calls == []


def test_an_unknown_command_fails_without_a_handler() -> None:
    result = runner().answer(cmd("format-disk"))
    assert (result.status, result.result) == (FAILED, {"error": "unknown command"})


def test_the_handler_gets_the_command_json_on_stdin(tmp_path: Path) -> None:
    result = runner(tmp_path, "cat").answer(cmd("collect-logs", {"lines": 10}))
    assert result.status == SUCCEEDED
    assert result.result == {"id": "c1", "name": "collect-logs", "payload": {"lines": 10},
                             "created_at": None, "expires_at": None}


def test_builtins_are_not_passed_to_the_handler(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = runner(tmp_path, f"touch {marker}; echo '{{}}'").answer(cmd("ping"))
    assert result.result == {"pong": True}
    assert not marker.exists()


@pytest.mark.parametrize(("script", "status", "result"), [
    ("echo '{\"rotated\": 3}'", SUCCEEDED, {"rotated": 3}),
    ("true", SUCCEEDED, {}),  # no output: an empty result
    ("echo '{\"why\": \"disk full\"}'; exit 2", FAILED,
     {"error": "handler exited with status 2", "exit_status": 2,
      "output": {"why": "disk full"}}),
    ("echo oops; exit 1", FAILED, {"error": "handler exited with status 1", "exit_status": 1}),
    ("echo not-json", FAILED, None),
    ("echo '[1,2]'", FAILED, None),
])
def test_handler_exit_status_and_output_decide_the_result(
        tmp_path: Path, script: str, status: str, result: dict[str, Any] | None) -> None:
    answer = runner(tmp_path, script).answer(cmd("custom"))
    assert answer.status == status
    if result is not None:
        assert answer.result == result
    else:
        assert "not" in answer.result["error"]


def test_a_hung_handler_is_killed_and_reported(tmp_path: Path) -> None:
    started = time.monotonic()
    answer = runner(tmp_path, "sleep 30", timeout=0.5).answer(cmd("slow"))
    assert answer.status == FAILED
    assert "timed out" in answer.result["error"]
    assert time.monotonic() - started < 10


def test_the_handler_never_sees_the_bootstrap_token(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETWARD_BOOTSTRAP_TOKEN", "fwb_secret.value")
    script = ('printf \'{"id":"%s","device":"%s","token":"%s"}\' "$FLEETWARD_COMMAND_ID" '
              '"$FLEETWARD_DEVICE_ID" "$FLEETWARD_BOOTSTRAP_TOKEN"')
    answer = runner(tmp_path, script).answer(cmd("env"))
    assert answer.result == {"id": "c1", "device": "dev-1", "token": ""}


def test_an_expired_command_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    run = runner(tmp_path, f"touch {marker}")
    answer = run.answer(cmd("custom", expires_at=NOW - dt.timedelta(seconds=1)))
    assert (answer.status, answer.result["error"]) == (FAILED, "command expired")
    assert not marker.exists()
    # negative control: the same command before its expiry runs
    run.answer(cmd("custom", cid="c2", expires_at=NOW + dt.timedelta(minutes=1)))
    assert marker.exists()


def test_a_repeated_command_is_answered_from_memory_not_run_again(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    run = runner(tmp_path, f"echo x >> {counter}; echo '{{\"n\": 1}}'")
    first = run.answer(cmd("custom", cid="same"))
    second = run.answer(cmd("custom", cid="same"))
    assert first == second
    assert counter.read_text().count("x") == 1
    run.answer(cmd("custom", cid="other"))
    assert counter.read_text().count("x") == 2
    assert run.executed == 2


def test_a_command_handler_that_is_not_executable_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(InvalidInput, match="not executable"):
        CommandRunner(device_id="d", set_interval=Interval().set, handler=path)


# --- TLS alert classification ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "refused"), [
    ("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked", True),
    ("failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert "
     "certificate required", True),
    ("OpenSSL SSL_read: error:0A000418:SSL routines::tlsv1 alert unknown ca", True),
    ("SSLV3_ALERT_BAD_CERTIFICATE", True),
    # network trouble is not a refusal of the identity
    ("[Errno 111] Connection refused", False),
    ("EOF occurred in violation of protocol", False),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", False),
])
def test_tls_alerts_against_our_certificate_count_as_refusals(text: str, refused: bool) -> None:
    assert tls_alert_refusal(text) is refused


# --- the supervisor, with scripted sessions --------------------------------------------------


class ListSource:
    paced = False

    def __init__(self, records: Sequence[Record], gate: threading.Event | None = None) -> None:
        self._records = list(records)
        self._gate = gate

    def read(self) -> Record | None:
        if not self._records:
            return None
        if self._gate is not None:
            self._gate.wait(10)
        return self._records.pop(0)


def readings(n: int) -> list[Record]:
    return [Record("telemetry", "reading", {"seq": i}) for i in range(1, n + 1)]


class ScriptedSession:
    """The server side of one session: delivers, rejects or loses messages as told."""

    channel = "scripted"

    def __init__(self, server: ScriptedServer, serial: int | None) -> None:
        self.server = server
        self.serial = serial
        self._lost = False
        self.refusal_value: ChannelRefused | None = None
        self.closed = False

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def refusal(self) -> ChannelRefused | None:
        return self.refusal_value

    def drop(self, refusal: ChannelRefused | None = None) -> None:
        self.refusal_value = refusal
        self._lost = True

    def send(self, messages: Sequence[Outbound], timeout_seconds: float) -> list[Outcome]:
        outcomes = []
        for message in messages:
            if self._lost:
                outcomes.append(Outcome.UNSENT)
                continue
            outcome = self.server.judge(self, message)
            if outcome is Outcome.DELIVERED:
                self.server.received.append(message)
            outcomes.append(outcome)
        return outcomes

    def close(self) -> None:
        self.closed = True
        self._lost = True


class ScriptedServer:
    def __init__(self) -> None:
        self.received: list[Outbound] = []
        self.sessions: list[ScriptedSession] = []
        self.attempts = 0
        self.refuse_open: ChannelRefused | None = None
        self.down_until: Callable[[Supervisor], bool] = lambda sup: False
        self.judge_hook: Callable[[ScriptedSession, Outbound], Outcome | None] = (
            lambda s, m: None)
        self.on_open: Callable[[ScriptedSession, Supervisor], None] = lambda s, sup: None

    def open(self, sup: Supervisor) -> ScriptedSession:
        self.attempts += 1
        if self.refuse_open is not None:
            raise self.refuse_open
        if self.down_until(sup):
            raise ServerUnreachable("connection refused (scripted)")
        session = ScriptedSession(self, int(sup.agent.certificate().serial_number))
        self.sessions.append(session)
        self.on_open(session, sup)
        return session

    def judge(self, session: ScriptedSession, message: Outbound) -> Outcome:
        return self.judge_hook(session, message) or Outcome.DELIVERED

    def seqs(self) -> list[int]:
        return [m.body["seq"] for m in self.received if m.kind == "telemetry"]


@dataclass
class Run:
    layout: StateLayout
    pki: Pki
    server: ScriptedServer
    stop: threading.Event
    waits: list[float] = field(default_factory=list)

    def go(self, source: Any = None, *, wait: Callable[[float], Any] | None = None,
           timeout: float = 20, **options: Any) -> RunStats:
        settings = {"renew": False, **FAST, **options}
        result: list[RunStats] = []

        def default_wait(seconds: float) -> None:
            self.waits.append(seconds)
            self.stop.wait(seconds)

        thread = threading.Thread(target=lambda: result.append(run_agent(
            self.layout, RunOptions(**settings), self.stop, source=source,
            clock=FrozenClock(NOW), rng=random.Random(3), wait=wait or default_wait,
            open_session=self.server.open)), daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self.stop.set()
            thread.join(10)
            raise AssertionError(f"run_agent did not finish within {timeout} s")
        return result[0]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    pki = Pki.create()
    layout, _ = enrolled_file_state(tmp_path / "state", pki)
    return Run(layout, pki, ScriptedServer(), threading.Event())


def test_records_are_sent_in_order_and_a_count_ends_the_run(run: Run) -> None:
    stats = run.go(ListSource(readings(45)), count=45)
    assert run.server.seqs() == list(range(1, 46))
    assert (stats.exit_code, stats.exit_reason, stats.delivered) == (EXIT_OK, "finished", 45)
    assert stats.connections == 1


def test_while_the_server_is_away_records_wait_and_the_oldest_are_dropped(run: Run) -> None:
    # The source starts once the agent has failed to connect, and the server stays
    # unreachable until the source has produced all ten records.
    gate = threading.Event()

    def down(sup: Supervisor) -> bool:
        gate.set()
        return not sup.source_done.is_set()

    run.server.down_until = down
    stats = run.go(ListSource(readings(10), gate), buffer_max_records=4)
    assert run.server.seqs() == [7, 8, 9, 10]  # the newest survive
    assert (stats.dropped, stats.delivered, stats.produced) == (6, 4, 10)
    assert run.waits, "no backoff while the server was away"


def test_messages_lost_with_a_connection_are_resent_in_order_on_the_next(run: Run) -> None:
    def judge(session: ScriptedSession, message: Outbound) -> Outcome | None:
        if len(run.server.sessions) == 1 and message.body["seq"] == 5:
            session.drop()  # the connection breaks under record 5
            return Outcome.UNSENT
        return None

    run.server.judge_hook = judge
    stats = run.go(ListSource(readings(30)))
    assert run.server.seqs() == list(range(1, 31))
    assert stats.connections == 2
    assert len(run.waits) == 1  # one backoff between the two sessions


def test_a_rejected_record_is_not_resent_and_does_not_block_the_rest(run: Run) -> None:
    run.server.judge_hook = lambda s, m: (Outcome.REJECTED if m.body.get("seq") == 2
                                          else None)
    stats = run.go(ListSource(readings(5)))
    assert run.server.seqs() == [1, 3, 4, 5]
    assert (stats.rejected, stats.delivered, stats.connections) == (1, 4, 1)


@pytest.mark.parametrize("code", [0x86, 0x87, 0x8A, 0x98])
def test_exit_on_refusal_exits_after_one_attempt(run: Run, code: int) -> None:
    run.server.refuse_open = ChannelRefused("refused (scripted)", code=code, reason="revoked")
    with structlog.testing.capture_logs() as logs:
        stats = run.go(ListSource(readings(3)), exit_on_refusal=True)
    assert (stats.exit_code, stats.exit_reason) == (EXIT_REFUSED, "refused")
    assert run.server.attempts == 1
    assert stats.connections == 0
    refused = [e for e in logs if "refuses this device" in e["event"]]
    assert refused and refused[0]["reason"] == "revoked"


def test_without_exit_on_refusal_a_refused_device_waits_long_not_hammering(run: Run) -> None:
    run.server.refuse_open = ChannelRefused("refused (scripted)", code=0x8A)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            run.stop.set()

    stats = run.go(ListSource(readings(3)), wait=wait,
                   refusal_min_seconds=60, refusal_cap_seconds=3600)
    assert run.server.attempts == 3
    assert all(w >= 60 for w in waits), waits
    assert stats.refusals == 3 and stats.exit_code == EXIT_OK


def test_a_server_that_ends_a_live_session_with_0x98_is_a_refusal(run: Run) -> None:
    run.server.on_open = lambda session, sup: session.drop(
        ChannelRefused("DISCONNECT 0x98", code=0x98, reason="certificate revoked"))
    stats = run.go(ListSource(readings(3)), exit_on_refusal=True)
    assert stats.exit_code == EXIT_REFUSED
    assert stats.connections == 1


def test_transient_failures_back_off_with_growing_jittered_delays(run: Run) -> None:
    run.server.down_until = lambda sup: True
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 12:
            run.stop.set()

    run.go(ListSource(readings(1)), wait=wait, reconnect_base_seconds=1,
           reconnect_cap_seconds=300)
    assert len(waits) == 12
    for failures, delay in enumerate(waits, start=1):
        assert MIN_RETRY_SECONDS <= delay <= max(1.0, min(300.0, 2.0 ** (failures - 1)))
    assert max(waits[6:]) > 8  # it does grow


def test_commands_are_answered_on_the_session_and_repeats_run_once(run: Run,
                                                                   tmp_path: Path) -> None:
    counter = tmp_path / "count"
    handler = tmp_path / "handler.sh"
    handler.write_text(f"#!/bin/sh\necho x >> {counter}\necho '{{\"ok\": true}}'\n")
    handler.chmod(0o755)

    def deliver(session: ScriptedSession, sup: Supervisor) -> None:
        sup.accept_command(Command("c1", "ping", {}))
        sup.accept_command(Command("c2", "reboot-app", {}))
        sup.accept_command(Command("c2", "reboot-app", {}))  # QoS 1 redelivery
        sup.accept_command(Command("c3", "set-interval", {"seconds": 1}))
        sup.accept_command(BadCommand("bad name", command_id="c4"))
        sup.accept_command(BadCommand("unreadable"))  # no id: nothing to answer

    run.server.on_open = deliver
    seen = threading.Event()

    def judge(session: ScriptedSession, message: Outbound) -> Outcome | None:
        results = [m for m in run.server.received if m.kind == "result"]
        if len(results) >= 4 and message.kind == "result":
            seen.set()
        return None

    run.server.judge_hook = judge

    def stop_when_answered() -> None:
        seen.wait(15)
        time.sleep(0.3)
        run.stop.set()

    threading.Thread(target=stop_when_answered, daemon=True).start()
    stats = run.go(None, command_handler=handler)
    results = {(m.name, json.dumps(m.body, sort_keys=True))
               for m in run.server.received if m.kind == "result"}
    assert results == {
        ("c1", json.dumps({"status": "succeeded", "result": {"pong": True}}, sort_keys=True)),
        ("c2", json.dumps({"status": "succeeded", "result": {"ok": True}}, sort_keys=True)),
        ("c3", json.dumps({"status": "succeeded", "result": {"interval_seconds": 1.0}},
                          sort_keys=True)),
        ("c4", json.dumps({"status": "failed", "result": {"error": "bad name"}},
                          sort_keys=True))}
    assert [m.name for m in run.server.received].count("c2") == 2  # both answered …
    assert counter.read_text().count("x") == 1  # … but run once
    assert stats.commands == 5


def test_results_are_not_lost_when_the_session_drops(run: Run) -> None:
    """A result that could not be sent waits for the next session (never dropped with the
    connection), and goes before buffered telemetry."""
    def on_open(session: ScriptedSession, sup: Supervisor) -> None:
        if len(run.server.sessions) == 1:
            sup.accept_command(Command("c1", "ping", {}))

    def judge(session: ScriptedSession, message: Outbound) -> Outcome | None:
        if message.kind == "result" and len(run.server.sessions) == 1:
            session.drop()
            return Outcome.UNSENT
        return None

    run.server.on_open = on_open
    run.server.judge_hook = judge
    gate = threading.Event()
    source = ListSource(readings(3), gate)

    def release() -> None:
        # records only after the second session is up: the result must go first
        while len(run.server.sessions) < 2:
            time.sleep(0.01)
        gate.set()

    threading.Thread(target=release, daemon=True).start()
    run.go(source)
    kinds = [(m.kind, m.name) for m in run.server.received]
    assert kinds[0] == ("result", "c1")
    assert [m.body["seq"] for m in run.server.received[1:]] == [1, 2, 3]


def test_a_renewal_makes_the_agent_reconnect_with_the_new_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = Pki.create()
    # renewal point (2/3 of the lifetime) already passed: renew at once
    layout, keystore = enrolled_file_state(
        tmp_path / "state", pki, not_before=NOW - dt.timedelta(days=80),
        not_after=NOW + dt.timedelta(days=10))
    server = ScriptedServer()
    stop = threading.Event()
    renewed_serials: list[int] = []

    first_open = threading.Event()

    def fake_renew(agent: Agent, *, force: bool = False,
                   fraction: float = 0.5) -> RenewOutcome:
        # What Agent.renew does after a successful EST exchange (the EST exchange itself
        # is covered in test_agent_renewal / tests/integration/test_agent.py). It renews
        # while the first session is up.
        first_open.wait(10)
        key = keystore.create_pending()
        cert = pki.leaf(key.public_key(), "dev-1")
        install_certificate(layout, keystore, cert, rotated=True)
        renewed_serials.append(cert.serial_number)
        return RenewOutcome(True, "new-key", cert, NOW + dt.timedelta(days=60))

    def on_open(session: ScriptedSession, sup: Supervisor) -> None:
        if len(server.sessions) == 1:
            first_open.set()
        else:
            stop.set()

    server.on_open = on_open
    monkeypatch.setattr(Agent, "renew", fake_renew)
    stats = run_agent(layout, RunOptions(renew=True, **FAST), stop, source=None,
                      clock=FrozenClock(NOW), rng=random.Random(1), open_session=server.open)
    assert stats.renewals == 1
    assert len(server.sessions) == 2
    first, second = server.sessions
    assert first.closed, "the session of the old certificate was not closed"
    assert second.serial == renewed_serials[0] != first.serial
    assert stats.backoffs == []  # reconnected at once, not after a backoff


def test_0x98_for_the_certificate_just_replaced_is_not_a_refusal(tmp_path: Path) -> None:
    """The server revokes a superseded certificate and ends its session with 0x98; the
    agent must reconnect with the new one, not sit out a refusal backoff."""
    pki = Pki.create()
    layout, keystore = enrolled_file_state(tmp_path / "state", pki)
    server = ScriptedServer()
    stop = threading.Event()

    def on_open(session: ScriptedSession, sup: Supervisor) -> None:
        if len(server.sessions) == 1:
            key = keystore.create_pending()
            install_certificate(layout, keystore, pki.leaf(key.public_key(), "dev-1"),
                                rotated=True)  # e.g. `fleetward-agent renew` meanwhile
            session.drop(ChannelRefused("0x98", code=0x98, reason="superseded"))
        else:
            stop.set()

    server.on_open = on_open
    stats = run_agent(layout, RunOptions(renew=False, exit_on_refusal=True, **FAST), stop,
                      clock=FrozenClock(NOW), rng=random.Random(1), open_session=server.open)
    assert stats.exit_code == EXIT_OK
    assert stats.refusals == 0 and len(server.sessions) == 2
    # negative control: the same 0x98 with an unchanged certificate is a refusal
    server2 = ScriptedServer()
    server2.on_open = lambda session, sup: session.drop(
        ChannelRefused("0x98", code=0x98, reason="revoked"))
    stats2 = run_agent(layout, RunOptions(renew=False, exit_on_refusal=True, **FAST),
                       threading.Event(), clock=FrozenClock(NOW), rng=random.Random(1),
                       open_session=server2.open)
    assert stats2.exit_code == EXIT_REFUSED


def test_mqtt_with_a_pkcs11_state_fails_before_connecting(tmp_path: Path) -> None:
    pki = Pki.create()
    layout, _ = enrolled_file_state(tmp_path / "state", pki)
    config = load_config(layout)
    # Only the keystore kind matters for the check, made before any token is opened.
    save_config(layout, AgentConfig(
        server_url=config.server_url, device_id=config.device_id,
        keystore=KeystoreConfig(kind="pkcs11", module="/usr/lib/softhsm/libsofthsm2.so",
                                token_label="t", pin_file=str(tmp_path / "pin"),
                                key_label="k")))
    server = ScriptedServer()
    with pytest.raises(InvalidInput) as caught:
        run_agent(layout, RunOptions(channel="mqtt"), threading.Event(),
                  open_session=server.open)
    assert "--https" in caught.value.hint
    assert server.attempts == 0


def test_a_bug_in_a_session_loses_nothing_and_does_not_end_the_run(run: Run) -> None:
    def judge(session: ScriptedSession, message: Outbound) -> Outcome | None:
        if len(run.server.sessions) == 1:
            raise RuntimeError("library surprise")
        return None

    run.server.judge_hook = judge
    stats = run.go(ListSource(readings(5)))
    assert run.server.seqs() == [1, 2, 3, 4, 5]
    assert stats.connections == 2 and stats.exit_reason == "finished"
