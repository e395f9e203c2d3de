"""Where the agent's telemetry comes from, and where it waits while the server is away.

Sources (``--source``):

- ``sim``: a simulated temperature/humidity sensor (bounded random walk), reproducible
  with ``--seed``;
- ``stdin``: one JSON object per line;
- ``script:PATH``: an executable run every ``--interval`` seconds; its stdout (one JSON
  object) is the record;
- ``none``: no telemetry (the agent only answers commands and renews).

A JSON object from ``stdin`` or a script is sent as it is, unless it is an *envelope*:
an object whose keys are ``data`` (an object) and ``type`` and/or ``kind`` and nothing
else, e.g. ``{"type": "power", "data": {"watts": 3.2}}`` or
``{"kind": "event", "type": "door-open", "data": {}}``. Then ``data`` is the record, sent
as ``type`` (default ``--message-type``) and ``kind`` (``telemetry`` or ``event``).

The message type becomes one MQTT topic level (``devices/<id>/telemetry/<type>``) and
one URL path segment (``/v1/telemetry/<type>``), so it is restricted to characters that
are inert in both: no ``/``, ``+``, ``#`` (MQTT 3.1.1/5.0 §4.7 topic separators and
wildcards), no ``$`` prefix (§4.7.2, server topics), nothing a URL must escape.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import re
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import structlog

from fleetward.errors import InvalidInput

log = structlog.get_logger("fleetward.agent")

# One record or event as JSON text: the server's [device_api] max_message_bytes default;
# larger ones would be refused there, so they are refused here, before they are queued.
MAX_RECORD_BYTES = 65536
MAX_SCRIPT_OUTPUT_BYTES = MAX_RECORD_BYTES  # stdout beyond this cannot be one record
MAX_LINE_BYTES = MAX_RECORD_BYTES + 1024  # stdin: room for the envelope around a record
SCRIPT_TIMEOUT_SECONDS = 30.0  # a hung script must not stall telemetry for longer
MIN_INTERVAL_SECONDS = 0.1  # faster floods the device's own uplink; servers throttle anyway
MAX_INTERVAL_SECONDS = 86400.0  # at least one reading a day keeps the device visibly alive
DEFAULT_MESSAGE_TYPE = "reading"
KINDS = ("telemetry", "event")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # 64: the device_messages column


def validate_message_type(name: str, what: str = "message type") -> str:
    """A telemetry message type or event type: 1-64 of ``A-Z a-z 0-9 _ . -``, starting
    with a letter or digit.

    Raises:
        InvalidInput: anything else (a ``/`` would let a record escape to another topic,
            ``+``/``#`` are wildcards a PUBLISH must not carry, MQTT 5.0 §3.3.2.1).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid {what} {name!r}",
                           hint="use 1-64 letters, digits, '_', '.' or '-', e.g. 'reading'")
    return name


def validate_interval(seconds: float) -> float:
    """Raises: InvalidInput outside [MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS]."""
    if not (isinstance(seconds, int | float) and not isinstance(seconds, bool)
            and math.isfinite(seconds)
            and MIN_INTERVAL_SECONDS <= seconds <= MAX_INTERVAL_SECONDS):
        raise InvalidInput(f"the interval must be between {MIN_INTERVAL_SECONDS} and "
                           f"{MAX_INTERVAL_SECONDS:.0f} seconds, not {seconds!r}",
                           hint="e.g. --interval 10")
    return float(seconds)


@dataclass(frozen=True, slots=True)
class Record:
    """One telemetry record or event on its way to the server."""

    kind: str  # telemetry | event
    message_type: str
    data: dict[str, Any]

    def payload(self) -> bytes:
        """Compact JSON (RFC 8259) of ``data``."""
        return encode_json(self.data)


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN/Infinity by default; RFC 8259 §6 does not.
    raise ValueError(f"{name} is not JSON")


def decode_object(text: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object from ``text``.

    Raises:
        InvalidInput: not JSON, not an object, or NaN/Infinity.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not JSON: {exc}",
                           hint="write one JSON object, e.g. {\"temperature_c\": 21.5}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} is a JSON {type(value).__name__}, not an object",
                           hint="wrap the value: {\"value\": 42}")
    return value


def to_record(obj: dict[str, Any], default_type: str) -> Record:
    """The record ``obj`` stands for: itself, or the ``data`` of an envelope.

    Raises:
        InvalidInput: a bad envelope (type, kind, data) or a record above MAX_RECORD_BYTES.
    """
    keys = set(obj)
    if "data" in keys and keys <= {"data", "type", "kind"} and len(keys) > 1:
        data = obj["data"]
        if not isinstance(data, dict):
            raise InvalidInput("the envelope's data is not a JSON object",
                               hint='{"type": "reading", "data": {...}}')
        kind = obj.get("kind", "telemetry")
        if kind not in KINDS:
            raise InvalidInput(f"unknown kind {kind!r}", hint="use telemetry or event")
        record = Record(kind, validate_message_type(obj.get("type", default_type)), data)
    else:
        record = Record("telemetry", validate_message_type(default_type), obj)
    size = len(record.payload())
    if size > MAX_RECORD_BYTES:
        raise InvalidInput(f"the record is {size} bytes, above {MAX_RECORD_BYTES}",
                           hint="split it into several records")
    return record


