"""Commands from the operator, and how the agent answers them.

A command arrives as JSON ``{"id", "name", "payload", "created_at", "expires_at"}``
(over MQTT on ``devices/<id>/commands/…``, or from ``GET /v1/commands``); its answer is
``{"status": "succeeded" | "failed", "result": {...}}``.

Handlers, deny by default:

- ``ping`` → succeeded ``{"pong": true}``;
- ``set-interval`` with payload ``{"seconds": N}`` → changes the telemetry interval;
- any other name goes to the ``--command-handler`` executable, if there is one: it gets
  the command JSON on stdin and no shell; exit status 0 means succeeded with its stdout
  (a JSON object, or nothing) as the result, anything else means failed;
- without a handler, an unknown name is answered failed ``{"error": "unknown command"}``.

Delivery is at least once (MQTT QoS 1 redelivers a command whose PUBACK was lost,
MQTT 5.0 §4.3.2; a long-poll answer can be lost with the connection), so the agent
remembers recent command ids and answers a repeat with the first result instead of
running the command twice.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from fleetward.agent.telemetry import (
    check_executable,
    decode_object,
    encode_json,
    run_bounded,
    validate_interval,
)
from fleetward.clock import Clock, SystemClock
from fleetward.errors import InvalidInput

log = structlog.get_logger("fleetward.agent")

MAX_COMMAND_BYTES = 65536  # one command as JSON; the server's message limit
MAX_RESULT_BYTES = 65536  # one result as JSON; larger handler output fails the command
DEFAULT_HANDLER_TIMEOUT_SECONDS = 60.0  # a handler that hangs is killed and reported
REMEMBERED_COMMANDS = 256  # ids answered recently (redelivery window of QoS 1 / long-poll)
# Environment variables never passed to a handler: the handler is the device vendor's
# code, but a bootstrap token is a credential it has no use for.
SECRET_ENV = ("FLEETWARD_BOOTSTRAP_TOKEN",)

# The id becomes a topic level (devices/<id>/command-results/<command id>) and a URL path
# segment (/v1/commands/<command id>/result): only characters inert in both (no '/',
# '+', '#', MQTT 5.0 §4.7; only RFC 3986 §2.3 unreserved characters).
_COMMAND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,63}")
_COMMAND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SUCCEEDED = "succeeded"
FAILED = "failed"


class BadCommand(InvalidInput):
    """A command the agent cannot run. ``command_id`` is set when the id itself was
    readable, so the refusal can still be answered."""

    def __init__(self, message: str, *, command_id: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    name: str
    payload: Any
    created_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "payload": self.payload,
                "created_at": self.created_at.isoformat() if self.created_at else None,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None}


@dataclass(frozen=True, slots=True)
class CommandResult:
    status: str  # succeeded | failed
    result: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "result": self.result}


def failed(error: str, **extra: Any) -> CommandResult:
    return CommandResult(FAILED, {"error": error, **extra})


def valid_command_id(value: object) -> str | None:
    return value if isinstance(value, str) and _COMMAND_ID.fullmatch(value) else None


def _timestamp(value: object, field: str, command_id: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadCommand(f"command {command_id}: {field} is not an ISO 8601 time",
                         command_id=command_id) from None
    if parsed.tzinfo is None:
        raise BadCommand(f"command {command_id}: {field} has no time zone",
                         command_id=command_id)
    return parsed.astimezone(dt.UTC)


def parse_command(data: bytes | dict[str, Any]) -> Command:
    """A command from its JSON (bytes) or its decoded object.

    Raises:
        BadCommand: not a JSON object, an id that cannot be a topic level or path
            segment (``command_id`` None: cannot be answered), or a bad name or time
            (``command_id`` set: answered failed).
    """
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_COMMAND_BYTES:
            raise BadCommand(f"a command of {len(data)} bytes is above {MAX_COMMAND_BYTES}")
        try:
            obj = decode_object(bytes(data), "the command")
        except InvalidInput as exc:
            raise BadCommand(exc.message) from None
    else:
        obj = data
    if not isinstance(obj, dict):
        raise BadCommand("the command is not a JSON object")
    command_id = valid_command_id(obj.get("id"))
    if command_id is None:
        raise BadCommand(f"the command id {obj.get('id')!r} is missing or unusable",
                         hint="ids are 1-64 letters, digits, '_', '.', '~' or '-'")
    name = obj.get("name")
    if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
        raise BadCommand(f"command {command_id}: invalid name {name!r}", command_id=command_id)
    return Command(command_id, name, obj.get("payload", {}),
                   _timestamp(obj.get("created_at"), "created_at", command_id),
                   _timestamp(obj.get("expires_at"), "expires_at", command_id))


class CommandRunner:
    """Runs one command at a time through the built-ins or the external handler."""

    def __init__(self, *, device_id: str, set_interval: Callable[[float], float],
                 handler: Path | None = None,
                 handler_timeout_seconds: float = DEFAULT_HANDLER_TIMEOUT_SECONDS,
                 clock: Clock | None = None) -> None:
        self._device_id = device_id
        self._set_interval = set_interval
        self._handler = check_executable(handler, "command handler") if handler else None
        self._timeout = handler_timeout_seconds
        self._clock = clock or SystemClock()
        self._recent: collections.OrderedDict[str, CommandResult] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.executed = 0  # commands actually run (repeats answered from memory excluded)

    def answer(self, command: Command) -> CommandResult:
        """The result for ``command``: remembered if its id was answered recently, else
        from running it now. Never raises: every failure is a failed result."""
        with self._lock:
            known = self._recent.get(command.id)
            if known is not None:
                self._recent.move_to_end(command.id)
                log.info("command repeated; answering with the first result",
                         command_id=command.id, name=command.name)
                return known
        result = self._run(command)
        with self._lock:
            self._recent[command.id] = result
            while len(self._recent) > REMEMBERED_COMMANDS:
                self._recent.popitem(last=False)
        log.info("command answered", command_id=command.id, name=command.name,
                 status=result.status)
        return result

    def _run(self, command: Command) -> CommandResult:
        if command.expires_at is not None and self._clock.now() >= command.expires_at:
            return failed("command expired", expires_at=command.expires_at.isoformat())
        self.executed += 1
        if command.name == "ping":
            return CommandResult(SUCCEEDED, {"pong": True})
        if command.name == "set-interval":
            return self._set_interval_command(command.payload)
        if self._handler is not None:
            return self._external(command)
        return failed("unknown command")

    def _set_interval_command(self, payload: Any) -> CommandResult:
        seconds = payload.get("seconds") if isinstance(payload, dict) else None
        try:
            if seconds is None:
                raise InvalidInput('set-interval needs a payload {"seconds": N}')
            applied = self._set_interval(validate_interval(seconds))
        except InvalidInput as exc:
            return failed(exc.message)
        return CommandResult(SUCCEEDED, {"interval_seconds": applied})

    def _external(self, command: Command) -> CommandResult:
        handler = self._handler
        if handler is None:  # for the type checker; _run checked it
            return failed("unknown command")
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update(FLEETWARD_DEVICE_ID=self._device_id, FLEETWARD_COMMAND_ID=command.id,
                   FLEETWARD_COMMAND_NAME=command.name)
        try:
            code, out, truncated = run_bounded([str(handler)], encode_json(command.to_json()),
                                               self._timeout, env, MAX_RESULT_BYTES)
        except InvalidInput as exc:
            return failed(exc.message)
        if code is None:
            return failed(f"handler timed out after {self._timeout:g} s")
        if truncated:
            return failed(f"handler output is larger than {MAX_RESULT_BYTES} bytes")
        output: dict[str, Any] | None = None
        output_error: str | None = None
        if out.strip():
            try:
                output = decode_object(out, "the handler output")
            except InvalidInput as exc:
                output_error = exc.message
        if code != 0:
            extra: dict[str, Any] = {"exit_status": code}
            if output is not None:
                extra["output"] = output
            return failed(f"handler exited with status {code}", **extra)
        if output_error is not None:
            return failed(output_error)
        return CommandResult(SUCCEEDED, output or {})


def result_payload(result: CommandResult) -> bytes:
    """The wire form of a result (compact JSON)."""
    return json.dumps(result.body(), separators=(",", ":")).encode()


__all__ = ["FAILED", "MAX_COMMAND_BYTES", "SUCCEEDED", "BadCommand", "Command",
           "CommandResult", "CommandRunner", "failed", "parse_command", "result_payload",
           "valid_command_id"]
