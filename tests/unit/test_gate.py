"""The trust gate over a real database (SQLite and PostgreSQL), the real registry,
CA and policy service: admission from memory, the audit log as change feed, and live
enforcement on registered connections."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from fleetward.config import ChannelConfig
from fleetward.edge.channel import Admission, Closer, LiveConnections, Refusal, Refused
from fleetward.edge.gate import TrustGate
from fleetward.model import AuditEvent, LifecycleState, device_uri
from fleetward.registry.policies import PolicyService
from fleetward.store.schema import audit_events
from tests.conftest import Stack


@dataclass
class Harness:
    stack: Stack
    gate: TrustGate
    live: LiveConnections
    policies: PolicyService
    refusals: list[AuditEvent] = field(default_factory=list)

    def sync(self) -> int:
        return self.gate.apply(self.gate.poll())


@pytest.fixture
def harness(stack: Stack) -> Iterator[Harness]:
    live = LiveConnections()
    policies = PolicyService(stack.db, stack.audit, stack.clock)
    refusals: list[AuditEvent] = []
    gate = TrustGate(stack.db, [stack.authority.issuing.certificate], policies, live,
                     ChannelConfig(), stack.clock, refusals.append)
    gate.load()
    yield Harness(stack, gate, live, policies, refusals)


def issue(stack: Stack, device_id: str) -> tuple[bytes, int]:
    """Register ``device_id`` (type sensor) and issue it a certificate; (DER, serial)."""
    stack.add_device(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    record = stack.registry.issue_certificate(device_id, csr, "device", "operator:test")
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    return cert.public_bytes(serialization.Encoding.DER), record.serial


def foreign_certificate(device_id: str, issuer_name: x509.Name | None = None) -> bytes:
    """A certificate naming ``device_id`` the way ours do, signed by someone else."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    cert = (x509.CertificateBuilder().subject_name(name)
            .issuer_name(issuer_name or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_uri(device_id))]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def admitted(verdict: Admission | Refused) -> Admission:
    assert isinstance(verdict, Admission), verdict
    return verdict


def refused(verdict: Admission | Refused) -> Refused:
    assert isinstance(verdict, Refused), verdict
    return verdict


def test_admits_an_active_device_with_its_default_policy(harness: Harness) -> None:
    der, serial = issue(harness.stack, "d1")
    harness.sync()
    admission = admitted(harness.gate.admit(der, channel="mqtt", client_id="d1"))
    assert (admission.device_id, admission.device_type, admission.owner) == ("d1", "sensor",
                                                                             "acme")
    assert admission.serial == serial and admission.state == "active"
    assert admission.not_after_epoch > 0
    assert admission.decide("mqtt:publish", "devices/d1/telemetry/temp").allowed
    assert not admission.decide("mqtt:publish", "devices/d2/telemetry/temp").allowed
    assert not admission.decide("mqtt:subscribe", "devices/+/commands/#").allowed


@pytest.mark.parametrize(("case", "expected"), [
    ("no certificate", Refusal.BAD_CREDENTIALS),
    ("self-signed", Refusal.BAD_CREDENTIALS),
    ("forged issuer name", Refusal.BAD_CREDENTIALS),
    ("garbage", Refusal.BAD_CREDENTIALS),
    ("other client id", Refusal.CLIENT_ID_NOT_VALID),
])
def test_refuses_peers_that_are_not_our_devices(harness: Harness, case: str,
                                                expected: Refusal) -> None:
    der, _ = issue(harness.stack, "d1")
    harness.sync()
    issuer = harness.stack.authority.issuing.certificate.subject
    peer = {"no certificate": None, "self-signed": foreign_certificate("d1"),
            "forged issuer name": foreign_certificate("d1", issuer),
            "garbage": b"\x30\x03\x02\x01\x01", "other client id": der}[case]
    client_id = "d2" if case == "other client id" else "d1"
    verdict = refused(harness.gate.admit(peer, channel="mqtt", client_id=client_id,
                                         source="192.0.2.7:4000"))
    assert verdict.code is expected
    assert harness.refusals and harness.refusals[-1].action == "channel.refused"
    # Negative control: the same gate admits the genuine certificate.
    admitted(harness.gate.admit(der, channel="mqtt", client_id="d1"))


def test_refusal_audit_is_throttled_per_peer_and_reason(harness: Harness) -> None:
    for _ in range(20):
        refused(harness.gate.admit(None, channel="https", source="192.0.2.9:1"))
    refused(harness.gate.admit(None, channel="https", source="192.0.2.10:1"))
    assert [e.target for e in harness.refusals] == ["remote:192.0.2.9", "remote:192.0.2.10"]


