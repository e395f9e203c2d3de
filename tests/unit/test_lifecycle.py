"""The lifecycle table is the only judge of a state change, and its verdicts stick.

Threats: a device slips into a state the table forbids (a retired device comes back, a
compromised one is re-enabled), a refused change leaves half a write or an audit row
behind, an accepted one is not audited, and a compromised or retired device keeps a
credential that relying parties still accept (CRL or OCSP says nothing, or the wrong
reason). Every case runs on SQLite and on PostgreSQL (the ``stack`` fixture).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections import deque

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from fleetward.ca.ocsp import OcspResponder
from fleetward.errors import IllegalTransition, InvalidInput, NotFound, PolicyViolation
from fleetward.model import (
    ISSUABLE_STATES,
    REVOKING_STATES,
    TRANSITIONS,
    CertificateRecord,
    LifecycleState,
    parse_state,
)
from fleetward.store import audit as audit_rows
from fleetward.store import certificates as cert_rows
from tests.conftest import Stack

S = LifecycleState
ACTOR = "operator:test"

# The table as the issue states it. An edit to TRANSITIONS must be made here as well, on
# purpose: `registered → active ⇄ disabled`, `active → quarantined → active`,
# `* → compromised`, `* → retired` (terminal), nothing back out of compromised.
EXPECTED_TABLE: dict[str, set[str]] = {
    "registered": {"active", "compromised", "retired"},
    "active": {"disabled", "quarantined", "compromised", "retired"},
    "disabled": {"active", "compromised", "retired"},
    "quarantined": {"active", "compromised", "retired"},
    "compromised": {"retired"},
    "retired": set(),
}
EXPECTED_REVOKING = {"compromised": "key_compromise", "retired": "cessation_of_operation"}
EXPECTED_ISSUABLE = {"registered", "active", "quarantined"}

PAIRS = list(itertools.product(LifecycleState, LifecycleState))


def path_to(target: LifecycleState) -> list[LifecycleState]:
    """Shortest legal sequence of states from ``registered`` to ``target`` (BFS over the table)."""
    previous: dict[LifecycleState, LifecycleState | None] = {S.REGISTERED: None}
    queue = deque([S.REGISTERED])
    while queue:
        state = queue.popleft()
        if state is target:
            steps: list[LifecycleState] = []
            node: LifecycleState | None = state
            while node is not None and node is not S.REGISTERED:
                steps.append(node)
                node = previous[node]
            return steps[::-1]
        for nxt in sorted(TRANSITIONS[state]):
            if nxt not in previous:
                previous[nxt] = state
                queue.append(nxt)
    raise LookupError(f"{target.value} is unreachable from registered")


def bring_to(stack: Stack, device_id: str, state: LifecycleState) -> None:
    stack.add_device(device_id)
    for step in path_to(state):
        stack.registry.change_state(device_id, step, ACTOR, "test setup")
    assert stack.registry.get_device(device_id).state is state


def head_seq(stack: Stack) -> int:
    with stack.db.read() as conn:
        head = audit_rows.read_head(conn)
    return head.seq if head else 0


def events_after(stack: Stack, seq: int) -> list[audit_rows.AuditRow]:
    with stack.db.read() as conn:
        return audit_rows.query_events(conn, after=seq, limit=1000)


def csr_for(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return (x509.CertificateSigningRequestBuilder().subject_name(name)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def hint_targets(hint: str) -> set[str]:
    """State names a hint offers as destinations ("... may move to: a, b")."""
    _, sep, names = hint.partition("may move to:")
    assert sep, f"hint does not list destinations: {hint!r}"
    return {n.strip() for n in names.split(",")}


# --- the table itself ------------------------------------------------------------------


def test_transition_table_is_exactly_the_documented_one() -> None:
    assert {s.value: {t.value for t in targets} for s, targets in TRANSITIONS.items()} \
        == EXPECTED_TABLE
    assert set(TRANSITIONS) == set(LifecycleState), "every state needs a row, even a terminal one"
    assert dict(REVOKING_STATES) == EXPECTED_REVOKING
    assert {s.value for s in ISSUABLE_STATES} == EXPECTED_ISSUABLE


def test_every_state_is_reachable_and_retired_is_terminal() -> None:
    for state in LifecycleState:
        assert path_to(state) is not None
    assert TRANSITIONS[S.RETIRED] == frozenset()
    # Nothing leads out of compromised except retirement: a leaked key stays leaked.
    assert TRANSITIONS[S.COMPROMISED] == frozenset({S.RETIRED})
    assert all(S.REGISTERED not in targets for targets in TRANSITIONS.values())


# --- the 6x6 matrix, on both databases -------------------------------------------------


@pytest.mark.parametrize(("current", "target"), PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_state_change_matrix(stack: Stack, current: LifecycleState,
                             target: LifecycleState) -> None:
    device_id = f"m-{current.value}-{target.value}"
    bring_to(stack, device_id, current)
    before = stack.registry.get_device(device_id)
    seq = head_seq(stack)
    stack.clock.advance(dt.timedelta(seconds=5))

    if target in TRANSITIONS[current]:
        change = stack.registry.change_state(device_id, target, ACTOR, "matrix")
        assert change.previous is current
        assert change.device.state is target
        stored = stack.registry.get_device(device_id)
        assert stored.state is target
        assert stored.updated_at == stack.clock.now()
        events = [e for e in events_after(stack, seq) if e.action == "device.state_changed"]
        assert len(events) == 1
        event = events[0]
        assert (event.actor, event.target, event.outcome) == (
            ACTOR, f"device:{device_id}", "success")
        assert json.loads(event.details) == {
            "from": current.value, "to": target.value, "reason": "matrix"}
        with stack.db.read() as conn:
            assert stack.audit.verify(conn).ok
        return

    allowed = sorted(s.value for s in TRANSITIONS[current])
    with pytest.raises(IllegalTransition) as caught:
        stack.registry.change_state(device_id, target, ACTOR, "matrix")
    error = caught.value
    assert error.extra["allowed"] == allowed
    assert error.to_problem()["allowed"] == allowed
    assert (error.status, error.problem_type) == (409, "illegal-transition")
    assert current.value in error.message and target.value in error.message
    if allowed:
        assert hint_targets(error.hint) == set(allowed)
    else:
        assert "terminal" in error.hint
        assert not any(f" {s.value}" in error.hint for s in LifecycleState if s is not current)
    after = stack.registry.get_device(device_id)
    assert after.state is current
    assert after.updated_at == before.updated_at
    assert head_seq(stack) == seq, "a refused change must leave no audit row"


def test_unknown_device_is_not_found_and_not_audited(stack: Stack) -> None:
    seq = head_seq(stack)
    with pytest.raises(NotFound) as caught:
        stack.registry.change_state("no-such-device", S.ACTIVE, ACTOR)
    assert "no-such-device" in caught.value.message
    assert head_seq(stack) == seq


@pytest.mark.parametrize("text", ["bogus", "", "Active", "enabled", "retired "])
def test_unknown_state_name_is_invalid_input_listing_the_states(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_state(text)
    for state in LifecycleState:
        assert state.value in caught.value.hint
    assert repr(text) in caught.value.message


def test_known_state_names_parse() -> None:
    assert [parse_state(s.value) for s in LifecycleState] == list(LifecycleState)


# --- issuance by state ---------------------------------------------------------------------


@pytest.mark.parametrize("state", list(LifecycleState), ids=lambda s: s.value)
def test_issuance_follows_the_issuable_states(stack: Stack, state: LifecycleState) -> None:
    device_id = f"i-{state.value}"
    bring_to(stack, device_id, state)
    if state not in ISSUABLE_STATES:
        with pytest.raises(PolicyViolation) as caught:
            stack.registry.issue_certificate(device_id, csr_for(device_id), "device", ACTOR)
        assert state.value in caught.value.message
        assert stack.registry.list_certificates(device_id) == []
        assert stack.registry.get_device(device_id).state is state
        refused = [e for e in events_after(stack, 0) if e.action == "certificate.issue_refused"]
        assert [e.target for e in refused] == [f"device:{device_id}"]
        return
    seq = head_seq(stack)
    record = stack.registry.issue_certificate(device_id, csr_for(device_id), "device", ACTOR)
    assert record.device_id == device_id
    changes = [e for e in events_after(stack, seq) if e.action == "device.state_changed"]
    if state is S.REGISTERED:
        # The first certificate makes the device active, through the table and audited.
        assert stack.registry.get_device(device_id).state is S.ACTIVE
        assert [json.loads(e.details)["to"] for e in changes] == ["active"]
    else:
        # A quarantined device re-enrolls without leaving quarantine.
        assert stack.registry.get_device(device_id).state is state
        assert changes == []


# --- revocation on entering compromised / retired ----------------------------------------------


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def read_crl(stack: Stack) -> x509.CertificateRevocationList:
    with stack.db.read() as conn:
        crl = x509.load_der_x509_crl(stack.authority.crl_der(conn, "issuing"))
    assert crl.is_signature_valid(stack.authority.issuing.certificate.public_key())
    return crl


def crl_reason(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is None:
        return None
    return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason


def ocsp_status(stack: Stack, record: CertificateRecord) -> ocsp.OCSPResponse:
    cert = x509.load_pem_x509_certificate(record.pem.encode())
    issuer = stack.authority.issuing.certificate
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    with stack.db.read() as conn:
        der = OcspResponder(stack.authority).respond(
            conn, request.public_bytes(serialization.Encoding.DER))
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.serial_number == record.serial
    return response


def device_with_three_certs(stack: Stack, device_id: str
                            ) -> tuple[CertificateRecord, list[CertificateRecord]]:
    """Three certificates, the first already revoked as superseded; (superseded, live)."""
    stack.add_device(device_id)
    records = [stack.registry.issue_certificate(device_id, csr_for(device_id), "device", ACTOR)
               for _ in range(3)]
    superseded = stack.registry.revoke_certificate(records[0].serial, "superseded", ACTOR)
    stack.clock.advance(dt.timedelta(minutes=10))
    return superseded, records[1:]


def assert_revoked_everywhere(stack: Stack, records: list[CertificateRecord],
                              reason: str, crl: x509.CertificateRevocationList) -> None:
    flag = x509.ReasonFlags[reason]
    for record in records:
        assert crl_reason(crl, record.serial) is flag, record.serial_hex
        response = ocsp_status(stack, record)
        assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert response.revocation_reason is flag


# (path after the certificates are issued, state entered, reason every live credential gets)
REVOKING_CASES = [
    ([], S.COMPROMISED, "key_compromise"),
    ([S.DISABLED], S.COMPROMISED, "key_compromise"),
    ([S.QUARANTINED], S.COMPROMISED, "key_compromise"),
    ([], S.RETIRED, "cessation_of_operation"),
    ([S.DISABLED], S.RETIRED, "cessation_of_operation"),
    ([S.QUARANTINED], S.RETIRED, "cessation_of_operation"),
]


@pytest.mark.parametrize(("via", "target", "reason"), REVOKING_CASES,
                         ids=[f"{'-'.join(['active', *v])}->{t.value}"
                              for v, t, _ in REVOKING_CASES])
def test_entering_a_revoking_state_revokes_every_live_certificate(
        stack: Stack, via: list[LifecycleState], target: LifecycleState, reason: str) -> None:
    assert REVOKING_STATES[target] == reason
    superseded, live = device_with_three_certs(stack, "victim")
    stack.add_device("bystander")
    bystander = stack.registry.issue_certificate("bystander", csr_for("bystander"), "device",
                                                 ACTOR)
    for step in via:
        stack.registry.change_state("victim", step, ACTOR)
    crl_before = read_crl(stack)
    seq = head_seq(stack)

    change = stack.registry.change_state("victim", target, ACTOR, "stolen from the depot")

    assert sorted(c.serial for c in change.revoked) == sorted(c.serial for c in live)
    assert stack.registry.get_device("victim").state is target
    for record in live:
        stored = stack.registry.get_certificate(record.serial)
        assert (stored.revocation_reason, stored.revoked_at) == (reason, stack.clock.now())
    # The earlier revocation keeps its own reason and time: RFC 5280 §5.3.1 reasons are
    # not rewritten, and the superseded key was not the one that leaked.
    assert stack.registry.get_certificate(superseded.serial) == superseded
    crl = read_crl(stack)
    assert crl_number(crl) > crl_number(crl_before)
    assert crl_reason(crl, superseded.serial) is x509.ReasonFlags.superseded
    assert_revoked_everywhere(stack, live, reason, crl)
    superseded_ocsp = ocsp_status(stack, superseded)
    assert superseded_ocsp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert superseded_ocsp.revocation_reason is x509.ReasonFlags.superseded
    # Negative control: another device's certificate is untouched.
    assert crl.get_revoked_certificate_by_serial_number(bystander.serial) is None
    assert ocsp_status(stack, bystander).certificate_status is ocsp.OCSPCertStatus.GOOD
    revocations = [json.loads(e.details) for e in events_after(stack, seq)
                   if e.action == "certificate.revoked"]
    assert sorted(r["serial"] for r in revocations) == sorted(c.serial_hex for c in live)
    assert {r["reason"] for r in revocations} == {reason}
    with stack.db.read() as conn:
        assert stack.audit.verify(conn).ok


def test_retiring_a_compromised_device_keeps_key_compromise(stack: Stack) -> None:
    superseded, live = device_with_three_certs(stack, "burnt")
    stack.registry.change_state("burnt", S.COMPROMISED, ACTOR)
    compromised = {c.serial: stack.registry.get_certificate(c.serial) for c in live}
    stack.clock.advance(dt.timedelta(days=3))
    seq = head_seq(stack)

    change = stack.registry.change_state("burnt", S.RETIRED, ACTOR, "scrapped")

    assert change.revoked == ()
    assert stack.registry.get_device("burnt").state is S.RETIRED
    for serial, before in compromised.items():
        assert stack.registry.get_certificate(serial) == before  # no re-revocation
    assert stack.registry.get_certificate(superseded.serial) == superseded
    assert [e.action for e in events_after(stack, seq)] == ["device.state_changed"]
    crl = read_crl(stack)
    assert crl_reason(crl, superseded.serial) is x509.ReasonFlags.superseded
    assert_revoked_everywhere(stack, live, "key_compromise", crl)
    with pytest.raises(IllegalTransition) as caught:
        stack.registry.change_state("burnt", S.ACTIVE, ACTOR)
    assert "terminal" in caught.value.hint


def test_device_without_certificates_enters_revoking_states_cleanly(stack: Stack) -> None:
    stack.add_device("blank")
    crl_before = read_crl(stack)
    assert stack.registry.change_state("blank", S.COMPROMISED, ACTOR).revoked == ()
    assert stack.registry.change_state("blank", S.RETIRED, ACTOR).revoked == ()
    crl = read_crl(stack)
    assert [e.serial_number for e in crl] == [e.serial_number for e in crl_before]


def test_retired_device_cannot_be_marked_compromised_afterwards(stack: Stack) -> None:
    """A refused move into a revoking state must not rewrite the reason already given."""
    stack.add_device("retired-early")
    record = stack.registry.issue_certificate("retired-early", csr_for("retired-early"),
                                              "device", ACTOR)
    stack.registry.change_state("retired-early", S.RETIRED, ACTOR)
    with stack.db.read() as conn:
        assert cert_rows.get_certificate(conn, record.serial).revocation_reason \
            == "cessation_of_operation"
    with pytest.raises(IllegalTransition):
        stack.registry.change_state("retired-early", S.COMPROMISED, ACTOR)
    assert stack.registry.get_certificate(record.serial).revocation_reason \
        == "cessation_of_operation"
    assert crl_reason(read_crl(stack), record.serial) is x509.ReasonFlags.cessation_of_operation
