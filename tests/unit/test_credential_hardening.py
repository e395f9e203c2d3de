"""Ways the credentials feature failed a security review (each test was written first,
failing, then the defect fixed): a key one node cannot open stopping its change feed, a
token's scope skipped on MQTT deliveries, a revoked token filling the replay cache, a
long-poll deciding with a stale policy, a manual "superseded" revocation sparing
tokens, introspection trusting a revoked certificate, a token in a repr.

Every test builds the situation from the real parts (SQLite, the real TrustGate,
TokenService, SigningKeys, ReplayCache, PresentedCredentials, Broker and Session) and
has a control step next to the defect.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fleetward.config import ChannelConfig, MqttConfig
from fleetward.crypto.jose import token_hash
from fleetward.crypto.signer import FileSigner, Signer
from fleetward.edge.channel import Action, Admission, AuthMethod, LiveConnections, Refusal
from fleetward.edge.credentials import HttpRefused, PresentedCredentials
from fleetward.edge.device_api import get_commands
from fleetward.edge.gate import TrustGate
from fleetward.edge.mqtt.broker import Broker
from fleetward.edge.mqtt.codec import EMPTY_PROPERTIES
from fleetward.edge.mqtt.session import Message, Subscriber
from fleetward.errors import FleetwardError, Forbidden, KeyUnavailable
from fleetward.model import Device, LifecycleState
from fleetward.policy.defaults import DEFAULT_POLICY
from fleetward.policy.engine import PolicyVariables, compile_policies
from fleetward.tokens.access import AccessTokenVerifier
from fleetward.tokens.dpop import ProofVerifier, TargetUri
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.replay import ReplayCache
from fleetward.tokens.scopes import compile_scope
from tests.unit import test_token_service
from tests.unit.test_token_service import (
    CONFIG,
    ISSUER,
    PASSPHRASE,
    MemorySecrets,
    Server,
    admitted,
    refused,
)

# The token-service test fixture (a real gate, token service and signing keys over
# SQLite), under its own name so it shadows the conftest's real-server ``server``.
server = test_token_service.server

RESOURCE_URL = "https://iot.example.com:8443/v1/devices/self"


def dpop_proof(key: ec.EllipticCurvePrivateKey, token: str, now: int, *,
               method: str = "GET", url: str = RESOURCE_URL) -> str:
    return jwt.encode({"jti": secrets.token_urlsafe(16), "htm": method, "htu": url,
                       "iat": now, "ath": token_hash(token)}, key, algorithm="ES256",
                      headers={"typ": "dpop+jwt",
                               "jwk": ECAlgorithm.to_jwk(key.public_key(), as_dict=True)})


# --- 1. a token key another node cannot open stalls the change feed (fail open) -----------


def test_unopenable_rotated_key_must_not_stop_revocations_reaching_a_node(
        server: Server, tmp_path: Path) -> None:
    stack = server.stack
    d1 = server.enroll("d1")
    token = server.tls(d1).issued.token

    # Node B: its own SigningKeys and gate over the same database. It can open the keys
    # that exist when it starts, not a key another node creates later on its own disk.
    known = {str(p) for p in tmp_path.glob("token-*.key")}

    def open_on_b(key_ref: Any) -> Signer:
        if key_ref.get("path") not in known:
            raise KeyUnavailable(f"CA key file {key_ref.get('path')} is missing")
        return FileSigner.load(Path(key_ref["path"]), PASSPHRASE)

    def never(label: str) -> Signer:
        raise AssertionError("node B does not rotate in this test")

    keys_b = SigningKeys(stack.db, stack.audit, stack.clock, CONFIG, open_signer=open_on_b,
                         new_signer=never)
    keys_b.load()
    gate_b = TrustGate(stack.db, [stack.authority.issuing.certificate], server.policies,
                       LiveConnections(), ChannelConfig(), stack.clock, lambda e: None,
                       secrets=MemorySecrets(), token_keys_changed=keys_b.reload)
    gate_b.load()
    verifier_b = AccessTokenVerifier(keys_b, ISSUER, ISSUER, CONFIG, stack.clock)
    admitted(gate_b.admit_token(verifier_b.verify(token), channel="https",
                                peer_der=d1.der))  # control: node B admits it today

    server.keys.rotate("operator:test", "scheduled rotation")  # on node A
    # The operator then ends every token of d1 (a stolen device, say).
    server.service.revoke_device_tokens("d1", "operator:test", "stolen")
    server.sync()
    assert refused(server.admit(token, peer_der=d1.der)).code is Refusal.BANNED  # node A

    # Node B's watcher polls (and, like Node._watch_control_plane, logs and retries).
    for _ in range(3):
        with contextlib.suppress(FleetwardError):
            gate_b.apply(gate_b.poll())
    verdict = gate_b.admit_token(verifier_b.verify(token), channel="https",
                                 peer_der=d1.der)
    assert refused(verdict).code is Refusal.BANNED, "node B still admits a revoked token"


# --- 2. mqtt:receive ignores the token's scope ---------------------------------------------


def _device() -> Device:
    return Device("d1", "sensor", "acme", LifecycleState.ACTIVE)


def _admission(scopes: tuple[str, ...] | None) -> Admission:
    device = _device()
    policy = compile_policies([DEFAULT_POLICY], PolicyVariables("d1", "sensor", "acme"))
    admission = Admission(device_id="d1", device_type="sensor", owner="acme", serial=0,
                          not_after_epoch=float("inf"), state="active", quarantined=False,
                          policy=policy)
    if scopes is not None:
        admission.auth = AuthMethod.ACCESS_TOKEN
        admission.scopes = scopes
        admission.scope = compile_scope(scopes, device)
    return admission


def test_queued_command_is_not_delivered_to_a_token_without_commands_read() -> None:
    topic = "devices/d1/commands/reboot"
    broker = Broker(MqttConfig(), lambda: 0.0)

    # A certificate session subscribed to its commands, then went offline (persistent).
    cert = _admission(None)
    session = broker.new_session("d1", cert, expiry_seconds=3600)
    broker.subscribe(Subscriber(session, "devices/d1/commands/#", 1))
    assert broker.route(Message(topic, b'{"cmd": 1}', 1, False, EMPTY_PROPERTIES)) == 1
    assert len(session.queue) == 1  # control: queued for the device

    # The device id reconnects with a token scoped to telemetry only (clean start 0):
    # the server swaps the admission in (server._complete_connect) before resume().
    token_only_telemetry = _admission(("telemetry:write", "mqtt:connect"))
    assert not token_only_telemetry.decide(Action.MQTT_RECEIVE, topic).allowed  # control
    session.admission = token_only_telemetry

    sent: list[str] = []

    class Link:
        window = 10
        writable = True

        def write_publish(self, delivery: Any, dup: bool, expiry: int | None) -> bool:
            sent.append(delivery.message.topic)
            return True

    session.resume(Link())
    # Also a fresh route while connected with that token:
    broker.route(Message(topic, b'{"cmd": 2}', 1, False, EMPTY_PROPERTIES))
    assert sent == [], f"a token without commands:read received {sent}"


# --- 3. long-poll decides with the stale policy of a token admission -----------------------


def test_long_poll_with_a_token_honours_a_policy_change_made_while_waiting(
        server: Server) -> None:
    d1 = server.enroll("d1")
    token = server.tls(d1).issued.token
    admission = admitted(server.admit(token, peer_der=d1.der))
    assert admission.decide("http:GET", "v1/commands").allowed  # control

    delivered: list[list[str]] = []

    async def wait_for_commands(device_id: str, wait: int) -> list[dict[str, Any]]:
        # While the device waits, the operator attaches a policy without http:GET
        # v1/commands (replacing the default): it must not get commands any more.
        server.policies.put("telemetry-only", {"statements": [
            {"sid": "t", "effect": "allow", "actions": ["http:POST"],
             "resources": ["v1/telemetry"]}]}, "operator:test")
        server.policies.attach("telemetry-only", "device", "d1", "operator:test")
        server.sync()
        return [{"id": "cmd-1"}]

    def mark_delivered(ids: list[str]) -> None:
        delivered.append(ids)

    api = SimpleNamespace(
        config=SimpleNamespace(long_poll_max_seconds=30), gate=server.gate, executor=None,
        commands=SimpleNamespace(wait_for_commands=wait_for_commands,
                                 mark_delivered=mark_delivered))
    request = SimpleNamespace(query={"wait": "5"}, method="GET",
                              transport=SimpleNamespace(is_closing=lambda: False))
    outcome: Any
    try:
        outcome = asyncio.run(get_commands(request, api, admission))  # type: ignore[arg-type]
    except Forbidden as exc:
        outcome = exc
    # control: the gate itself knows the device may no longer fetch commands
    current = admitted(server.gate.recheck(admission, channel="https"))
    assert not current.decide("http:GET", "v1/commands").allowed
    assert isinstance(outcome, Forbidden), "commands handed out after the policy removed them"
    assert delivered == []


# --- 4. a revoked token can fill the node-wide replay cache ---------------------------------


def test_revoked_token_cannot_fill_the_replay_cache(server: Server) -> None:
    stack = server.stack
    replay = ReplayCache(max_entries=20)
    proofs = ProofVerifier(replay, CONFIG, stack.clock, frozenset({"iot.example.com"}))
    presented = PresentedCredentials(server.gate, server.service.verifier, proofs, 8883)
    target = TargetUri.parse(RESOURCE_URL)

    thief, victim = server.enroll("thief"), server.enroll("victim")
    thief_key, victim_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    stolen = server.pkjwt(thief, dpop=thief_key).issued.token
    server.service.revoke_device_tokens("thief", "operator:test", "stolen")
    server.sync()
    good = server.pkjwt(victim, dpop=victim_key).issued.token

    def call(token: str, key: ec.EllipticCurvePrivateKey) -> Any:
        return presented.http(f"DPoP {token}", [dpop_proof(key, token, server.now)],
                              method="GET", target=target, peer_der=None, source="x:1")

    for _ in range(20):  # each refused: the token is revoked
        assert isinstance(call(stolen, thief_key), HttpRefused)
    verdict = call(good, victim_key)
    assert isinstance(verdict, Admission), getattr(verdict, "refused", verdict)


# --- 5. an operator's "superseded" revocation keeps key-bound tokens alive ------------------


def test_manual_superseded_revocation_ends_tokens_obtained_with_that_key(
        server: Server) -> None:
    d1 = server.enroll("d1")
    proof_key = ec.generate_private_key(ec.SECP256R1())
    token = server.pkjwt(d1, dpop=proof_key).issued.token  # assertion signed by cert key
    from tests.unit.test_token_service import jkt_of
    admitted(server.admit(token, proof_jkt=jkt_of(proof_key)))  # control
    serial = admitted(server.gate.admit(d1.der, channel="https")).serial
    server.stack.registry.revoke_certificate(serial, "superseded", "operator:test")
    server.sync()
    assert refused(server.gate.admit(d1.der, channel="https")).code is Refusal.BANNED
    verdict = server.admit(token, proof_jkt=jkt_of(proof_key))
    assert refused(verdict).code is Refusal.BANNED


# keep dt imported for readers extending these tests with clock moves
_ = dt


# --- 6. introspection says "active" for a token bound to a revoked or expired certificate ---


@pytest.mark.parametrize("how", ["superseded", "expired"])
def test_introspection_agrees_with_the_gate_about_the_bound_certificate(
        server: Server, how: str) -> None:
    from cryptography import x509

    from tests.unit.test_token_service import x5t_of
    d1 = server.enroll("d1")
    if how == "expired":
        not_after = x509.load_der_x509_certificate(d1.der).not_valid_after_utc
        server.stack.clock.advance(not_after - server.stack.clock.now()
                                   - dt.timedelta(seconds=300))
    token = server.tls(d1).issued.token
    cnf = {"x5t#S256": x5t_of(d1.der)}
    assert server.service.introspect(token, cnf)["active"] is True  # control
    if how == "superseded":
        serial = admitted(server.gate.admit(d1.der, channel="https")).serial
        server.stack.registry.revoke_certificate(serial, "superseded", "operator:test")
        server.sync()
    else:
        server.stack.clock.advance(dt.timedelta(seconds=301))
    refused(server.admit(token, peer_der=d1.der))  # control: the gate refuses it
    assert server.service.introspect(token, cnf) == {"active": False}


# --- 7. reprs that carry a bearer credential ------------------------------------------------


def test_issued_token_repr_hides_the_token(server: Server) -> None:
    d1 = server.enroll("d1")
    grant = server.tls(d1)
    token = grant.issued.token
    assert token not in repr(grant.issued)
    assert token not in repr(grant)