class FakeConnection:
    """Stands in for a socket: records how the gate asked it to close."""

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def connect(harness: Harness, der: bytes, channel: str) -> tuple[Closer, FakeConnection]:
    client_id = None
    if channel == "mqtt":
        client_id = harness.gate._verify(der).device_id  # type: ignore[union-attr]
    admission = admitted(harness.gate.admit(der, channel=channel, client_id=client_id))
    conn = FakeConnection()
    closer = Closer(channel, admission, conn.close)
    harness.live.register(closer)
    return closer, conn


@pytest.mark.parametrize(("change", "reconnect_code"), [
    ("revoke", Refusal.BANNED),
    ("disabled", Refusal.NOT_AUTHORIZED),
    ("compromised", Refusal.BANNED),
    ("retired", Refusal.BANNED),
])
def test_control_plane_change_closes_live_connections(harness: Harness, change: str,
                                                      reconnect_code: Refusal) -> None:
    der, serial = issue(harness.stack, "d1")
    other_der, _ = issue(harness.stack, "d2")
    harness.sync()
    _, mqtt_conn = connect(harness, der, "mqtt")
    _, https_conn = connect(harness, der, "https")
    _, bystander = connect(harness, other_der, "mqtt")
    if change == "revoke":
        harness.stack.registry.revoke_certificate(serial, "key_compromise", "operator:test")
    else:
        harness.stack.registry.change_state("d1", LifecycleState(change), "operator:test")
    assert mqtt_conn.closed is None  # nothing happens before the change feed is read
    assert harness.sync() >= 2
    assert mqtt_conn.closed is not None and mqtt_conn.closed[0] == 0x98
    assert https_conn.closed is not None and https_conn.closed[0] == 0x98
    assert bystander.closed is None
    verdict = refused(harness.gate.admit(der, channel="mqtt", client_id="d1"))
    assert verdict.code is reconnect_code
    admitted(harness.gate.admit(other_der, channel="mqtt", client_id="d2"))


def test_quarantine_closes_mqtt_and_narrows_https_to_recovery_routes(harness: Harness) -> None:
    der, _ = issue(harness.stack, "d1")
    harness.sync()
    _, mqtt_conn = connect(harness, der, "mqtt")
    https_closer, https_conn = connect(harness, der, "https")
    assert https_closer.admission.decide("http:POST", "v1/telemetry").allowed
    harness.stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    harness.sync()
    assert mqtt_conn.closed is not None and mqtt_conn.closed[0] == 0x98
    assert https_conn.closed is None
    assert https_closer.admission.quarantined
    assert not https_closer.admission.decide("http:POST", "v1/telemetry").allowed
    assert https_closer.admission.decide("http:GET", "v1/devices/self").allowed
    verdict = refused(harness.gate.admit(der, channel="mqtt", client_id="d1"))
    assert verdict.code is Refusal.NOT_AUTHORIZED and "quarantined" in verdict.reason
    # Release: the next poll restores the full policy on the live connection.
    harness.stack.registry.change_state("d1", LifecycleState.ACTIVE, "operator:test")
    harness.sync()
    assert https_closer.admission.decide("http:POST", "v1/telemetry").allowed
    admitted(harness.gate.admit(der, channel="mqtt", client_id="d1"))


def test_policy_change_is_swapped_into_live_admissions(harness: Harness) -> None:
    der, _ = issue(harness.stack, "d1")
    harness.sync()
    closer, conn = connect(harness, der, "mqtt")
    topic = "devices/d1/telemetry/temp"
    assert closer.admission.decide("mqtt:publish", topic).allowed
    harness.policies.put("no-telemetry", {"statements": [
        {"sid": "connect", "effect": "allow", "actions": ["mqtt:connect"],
         "resources": ["${device.id}"]},
        {"sid": "deny-telemetry", "effect": "deny", "actions": ["mqtt:publish"],
         "resources": ["devices/${device.id}/telemetry/#"]}]}, "operator:test")
    harness.policies.attach("no-telemetry", "device", "d1", "operator:test")
    harness.sync()
    decision = closer.admission.decide("mqtt:publish", topic)
    assert not decision.allowed and decision.statement == "deny-telemetry"
    assert conn.closed is None


def test_policy_change_that_forbids_connect_closes_the_session(harness: Harness) -> None:
    der, _ = issue(harness.stack, "d1")
    harness.sync()
    _, conn = connect(harness, der, "mqtt")
    harness.policies.put("https-only", {"statements": [
        {"effect": "allow", "actions": ["http:*"], "resources": ["#"]}]}, "operator:test")
    harness.policies.attach("https-only", "device", "d1", "operator:test")
    harness.sync()
    assert conn.closed is not None and conn.closed[0] == 0x98