class Source(Protocol):
    """Produces records. ``paced`` sources are read every interval; unpaced ones
    (stdin) block until a record arrives. ``read`` returns None when exhausted."""

    @property
    def paced(self) -> bool: ...

    def read(self) -> Record | None:
        """The next record, or None at the end.

        Raises:
            InvalidInput: this reading failed (logged and skipped by the caller).
        """
        ...


# --- sim -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SensorModel:
    """Bounds and step sizes of the simulated sensor (a plausible indoor climate)."""

    start_temperature_c: float = 21.0
    temperature_step_c: float = 0.2  # standard deviation per reading
    min_temperature_c: float = -40.0  # the usual industrial sensor range
    max_temperature_c: float = 85.0
    start_humidity_pct: float = 45.0
    humidity_step_pct: float = 0.5
    min_humidity_pct: float = 0.0
    max_humidity_pct: float = 100.0


class SimulatedSensor:
    """Temperature/humidity random walk; the same ``seed`` gives the same readings."""

    paced = True

    def __init__(self, seed: int | None = None, message_type: str = DEFAULT_MESSAGE_TYPE,
                 model: SensorModel = SensorModel()) -> None:
        # random.Random: a simulation, not a secret; a seed must reproduce it exactly.
        self._rng = random.Random(seed)  # noqa: S311
        self._type = validate_message_type(message_type)
        self._model = model
        self._temperature = model.start_temperature_c
        self._humidity = model.start_humidity_pct
        self._seq = 0

    def read(self) -> Record:
        m = self._model
        self._seq += 1
        self._temperature = min(m.max_temperature_c, max(
            m.min_temperature_c, self._temperature + self._rng.gauss(0, m.temperature_step_c)))
        self._humidity = min(m.max_humidity_pct, max(
            m.min_humidity_pct, self._humidity + self._rng.gauss(0, m.humidity_step_pct)))
        return Record("telemetry", self._type, {
            "seq": self._seq,
            "temperature_c": round(self._temperature, 2),
            "humidity_pct": round(self._humidity, 2)})


# --- stdin -------------------------------------------------------------------------------


class LineSource:
    """One JSON object per line of a text stream (stdin); blank lines are skipped."""

    paced = False

    def __init__(self, stream: IO[bytes], message_type: str = DEFAULT_MESSAGE_TYPE) -> None:
        self._stream = stream
        self._type = validate_message_type(message_type)
        self.line = 0

    def read(self) -> Record | None:
        while True:
            raw = self._stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return None
            self.line += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                self._discard_rest_of_line()
                raise InvalidInput(f"line {self.line} is longer than {MAX_LINE_BYTES} bytes",
                                   hint="one record per line, at most 64 KiB")
            if raw.strip():
                return to_record(decode_object(raw, f"line {self.line}"), self._type)

    def _discard_rest_of_line(self) -> None:
        while True:
            chunk = self._stream.readline(MAX_LINE_BYTES)
            if not chunk or chunk.endswith(b"\n"):
                return


# --- script ---------------------------------------------------------------------------------


def check_executable(path: Path, what: str) -> Path:
    """``path`` if it is an executable regular file.

    Raises:
        InvalidInput: missing, not a file, or not executable by this user.
    """
    if not path.is_file():
        raise InvalidInput(f"the {what} {path} does not exist or is not a file",
                           hint="give the path of an executable file")
    if not os.access(path, os.X_OK):
        raise InvalidInput(f"the {what} {path} is not executable", hint=f"chmod +x {path}")
    return path


class ScriptSource:
    """Runs an executable (no shell) and reads one JSON object from its stdout."""

    paced = True

    def __init__(self, path: Path, *, message_type: str = DEFAULT_MESSAGE_TYPE,
                 timeout_seconds: float = SCRIPT_TIMEOUT_SECONDS,
                 env: dict[str, str] | None = None) -> None:
        self._path = check_executable(path, "telemetry script")
        self._type = validate_message_type(message_type)
        self._timeout = timeout_seconds
        self._env = env

    def read(self) -> Record:
        code, out, truncated = run_bounded([str(self._path)], b"", self._timeout, self._env)
        name = self._path.name
        if code is None:
            raise InvalidInput(f"the telemetry script {name} ran longer than "
                               f"{self._timeout:g} s and was killed",
                               hint="make the script finish within the interval")
        if code != 0:
            raise InvalidInput(f"the telemetry script {name} exited with status {code}",
                               hint="a script reports a reading with exit status 0")
        if truncated:
            raise InvalidInput(f"the telemetry script {name} wrote more than "
                               f"{MAX_SCRIPT_OUTPUT_BYTES} bytes",
                               hint="write one JSON object of at most 64 KiB")
        return to_record(decode_object(out, f"the output of {name}"), self._type)


