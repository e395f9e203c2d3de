"""Acceptance 1 (MQTT part) and 2: stock MQTT and TLS tools against a real
`fleetward serve`.

Threats, each checked with the tool a device developer would use and each with a
negative control (the genuine certificate, or the device's own topic, passes the very
same command, so a refusal cannot come from a broken command line):

* a client that presents no certificate, or one from a CA we did not run (even one
  that copies our issuing CA's name and our device-id SAN), gets an MQTT session;
* a revoked certificate, whose chain is still valid, gets a session (it must get
  CONNACK 0x8A banned on MQTT 5, return code 5 on 3.1.1);
* a device publishes to, or subscribes to, another device's topics (MQTT 5: PUBACK /
  SUBACK 0x87; 3.1.1: connection closed / SUBACK 0x80), and the message leaks;
* own topics lose or duplicate messages at QoS 0/1; retained messages and wills do
  not behave as MQTT 3.1.1 §3.3.1.3, §3.1.2.5 and MQTT 5.0 §3.3.1.3, §3.1.2.5 say.
"""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity
from tests.integration.mqtt_helpers import (
    MQTT5,
    MQTT311,
    TOOL_TIMEOUT_SECONDS,
    VERSIONS,
    MosquittoSub,
    PahoClient,
    Received,
    lab_device,
    mosquitto_pub,
    setup_lab,
)

NOT_AUTHORIZED = 0x87  # MQTT 5.0 §2.4
BANNED = 0x8A
V311_SUBACK_FAILURE = 0x80  # MQTT 3.1.1 §3.9.3
V311_NOT_AUTHORIZED = 5  # MQTT 3.1.1 §3.2.2.3, CONNACK return code 5
MESSAGES = 25  # per own-topic run: enough to see a loss or a duplicate
# A valid telemetry record (edge/ingest.py: a JSON object on devices/<id>/telemetry/<type>),
# so that a refusal can only come from who publishes where.
RECORD = '{"temperature_c": 21.5}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("mqtt-interop") / "data"
    s = start_server(data_dir)
    setup_lab(s)
    yield s
    stop_server(s)


def lab(server: RunningServer, tmp_path: Path, name: str) -> DeviceIdentity:
    """A fresh lab device; ids are unique so tests never share sessions or topics."""
    return lab_device(server, tmp_path, f"{name}-{uuid.uuid4().hex[:8]}")


def connack(result: subprocess.CompletedProcess[str]) -> int | None:
    """The CONNACK code mosquitto_pub -d reports, or None when none arrived."""
    for line in result.stdout.splitlines():
        if "received CONNACK (" in line:
            return int(line.rsplit("(", 1)[1].rstrip(")"))
    return None


def puback(result: subprocess.CompletedProcess[str]) -> int | None:
    """The PUBACK reason code mosquitto_pub -d reports (``RC:135``), or None."""
    for line in result.stdout.splitlines():
        if "received PUBACK" in line:
            return int(line.rsplit("RC:", 1)[1].rstrip(")"))
    return None


def publish_ok(server: RunningServer, identity: DeviceIdentity, version: str, topic: str,
               *args: str) -> None:
    result = mosquitto_pub(server, identity, version, "-t", topic, "-q", "1", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert connack(result) == 0 and puback(result) == 0, result.stdout + result.stderr


# --- acceptance 1: certificates ----------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[x509.Certificate,
                                                                  ec.EllipticCurvePrivateKey]:
    """A CA we never ran that copies our issuing CA's name: only the key differs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleetward"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Fleetward Issuing CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def forge(directory: Path, device_id: str,
          ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> tuple[Path, Path]:
    """A device certificate shaped like ours (SAN urn:fleetward:device:<id>, clientAuth)
    for a real, active device id, signed by ``ca``."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(f"urn:fleetward:device:{device_id}")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"forged-{device_id}.pem", directory / "forged.key"
    # The chain as a device would present it: leaf and its (foreign) CA.
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) then DISCONNECT."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body + b"\xe0\x00"


CONNACK_ACCEPTED = b"\x20\x02\x00\x00"  # 3.1.1 §3.2: session present 0, return code 0
CONNACK_BAD_CREDENTIALS = b"\x20\x02\x00\x04"  # return code 4: bad user name or password


def s_client_mqtt(server: RunningServer, identity: DeviceIdentity, tls: str,
                  cert: tuple[Path, Path] | None) -> subprocess.CompletedProcess[bytes]:
    """`openssl s_client` sends an MQTT CONNECT + DISCONNECT; stdout holds what the
    server answered (-quiet: only application data)."""
    args = ["openssl", "s_client", "-connect", f"localhost:{server.mqtt_port}",
            "-servername", "localhost", "-CAfile", str(identity.cafile), tls,
            "-quiet", "-nocommands", "-verify_return_error"]
    if cert is not None:
        args += ["-cert", str(cert[0]), "-key", str(cert[1])]
    return subprocess.run(args, input=_connect_packet(identity.device_id), capture_output=True,
                          timeout=TOOL_TIMEOUT_SECONDS)


