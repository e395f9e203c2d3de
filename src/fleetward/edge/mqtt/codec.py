"""MQTT 3.1.1 and 5.0 control packets: a sans-I/O encoder and an incremental decoder.

Every control packet of both versions is a frozen dataclass; :func:`encode` turns one
into bytes for a protocol version and :class:`PacketReader` turns a byte stream back
into packets. The reader is on the hot path of every device connection, so it works on
``memoryview`` slices of the received chunk, copies each payload once, and never
buffers more than one packet: the maximum packet size is checked from the fixed
header's Remaining Length before the body is read (MQTT 5.0 §3.1.2.11.4), so a header
announcing a gigabyte allocates nothing.

Anything that is not a well-formed packet raises :class:`MalformedPacket` with the
MQTT 5 reason code the server sends back (MQTT 5.0 §4.13: 0x81 malformed packet, 0x82
protocol error, 0x84 unsupported protocol version, 0x95 packet too large). Rules that
depend on the server's state (packet identifiers in use, topic aliases, policy) are the
server's business, not the codec's.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from fleetward.errors import InvalidInput

MQTT_311: Final = 4  # protocol level byte of MQTT 3.1.1 (§3.1.2.2)
MQTT_5: Final = 5  # protocol level byte of MQTT 5.0 (§3.1.2.2)
SUPPORTED_VERSIONS: Final = (MQTT_311, MQTT_5)

# §1.5.5 / §2.1.4: a Variable Byte Integer has at most four bytes, 268,435,455 at most.
MAX_VARIABLE_BYTE_INTEGER: Final = 268_435_455
MAX_UINT16: Final = 0xFFFF
MAX_UINT32: Final = 0xFFFF_FFFF
# §1.5.4 / §1.5.6: strings and binary data carry a two-byte length.
MAX_STRING_BYTES: Final = 0xFFFF


class PacketType(enum.IntEnum):
    """MQTT control packet types, the high nibble of the first byte (§2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # MQTT 5.0 only; reserved in 3.1.1


class ReasonCode(enum.IntEnum):
    """MQTT 5.0 reason codes (§2.4, Table 2-6). 0x00 is also "normal disconnection"
    and "granted QoS 0"."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class MalformedPacket(InvalidInput):
    """The bytes are not a packet this codec accepts.

    ``reason_code`` is what the server puts in CONNACK/DISCONNECT (MQTT 5.0 §4.13);
    3.1.1 peers just lose the connection (3.1.1 §4.8).
    """

    def __init__(self, reason_code: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "fix the client's MQTT encoding; the message "
                         "names the rule and the clause of the MQTT specification")
        self.reason_code = reason_code


def _malformed(message: str) -> MalformedPacket:
    return MalformedPacket(ReasonCode.MALFORMED_PACKET, message)


def _protocol_error(message: str) -> MalformedPacket:
    return MalformedPacket(ReasonCode.PROTOCOL_ERROR, message)


# --- properties (MQTT 5.0 §2.2.2) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5.0 properties of one packet (§2.2.2.2); ``None`` = absent.

    User Property and Subscription Identifier may repeat, so they are tuples; every
    other property appears at most once (a repeat is a protocol error).
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


EMPTY_PROPERTIES: Final = Properties()

# Value kinds (§1.5): one byte, two/four-byte integers, variable byte integer, UTF-8
# string, binary data, UTF-8 string pair.
_BYTE, _U16, _U32, _VARINT, _STRING, _BINARY, _PAIR = range(7)

# Where a property may appear: a bit per packet type, plus one for the Will properties
# of CONNECT's payload (§3.1.3.2).
WILL_PROPERTIES: Final = 16


def _mask(*kinds: int) -> int:
    bits = 0
    for kind in kinds:
        bits |= 1 << kind
    return bits


_P = PacketType
_ALL = _mask(_P.CONNECT, _P.CONNACK, _P.PUBLISH, _P.PUBACK, _P.PUBREC, _P.PUBREL,
             _P.PUBCOMP, _P.SUBSCRIBE, _P.SUBACK, _P.UNSUBSCRIBE, _P.UNSUBACK,
             _P.DISCONNECT, _P.AUTH, WILL_PROPERTIES)
_ACKS = _mask(_P.CONNACK, _P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP, _P.SUBACK,
              _P.UNSUBACK, _P.DISCONNECT, _P.AUTH)


@dataclass(frozen=True, slots=True)
class _PropertySpec:
    identifier: int
    name: str
    kind: int
    allowed_in: int  # bit mask of packet types
    boolean: bool = False  # only 0 or 1 is valid (a protocol error otherwise)
    non_zero: bool = False  # 0 is a protocol error


# MQTT 5.0 §2.2.2.2, Table 2-4, in identifier order (the encoding order).
_PROPERTY_SPECS: Final = (
    _PropertySpec(0x01, "payload_format_indicator", _BYTE,
                  _mask(_P.PUBLISH, WILL_PROPERTIES), boolean=True),
    _PropertySpec(0x02, "message_expiry_interval", _U32, _mask(_P.PUBLISH, WILL_PROPERTIES)),
    _PropertySpec(0x03, "content_type", _STRING, _mask(_P.PUBLISH, WILL_PROPERTIES)),
    _PropertySpec(0x08, "response_topic", _STRING, _mask(_P.PUBLISH, WILL_PROPERTIES)),
    _PropertySpec(0x09, "correlation_data", _BINARY, _mask(_P.PUBLISH, WILL_PROPERTIES)),
    # §3.8.2.1.2: a Subscription Identifier of 0 is a protocol error.
    _PropertySpec(0x0B, "subscription_identifiers", _VARINT,
                  _mask(_P.PUBLISH, _P.SUBSCRIBE), non_zero=True),
    _PropertySpec(0x11, "session_expiry_interval", _U32,
                  _mask(_P.CONNECT, _P.CONNACK, _P.DISCONNECT)),
    _PropertySpec(0x12, "assigned_client_identifier", _STRING, _mask(_P.CONNACK)),
    _PropertySpec(0x13, "server_keep_alive", _U16, _mask(_P.CONNACK)),
    _PropertySpec(0x15, "authentication_method", _STRING,
                  _mask(_P.CONNECT, _P.CONNACK, _P.AUTH)),
    _PropertySpec(0x16, "authentication_data", _BINARY, _mask(_P.CONNECT, _P.CONNACK, _P.AUTH)),
    _PropertySpec(0x17, "request_problem_information", _BYTE, _mask(_P.CONNECT), boolean=True),
    _PropertySpec(0x18, "will_delay_interval", _U32, _mask(WILL_PROPERTIES)),
    _PropertySpec(0x19, "request_response_information", _BYTE, _mask(_P.CONNECT),
                  boolean=True),
    _PropertySpec(0x1A, "response_information", _STRING, _mask(_P.CONNACK)),
    _PropertySpec(0x1C, "server_reference", _STRING, _mask(_P.CONNACK, _P.DISCONNECT)),
    _PropertySpec(0x1F, "reason_string", _STRING, _ACKS),
    # §3.1.2.11.3 / §3.2.2.3.3: a Receive Maximum of 0 is a protocol error.
    _PropertySpec(0x21, "receive_maximum", _U16, _mask(_P.CONNECT, _P.CONNACK), non_zero=True),
    _PropertySpec(0x22, "topic_alias_maximum", _U16, _mask(_P.CONNECT, _P.CONNACK)),
    # §3.3.2.3.4: a Topic Alias of 0 is a protocol error.
    _PropertySpec(0x23, "topic_alias", _U16, _mask(_P.PUBLISH), non_zero=True),
    _PropertySpec(0x24, "maximum_qos", _BYTE, _mask(_P.CONNACK), boolean=True),
    _PropertySpec(0x25, "retain_available", _BYTE, _mask(_P.CONNACK), boolean=True),
    _PropertySpec(0x26, "user_properties", _PAIR, _ALL),
    # §3.1.2.11.4: a Maximum Packet Size of 0 is a protocol error.
    _PropertySpec(0x27, "maximum_packet_size", _U32, _mask(_P.CONNECT, _P.CONNACK),
                  non_zero=True),
    _PropertySpec(0x28, "wildcard_subscription_available", _BYTE, _mask(_P.CONNACK),
                  boolean=True),
    _PropertySpec(0x29, "subscription_identifier_available", _BYTE, _mask(_P.CONNACK),
                  boolean=True),
    _PropertySpec(0x2A, "shared_subscription_available", _BYTE, _mask(_P.CONNACK),
                  boolean=True),
)
_SPEC_BY_ID: Final = {spec.identifier: spec for spec in _PROPERTY_SPECS}
_REPEATABLE: Final = frozenset({"user_properties", "subscription_identifiers"})


# --- reason codes allowed per packet (MQTT 5.0 §3.x.2.1 tables) ---------------------

_CONNACK_CODES: Final = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
    0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F})
PUBACK_REASON_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES: Final = frozenset({0x00, 0x92})
_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97,
                                  0x9E, 0xA1, 0xA2})
_UNSUBACK_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES: Final = frozenset({
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
    0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
    0xA2})
_AUTH_CODES: Final = frozenset({0x00, 0x18, 0x19})
_V311_CONNACK_CODES: Final = frozenset(range(6))  # 3.1.1 §3.2.2.3, Table 3.1
_V311_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})  # 3.1.1 §3.9.3


# --- packets ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """The Will Message of a CONNECT (§3.1.2.5, §3.1.3.2-3.1.3.4)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol_version: int = MQTT_5
    clean_start: bool = True  # "Clean Session" in 3.1.1
    keep_alive: int = 60  # seconds; 0 = off (§3.1.2.10)
    properties: Properties = EMPTY_PROPERTIES
    will: Will | None = None
    # Never in a repr (a log line or traceback that formats the packet): credentials.
    username: str | None = dataclasses.field(default=None, repr=False)
    password: bytes | None = dataclasses.field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0  # the 3.1.1 "return code" (0-5) for 3.1.1
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present exactly when qos > 0 (§2.2.1)
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (§3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False  # v5 only
    retain_as_published: bool = False  # v5 only
    retain_handling: int = 0  # v5 only: 0 send retained, 1 only if new, 2 never


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # empty for 3.1.1, which has no payload (§3.11.3)
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


Packet = (Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe
          | Suback | Unsubscribe | Unsuback | Pingreq | Pingresp | Disconnect | Auth)

PINGREQ: Final = Pingreq()
PINGRESP: Final = Pingresp()


# --- primitive readers (bounded by ``end``; every overrun is a malformed packet) ----


def _read_u16(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    if off + 2 > end:
        raise _malformed("packet ends inside a two-byte integer")
    return (buf[off] << 8) | buf[off + 1], off + 2


def _read_u32(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    if off + 4 > end:
        raise _malformed("packet ends inside a four-byte integer")
    value: int = int.from_bytes(buf[off:off + 4], "big")
    return value, off + 4


def _read_varint(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer (§1.5.5): at most four bytes, minimally encoded."""
    value = 0
    shift = 0
    for count in range(4):
        if off >= end:
            raise _malformed("packet ends inside a variable byte integer")
        byte = buf[off]
        off += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and count > 0:
                raise _malformed("variable byte integer is not minimally encoded (§1.5.5)")
            return value, off
        shift += 7
    raise _malformed("variable byte integer longer than four bytes (§1.5.5)")


def _utf8(raw: memoryview) -> str:
    # §1.5.4: well-formed UTF-8 (no encoded surrogates, which Python's strict codec
    # rejects) and no U+0000 [MQTT-1.5.4-1, MQTT-1.5.4-2].
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed("string is not well-formed UTF-8 (§1.5.4)") from exc
    if "\x00" in text:
        raise _malformed("string contains U+0000 (§1.5.4)")
    return text


def _read_str(buf: memoryview, off: int, end: int) -> tuple[str, int]:
    if off + 2 > end:
        raise _malformed("packet ends inside a string length")
    size = (buf[off] << 8) | buf[off + 1]
    start = off + 2
    stop = start + size
    if stop > end:
        raise _malformed("string runs past the end of the packet")
    return _utf8(buf[start:stop]), stop


def _read_bin(buf: memoryview, off: int, end: int) -> tuple[bytes, int]:
    if off + 2 > end:
        raise _malformed("packet ends inside a binary data length")
    size = (buf[off] << 8) | buf[off + 1]
    start = off + 2
    stop = start + size
    if stop > end:
        raise _malformed("binary data runs past the end of the packet")
    return bytes(buf[start:stop]), stop


def _read_properties(buf: memoryview, off: int, end: int, where: int) -> tuple[Properties, int]:
    """The property block at ``off`` (§2.2.2): length, then identifier/value pairs."""
    length, off = _read_varint(buf, off, end)
    if length == 0:
        return EMPTY_PROPERTIES, off
    stop = off + length
    if stop > end:
        raise _malformed("property length runs past the end of the packet")
    values: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    bit = 1 << where
    while off < stop:
        # Every identifier defined is below 128, so its variable byte integer is one
        # byte; a byte with the continuation bit names no property.
        spec = _SPEC_BY_ID.get(buf[off])
        if spec is None:
            raise _malformed(f"unknown property identifier 0x{buf[off]:02X} (§2.2.2.2)")
        off += 1
        if not spec.allowed_in & bit:
            raise _malformed(f"property {spec.name} is not allowed in this packet (§2.2.2.2)")
        kind = spec.kind
        value: Any
        if kind == _BYTE:
            if off >= stop:
                raise _malformed("packet ends inside a property")
            value = buf[off]
            off += 1
        elif kind == _U16:
            value, off = _read_u16(buf, off, stop)
        elif kind == _U32:
            value, off = _read_u32(buf, off, stop)
        elif kind == _VARINT:
            value, off = _read_varint(buf, off, stop)
        elif kind == _STRING:
            value, off = _read_str(buf, off, stop)
        elif kind == _BINARY:
            value, off = _read_bin(buf, off, stop)
        else:
            key, off = _read_str(buf, off, stop)
            text, off = _read_str(buf, off, stop)
            value = (key, text)
        if spec.boolean and value > 1:
            raise _protocol_error(f"property {spec.name} must be 0 or 1")
        if spec.non_zero and value == 0:
            raise _protocol_error(f"property {spec.name} must not be 0")
        if spec.name == "user_properties":
            users.append(value)
        elif spec.name == "subscription_identifiers":
            sub_ids.append(value)
        elif spec.name in values:
            raise _protocol_error(f"property {spec.name} appears more than once (§2.2.2.2)")
        else:
            values[spec.name] = value
    if users:
        values["user_properties"] = tuple(users)
    if sub_ids:
        values["subscription_identifiers"] = tuple(sub_ids)
    return Properties(**values), stop


def _check_reason(code: int, allowed: frozenset[int], packet: str) -> int:
    if code not in allowed:
        raise _malformed(f"reason code 0x{code:02X} is not defined for {packet}")
    return code


def _expect_end(off: int, end: int, packet: str) -> None:
    if off != end:
        raise _malformed(f"{end - off} unexpected bytes at the end of {packet}")


def _read_packet_id(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    packet_id, off = _read_u16(buf, off, end)
    if packet_id == 0:
        # §2.2.1 [MQTT-2.2.1-3]: packets that carry an identifier need a non-zero one.
        raise _protocol_error("packet identifier 0 (§2.2.1)")
    return packet_id, off


# --- decoders, one per packet type ------------------------------------------------------


def _decode_connect(flags: int, buf: memoryview, version: int | None) -> Connect:
    end = len(buf)
    name, off = _read_str(buf, 0, end)
    if off >= end:
        raise _malformed("CONNECT ends before the protocol level")
    level = buf[off]
    off += 1
    if name != "MQTT" or level not in SUPPORTED_VERSIONS:
        if name in ("MQTT", "MQIsdp"):
            # 3.1.1 §3.1.2.2 [MQTT-3.1.2-2] / 5.0 §3.1.2.2: answer "unsupported protocol
            # version" (3.1.1 return code 1), then close.
            raise MalformedPacket(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                                  f"protocol {name!r} level {level} is not supported",
                                  hint="connect with MQTT 3.1.1 (level 4) or 5.0 (level 5)")
        raise _malformed("protocol name is not 'MQTT' (§3.1.2.1)")
    if off + 3 > end:
        raise _malformed("CONNECT ends inside its variable header")
    connect_flags = buf[off]
    keep_alive = (buf[off + 1] << 8) | buf[off + 2]
    off += 3
    if connect_flags & 0x01:
        raise _malformed("CONNECT reserved flag is set (§3.1.2.3)")
    will_flag = connect_flags & 0x04
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    has_password = connect_flags & 0x40
    has_username = connect_flags & 0x80
    if will_qos == 3:
        raise _malformed("Will QoS 3 (§3.1.2.6)")
    if not will_flag and (will_qos or will_retain):
        raise _malformed("Will QoS/Retain set without the Will Flag (§3.1.2.6, §3.1.2.7)")
    if level == MQTT_311 and has_password and not has_username:
        raise _malformed("password without user name (3.1.1 §3.1.2.9 [MQTT-3.1.2-22])")
    properties = EMPTY_PROPERTIES
    if level == MQTT_5:
        properties, off = _read_properties(buf, off, end, PacketType.CONNECT)
    client_id, off = _read_str(buf, off, end)
    will = None
    if will_flag:
        will_properties = EMPTY_PROPERTIES
        if level == MQTT_5:
            will_properties, off = _read_properties(buf, off, end, WILL_PROPERTIES)
        will_topic, off = _read_str(buf, off, end)
        will_payload, off = _read_bin(buf, off, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = None
    password = None
    if has_username:
        username, off = _read_str(buf, off, end)
    if has_password:
        password, off = _read_bin(buf, off, end)
    _expect_end(off, end, "CONNECT")
    return Connect(client_id, level, bool(connect_flags & 0x02), keep_alive, properties, will,
                   username, password)


def _decode_connack(flags: int, buf: memoryview, version: int | None) -> Connack:
    end = len(buf)
    if end < 2:
        raise _malformed("CONNACK shorter than two bytes")
    if buf[0] & 0xFE:
        raise _malformed("CONNACK acknowledge flags reserved bits set (§3.2.2.1)")
    session_present = bool(buf[0])
    code = buf[1]
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        _check_reason(code, _CONNACK_CODES, "CONNACK")
        properties, off = _read_properties(buf, 2, end, PacketType.CONNACK)
        _expect_end(off, end, "CONNACK")
    else:
        _check_reason(code, _V311_CONNACK_CODES, "CONNACK")
        _expect_end(2, end, "CONNACK")
    if session_present and code != 0:
        raise _protocol_error("Session Present with a failure code (§3.2.2.1.1)")
    return Connack(session_present, code, properties)


def _decode_publish(flags: int, buf: memoryview, version: int | None) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _malformed("PUBLISH with QoS 3 (§3.3.1.2)")
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise _protocol_error("DUP set on a QoS 0 PUBLISH (§3.3.1.1 [MQTT-3.3.1-2])")
    end = len(buf)
    topic, off = _read_str(buf, 0, end)
    packet_id = None
    if qos:
        packet_id, off = _read_packet_id(buf, off, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, off = _read_properties(buf, off, end, PacketType.PUBLISH)
    return Publish(topic, bytes(buf[off:]), qos, bool(flags & 0x01), dup, packet_id, properties)


def _ack_fields(buf: memoryview, version: int | None, allowed: frozenset[int],
                kind: PacketType) -> tuple[int, int, Properties]:
    end = len(buf)
    packet_id, off = _read_packet_id(buf, 0, end)
    if version != MQTT_5 or end == 2:
        _expect_end(off, end, kind.name)
        return packet_id, 0, EMPTY_PROPERTIES
    # §3.4.2.1: Reason Code and properties may be omitted (length 2, or 3 without props).
    code = _check_reason(buf[2], allowed, kind.name)
    if end == 3:
        return packet_id, code, EMPTY_PROPERTIES
    properties, off = _read_properties(buf, 3, end, kind)
    _expect_end(off, end, kind.name)
    return packet_id, code, properties


def _decode_puback(flags: int, buf: memoryview, version: int | None) -> Puback:
    return Puback(*_ack_fields(buf, version, PUBACK_REASON_CODES, PacketType.PUBACK))


def _decode_pubrec(flags: int, buf: memoryview, version: int | None) -> Pubrec:
    return Pubrec(*_ack_fields(buf, version, PUBACK_REASON_CODES, PacketType.PUBREC))


def _decode_pubrel(flags: int, buf: memoryview, version: int | None) -> Pubrel:
    return Pubrel(*_ack_fields(buf, version, _PUBREL_CODES, PacketType.PUBREL))


def _decode_pubcomp(flags: int, buf: memoryview, version: int | None) -> Pubcomp:
    return Pubcomp(*_ack_fields(buf, version, _PUBREL_CODES, PacketType.PUBCOMP))


def _decode_subscribe(flags: int, buf: memoryview, version: int | None) -> Subscribe:
    end = len(buf)
    packet_id, off = _read_packet_id(buf, 0, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, off = _read_properties(buf, off, end, PacketType.SUBSCRIBE)
        if len(properties.subscription_identifiers) > 1:
            raise _protocol_error("more than one Subscription Identifier (§3.8.2.1.2)")
    subscriptions: list[Subscription] = []
    while off < end:
        topic_filter, off = _read_str(buf, off, end)
        if off >= end:
            raise _malformed("SUBSCRIBE ends before the subscription options")
        options = buf[off]
        off += 1
        qos = options & 0x03
        if qos == 3:
            raise _malformed("subscription with QoS 3 (§3.8.3.1)")
        if version == MQTT_5:
            if options & 0xC0:
                raise _malformed("subscription options reserved bits set (§3.8.3.1)")
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                raise _protocol_error("Retain Handling 3 (§3.8.3.1)")
            subscriptions.append(Subscription(topic_filter, qos, bool(options & 0x04),
                                              bool(options & 0x08), retain_handling))
        else:
            if options & 0xFC:
                raise _malformed("requested QoS byte reserved bits set (3.1.1 §3.8.3.1)")
            subscriptions.append(Subscription(topic_filter, qos))
    if not subscriptions:
        # §3.8.3 [MQTT-3.8.3-2] (3.1.1 [MQTT-3.8.3-3]): at least one subscription.
        raise _protocol_error("SUBSCRIBE without a topic filter (§3.8.3)")
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _decode_suback(flags: int, buf: memoryview, version: int | None) -> Suback:
    end = len(buf)
    packet_id, off = _read_packet_id(buf, 0, end)
    properties = EMPTY_PROPERTIES
    allowed = _V311_SUBACK_CODES
    if version == MQTT_5:
        properties, off = _read_properties(buf, off, end, PacketType.SUBACK)
        allowed = _SUBACK_CODES
    codes = tuple(_check_reason(code, allowed, "SUBACK") for code in buf[off:end])
    if not codes:
        raise _protocol_error("SUBACK without a reason code (§3.9.3)")
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(flags: int, buf: memoryview, version: int | None) -> Unsubscribe:
    end = len(buf)
    packet_id, off = _read_packet_id(buf, 0, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, off = _read_properties(buf, off, end, PacketType.UNSUBSCRIBE)
    filters: list[str] = []
    while off < end:
        topic_filter, off = _read_str(buf, off, end)
        filters.append(topic_filter)
    if not filters:
        raise _protocol_error("UNSUBSCRIBE without a topic filter (§3.10.3)")
    return Unsubscribe(packet_id, tuple(filters), properties)


def _decode_unsuback(flags: int, buf: memoryview, version: int | None) -> Unsuback:
    end = len(buf)
    packet_id, off = _read_packet_id(buf, 0, end)
    if version != MQTT_5:
        _expect_end(off, end, "UNSUBACK")
        return Unsuback(packet_id)
    properties, off = _read_properties(buf, off, end, PacketType.UNSUBACK)
    codes = tuple(_check_reason(code, _UNSUBACK_CODES, "UNSUBACK") for code in buf[off:end])
    if not codes:
        raise _protocol_error("UNSUBACK without a reason code (§3.11.3)")
    return Unsuback(packet_id, codes, properties)


def _decode_pingreq(flags: int, buf: memoryview, version: int | None) -> Pingreq:
    _expect_end(0, len(buf), "PINGREQ")
    return PINGREQ


def _decode_pingresp(flags: int, buf: memoryview, version: int | None) -> Pingresp:
    _expect_end(0, len(buf), "PINGRESP")
    return PINGRESP


def _decode_disconnect(flags: int, buf: memoryview, version: int | None) -> Disconnect:
    end = len(buf)
    if version != MQTT_5 or end == 0:
        _expect_end(0, end, "DISCONNECT")
        return Disconnect()
    code = _check_reason(buf[0], _DISCONNECT_CODES, "DISCONNECT")
    if end == 1:
        return Disconnect(code)
    properties, off = _read_properties(buf, 1, end, PacketType.DISCONNECT)
    _expect_end(off, end, "DISCONNECT")
    return Disconnect(code, properties)


def _decode_auth(flags: int, buf: memoryview, version: int | None) -> Auth:
    if version != MQTT_5:
        raise _malformed("packet type 15 is reserved in MQTT 3.1.1 (§2.2.1)")
    end = len(buf)
    if end == 0:
        return Auth()
    code = _check_reason(buf[0], _AUTH_CODES, "AUTH")
    if end == 1:
        return Auth(code)
    properties, off = _read_properties(buf, 1, end, PacketType.AUTH)
    _expect_end(off, end, "AUTH")
    return Auth(code, properties)


_Decoder = Callable[[int, memoryview, "int | None"], Packet]
# Indexed by packet type; each entry: (decoder, required fixed-header flags or None when
# the flags carry data, as for PUBLISH). §2.1.3, Table 2-2.
_DECODERS: Final[tuple[tuple[_Decoder, int | None] | None, ...]] = (
    None,  # type 0 is reserved
    (_decode_connect, 0),
    (_decode_connack, 0),
    (_decode_publish, None),
    (_decode_puback, 0),
    (_decode_pubrec, 0),
    (_decode_pubrel, 2),
    (_decode_pubcomp, 0),
    (_decode_subscribe, 2),
    (_decode_suback, 0),
    (_decode_unsubscribe, 2),
    (_decode_unsuback, 0),
    (_decode_pingreq, 0),
    (_decode_pingresp, 0),
    (_decode_disconnect, 0),
    (_decode_auth, 0),
)


class PacketReader:
    """Incremental decoder for one connection's byte stream.

    ``feed`` the bytes as they arrive, then call ``next_packet`` until it returns
    ``None``. Only one packet is ever buffered, and only once its fixed header has
    shown that it fits ``max_packet_size`` (the whole packet, fixed header included,
    as MQTT 5.0 §3.1.2.11.4 counts it).

    ``version`` is the protocol level the stream speaks; a reader created without
    one accepts only CONNECT first (§3.1 [MQTT-3.1.0-1]) and takes the version from it.
    """

    __slots__ = ("_data", "_need", "_pending", "_pending_len", "_pos", "max_packet_size",
                 "version")

    def __init__(self, max_packet_size: int, version: int | None = None) -> None:
        self.max_packet_size = max_packet_size
        self.version = version
        self._data = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = 2  # bytes (from _pos) before another attempt is worth it

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as packets."""
        return len(self._data) - self._pos + self._pending_len

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._pos >= len(self._data):
            self._data = bytes(data)
            self._pos = 0
        else:
            # Collect the rest of a partial packet; joined once, when it is complete.
            self._pending.append(bytes(data))
            self._pending_len += len(data)

    def next_packet(self) -> Packet | None:
        """The next complete packet, or ``None`` until more bytes arrive.

        Raises:
            MalformedPacket: the stream is not valid MQTT; the connection must close.
        """
        pos = self._pos
        data = self._data
        if len(data) - pos + self._pending_len < self._need:
            return None
        if self._pending:
            data = self._data = data[pos:] + b"".join(self._pending)
            pos = self._pos = 0
            self._pending = []
            self._pending_len = 0
        size = len(data)
        first = data[pos]
        # Remaining Length (§2.1.4): one to four bytes, minimally encoded.
        byte = data[pos + 1]
        if byte < 0x80:
            remaining = byte
            header = 2
        else:
            remaining = byte & 0x7F
            shift = 7
            index = pos + 2
            while True:
                if index >= size:
                    self._need = index - pos + 1
                    return None
                byte = data[index]
                index += 1
                remaining |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                if index - pos > 4:
                    raise _malformed("Remaining Length longer than four bytes (§2.1.4)")
                shift += 7
            if byte == 0:
                raise _malformed("Remaining Length is not minimally encoded (§1.5.5)")
            header = index - pos
        total = header + remaining
        if total > self.max_packet_size:
            raise MalformedPacket(ReasonCode.PACKET_TOO_LARGE,
                                  f"packet of {total} bytes exceeds the maximum packet size "
                                  f"of {self.max_packet_size} bytes",
                                  hint="send smaller packets; CONNACK announces the limit")
        # Refuse what the fixed header already condemns before waiting for the body.
        ptype = first >> 4
        flags = first & 0x0F
        if self.version is None and ptype != PacketType.CONNECT:
            raise _protocol_error("the first packet must be CONNECT (§3.1 [MQTT-3.1.0-1])")
        entry = _DECODERS[ptype]
        if entry is None:
            raise _malformed("reserved packet type 0 (§2.1.2)")
        decoder, required_flags = entry
        if required_flags is not None and flags != required_flags:
            raise _malformed(f"{PacketType(ptype).name} with reserved flags "
                             f"0x{flags:X} (§2.1.3)")
        if size - pos < total:
            self._need = total
            return None
        end = pos + total
        if end == size:
            self._data = b""
            self._pos = 0
        else:
            self._pos = end
        self._need = 2
        packet = decoder(flags, memoryview(data)[pos + header:end], self.version)
        if self.version is None and isinstance(packet, Connect):
            self.version = packet.protocol_version
        return packet


def decode_all(data: bytes, version: int | None = None,
               max_packet_size: int = MAX_VARIABLE_BYTE_INTEGER + 5) -> list[Packet]:
    """Every packet in ``data`` (which must end on a packet boundary).

    Raises:
        MalformedPacket: invalid bytes, or a partial packet at the end.
    """
    reader = PacketReader(max_packet_size, version)
    reader.feed(data)
    packets: list[Packet] = []
    while (packet := reader.next_packet()) is not None:
        packets.append(packet)
    if reader.buffered:
        raise _malformed(f"{reader.buffered} bytes of an incomplete packet at the end")
    return packets


# --- encoders ---------------------------------------------------------------------------

_VARINT_1: Final = tuple(bytes((n,)) for n in range(128))
_U16_PACK: Final = struct.Struct("!H").pack
_U32_PACK: Final = struct.Struct("!I").pack


def _varint(value: int) -> bytes:
    if value < 128:
        return _VARINT_1[value]
    if value > MAX_VARIABLE_BYTE_INTEGER:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError("MQTT strings are at most 65,535 bytes (§1.5.4)")
    return _U16_PACK(len(raw)) + raw


def _bin(raw: bytes) -> bytes:
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError("MQTT binary data is at most 65,535 bytes (§1.5.6)")
    return _U16_PACK(len(raw)) + raw


def encode_properties(properties: Properties) -> bytes:
    """The property block (§2.2.2): Variable Byte Integer length, then the properties."""
    if properties is EMPTY_PROPERTIES:
        return b"\x00"
    parts: list[bytes] = []
    for spec in _PROPERTY_SPECS:
        value = getattr(properties, spec.name)
        if value is None or value == ():
            continue
        values = value if spec.name in _REPEATABLE else (value,)
        for item in values:
            parts.append(_VARINT_1[spec.identifier])
            kind = spec.kind
            if kind == _BYTE:
                parts.append(bytes((item,)))
            elif kind == _U16:
                parts.append(_U16_PACK(item))
            elif kind == _U32:
                parts.append(_U32_PACK(item))
            elif kind == _VARINT:
                parts.append(_varint(item))
            elif kind == _STRING:
                parts.append(_str(item))
            elif kind == _BINARY:
                parts.append(_bin(item))
            else:
                parts.append(_str(item[0]))
                parts.append(_str(item[1]))
    body = b"".join(parts)
    return _varint(len(body)) + body


def _frame(first: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes((first,)) + _varint(len(body)) + body


def _encode_connect(packet: Connect, version: int) -> bytes:
    level = packet.protocol_version
    will = packet.will
    flags = 0x02 if packet.clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.password is not None:
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    parts = [_str("MQTT"), bytes((level, flags)), _U16_PACK(packet.keep_alive)]
    if level == MQTT_5:
        parts.append(encode_properties(packet.properties))
    parts.append(_str(packet.client_id))
    if will is not None:
        if level == MQTT_5:
            parts.append(encode_properties(will.properties))
        parts.append(_str(will.topic))
        parts.append(_bin(will.payload))
    if packet.username is not None:
        parts.append(_str(packet.username))
    if packet.password is not None:
        parts.append(_bin(packet.password))
    return _frame(0x10, *parts)


def _encode_connack(packet: Connack, version: int) -> bytes:
    head = bytes((1 if packet.session_present else 0, packet.reason_code))
    if version == MQTT_5:
        return _frame(0x20, head, encode_properties(packet.properties))
    return _frame(0x20, head)


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                   packet_id: int | None, properties: Properties, version: int) -> bytes:
    """One PUBLISH packet (§3.3), without building a :class:`Publish` first: the
    server's delivery path calls this for every outgoing message."""
    raw_topic = topic.encode("utf-8")
    if len(raw_topic) > MAX_STRING_BYTES:
        raise ValueError("MQTT strings are at most 65,535 bytes (§1.5.4)")
    parts = [_U16_PACK(len(raw_topic)), raw_topic]
    if qos:
        parts.append(_U16_PACK(packet_id or 0))
    if version == MQTT_5:
        parts.append(encode_properties(properties))
    parts.append(payload)
    body = b"".join(parts)
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes((first,)) + _varint(len(body)) + body


def _encode_publish(packet: Publish, version: int) -> bytes:
    return encode_publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup,
                          packet.packet_id, packet.properties, version)


def _encode_ack(first: int, packet_id: int, code: int, properties: Properties,
                version: int) -> bytes:
    if version != MQTT_5 or (code == 0 and properties is EMPTY_PROPERTIES):
        return bytes((first, 2)) + _U16_PACK(packet_id)
    if properties is EMPTY_PROPERTIES:
        return bytes((first, 3)) + _U16_PACK(packet_id) + bytes((code,))
    return _frame(first, _U16_PACK(packet_id), bytes((code,)), encode_properties(properties))


def _encode_puback(packet: Puback, version: int) -> bytes:
    return _encode_ack(0x40, packet.packet_id, packet.reason_code, packet.properties, version)


def _encode_pubrec(packet: Pubrec, version: int) -> bytes:
    return _encode_ack(0x50, packet.packet_id, packet.reason_code, packet.properties, version)


def _encode_pubrel(packet: Pubrel, version: int) -> bytes:
    return _encode_ack(0x62, packet.packet_id, packet.reason_code, packet.properties, version)


def _encode_pubcomp(packet: Pubcomp, version: int) -> bytes:
    return _encode_ack(0x70, packet.packet_id, packet.reason_code, packet.properties, version)


def _encode_subscribe(packet: Subscribe, version: int) -> bytes:
    parts = [_U16_PACK(packet.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(packet.properties))
    for sub in packet.subscriptions:
        options = sub.qos
        if version == MQTT_5:
            options |= ((0x04 if sub.no_local else 0) | (0x08 if sub.retain_as_published else 0)
                        | (sub.retain_handling << 4))
        parts.append(_str(sub.topic_filter))
        parts.append(bytes((options,)))
    return _frame(0x82, *parts)


def _encode_suback(packet: Suback, version: int) -> bytes:
    parts = [_U16_PACK(packet.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(packet.properties))
    parts.append(bytes(packet.reason_codes))
    return _frame(0x90, *parts)


def _encode_unsubscribe(packet: Unsubscribe, version: int) -> bytes:
    parts = [_U16_PACK(packet.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(packet.properties))
    parts.extend(_str(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, *parts)


def _encode_unsuback(packet: Unsuback, version: int) -> bytes:
    if version != MQTT_5:
        return bytes((0xB0, 2)) + _U16_PACK(packet.packet_id)
    return _frame(0xB0, _U16_PACK(packet.packet_id), encode_properties(packet.properties),
                  bytes(packet.reason_codes))


def _encode_pingreq(packet: Pingreq, version: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(packet: Pingresp, version: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(packet: Disconnect, version: int) -> bytes:
    if version != MQTT_5 or (packet.reason_code == 0
                             and packet.properties is EMPTY_PROPERTIES):
        return b"\xe0\x00"
    if packet.properties is EMPTY_PROPERTIES:
        return bytes((0xE0, 1, packet.reason_code))
    return _frame(0xE0, bytes((packet.reason_code,)), encode_properties(packet.properties))


def _encode_auth(packet: Auth, version: int) -> bytes:
    if version != MQTT_5:
        raise ValueError("AUTH exists only in MQTT 5.0 (§3.15)")
    if packet.reason_code == 0 and packet.properties is EMPTY_PROPERTIES:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((packet.reason_code,)), encode_properties(packet.properties))


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _encode_puback,
    Pubrec: _encode_pubrec,
    Pubrel: _encode_pubrel,
    Pubcomp: _encode_pubcomp,
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_pingreq,
    Pingresp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, version: int) -> bytes:
    """The wire form of ``packet`` for protocol level ``version`` (4 or 5).

    3.1.1 has no properties and no reason codes outside CONNACK/SUBACK: they are left
    out. CONNECT is encoded for its own ``protocol_version``.

    Raises:
        ValueError: a string or binary field longer than 65,535 bytes, or a packet
            that does not exist in ``version``.
    """
    return _ENCODERS[type(packet)](packet, version)


def with_properties(properties: Properties, **changes: Any) -> Properties:
    """A copy of ``properties`` with ``changes`` applied."""
    return dataclasses.replace(properties, **changes)
