"""The one place where a device's message becomes a :class:`DeviceMessage` for the sinks,
whichever channel it came over.

MQTT topic conventions (the policy decides first who may publish where; this module
then decides what a publish *means*):

==========================================  =====================================
``devices/<id>/telemetry/<message_type>``   telemetry record → sinks
``devices/<id>/events/<message_type>``      event → sinks
``devices/<id>/messages/events/[<props>]``  telemetry (Azure IoT Hub's topic; the
                                            message type is the property ``type``)
``devices/<id>/command-results/<cmd id>``   the device's answer to a command
any other topic the policy allowed          routed by the broker only, not sunk
==========================================  =====================================

HTTPS: ``POST /v1/telemetry[/<type>]`` and ``/v1/events[/<type>]`` (edge/device_api.py)
call :meth:`Ingest.accept_http` with the decoded record.

A record is a JSON object of at most ``[device_api] max_message_bytes`` (UTF-8, strict
JSON: no NaN/Infinity, no unpaired surrogates). Its message type matches
``[a-z0-9][a-z0-9_.-]{0,63}`` and, when the device type lists message types, is one of
them. ``<id>`` must be the admitted device's own id for anything to be stored, whatever
the policy says (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import structlog

from fleetward.config import DeviceApiConfig
from fleetward.edge.channel import Admission, DeviceMessage, MessageSink
from fleetward.errors import (
    Conflict,
    FleetwardError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PolicyViolation,
    SinkUnavailable,
)

log = structlog.get_logger("fleetward.ingest")

TELEMETRY = "telemetry"
EVENT = "event"
KINDS = (TELEMETRY, EVENT)
# Topic level → kind. The level is plural for events, as in AWS IoT's conventions.
TOPIC_KINDS = {"telemetry": TELEMETRY, "events": EVENT}
COMMAND_RESULTS = "command-results"
MESSAGE_TYPE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ALLOWED_TYPES_SHOWN = 20  # message types listed in one refusal; the rest are counted
# Message type of Azure-style telemetry whose property bag names none.
AZURE_MESSAGE_TYPE = "message"


class ReasonCode:
    """MQTT 5.0 §3.4.2.1 PUBACK reason codes this module answers with."""

    UNSPECIFIED_ERROR = 0x80  # a sink is unavailable: the client retries (QoS 1)
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83  # a command result refused (answered/expired)
    NOT_AUTHORIZED = 0x87  # topic of another device
    TOPIC_NAME_INVALID = 0x90  # topic shape or message type
    QUOTA_EXCEEDED = 0x97  # payload above max_message_bytes
    PAYLOAD_FORMAT_INVALID = 0x99  # not a UTF-8 JSON object


class CommandResults(Protocol):
    """The command service's side that devices use (registry/device_commands.py)."""

    def complete(self, device_id: str, command_id: str, status: str, result: Any) -> Any:
        ...


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a PUBLISH was refused: an MQTT 5 reason code and a Reason String (§3.4.2.2.2)
    a device developer can act on."""

    code: int
    reason: str


class _Refused(Exception):
    """Internal: a refusal with the MQTT reason code and the HTTP error for it."""

    def __init__(self, code: int, error: FleetwardError) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error


class Ingest:
    """Validate device messages and hand them to the sinks.

    Args:
        sink: where accepted records go (``SqlSink``, ``NatsSink`` or a ``FanoutSink``).
        commands: completes commands answered on ``devices/<id>/command-results/<id>``.
        config: ``max_message_bytes``.
        message_types_of: a device type's allowed message types, from memory (the
            gate's cache; ``()`` = any valid name, ``None`` = type unknown → refused).
        executor: the SQL writer thread, for command results.
        wall_clock: seconds since the epoch with sub-second precision (received_at).
    """

    def __init__(self, sink: MessageSink, commands: CommandResults, config: DeviceApiConfig,
                 message_types_of: Callable[[str], tuple[str, ...] | None],
                 executor: Executor, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._commands = commands
        self._config = config
        self._message_types_of = message_types_of
        self._executor = executor
        self._now = wall_clock

    # --- MQTT ---------------------------------------------------------------------------

    async def accept_publish(self, admission: Admission, topic: str, payload: bytes,
                             qos: int, retain: bool) -> int | None:
        """The MQTT server's hook: None when accepted, else an MQTT 5 reason code.

        Returns only after the sinks accepted a record (a QoS 1 PUBACK waits for it).
        The record is queued in the sink before this coroutine first suspends, so
        publishes of one connection are stored in arrival order.
        """
        rejection = await self.check_publish(admission, topic, payload, qos, retain)
        return None if rejection is None else rejection.code

    async def check_publish(self, admission: Admission, topic: str, payload: bytes,
                            qos: int, retain: bool) -> Rejection | None:
        """:meth:`accept_publish` with the refusal's reason. The reason is logged; the
        MQTT hook passes on only the code (no Reason String in the PUBACK yet).

        ``qos`` and ``retain`` do not change what is stored: retained messages are the
        broker's business, and a QoS 0 record is stored like any other.
        """
        try:
            levels = topic.split("/")
            if (len(levels) >= 4 and levels[0] == "devices" and levels[2] == "messages"
                    and levels[3] == "events"):
                return await self._azure_telemetry(admission, levels, payload, topic)
            if len(levels) < 3 or levels[0] != "devices" or (
                    levels[2] not in TOPIC_KINDS and levels[2] != COMMAND_RESULTS):
                return None  # an ordinary topic: the broker routes it, nothing is stored
            if levels[1] != admission.device_id:
                raise _Refused(ReasonCode.NOT_AUTHORIZED, PolicyViolation(
                    f"topic {topic[:200]!r} belongs to device {levels[1][:128]!r}",
                    hint=f"publish under devices/{admission.device_id}/…"))
            if len(levels) != 4 or not levels[3]:
                raise _Refused(ReasonCode.TOPIC_NAME_INVALID, InvalidInput(
                    f"topic {topic[:200]!r} has the wrong shape",
                    hint=f"use devices/{admission.device_id}/{levels[2]}/<"
                         f"{'command id' if levels[2] == COMMAND_RESULTS else 'message type'}"
                         f"> (exactly four levels)"))
            if levels[2] == COMMAND_RESULTS:
                await self._command_result(admission, levels[3], payload)
                return None
            kind = TOPIC_KINDS[levels[2]]
            self._check_type(admission, levels[3])
            record = self._parse(payload)
            await self._submit(admission, kind, levels[3], record, "mqtt", topic)
            return None
        except _Refused as refused:
            log.info("publish refused", device_id=admission.device_id, topic=topic[:200],
                     reason_code=f"0x{refused.code:02x}", reason=refused.error.message)
            return Rejection(refused.code, refused.error.message)

    async def _azure_telemetry(self, admission: Admission, levels: list[str],
                               payload: bytes, topic: str) -> Rejection | None:
        """Azure IoT Hub's device-to-cloud topic, ``devices/<id>/messages/events/`` with an
        optional URL-encoded property bag as the last level: telemetry, of the message
        type the bag's ``type`` names (``message`` without one), so devices written for
        Azure's MQTT conventions move over by changing the host name."""
        if levels[1] != admission.device_id:
            raise _Refused(ReasonCode.NOT_AUTHORIZED, PolicyViolation(
                f"topic {topic[:200]!r} belongs to device {levels[1][:128]!r}",
                hint=f"publish under devices/{admission.device_id}/messages/events/"))
        if len(levels) > 5:
            raise _Refused(ReasonCode.TOPIC_NAME_INVALID, InvalidInput(
                f"topic {topic[:200]!r} has the wrong shape",
                hint=f"use devices/{admission.device_id}/messages/events/[<property bag>]"))
        properties = urllib.parse.parse_qs(levels[4]) if len(levels) == 5 else {}
        message_type = properties.get("type", [AZURE_MESSAGE_TYPE])[0]
        self._check_type(admission, message_type)
        record = self._parse(payload)
        await self._submit(admission, TELEMETRY, message_type, record, "mqtt", topic)
        return None

    async def _command_result(self, admission: Admission, command_id: str,
                              payload: bytes) -> None:
        answer = self._parse(payload)
        status = answer.get("status")
        if not isinstance(status, str) or set(answer) - {"status", "result"}:
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, InvalidInput(
                "a command result is {\"status\": \"succeeded\"|\"failed\", \"result\": {…}}",
                hint='e.g. {"status": "succeeded", "result": {"ok": true}}'))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, partial(
                self._commands.complete, admission.device_id, command_id, status,
                answer.get("result", {})))
        except PayloadTooLarge as exc:
            raise _Refused(ReasonCode.QUOTA_EXCEEDED, exc) from None
        except InvalidInput as exc:
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, exc) from None
        except NotFound as exc:
            raise _Refused(ReasonCode.TOPIC_NAME_INVALID, exc) from None
        except Conflict as exc:
            raise _Refused(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, exc) from None
        except FleetwardError as exc:
            raise _Refused(ReasonCode.UNSPECIFIED_ERROR, exc) from None

    # --- HTTPS --------------------------------------------------------------------------

    async def accept_http(self, admission: Admission, kind: str, message_type: str,
                          data: Any) -> None:
        """Validate one record from the device API and return once the sinks took it.

        Args:
            admission: the connection's admission (the device, from its certificate).
            kind: ``telemetry`` or ``event``.
            message_type: from the path or the body's ``type``.
            data: the decoded record.

        Raises:
            InvalidInput: bad message type or record (400).
            PolicyViolation: a message type the device type does not list (422).
            PayloadTooLarge: record above ``max_message_bytes`` (413).
            SinkUnavailable: a sink cannot take it now (503; retry).
        """
        if kind not in KINDS:
            raise InvalidInput(f"unknown message kind {kind!r}",
                               hint=f"one of: {', '.join(KINDS)}")
        try:
            self._check_type(admission, message_type)
            record = self._check_record(data)
            await self._submit(admission, kind, message_type, record, "https", None)
        except _Refused as refused:
            raise refused.error from None

    # --- shared ---------------------------------------------------------------------------

    def _check_type(self, admission: Admission, message_type: str) -> None:
        if not MESSAGE_TYPE.fullmatch(message_type):
            raise _Refused(ReasonCode.TOPIC_NAME_INVALID, InvalidInput(
                f"invalid message type {message_type[:80]!r}",
                hint="1-64 characters: lower-case letters, digits, _ . - (starting with a "
                     "letter or digit), e.g. temperature"))
        allowed = self._message_types_of(admission.device_type)
        if allowed is None:
            # The gate admitted this type, so its cache knows it unless it is reloading.
            raise _Refused(ReasonCode.UNSPECIFIED_ERROR, SinkUnavailable(
                f"device type {admission.device_type!r} is not known to this node yet",
                hint="retry in a few seconds"))
        if allowed and message_type not in allowed:
            shown = ", ".join(sorted(allowed)[:ALLOWED_TYPES_SHOWN])
            more = len(allowed) - ALLOWED_TYPES_SHOWN
            raise _Refused(ReasonCode.TOPIC_NAME_INVALID, PolicyViolation(
                f"message type {message_type!r} is not allowed for device type "
                f"{admission.device_type!r}",
                hint=f"allowed message types: {shown}" + (f" and {more} more" if more > 0
                                                          else ""),
                allowed=sorted(allowed)))

    def _parse(self, payload: bytes) -> dict[str, Any]:
        """A PUBLISH payload as a record (a JSON object)."""
        limit = self._config.max_message_bytes
        if len(payload) > limit:
            raise _Refused(ReasonCode.QUOTA_EXCEEDED, PayloadTooLarge(
                f"the payload is {len(payload)} bytes; the limit is {limit}",
                hint="send smaller records, or split one into several"))
        try:
            value = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, InvalidInput(
                "the payload is not UTF-8",
                hint="send a JSON object encoded as UTF-8 (RFC 8259 §8.1)")) from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, InvalidInput(
                f"the payload is not valid JSON: {detail}",
                hint='send one JSON object, e.g. {"t": 21.5}')) from None
        return self._check_record(value)

    def _check_record(self, value: Any) -> dict[str, Any]:
        """A record is a JSON object of at most max_message_bytes as strict UTF-8 JSON.

        Serialising once more rejects what Python's parser lets through but a database
        cannot store: NaN/Infinity (not JSON, RFC 8259 §6) and unpaired surrogates
        (not UTF-8), so one bad record can never fail a whole batch in the SQL sink.
        """
        if not isinstance(value, dict):
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, InvalidInput(
                f"the record must be a JSON object, not {_json_kind(value)}",
                hint='wrap the value in an object, e.g. {"value": 21.5}'))
        try:
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False,
                                  separators=(",", ":")).encode("utf-8"))
        except (ValueError, UnicodeEncodeError, RecursionError):
            raise _Refused(ReasonCode.PAYLOAD_FORMAT_INVALID, InvalidInput(
                "the record is not strict JSON (NaN, Infinity, or an unpaired surrogate "
                "in a string)", hint="send finite numbers and valid UTF-8 strings")) from None
        limit = self._config.max_message_bytes
        if size > limit:
            raise _Refused(ReasonCode.QUOTA_EXCEEDED, PayloadTooLarge(
                f"the record is {size} bytes of JSON; the limit is {limit}",
                hint="send smaller records, or split one into several"))
        return value

    async def _submit(self, admission: Admission, kind: str, message_type: str,
                      record: dict[str, Any], channel: str, topic: str | None) -> None:
        message = DeviceMessage(
            device_id=admission.device_id, device_type=admission.device_type,
            owner=admission.owner, kind=kind, message_type=message_type, channel=channel,
            payload=record, received_at_epoch=self._now(), topic=topic)
        try:
            await self._sink.submit(message)
        except SinkUnavailable as exc:
            raise _Refused(ReasonCode.UNSPECIFIED_ERROR, exc) from None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


__all__ = ["COMMAND_RESULTS", "EVENT", "KINDS", "TELEMETRY", "CommandResults", "Ingest",
           "ReasonCode", "Rejection"]