@pytest.mark.parametrize("tls", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("client", ["no certificate", "foreign CA"])
def test_s_client_without_our_certificate_gets_no_mqtt_session(
        server: RunningServer, tmp_path: Path, foreign_ca: tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey],
        tls: str, client: str) -> None:
    identity = lab(server, tmp_path, "sclient")
    genuine = s_client_mqtt(server, identity, tls, (identity.cert, identity.key))
    assert genuine.returncode == 0, genuine.stderr.decode(errors="replace")
    assert genuine.stdout.startswith(CONNACK_ACCEPTED), genuine.stdout  # negative control

    if client == "no certificate":
        # The listener also serves token and SAS devices (server-auth TLS): the handshake
        # completes and the CONNECT, which carries no credential, is refused (3.1.1
        # return code 4, bad user name or password).
        refused = s_client_mqtt(server, identity, tls, None)
        assert refused.stdout == CONNACK_BAD_CREDENTIALS, refused.stdout
        return
    refused = s_client_mqtt(server, identity, tls, forge(tmp_path, identity.device_id,
                                                         foreign_ca))
    assert CONNACK_ACCEPTED not in refused.stdout and refused.stdout == b"", refused.stdout
    assert refused.returncode != 0, "the TLS session ended cleanly: the server accepted it"


def test_required_client_certificates_refuse_certificate_less_clients_at_tls(
        tmp_path: Path) -> None:
    """``[mqtt] client_certificate = "required"`` (mTLS-only fleets): a client without a
    certificate does not get through the handshake at all; one with ours still does."""
    server = start_server(tmp_path / "data", settings={
        "mqtt": {"client_certificate": "required"}})
    try:
        setup_lab(server)
        identity = lab(server, tmp_path, "mtls-only")
        genuine = s_client_mqtt(server, identity, "-tls1_3", (identity.cert, identity.key))
        assert genuine.stdout.startswith(CONNACK_ACCEPTED), genuine.stdout  # control
        refused = s_client_mqtt(server, identity, "-tls1_3", None)
        assert refused.stdout == b"" and refused.returncode != 0, refused.stdout
    finally:
        stop_server(server)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("client", ["no certificate", "foreign CA"])
def test_mosquitto_without_our_certificate_is_refused(
        server: RunningServer, tmp_path: Path, foreign_ca: tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey],
        version: str, client: str) -> None:
    identity = lab(server, tmp_path, "nocert")
    topic = f"devices/{identity.device_id}/telemetry/reading"
    publish_ok(server, identity, version, topic, "-m", RECORD)  # negative control

    if client == "no certificate":
        refused = mosquitto_pub(server, identity, version, "-t", topic, "-q", "1",
                                "-m", RECORD, client_cert=False)
        # TLS completes (token and SAS devices use this listener too); the CONNECT has
        # no credential: MQTT 5 0x86 / 3.1.1 return code 4, nothing published.
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert connack(refused) == (0x86 if version == "mqttv5" else 4), refused.stdout
        assert puback(refused) is None, refused.stdout
        return
    else:
        cert, key = forge(tmp_path, identity.device_id, foreign_ca)
        refused = mosquitto_pub(server, identity, version, "-t", topic, "-q", "1", "-m", RECORD,
                                "--cert", str(cert), "--key", str(key), client_cert=False)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert connack(refused) is None and puback(refused) is None, refused.stdout


def test_a_certificate_refused_at_the_mqtt_handshake_is_audited(
        server: RunningServer, tmp_path: Path, foreign_ca: tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey]
) -> None:
    """The handshake fails inside OpenSSL, before any MQTT: the listener must still hear
    of it. The forger connects from its own loopback address, so rows left by other
    tests (refusals are audited once per peer per window) cannot satisfy this one."""
    identity = lab(server, tmp_path, "forged")
    cert, key = forge(tmp_path, identity.device_id, foreign_ca)
    context = ssl.create_default_context(cafile=str(identity.cafile))
    context.load_cert_chain(str(cert), str(key))
    source = "127.0.0.11"
    raw = socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=10,
                                   source_address=(source, 0))
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(bytes([0xC0, 0x00]))  # PINGREQ: TLS 1.3 learns the verdict on read
        try:
            answer = tls.recv(16)
        except (ssl.SSLError, ConnectionError):
            answer = b""
    assert answer == b"", "a forged certificate got an MQTT answer"
    deadline = time.monotonic() + 10
    while True:
        with server.admin() as admin:
            rows = admin.get("/v1/audit", params={"action": "mqtt.tls_refused",
                                                  "limit": 1000}).json()["items"]
        mine = [row for row in rows if row["actor"].startswith(f"remote:{source}:")]
        if mine:
            break
        assert time.monotonic() < deadline, "the refused handshake was not audited"
        time.sleep(0.2)
    assert mine[0]["outcome"] == "failure"
    assert mine[0]["details"]["reason"], mine[0]


