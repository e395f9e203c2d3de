"""MQTT 5.0 AUTH packets (§3.15) for paho-mqtt 2.x, which has none.

paho-mqtt 2.x sends the Authentication Method and Data of a CONNECT (they are ordinary
CONNECT properties) but treats an incoming AUTH packet as an unknown command and drops
the connection, and has no way to send one. ``AuthClient`` is exactly that missing
piece and nothing more: a ``paho.mqtt.client.Client`` subclass that

- overrides ``_packet_handle`` for command 0xF0 only (every other packet goes to paho),
  parses the reason code and properties with paho's own
  ``paho.mqtt.properties.Properties(PacketTypes.AUTH)`` and hands them to ``on_auth``;
- sends AUTH packets with paho's own ``_packet_queue`` (the path every paho packet takes,
  so keep-alive accounting and the network thread stay paho's).

Both are private paho methods (stable across 2.0-2.2); the tests pin the wire bytes
against Fleetward's own MQTT codec, so a paho change that breaks them fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

AUTH_PACKET = 0xF0  # MQTT 5.0 §3.15.1: packet type 15, flags 0
SUCCESS = 0x00  # §3.15.2.1 Authenticate Reason Codes
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
AUTH_REASON_CODES = frozenset({SUCCESS, CONTINUE_AUTHENTICATION, RE_AUTHENTICATE})

# (reason code, Authentication Method or None, Authentication Data or None)
AuthHandler = Callable[[int, str | None, bytes | None], None]


class MalformedAuth(ValueError):
    """An AUTH packet that breaks §3.15: the connection must be closed."""


def decode_auth(fixed_header: int, body: bytes) -> tuple[int, str | None, bytes | None]:
    """Reason code, Authentication Method and Authentication Data of an AUTH packet.

    Args:
        fixed_header: its first byte (0xF0: the flags must be 0, §3.15.1).
        body: everything after the Remaining Length.

    Raises:
        MalformedAuth: reserved flags set, an unknown reason code, or bad properties.
    """
    if fixed_header != AUTH_PACKET:
        raise MalformedAuth("AUTH with reserved flags set (§3.15.1)")
    if not body:
        return SUCCESS, None, None  # §3.15.2.1: no reason code and no properties = 0x00
    reason = body[0]
    if reason not in AUTH_REASON_CODES:
        raise MalformedAuth(f"AUTH reason code 0x{reason:02X} is not defined (§3.15.2.1)")
    props = Properties(PacketTypes.AUTH)  # type: ignore[no-untyped-call]
    if len(body) > 1:
        try:
            _, length = props.unpack(body[1:])  # type: ignore[no-untyped-call]
        except Exception as exc:  # paho raises MQTTException, IndexError, …
            raise MalformedAuth(f"AUTH properties cannot be read: {type(exc).__name__}") \
                from None
        if 1 + length != len(body):
            raise MalformedAuth("AUTH has bytes after its properties")
    method = getattr(props, "AuthenticationMethod", None)
    data = getattr(props, "AuthenticationData", None)
    return (reason, method if isinstance(method, str) else None,
            bytes(data) if isinstance(data, bytes | bytearray) else None)


def encode_auth(reason_code: int, method: str, data: bytes | None) -> bytearray:
    """The bytes of one AUTH packet (§3.15): fixed header, reason code, properties.

    Args:
        reason_code: 0x00, 0x18 or 0x19 (§3.15.2.1).
        method: the Authentication Method (``FW-TOKEN``).
        data: the Authentication Data (a token, a proof), or None.

    Raises:
        ValueError: another reason code.

    Returns:
        The packet, ready for paho's output queue.
    """
    if reason_code not in AUTH_REASON_CODES:
        raise ValueError(f"AUTH reason code 0x{reason_code:02X} is not defined")
    props = Properties(PacketTypes.AUTH)  # type: ignore[no-untyped-call]
    props.AuthenticationMethod = method
    if data is not None:
        props.AuthenticationData = data
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    remaining = 1 + len(packed)
    packet = bytearray([AUTH_PACKET])
    while True:  # Variable Byte Integer (§1.5.5)
        byte, remaining = remaining % 128, remaining // 128
        packet.append(byte | (0x80 if remaining else 0))
        if not remaining:
            break
    packet.append(reason_code)
    packet += packed
    return packet


class AuthClient(mqtt.Client):
    """A paho ``Client`` that also receives and sends MQTT 5.0 AUTH packets.

    ``on_auth`` runs on paho's network thread, like paho's own callbacks: it must not
    block (signing a proof is fine). Without ``on_auth`` an AUTH packet is a protocol
    error, as in plain paho.
    """

    on_auth: AuthHandler | None = None

    def _packet_handle(self) -> MQTTErrorCode:
        command = self._in_packet["command"]
        if command & 0xF0 != AUTH_PACKET or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._packet_handle()
        handler = self.on_auth
        if handler is None:
            self._easy_log(mqtt.MQTT_LOG_ERR, "Error: AUTH received but no handler is set")
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        try:
            reason, method, data = decode_auth(command, bytes(self._in_packet["packet"]))
        except MalformedAuth as exc:
            self._easy_log(mqtt.MQTT_LOG_ERR, "Error: malformed AUTH: %s", str(exc))
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received AUTH reason=0x%02X", reason)
        handler(reason, method, data)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def send_auth(self, reason_code: int, method: str, data: bytes | None) -> MQTTErrorCode:
        """Queue one AUTH packet; thread-safe like ``publish`` (paho's network thread
        writes it).

        Args:
            reason_code: 0x18 (an answer to a challenge) or 0x19 (re-authenticate).
            method: the Authentication Method of the CONNECT.
            data: the Authentication Data.

        Raises:
            ValueError: the session is not MQTT 5.0.

        Returns:
            paho's result: ``MQTT_ERR_SUCCESS`` once queued on a running network loop.
        """
        if self._protocol != MQTTProtocolVersion.MQTTv5:
            raise ValueError("AUTH exists in MQTT 5.0 only")
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Sending AUTH reason=0x%02X", reason_code)
        return self._packet_queue(AUTH_PACKET, encode_auth(reason_code, method, data), 0, 0)


__all__ = ["AUTH_PACKET", "CONTINUE_AUTHENTICATION", "RE_AUTHENTICATE", "SUCCESS",
           "AuthClient", "AuthHandler", "MalformedAuth", "decode_auth", "encode_auth"]
