"""The MQTT codec: every packet of both versions round-trips, and no byte string makes
the decoder raise anything but MalformedPacket or buffer more than one packet."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetward.edge.mqtt import codec as c
from fleetward.edge.mqtt.codec import MalformedPacket, PacketReader
from fleetward.errors import InvalidInput

# --- strategies -------------------------------------------------------------------------------

# MQTT strings (§1.5.4): well-formed UTF-8 without U+0000 (surrogates cannot be encoded).
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=12)
binaries = st.binary(max_size=16)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
flag = st.integers(0, 1)
packet_ids = st.integers(1, 0xFFFF)

# The oracle, typed from MQTT 5.0 §2.2.2.2 Table 2-4 independently of the codec's table:
# property → (value strategy, packets it may appear in).
PUBLISH, WILL = "PUBLISH", "WILL"
PROPERTY_TABLE = {
    "payload_format_indicator": (flag, {PUBLISH, WILL}),
    "message_expiry_interval": (u32, {PUBLISH, WILL}),
    "content_type": (texts, {PUBLISH, WILL}),
    "response_topic": (texts, {PUBLISH, WILL}),
    "correlation_data": (binaries, {PUBLISH, WILL}),
    "session_expiry_interval": (u32, {"CONNECT", "CONNACK", "DISCONNECT"}),
    "assigned_client_identifier": (texts, {"CONNACK"}),
    "server_keep_alive": (u16, {"CONNACK"}),
    "authentication_method": (texts, {"CONNECT", "CONNACK", "AUTH"}),
    "authentication_data": (binaries, {"CONNECT", "CONNACK", "AUTH"}),
    "request_problem_information": (flag, {"CONNECT"}),
    "will_delay_interval": (u32, {WILL}),
    "request_response_information": (flag, {"CONNECT"}),
    "response_information": (texts, {"CONNACK"}),
    "server_reference": (texts, {"CONNACK", "DISCONNECT"}),
    "reason_string": (texts, {"CONNACK", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBACK",
                              "UNSUBACK", "DISCONNECT", "AUTH"}),
    "receive_maximum": (st.integers(1, 0xFFFF), {"CONNECT", "CONNACK"}),
    "topic_alias_maximum": (u16, {"CONNECT", "CONNACK"}),
    "topic_alias": (st.integers(1, 0xFFFF), {PUBLISH}),
    "maximum_qos": (flag, {"CONNACK"}),
    "retain_available": (flag, {"CONNACK"}),
    "maximum_packet_size": (st.integers(1, 0xFFFF_FFFF), {"CONNECT", "CONNACK"}),
    "wildcard_subscription_available": (flag, {"CONNACK"}),
    "subscription_identifier_available": (flag, {"CONNACK"}),
    "shared_subscription_available": (flag, {"CONNACK"}),
}


@st.composite
def properties(draw: st.DrawFn, where: str) -> c.Properties:
    values = {}
    for name, (strategy, allowed) in PROPERTY_TABLE.items():
        if where in allowed and draw(st.booleans()):
            values[name] = draw(strategy)
    if draw(st.booleans()):
        values["user_properties"] = tuple(draw(st.lists(st.tuples(texts, texts), max_size=3)))
    if where in (PUBLISH, "SUBSCRIBE") and draw(st.booleans()):
        ids = st.integers(1, c.MAX_VARIABLE_BYTE_INTEGER)
        values["subscription_identifiers"] = tuple(
            draw(st.lists(ids, min_size=1, max_size=1 if where == "SUBSCRIBE" else 3)))
    return c.Properties(**values)


def props(where: str, version: int) -> st.SearchStrategy[c.Properties]:
    return properties(where) if version == c.MQTT_5 else st.just(c.EMPTY_PROPERTIES)


@st.composite
def connects(draw: st.DrawFn, version: int) -> c.Connect:
    will = None
    if draw(st.booleans()):
        will = c.Will(draw(texts), draw(binaries), draw(st.integers(0, 2)), draw(st.booleans()),
                      draw(props(WILL, version)))
    username = draw(st.none() | texts)
    password = draw(st.none() | binaries)
    if version == c.MQTT_311 and username is None:
        password = None  # 3.1.1 §3.1.2.9: no password without a user name
    return c.Connect(draw(texts), version, draw(st.booleans()), draw(u16),
                     draw(props("CONNECT", version)), will, username, password)


@st.composite
def connacks(draw: st.DrawFn, version: int) -> c.Connack:
    codes = sorted(c._CONNACK_CODES) if version == c.MQTT_5 else list(range(6))
    code = draw(st.sampled_from(codes))
    present = draw(st.booleans()) if code == 0 else False
    return c.Connack(present, code, draw(props("CONNACK", version)))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> c.Publish:
    qos = draw(st.integers(0, 2))
    return c.Publish(draw(texts), draw(st.binary(max_size=64)), qos, draw(st.booleans()),
                     draw(st.booleans()) if qos else False,
                     draw(packet_ids) if qos else None, draw(props(PUBLISH, version)))


def acks(kind: type, name: str, codes: frozenset[int], version: int) -> st.SearchStrategy[object]:
    if version == c.MQTT_311:
        return st.builds(kind, packet_ids)
    return st.builds(kind, packet_ids, st.sampled_from(sorted(codes)), properties(name))


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> c.Subscribe:
    if version == c.MQTT_5:
        sub = st.builds(c.Subscription, texts, st.integers(0, 2), st.booleans(), st.booleans(),
                        st.integers(0, 2))
    else:
        sub = st.builds(c.Subscription, texts, st.integers(0, 2))
    return c.Subscribe(draw(packet_ids), tuple(draw(st.lists(sub, min_size=1, max_size=4))),
                       draw(props("SUBSCRIBE", version)))


def packets(version: int) -> st.SearchStrategy[object]:
    v5 = version == c.MQTT_5
    suback_codes = sorted(c._SUBACK_CODES) if v5 else [0, 1, 2, 0x80]
    choices = [
        connects(version), connacks(version), publishes(version),
        acks(c.Puback, "PUBACK", c.PUBACK_REASON_CODES, version),
        acks(c.Pubrec, "PUBREC", c.PUBACK_REASON_CODES, version),
        acks(c.Pubrel, "PUBREL", c._PUBREL_CODES, version),
        acks(c.Pubcomp, "PUBCOMP", c._PUBREL_CODES, version),
        subscribes(version),
        st.builds(c.Suback, packet_ids,
                  st.lists(st.sampled_from(suback_codes), min_size=1, max_size=4).map(tuple),
                  props("SUBACK", version)),
        st.builds(c.Unsubscribe, packet_ids, st.lists(texts, min_size=1, max_size=4).map(tuple),
                  props("UNSUBSCRIBE", version)),
        st.just(c.PINGREQ), st.just(c.PINGRESP),
    ]
    if v5:
        choices += [
            st.builds(c.Unsuback, packet_ids,
                      st.lists(st.sampled_from(sorted(c._UNSUBACK_CODES)), min_size=1,
                               max_size=4).map(tuple), properties("UNSUBACK")),
            st.builds(c.Disconnect, st.sampled_from(sorted(c._DISCONNECT_CODES)),
                      properties("DISCONNECT")),
            st.builds(c.Auth, st.sampled_from(sorted(c._AUTH_CODES)), properties("AUTH")),
        ]
    else:
        choices += [st.builds(c.Unsuback, packet_ids), st.just(c.Disconnect())]
    return st.one_of(choices)


def decode(data: bytes, version: int, packet: object) -> list[c.Packet]:
    # A CONNECT is read by a fresh reader (it sets the version); others need it.
    return c.decode_all(data, None if isinstance(packet, c.Connect) else version)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [c.MQTT_311, c.MQTT_5])
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_packet_round_trips(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    encoded = c.encode(packet, version)  # type: ignore[arg-type]
    assert decode(encoded, version, packet) == [packet]


@pytest.mark.parametrize("version", [c.MQTT_311, c.MQTT_5])
@settings(max_examples=100)
@given(data=st.data())
def test_any_split_of_a_stream_gives_the_same_packets(version: int, data: st.DataObject) -> None:
    first = data.draw(connects(version))
    rest = data.draw(st.lists(packets(version).filter(lambda p: not isinstance(p, c.Connect)),
                              max_size=5))
    stream = c.encode(first, version) + b"".join(c.encode(p, version) for p in rest)  # type: ignore[arg-type]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = PacketReader(1 << 20)
    decoded = []
    start = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[start:cut])
        start = cut
        while (packet := reader.next_packet()) is not None:
            decoded.append(packet)
    assert decoded == [first, *rest]
    assert reader.buffered == 0


def test_large_publish_round_trips_through_one_byte_chunks() -> None:
    packet = c.Publish("devices/d1/telemetry/blob", bytes(range(256)) * 400, 1, False, False, 9)
    data = c.encode(packet, c.MQTT_5)
    reader = PacketReader(1 << 20, c.MQTT_5)
    out = []
    for index in range(len(data)):
        reader.feed(data[index:index + 1])
        if (decoded := reader.next_packet()) is not None:
            out.append(decoded)
    assert out == [packet]


def test_short_forms_of_v5_acknowledgements() -> None:
    # §3.4.2.1: reason code 0 without properties may be left out (length 2); a reason
    # code without properties has length 3.
    assert c.encode(c.Puback(5), c.MQTT_5) == b"\x40\x02\x00\x05"
    assert c.encode(c.Puback(5, 0x87), c.MQTT_5) == b"\x40\x03\x00\x05\x87"
    assert c.decode_all(b"\x40\x03\x00\x05\x87", c.MQTT_5) == [c.Puback(5, 0x87)]
    assert c.decode_all(b"\xe0\x00", c.MQTT_5) == [c.Disconnect(0)]
    assert c.decode_all(b"\xe0\x01\x98", c.MQTT_5) == [c.Disconnect(0x98)]


# --- the decoder refuses what the spec forbids ------------------------------------------------

CONNECT_V5 = c.encode(c.Connect("d1", c.MQTT_5), c.MQTT_5)
CONNECT_V311 = c.encode(c.Connect("d1", c.MQTT_311), c.MQTT_311)


def _connect_with(flags: int, version: int = c.MQTT_311) -> bytes:
    body = b"\x00\x04MQTT" + bytes((version, flags)) + b"\x00\x3c"
    if version == c.MQTT_5:
        body += b"\x00"
    body += b"\x00\x02d1"
    return bytes((0x10, len(body))) + body


# (name of the defect, bytes, version of the reader, expected reason code)
MALFORMED = [
    ("remaining length of five bytes", b"\x30\xff\xff\xff\xff\x01", c.MQTT_5, 0x81),
    ("remaining length not minimal", b"\xc0\x80\x00", c.MQTT_5, 0x81),
    ("reserved packet type 0", b"\x00\x00", c.MQTT_5, 0x81),
    ("AUTH in 3.1.1", b"\xf0\x00", c.MQTT_311, 0x81),
    ("SUBSCRIBE with flags 0", b"\x80\x06\x00\x01\x00\x01a\x00", c.MQTT_5, 0x81),
    ("PUBREL with flags 0", b"\x60\x02\x00\x01", c.MQTT_5, 0x81),
    ("PINGREQ with flags", b"\xc1\x00", c.MQTT_5, 0x81),
    ("PINGREQ with a body", b"\xc0\x01\x00", c.MQTT_5, 0x81),
    ("PUBLISH QoS 3", b"\x36\x05\x00\x01a\x00\x01", c.MQTT_5, 0x81),
    ("PUBLISH DUP with QoS 0", b"\x38\x04\x00\x01a\x00", c.MQTT_5, 0x82),
    ("PUBLISH packet id 0", b"\x32\x06\x00\x01a\x00\x00\x00", c.MQTT_5, 0x82),
    ("topic not UTF-8", b"\x30\x04\x00\x02\xc3\x28", c.MQTT_311, 0x81),
    ("topic with an encoded surrogate", b"\x30\x05\x00\x03\xed\xa0\x80", c.MQTT_311, 0x81),
    ("topic with U+0000", b"\x30\x05\x00\x03a\x00b", c.MQTT_311, 0x81),
    ("string longer than the packet", b"\x30\x04\x00\x09ab", c.MQTT_311, 0x81),
    ("property length beyond the packet", b"\x30\x05\x00\x01a\x09\x01", c.MQTT_5, 0x81),
    ("unknown property id", b"\x30\x06\x00\x01a\x02\x7f\x00", c.MQTT_5, 0x81),
    ("property not allowed in PUBLISH", b"\x30\x09\x00\x01a\x05\x11\x00\x00\x00\x01",
     c.MQTT_5, 0x81),
    ("property repeated", b"\x30\x08\x00\x01a\x04\x01\x00\x01\x01", c.MQTT_5, 0x82),
    ("topic alias 0", b"\x30\x07\x00\x01a\x03\x23\x00\x00", c.MQTT_5, 0x82),
    ("payload format indicator 2", b"\x30\x06\x00\x01a\x02\x01\x02", c.MQTT_5, 0x82),
    ("PUBACK packet id 0", b"\x40\x02\x00\x00", c.MQTT_5, 0x82),
    ("PUBACK undefined reason code", b"\x40\x03\x00\x01\x05", c.MQTT_5, 0x81),
    ("3.1.1 PUBACK too long", b"\x40\x03\x00\x01\x00", c.MQTT_311, 0x81),
    ("SUBSCRIBE without filters", b"\x82\x03\x00\x01\x00", c.MQTT_5, 0x82),
    ("SUBSCRIBE QoS 3", b"\x82\x06\x00\x01\x00\x01a\x03", c.MQTT_311, 0x81),
    ("SUBSCRIBE reserved option bits (3.1.1)", b"\x82\x06\x00\x01\x00\x01a\x04", c.MQTT_311,
     0x81),
    ("SUBSCRIBE reserved option bits (5)", b"\x82\x07\x00\x01\x00\x00\x01a\x40", c.MQTT_5, 0x81),
    ("SUBSCRIBE retain handling 3", b"\x82\x07\x00\x01\x00\x00\x01a\x30", c.MQTT_5, 0x82),
    ("SUBSCRIBE two subscription ids", b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00",
     c.MQTT_5, 0x82),
    ("UNSUBSCRIBE without filters", b"\xa2\x02\x00\x01", c.MQTT_311, 0x82),
    ("DISCONNECT undefined reason", b"\xe0\x01\x01", c.MQTT_5, 0x81),
    ("3.1.1 DISCONNECT with a body", b"\xe0\x01\x00", c.MQTT_311, 0x81),
    ("first packet is PUBLISH", b"\x30\x03\x00\x01a", None, 0x82),
    ("first packet is PINGREQ", b"\xc0\x00", None, 0x82),
    ("CONNECT reserved flag", _connect_with(0x03), None, 0x81),
    ("CONNECT will QoS without will flag", _connect_with(0x0A), None, 0x81),
    ("CONNECT will QoS 3", _connect_with(0x1E), None, 0x81),
    ("3.1.1 CONNECT password without user name", _connect_with(0x42), None, 0x81),
    ("CONNECT protocol level 3 (MQTT 3.1)", b"\x10\x0e\x00\x04MQTT\x03\x02\x00\x3c\x00\x02d1",
     None, 0x84),
    ("CONNECT protocol MQIsdp", b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x02d1", None, 0x84),
    ("CONNECT protocol name garbage", b"\x10\x0e\x00\x04XQTT\x04\x02\x00\x3c\x00\x02d1", None,
     0x81),
    ("CONNECT with trailing bytes", CONNECT_V311[:1] + bytes((CONNECT_V311[1] + 1,))
     + CONNECT_V311[2:] + b"\x00", None, 0x81),
    ("CONNECT receive maximum 0", b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00"
     b"\x00\x00", None, 0x82),
]


@pytest.mark.parametrize(("defect", "data", "version", "code"), MALFORMED,
                         ids=[row[0] for row in MALFORMED])
def test_malformed_packets_are_refused_with_their_reason_code(
        defect: str, data: bytes, version: int | None, code: int) -> None:
    reader = PacketReader(1 << 20, version)
    reader.feed(data)
    with pytest.raises(MalformedPacket) as caught:
        reader.next_packet()
    assert caught.value.reason_code == code, caught.value.message
    assert isinstance(caught.value, InvalidInput) and caught.value.hint


def test_the_well_formed_controls_of_those_vectors_decode() -> None:
    # Negative controls: the same shapes with the defect removed are accepted.
    assert c.decode_all(b"\x30\x04\x00\x01a\x00", c.MQTT_5) == [c.Publish("a")]
    assert c.decode_all(b"\x30\x04\x00\x02\xc3\xa9", c.MQTT_311) == [c.Publish("é")]
    assert c.decode_all(b"\x82\x06\x00\x01\x00\x01a\x01", c.MQTT_311) == [
        c.Subscribe(1, (c.Subscription("a", 1),))]
    assert c.decode_all(_connect_with(0x02), None)[0] == c.Connect("d1", c.MQTT_311, True, 60)


def test_v5_publish_without_a_property_length_is_malformed() -> None:
    # In 5.0 the property length is mandatory: "\x30\x03\x00\x01a" has none.
    with pytest.raises(MalformedPacket):
        c.decode_all(b"\x30\x03\x00\x01a", c.MQTT_5)


def test_a_gigabyte_remaining_length_is_refused_from_the_header_alone() -> None:
    reader = PacketReader(4096, c.MQTT_5)
    reader.feed(b"\x30\xff\xff\xff\x03")  # 1 GiB announced, five bytes sent
    with pytest.raises(MalformedPacket) as caught:
        reader.next_packet()
    assert caught.value.reason_code == 0x95
    assert reader.buffered <= 5


def test_the_limit_counts_the_whole_packet() -> None:
    # §3.1.2.11.4: the Maximum Packet Size is the total packet, fixed header included.
    packet = c.encode(c.Publish("a", b"x" * 95), c.MQTT_311)
    assert len(packet) == 100
    exact = PacketReader(100, c.MQTT_311)
    exact.feed(packet)
    assert exact.next_packet() == c.Publish("a", b"x" * 95)
    one_less = PacketReader(99, c.MQTT_311)
    one_less.feed(packet)
    with pytest.raises(MalformedPacket):
        one_less.next_packet()


def test_reader_takes_the_version_from_connect() -> None:
    reader = PacketReader(1 << 16)
    reader.feed(CONNECT_V5 + b"\x30\x04\x00\x01a\x00")  # v5 PUBLISH (property length 0)
    assert isinstance(reader.next_packet(), c.Connect)
    assert reader.version == c.MQTT_5
    assert reader.next_packet() == c.Publish("a")


# --- fuzzing ----------------------------------------------------------------------------------

LIMIT = 2048


def _drain(reader: PacketReader) -> list[c.Packet]:
    out = []
    while (packet := reader.next_packet()) is not None:
        out.append(packet)
    # Whatever stays buffered is one incomplete packet that fits the limit.
    assert reader.buffered < max(LIMIT, 5)
    return out


@pytest.mark.parametrize("version", [None, c.MQTT_311, c.MQTT_5])
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes_only_raise_malformed_and_stay_bounded(
        version: int | None, chunks: list[bytes]) -> None:
    reader = PacketReader(LIMIT, version)
    try:
        for chunk in chunks:
            reader.feed(chunk)
            _drain(reader)
    except MalformedPacket as exc:
        assert 0x80 <= exc.reason_code <= 0xA2


@pytest.mark.parametrize("version", [c.MQTT_311, c.MQTT_5])
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_packets_only_raise_malformed(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    encoded = bytearray(c.encode(packet, version))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    reader = PacketReader(LIMIT, None if isinstance(packet, c.Connect) else version)
    try:
        reader.feed(bytes(encoded[:cut]))
        _drain(reader)
    except MalformedPacket:
        pass


def test_encoder_refuses_strings_longer_than_the_spec_allows() -> None:
    with pytest.raises(ValueError):
        c.encode(c.Publish("t" * 65536), c.MQTT_5)