def test_revoked_certificate_gets_connack_banned(server: RunningServer,
                                                 tmp_path: Path) -> None:
    """The chain still verifies (revocation is not in the TLS trust store): the gate
    refuses at CONNECT, 0x8A on MQTT 5, return code 5 (not authorized) on 3.1.1."""
    identity = lab(server, tmp_path, "revoked")
    topic = f"devices/{identity.device_id}/telemetry/reading"
    for version in VERSIONS:
        publish_ok(server, identity, version, topic, "-m", RECORD)  # negative control
    with server.admin() as admin:
        revoked = admin.post(f"/v1/certificates/{identity.serial_hex}/revoke",
                             json={"reason": "key_compromise"})
        assert revoked.status_code == 200, revoked.text
    expected = {MQTT5: BANNED, MQTT311: V311_NOT_AUTHORIZED}
    for version in VERSIONS:
        result = mosquitto_pub(server, identity, version, "-t", topic, "-q", "1", "-m", RECORD)
        assert connack(result) == expected[version], result.stdout + result.stderr
        assert puback(result) is None and result.returncode != 0


# --- acceptance 2: own topics ------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("version", VERSIONS)
def test_own_status_topic_delivers_every_message_once(server: RunningServer, tmp_path: Path,
                                                      version: str, qos: int) -> None:
    publisher, watcher = lab(server, tmp_path, "pub"), lab(server, tmp_path, "sub")
    topic = f"status/{publisher.device_id}"
    with MosquittoSub(server, watcher, version, "-t", topic, "-q", str(qos)) as sub:
        assert sub.suback() == [qos]
        sent = mosquitto_pub(server, publisher, version, "-t", topic, "-q", str(qos),
                             "-m", "reading", "--repeat", str(MESSAGES))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(sub.wait_messages(MESSAGES)) >= MESSAGES, sub.output()
        # Everything routed for those publishes precedes this marker: a duplicate would
        # show up before it.
        publish_ok(server, publisher, version, topic, "-m", "end")
        got = sub.wait_payload("end")
    assert [m.payload for m in got] == ["reading"] * MESSAGES + ["end"]
    assert {(m.topic, m.qos, m.retain) for m in got[:-1]} == {(topic, qos, False)}


@pytest.mark.parametrize("version", VERSIONS)
def test_own_device_tree_accepts_publish_and_subscribe(server: RunningServer, tmp_path: Path,
                                                       version: str) -> None:
    identity = lab(server, tmp_path, "tree")
    own = f"devices/{identity.device_id}"
    publish_ok(server, identity, version, f"{own}/telemetry/temp", "-m", RECORD)
    # Retained on the own tree, then read back by the same device: the full round trip
    # publish → retain → subscribe → receive on devices/${device.id}/#.
    publish_ok(server, identity, version, f"{own}/config", "-m", "v1", "-r")
    with MosquittoSub(server, identity, version, "-t", f"{own}/#", "-q", "1",
                      "-C", "1") as sub:
        assert sub.suback() == [1]
        assert sub.wait_exit() == 0, sub.output()
        assert sub.messages == [Received(True, 1, f"{own}/config", "v1")]


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_message_lifecycle(server: RunningServer, tmp_path: Path,
                                    version: str) -> None:
    """3.1.1 §3.3.1.3 / 5.0 §3.3.1.3: a retained PUBLISH goes to later subscribers with
    RETAIN 1, to existing subscriptions with RETAIN 0 (5.0: Retain As Published 0), and
    a retained PUBLISH with an empty payload is delivered as usual and clears it."""
    owner, reader = lab(server, tmp_path, "ret"), lab(server, tmp_path, "reader")
    topic = f"status/{owner.device_id}"
    publish_ok(server, owner, version, topic, "-m", "online", "-r")

    with MosquittoSub(server, reader, version, "-t", topic, "-q", "1") as late:
        assert late.suback() == [1]
        publish_ok(server, owner, version, topic, "-m", "updated", "-r")
        publish_ok(server, owner, version, topic, "-n", "-r")  # clears
        publish_ok(server, owner, version, topic, "-m", "marker-1")
        got = late.wait_payload("marker-1")
    assert [(m.retain, m.payload) for m in got] == [
        (True, "online"), (False, "updated"), (False, ""), (False, "marker-1")]

    with MosquittoSub(server, reader, version, "-t", topic, "-q", "1") as later:
        assert later.suback() == [1]
        publish_ok(server, owner, version, topic, "-m", "marker-2")
        got = later.wait_payload("marker-2")
    assert [(m.retain, m.payload) for m in got] == [(False, "marker-2")], "not cleared"