def test_changes_made_through_another_database_handle_are_seen(harness: Harness,
                                                                stack: Stack) -> None:
    """Another node shares only the database: the audit-log change feed carries it."""
    der, serial = issue(harness.stack, "d1")
    harness.sync()
    from fleetward.registry import Registry
    from fleetward.store import Database

    other_db = Database(stack.db.url)
    try:
        other = Registry(other_db, stack.authority, stack.audit, stack.clock)
        other.revoke_certificate(serial, "key_compromise", "operator:other-node")
    finally:
        other_db.dispose()
    harness.sync()
    assert refused(harness.gate.admit(der, channel="https")).code is Refusal.BANNED


def test_load_reads_the_feed_position_first(harness: Harness, stack: Stack) -> None:
    """A gate loaded before a change still applies it on its first poll."""
    der, _ = issue(harness.stack, "d1")
    with stack.db.read() as conn:
        last = conn.execute(select(audit_events.c.seq).order_by(
            audit_events.c.seq.desc()).limit(1)).scalar_one()
    assert last > 0
    fresh = TrustGate(stack.db, [stack.authority.issuing.certificate], harness.policies,
                      LiveConnections(), ChannelConfig(), stack.clock, lambda e: None)
    fresh.load()
    admitted(fresh.admit(der, channel="https"))
    stack.registry.change_state("d1", LifecycleState.DISABLED, "operator:test")
    fresh.apply(fresh.poll())
    assert refused(fresh.admit(der, channel="https")).code is Refusal.NOT_AUTHORIZED


def test_not_loaded_gate_fails_closed(stack: Stack) -> None:
    gate = TrustGate(stack.db, [stack.authority.issuing.certificate],
                     PolicyService(stack.db, stack.audit, stack.clock), LiveConnections(),
                     ChannelConfig(), stack.clock, lambda e: None)
    assert refused(gate.admit(b"x", channel="mqtt")).code is Refusal.SERVER_UNAVAILABLE


def test_local_commits_of_watched_changes_wake_the_watcher(stack: Stack) -> None:
    """This node's own changes need not wait for the next poll: the audit append marks
    the transaction, its commit wakes the watcher; a rollback or an unwatched action
    wakes nobody."""
    from fleetward.edge.gate import LocalChanges

    changes = LocalChanges()
    woken: list[int] = []
    changes.bind(lambda: woken.append(1))
    stack.audit.on_append = changes.noted
    stack.db.on_commit = changes.committed
    try:
        stack.add_device("d1")  # device.created: watched
        assert woken == [1]
        with stack.db.transaction() as conn:  # unwatched action
            stack.audit.append(conn, AuditEvent(action="operator.token_created",
                                                actor="system", target="x"))
        assert woken == [1]
        with pytest.raises(RuntimeError), stack.db.transaction() as conn:
            stack.audit.append(conn, AuditEvent(action="device.state_changed",
                                                actor="system", target="device:d1"))
            raise RuntimeError("rolled back")
        assert woken == [1]
    finally:
        stack.audit.on_append = None
        stack.db.on_commit = None


def test_an_expired_certificate_is_refused_even_if_tls_let_it_through(harness: Harness) -> None:
    """A resumed TLS session presents the original certificate without OpenSSL checking
    its validity again; the gate checks the period itself."""
    der, _ = issue(harness.stack, "d1")
    harness.sync()
    admitted(harness.gate.admit(der, channel="https"))  # negative control
    harness.stack.clock.advance(dt.timedelta(days=400))  # past the 365-day validity
    verdict = refused(harness.gate.admit(der, channel="https"))
    assert verdict.code is Refusal.BAD_CREDENTIALS and "expired" in verdict.reason


def test_a_flood_of_unrelated_audit_rows_does_not_delay_a_revocation(harness: Harness) -> None:
    """Refused logins and enrollments write audit rows nobody throttles; the change feed
    must still deliver the revocation behind them in one poll."""
    der, serial = issue(harness.stack, "d1")
    harness.sync()
    _, conn = connect(harness, der, "mqtt")
    with harness.stack.db.transaction() as c:
        for i in range(2500):
            harness.stack.audit.append(c, AuditEvent(
                action="admin.authentication_failed", actor=f"remote:192.0.2.{i % 250}",
                target="admin", outcome="failure"))
    harness.stack.registry.revoke_certificate(serial, "key_compromise", "operator:test")
    harness.sync()  # one poll
    assert conn.closed is not None and conn.closed[0] == 0x98
    assert refused(harness.gate.admit(der, channel="mqtt", client_id="d1")).code \
        is Refusal.BANNED
