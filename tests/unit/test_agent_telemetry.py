"""Telemetry sources and the offline buffer of ``fleetward-agent run``.

Threats: a record whose message type escapes its topic level (``a/b``, ``+``, ``#``,
``$SYS``) and lands on another device's or the server's topics; a source that feeds
NaN or a non-object the server must then refuse; a runaway script that hangs the agent
or floods its memory; an offline buffer that grows without bound (or loses the newest
readings instead of the oldest) while the server is away; a simulator that is not
reproducible, so a test built on it cannot fail for the right reason.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from fleetward.agent.telemetry import (
    MAX_LINE_BYTES,
    MAX_RECORD_BYTES,
    LineSource,
    OfflineBuffer,
    Record,
    ScriptSource,
    SensorModel,
    SimulatedSensor,
    make_source,
    to_record,
    validate_interval,
    validate_message_type,
)
from fleetward.errors import InvalidInput

# --- message types ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reading", "power.v2", "a", "A-1_b", "x" * 64, "0day"])
def test_plain_message_types_are_accepted(name: str) -> None:
    assert validate_message_type(name) == name


@pytest.mark.parametrize(("name", "threat"), [
    ("a/b", "a topic separator: the record would land on devices/<id>/telemetry/a/b"),
    ("../events", "path traversal in the HTTPS route"),
    ("+", "single-level wildcard in a PUBLISH topic (MQTT 5.0 §3.3.2.1)"),
    ("#", "multi-level wildcard"),
    ("$SYS", "a $-topic is the server's (MQTT 5.0 §4.7.2)"),
    ("", "an empty topic level"),
    ("a b", "whitespace"),
    ("a\x00b", "NUL is forbidden in MQTT strings (§1.5.4)"),
    ("x" * 65, "longer than the server's column"),
    ("-lead", "must start with a letter or digit"),
    ("caf\u00e9", "non-ASCII: percent-encoding differences between channels"),
])
def test_message_types_that_could_escape_their_topic_level_are_refused(
        name: str, threat: str) -> None:
    with pytest.raises(InvalidInput, match="invalid message type"):
        validate_message_type(name)


# --- records and envelopes -----------------------------------------------------------------


@pytest.mark.parametrize(("obj", "expected"), [
    ({"temperature_c": 21.5}, Record("telemetry", "reading", {"temperature_c": 21.5})),
    ({"type": "power", "data": {"w": 3}}, Record("telemetry", "power", {"w": 3})),
    ({"kind": "event", "type": "door", "data": {}}, Record("event", "door", {})),
    ({"kind": "event", "data": {"x": 1}}, Record("event", "reading", {"x": 1})),
    # not envelopes: a lone "data" key, or other keys next to type/data, are plain records
    ({"data": {"x": 1}}, Record("telemetry", "reading", {"data": {"x": 1}})),
    ({"type": "t", "data": {}, "extra": 1},
     Record("telemetry", "reading", {"type": "t", "data": {}, "extra": 1})),
])
def test_envelopes_select_type_and_kind_and_plain_objects_pass_through(
        obj: dict[str, object], expected: Record) -> None:
    assert to_record(obj, "reading") == expected


@pytest.mark.parametrize(("obj", "match"), [
    ({"type": "a/b", "data": {}}, "invalid message type"),
    ({"type": "ok", "data": [1, 2]}, "not a JSON object"),
    ({"kind": "command", "type": "ok", "data": {}}, "unknown kind"),
    ({"blob": "x" * MAX_RECORD_BYTES}, "above"),
])
def test_bad_envelopes_and_oversized_records_are_refused(obj: dict[str, object],
                                                         match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        to_record(obj, "reading")


def test_a_record_payload_is_compact_json_of_its_data() -> None:
    assert Record("telemetry", "r", {"a": 1, "b": "é"}).payload() == '{"a":1,"b":"é"}'.encode()


# --- stdin -----------------------------------------------------------------------------------


def read_all(data: bytes) -> tuple[list[Record], list[str]]:
    source = LineSource(io.BytesIO(data), "reading")
    records: list[Record] = []
    errors: list[str] = []
    while True:
        try:
            record = source.read()
        except InvalidInput as exc:
            errors.append(exc.message)
            continue
        if record is None:
            return records, errors
        records.append(record)


def test_stdin_lines_become_records_and_bad_lines_are_skipped_not_fatal() -> None:
    records, errors = read_all(
        b'{"t": 1}\n'
        b'\n'                                  # blank: skipped silently
        b'not json\n'                          # skipped, reported
        b'[1, 2]\n'                            # JSON, but not an object
        b'{"v": NaN}\n'                        # NaN is not JSON (RFC 8259 \xc2\xa76)
        b'\xff\xfe\n'                          # not UTF-8
        b'{"type": "power", "data": {"w": 2}}\n'
        b'{"t": 3}')                           # last line without a newline
    assert records == [Record("telemetry", "reading", {"t": 1}),
                       Record("telemetry", "power", {"w": 2}),
                       Record("telemetry", "reading", {"t": 3})]
    assert len(errors) == 4
    assert any("line 3" in e for e in errors)


def test_an_overlong_stdin_line_is_skipped_without_buffering_it_whole() -> None:
    long_line = b'{"x": "' + b"a" * (MAX_LINE_BYTES * 3) + b'"}\n'
    records, errors = read_all(long_line + b'{"ok": 1}\n')
    assert records == [Record("telemetry", "reading", {"ok": 1})]
    assert errors == [f"line 1 is longer than {MAX_LINE_BYTES} bytes"]


# --- sim -------------------------------------------------------------------------------------


def test_the_simulated_sensor_is_reproducible_with_a_seed() -> None:
    a, b = SimulatedSensor(seed=42), SimulatedSensor(seed=42)
    run_a = [a.read() for _ in range(50)]
    run_b = [b.read() for _ in range(50)]
    assert run_a == run_b
    # negative control: another seed walks elsewhere
    other = SimulatedSensor(seed=43)
    assert [other.read() for _ in range(50)] != run_a


def test_simulated_readings_are_numbered_and_stay_within_the_sensor_range() -> None:
    model = SensorModel(temperature_step_c=50.0, humidity_step_pct=80.0)  # wild steps
    sensor = SimulatedSensor(seed=1, message_type="climate", model=model)
    readings = [sensor.read() for _ in range(500)]
    assert [r.data["seq"] for r in readings] == list(range(1, 501))
    assert {r.message_type for r in readings} == {"climate"}
    temps = [r.data["temperature_c"] for r in readings]
    hums = [r.data["humidity_pct"] for r in readings]
    assert min(temps) >= model.min_temperature_c and max(temps) <= model.max_temperature_c
    assert min(hums) >= 0.0 and max(hums) <= 100.0
    # the bounds are actually reached with such steps: the clamp is what held them
    assert model.max_humidity_pct in hums or model.min_humidity_pct in hums


# --- script ----------------------------------------------------------------------------------


def script(tmp_path: Path, body: str, name: str = "sensor.sh", mode: int = 0o755) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def test_a_script_reading_is_its_stdout_json(tmp_path: Path) -> None:
    source = ScriptSource(script(tmp_path, 'echo \'{"lux": 120}\''), message_type="light")
    assert source.read() == Record("telemetry", "light", {"lux": 120})


def test_a_script_can_send_an_event_through_an_envelope(tmp_path: Path) -> None:
    source = ScriptSource(script(tmp_path, 'echo \'{"kind":"event","type":"tamper","data":{}}\''))
    assert source.read() == Record("event", "tamper", {})


@pytest.mark.parametrize(("body", "match"), [
    ("exit 3", "exited with status 3"),
    ("echo hello", "not JSON"),
    ("echo '[1]'", "not an object"),
    (f"head -c {MAX_RECORD_BYTES + 10} /dev/zero | tr '\\\\0' a", "more than"),
])
def test_a_failing_script_reading_is_reported_not_sent(tmp_path: Path, body: str,
                                                        match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        ScriptSource(script(tmp_path, body)).read()


def test_a_hung_script_is_killed_with_what_it_forked(tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    # The child forks a grandchild that would write the marker after the timeout.
    body = f"(sleep 2; touch {marker}) &\nsleep 30"
    source = ScriptSource(script(tmp_path, body), timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="killed"):
        source.read()
    assert time.monotonic() - started < 10
    time.sleep(2.5)
    assert not marker.exists(), "the script's process group outlived the timeout"


@pytest.mark.parametrize(("mode", "match"), [(0o644, "not executable")])
def test_a_script_that_cannot_run_is_refused_at_start(tmp_path: Path, mode: int,
                                                      match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        ScriptSource(script(tmp_path, "echo {}", mode=mode))
    with pytest.raises(InvalidInput, match="does not exist"):
        ScriptSource(tmp_path / "missing")


@pytest.mark.parametrize(("spec", "kind"), [
    ("sim", SimulatedSensor), ("stdin", LineSource), ("none", type(None))])
def test_make_source_names(spec: str, kind: type) -> None:
    assert isinstance(make_source(spec, stdin=io.BytesIO()), kind)


@pytest.mark.parametrize("spec", ["", "script:", "file:/x", "SIM", "sim "])
def test_unknown_sources_are_refused(spec: str) -> None:
    with pytest.raises(InvalidInput, match="unknown telemetry source"):
        make_source(spec)


def test_make_source_script(tmp_path: Path) -> None:
    path = script(tmp_path, "echo {}")
    assert isinstance(make_source(f"script:{path}"), ScriptSource)


@pytest.mark.parametrize("seconds", [0, 0.01, -1, float("nan"), float("inf"), 86401, True])
def test_intervals_outside_the_bounds_are_refused(seconds: float) -> None:
    with pytest.raises(InvalidInput, match="interval"):
        validate_interval(seconds)


# --- offline buffer --------------------------------------------------------------------------


def rec(n: int) -> Record:
    return Record("telemetry", "reading", {"seq": n})


def seqs(records: list[Record]) -> list[int]:
    return [r.data["seq"] for r in records]


def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    buffer = OfflineBuffer(3)
    for n in range(1, 8):
        buffer.put(rec(n))
    assert len(buffer) == 3
    assert buffer.dropped == 4
    assert seqs(buffer.take(10)) == [5, 6, 7]


def test_records_put_back_after_a_failed_send_keep_their_order_in_front() -> None:
    buffer = OfflineBuffer(10)
    for n in range(1, 6):
        buffer.put(rec(n))
    taken = buffer.take(3)
    buffer.put(rec(6))  # the source kept producing during the send
    buffer.requeue(taken)
    assert seqs(buffer.take(10)) == [1, 2, 3, 4, 5, 6]


def test_a_requeue_into_a_full_buffer_drops_the_oldest_which_are_the_requeued() -> None:
    buffer = OfflineBuffer(3)
    for n in range(1, 4):
        buffer.put(rec(n))
    taken = buffer.take(2)  # 1, 2 in flight
    buffer.put(rec(4))
    buffer.put(rec(5))
    buffer.requeue(taken)  # 1, 2, 3, 4, 5 -> keep the newest three
    assert seqs(buffer.take(10)) == [3, 4, 5]
    assert buffer.dropped == 2


def test_take_waits_for_a_record_but_not_forever() -> None:
    buffer = OfflineBuffer(5)
    started = time.monotonic()
    assert buffer.take(5, timeout_seconds=0.2) == []
    assert time.monotonic() - started >= 0.15
    buffer.put(rec(1))
    assert seqs(buffer.take(5, timeout_seconds=5)) == [1]


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_buffer_must_hold_something(capacity: int) -> None:
    with pytest.raises(InvalidInput):
        OfflineBuffer(capacity)


def test_records_are_json_round_trippable() -> None:
    record = SimulatedSensor(seed=3).read()
    assert json.loads(record.payload()) == record.data