def run_bounded(argv: Sequence[str], stdin: bytes, timeout_seconds: float,
                env: dict[str, str] | None = None,
                max_output_bytes: int = MAX_SCRIPT_OUTPUT_BYTES,
                ) -> tuple[int | None, bytes, bool]:
    """Run ``argv`` without a shell, feed ``stdin``, keep at most ``max_output_bytes`` of
    stdout (a runaway child cannot fill the agent's memory); stderr goes to the agent's
    own stderr (the device log). Returns (exit status or None on timeout, stdout,
    truncated)."""
    try:
        process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env=env, close_fds=True, start_new_session=True)
    except OSError as exc:
        raise InvalidInput(f"cannot run {argv[0]}: {exc.strerror}",
                           hint="check the path and its interpreter line") from exc
    out = bytearray()
    truncated = False

    def pump() -> None:
        nonlocal truncated
        stdout = process.stdout
        if stdout is None:
            return
        while chunk := stdout.read(8192):
            room = max_output_bytes - len(out)
            if len(chunk) > room:
                truncated = True
            out.extend(chunk[:max(room, 0)])

    reader = threading.Thread(target=pump, name="fleetward-agent-child-stdout", daemon=True)
    reader.start()
    try:
        if process.stdin is not None:
            try:
                process.stdin.write(stdin)
                process.stdin.close()
            except BrokenPipeError:
                pass  # the child did not read its input; its exit status says the rest
        code: int | None = process.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        code = None
    reader.join(5)
    if reader.is_alive():
        _kill_group(process)  # a grandchild holds stdout open
        reader.join(5)
    if process.stdout is not None:
        process.stdout.close()
    return code, bytes(out), truncated


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # start_new_session=True made the child a process-group leader: kill what it forked too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, 9)
    process.wait()


def make_source(spec: str, *, message_type: str = DEFAULT_MESSAGE_TYPE,
                seed: int | None = None, stdin: IO[bytes] | None = None,
                ) -> Source | None:
    """The source named by ``--source`` (``sim``, ``stdin``, ``script:PATH``, ``none``).

    Raises:
        InvalidInput: an unknown source, or a script that is not executable.
    """
    validate_message_type(message_type)
    if spec == "sim":
        return SimulatedSensor(seed, message_type)
    if spec == "stdin":
        if stdin is None:
            raise InvalidInput("no standard input to read from")
        return LineSource(stdin, message_type)
    if spec.startswith("script:") and len(spec) > len("script:"):
        return ScriptSource(Path(spec[len("script:"):]), message_type=message_type)
    if spec == "none":
        return None
    raise InvalidInput(f"unknown telemetry source {spec!r}",
                       hint="use sim, stdin, script:/path/to/executable or none")


# --- offline buffer --------------------------------------------------------------------------


class OfflineBuffer:
    """Records waiting for the server, oldest first; at most ``capacity`` of them.

    When full, the OLDEST record is dropped (and counted): after a long outage the
    newest readings are the ones worth having. Thread-safe: the source thread puts,
    the sender takes and, when a send fails, puts back in front (``requeue``).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidInput(f"the buffer must hold at least one record, not {capacity}",
                               hint="e.g. --buffer-size 1000")
        self.capacity = capacity
        self._items: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, record: Record) -> None:
        with self._cond:
            self._items.append(record)
            self._trim()
            self._cond.notify_all()

    def requeue(self, records: Iterable[Record]) -> None:
        """Put records that were taken but not delivered back in front, in order."""
        with self._cond:
            self._items.extendleft(reversed(list(records)))
            self._trim()
            self._cond.notify_all()

    def _trim(self) -> None:
        while len(self._items) > self.capacity:
            self._items.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("offline buffer full: dropping the oldest records",
                            capacity=self.capacity, dropped_total=self.dropped)

    def take(self, limit: int, timeout_seconds: float = 0.0) -> list[Record]:
        """Up to ``limit`` records from the front, waiting up to ``timeout_seconds`` for
        the first one."""
        with self._cond:
            if not self._items and timeout_seconds > 0:
                self._cond.wait(timeout_seconds)
            batch: list[Record] = []
            while self._items and len(batch) < limit:
                batch.append(self._items.popleft())
            return batch

    def wake(self) -> None:
        """Wake a ``take`` that is waiting (stop, reconnect)."""
        with self._cond:
            self._cond.notify_all()


__all__ = ["DEFAULT_MESSAGE_TYPE", "KINDS", "MAX_INTERVAL_SECONDS", "MAX_RECORD_BYTES",
           "MIN_INTERVAL_SECONDS", "LineSource", "OfflineBuffer", "Record", "ScriptSource",
           "SensorModel", "SimulatedSensor", "Source", "check_executable", "decode_object",
           "encode_json", "make_source", "run_bounded", "to_record", "validate_interval",
           "validate_message_type"]