@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_abnormal_end_only(server: RunningServer, tmp_path: Path,
                                   version: str) -> None:
    """3.1.1 §3.1.2.5 / 5.0 §3.1.2.5: the will is published when the network connection
    ends without DISCONNECT (here SIGKILL), and discarded on a normal DISCONNECT."""
    device, watcher = lab(server, tmp_path, "will"), lab(server, tmp_path, "watch")
    topic = f"status/{device.device_id}"
    will = ["--will-topic", topic, "--will-qos", "1"]
    with MosquittoSub(server, watcher, version, "-t", topic, "-q", "1") as sub:
        assert sub.suback() == [1]
        with MosquittoSub(server, device, version, "-t", f"devices/{device.device_id}/#", "-q", "1",
                          *will, "--will-payload", "gone") as doomed:
            assert doomed.suback() == [1]
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(TOOL_TIMEOUT_SECONDS)
            got = sub.wait_payload("gone")
        assert [(m.topic, m.qos, m.payload) for m in got] == [(topic, 1, "gone")]

        # Normal end: mosquitto_pub sends DISCONNECT (0x00) after its PUBACK.
        publish_ok(server, device, version, topic, "-m", "hello", *will,
                   "--will-payload", "gone-again")
        publish_ok(server, device, version, topic, "-m", "marker")
        rest = sub.wait_payload("marker")[len(got):]
    assert [m.payload for m in rest] == ["hello", "marker"]


# --- acceptance 2: another device's topics -----------------------------------------------


@pytest.fixture
def pair(server: RunningServer, tmp_path: Path) -> tuple[DeviceIdentity, DeviceIdentity]:
    return lab(server, tmp_path, "alice"), lab(server, tmp_path, "bob")


OTHER_TOPICS = ["devices/{other}/telemetry/reading", "devices/{other}/commands/reboot",
                "status/{other}"]


@pytest.mark.parametrize("template", OTHER_TOPICS)
@pytest.mark.parametrize("version", VERSIONS)
def test_publish_to_another_devices_topic_is_refused(
        server: RunningServer, pair: tuple[DeviceIdentity, DeviceIdentity], version: str,
        template: str) -> None:
    alice, bob = pair
    topic = template.format(other=bob.device_id)
    own = template.replace("{other}", alice.device_id).format()
    publish_ok(server, alice, version, own, "-m", RECORD)  # negative control

    # The victim listens on its own tree and status on the same connection (paho), so
    # a leaked message would arrive before its own marker.
    victim = PahoClient(server, bob, v5=True)
    try:
        assert victim.wait_connack() == 0
        assert victim.subscribe(f"devices/{bob.device_id}/#", 1) == [1]
        assert victim.subscribe(f"status/{bob.device_id}", 1) == [1]
        result = mosquitto_pub(server, alice, version, "-t", topic, "-q", "1", "-m", RECORD)
        if version == MQTT5:
            # §3.4.2.1: PUBACK 0x87; the connection stays up.
            assert puback(result) == NOT_AUTHORIZED, result.stdout + result.stderr
            assert "Not authorized" in result.stderr
        else:
            # 3.1.1 §3.3.5 has no negative PUBACK: the server closes the connection.
            assert puback(result) is None, result.stdout
            assert result.returncode != 0 and "connection was lost" in result.stderr.lower()
        assert victim.publish(f"devices/{bob.device_id}/marker", b"marker", 1) == 0
        got = victim.take_until(b"marker")
        assert [m.payload for m in got] == [b"marker"], "the forged message was delivered"
    finally:
        victim.close()


OTHER_FILTERS = ["devices/{other}/#", "devices/{other}/commands/+", "devices/+/telemetry",
                 "devices/#", "#", "status/{other}/#", "+/{other}"]


@pytest.mark.parametrize("template", OTHER_FILTERS)
@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_to_another_devices_topics_is_refused(
        server: RunningServer, pair: tuple[DeviceIdentity, DeviceIdentity], version: str,
        template: str) -> None:
    alice, bob = pair
    topic_filter = template.format(other=bob.device_id)
    with MosquittoSub(server, alice, version, "-t", f"devices/{alice.device_id}/#",
                      "-q", "1") as control:
        assert control.suback() == [1]  # negative control: the own tree
    with MosquittoSub(server, alice, version, "-t", topic_filter, "-q", "1") as sub:
        expected = NOT_AUTHORIZED if version == MQTT5 else V311_SUBACK_FAILURE
        assert sub.suback() == [expected], sub.output()
        # mosquitto_sub gives up (exit status 0) when every subscription is refused.
        sub.wait_exit()
        assert "All subscription requests were denied" in sub.output()
