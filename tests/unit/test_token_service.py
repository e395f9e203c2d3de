"""The token endpoint's logic end to end without HTTP (docs/credentials.md "The token
endpoint", "Revocation"): a real TrustGate over a real SQLite database, the real
registry and CA, client assertions and DPoP proofs made with PyJWT from the device's
keys. Every refusal sits next to the same request without its defect succeeding."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from fleetward.config import ChannelConfig, TokensConfig
from fleetward.crypto.signer import FileSigner, Signer
from fleetward.edge.channel import Admission, Closer, LiveConnections, Refusal, Refused
from fleetward.edge.gate import DeviceSecrets, TrustGate
from fleetward.errors import Conflict, InvalidInput, TooManyRequests
from fleetward.model import AuditEvent, LifecycleState, device_uri
from fleetward.registry.policies import PolicyService
from fleetward.tokens.access import AccessTokenIssuer, AccessTokenVerifier
from fleetward.tokens.assertion import AssertionVerifier
from fleetward.tokens.dpop import ProofVerifier, TargetUri
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.replay import ReplayCache
from fleetward.tokens.service import OAuthError, TokenGrant, TokenRequest, TokenService
from tests.conftest import Stack

CONFIG = TokensConfig()
ISSUER = "https://iot.example.com:8443"
TOKEN_URL = f"{ISSUER}/oauth2/token"
ENDPOINT = TargetUri.parse(TOKEN_URL)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
PASSPHRASE = b"test-passphrase"
ALL_SCOPES = "telemetry:write commands:read commands:write device:read ota:download " \
             "mqtt:connect"
RECOVERY_SCOPES = "device:read ota:download"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jkt_of(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 §3 thumbprint, computed here, independently of fleetward.crypto.jose."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                            sort_keys=True).encode()).digest())


def x5t_of(der: bytes) -> str:
    return b64url(hashlib.sha256(der).digest())


class MemorySecrets:
    """A SecretsLoader over a dict: the symmetric keys the gate would decrypt."""

    def __init__(self) -> None:
        self.by_device: dict[str, DeviceSecrets] = {}

    def load_all(self, conn: Any) -> dict[str, DeviceSecrets]:
        return dict(self.by_device)

    def load_device(self, conn: Any, device_id: str) -> DeviceSecrets | None:
        return self.by_device.get(device_id)


@dataclass
class Enrolled:
    """A device as it sees itself: its id, key and certificate (DER)."""

    device_id: str
    key: ec.EllipticCurvePrivateKey
    der: bytes = b""
    symmetric_key: bytes = b""


@dataclass
class Server:
    stack: Stack
    gate: TrustGate
    policies: PolicyService
    live: LiveConnections
    service: TokenService
    keys: SigningKeys
    secrets: MemorySecrets
    public_keys: dict[str, list[ec.EllipticCurvePublicKey]]
    refusals: list[AuditEvent] = field(default_factory=list)

    @property
    def now(self) -> int:
        return int(self.stack.clock.now().timestamp())

    def sync(self) -> int:
        return self.gate.apply(self.gate.poll())

    # --- devices ---------------------------------------------------------------------

    def enroll(self, device_id: str) -> Enrolled:
        """Register the device and issue it a certificate (which makes it active)."""
        self.stack.add_device(device_id)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        record = self.stack.registry.issue_certificate(device_id, csr, "device",
                                                       "operator:test")
        der = x509.load_pem_x509_certificate(record.pem.encode()).public_bytes(
            serialization.Encoding.DER)
        self.sync()
        return Enrolled(device_id, key, der)

    def keyed(self, device_id: str, *, activate: bool = True) -> Enrolled:
        """A device without a certificate, with a raw public key registered for it."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.public_keys[device_id] = [key.public_key()]
        self.stack.add_device(device_id)
        if activate:
            self.stack.registry.change_state(device_id, LifecycleState.ACTIVE,
                                             "operator:test")
        self.sync()
        return Enrolled(device_id, key)

    def symmetric_key_for(self, device_id: str) -> bytes:
        """Give the device a symmetric credential; the gate reads it with the device's
        next polled change. Returns the primary key."""
        primary = secrets.token_bytes(32)
        self.secrets.by_device[device_id] = DeviceSecrets(
            "sk_0123456789abcdef", primary, secrets.token_bytes(32), 1, 1)
        return primary

    def symmetric_only(self, device_id: str) -> Enrolled:
        """An active device that holds a symmetric key and no key pair."""
        primary = self.symmetric_key_for(device_id)
        self.stack.add_device(device_id)
        self.stack.registry.change_state(device_id, LifecycleState.ACTIVE, "operator:test")
        self.sync()
        return Enrolled(device_id, ec.generate_private_key(ec.SECP256R1()),
                        symmetric_key=primary)

    # --- what a device sends ------------------------------------------------------------

    def assertion(self, device: Enrolled, **overrides: Any) -> str:
        claims = {"iss": device.device_id, "sub": device.device_id, "aud": TOKEN_URL,
                  "iat": self.now, "exp": self.now + 60, "jti": secrets.token_urlsafe(16),
                  **overrides}
        return jwt.encode(claims, device.key, algorithm="ES256")

    def hs_assertion(self, device: Enrolled, secret: bytes | None = None) -> str:
        """client_secret_jwt, HMAC by hand (PyJWT refuses PEM-looking secrets)."""
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = b64url(json.dumps({
            "iss": device.device_id, "sub": device.device_id, "aud": TOKEN_URL,
            "exp": self.now + 60, "jti": secrets.token_urlsafe(16)}).encode())
        mac = hmac.new(secret or device.symmetric_key, f"{header}.{claims}".encode(),
                       hashlib.sha256).digest()
        return f"{header}.{claims}.{b64url(mac)}"

    def proof(self, key: ec.EllipticCurvePrivateKey) -> str:
        """A DPoP proof for the token endpoint (no ath: there is no token yet)."""
        return jwt.encode({"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": TOKEN_URL,
                           "iat": self.now}, key, algorithm="ES256",
                          headers={"typ": "dpop+jwt",
                                   "jwk": ECAlgorithm.to_jwk(key.public_key(), as_dict=True)})

    def tls(self, device: Enrolled, scope: str | None = None, **form: str) -> TokenGrant:
        """tls_client_auth with the device certificate."""
        fields = {"grant_type": "client_credentials", "client_id": device.device_id, **form}
        if scope is not None:
            fields["scope"] = scope
        return self.service.token(TokenRequest(fields, ENDPOINT, peer_der=device.der))

    def pkjwt(self, device: Enrolled, *, dpop: ec.EllipticCurvePrivateKey | None = None,
              assertion: str | None = None, peer_der: bytes | None = None,
              scope: str | None = None) -> TokenGrant:
        """private_key_jwt (or client_secret_jwt, given an HS256 ``assertion``)."""
        fields = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                  "client_assertion": assertion or self.assertion(device),
                  "client_id": device.device_id}
        if scope is not None:
            fields["scope"] = scope
        return self.service.token(TokenRequest(
            fields, ENDPOINT, peer_der=peer_der,
            dpop=self.proof(dpop) if dpop is not None else None))

    def admit(self, token: str, **kwargs: Any) -> Admission | Refused:
        claims = self.service.verifier.verify(token)
        return self.gate.admit_token(claims, channel=kwargs.pop("channel", "https"),
                                     **kwargs)


@pytest.fixture
def server(sqlite_stack: Stack, tmp_path: Path) -> Iterator[Server]:
    stack = sqlite_stack

    def open_signer(key_ref: Any) -> Signer:
        return FileSigner.load(Path(key_ref["path"]), PASSPHRASE)

    def new_signer(label: str) -> Signer:
        return FileSigner.create(tmp_path / f"token-{label}.key", PASSPHRASE)

    keys = SigningKeys(stack.db, stack.audit, stack.clock, CONFIG, open_signer=open_signer,
                       new_signer=new_signer)
    keys.load()
    policies = PolicyService(stack.db, stack.audit, stack.clock)
    live = LiveConnections()
    refusals: list[AuditEvent] = []
    memory = MemorySecrets()
    gate = TrustGate(stack.db, [stack.authority.issuing.certificate], policies, live,
                     ChannelConfig(), stack.clock, refusals.append, secrets=memory,
                     token_keys_changed=keys.reload)
    gate.load()
    replay = ReplayCache(CONFIG.replay_cache_entries)
    public_keys: dict[str, list[ec.EllipticCurvePublicKey]] = {}
    service = TokenService(
        stack.db, stack.audit, stack.clock, CONFIG, gate,
        AccessTokenIssuer(keys, ISSUER, ISSUER, CONFIG, stack.clock),
        AccessTokenVerifier(keys, ISSUER, ISSUER, CONFIG, stack.clock),
        ProofVerifier(replay, CONFIG, stack.clock, frozenset({"iot.example.com"})),
        AssertionVerifier(replay, CONFIG, stack.clock, frozenset({ISSUER, TOKEN_URL})),
        lambda device_id: list(public_keys.get(device_id, [])))
    yield Server(stack, gate, policies, live, service, keys, memory, public_keys, refusals)


def oauth_error(excinfo: pytest.ExceptionInfo[OAuthError]) -> tuple[str, int]:
    return excinfo.value.error, excinfo.value.status


def raw_claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def admitted(verdict: Admission | Refused) -> Admission:
    assert isinstance(verdict, Admission), verdict
    return verdict


def refused(verdict: Admission | Refused) -> Refused:
    assert isinstance(verdict, Refused), verdict
    return verdict


# --- client authentication and binding ---------------------------------------------------


def test_tls_client_auth_gets_a_certificate_bound_token(server: Server) -> None:
    d1 = server.enroll("d1")
    grant = server.tls(d1)
    response = grant.response()
    assert set(response) == {"access_token", "token_type", "expires_in", "scope"}
    assert (response["token_type"], response["expires_in"], response["scope"]) == (
        "Bearer", CONFIG.access_token_lifetime_seconds, ALL_SCOPES)
    assert grant.method == "tls_client_auth"
    raw = raw_claims(response["access_token"])
    assert raw["cnf"] == {"x5t#S256": x5t_of(d1.der)} and raw["fw_binding"] == "x5t#S256"
    assert (raw["sub"], raw["client_id"], raw["iss"], raw["aud"]) == ("d1", "d1", ISSUER,
                                                                      ISSUER)
    claims = server.service.verifier.verify(response["access_token"])
    assert (claims.binding, claims.thumbprint) == ("x5t#S256", x5t_of(d1.der))


def test_certificate_bound_token_is_refused_without_its_certificate(server: Server) -> None:
    """RFC 8705 §3: a stolen certificate-bound token is worthless without the key of the
    certificate; the gate refuses it with no certificate or with another device's."""
    d1, d2 = server.enroll("d1"), server.enroll("d2")
    token = server.tls(d1).issued.token
    assert refused(server.admit(token)).code is Refusal.BAD_CREDENTIALS
    assert refused(server.admit(token, peer_der=d2.der)).code is Refusal.BAD_CREDENTIALS
    admitted(server.admit(token, peer_der=d1.der))  # control: with its certificate


def test_gate_admits_a_certificate_bound_token_with_its_certificate(server: Server) -> None:
    d1 = server.enroll("d1")
    token = server.tls(d1).issued.token
    admission = admitted(server.admit(token, peer_der=d1.der))
    assert admission.device_id == "d1" and admission.token_binding == "x5t#S256"
    assert admission.decide("http:POST", "v1/telemetry").allowed


def test_private_key_jwt_with_dpop_gets_a_key_bound_token(server: Server) -> None:
    d1 = server.enroll("d1")  # its certificate's key signs the assertion
    proof_key = ec.generate_private_key(ec.SECP256R1())
    grant = server.pkjwt(d1, dpop=proof_key)
    response = grant.response()
    assert response["token_type"] == "DPoP" and grant.method == "private_key_jwt"
    raw = raw_claims(response["access_token"])
    assert raw["cnf"] == {"jkt": jkt_of(proof_key)} and raw["fw_binding"] == "jkt"
    # The gate refuses it without a proof of that key.
    token = response["access_token"]
    assert refused(server.admit(token)).code is Refusal.BAD_CREDENTIALS
    assert refused(server.admit(token, proof_jkt=jkt_of(d1.key))).code \
        is Refusal.BAD_CREDENTIALS
    admitted(server.admit(token, proof_jkt=jkt_of(proof_key)))  # control


def test_gate_admits_a_key_bound_token_with_a_proof_of_its_key(server: Server) -> None:
    d1 = server.enroll("d1")
    proof_key = ec.generate_private_key(ec.SECP256R1())
    token = server.pkjwt(d1, dpop=proof_key).issued.token
    admission = admitted(server.admit(token, proof_jkt=jkt_of(proof_key)))
    assert admission.token_binding == "jkt"


def test_private_key_jwt_with_a_registered_public_key(server: Server) -> None:
    """A device without a certificate authenticates with a registered raw key; without
    one registered (public_keys_of answers []) the same assertion authenticates nobody."""
    d1 = server.keyed("d1")
    proof_key = ec.generate_private_key(ec.SECP256R1())
    assert server.pkjwt(d1, dpop=proof_key).issued.claims.thumbprint == jkt_of(proof_key)
    server.public_keys["d1"] = []
    with pytest.raises(OAuthError) as excinfo:
        server.pkjwt(d1, dpop=proof_key)
    assert oauth_error(excinfo) == ("invalid_client", 400)


def test_private_key_jwt_over_mtls_is_bound_to_the_certificate(server: Server) -> None:
    d1 = server.enroll("d1")
    grant = server.pkjwt(d1, peer_der=d1.der)
    assert raw_claims(grant.issued.token)["cnf"] == {"x5t#S256": x5t_of(d1.der)}


def test_tls_client_auth_with_dpop_is_bound_to_the_proof_key(server: Server) -> None:
    d1 = server.enroll("d1")
    proof_key = ec.generate_private_key(ec.SECP256R1())
    grant = server.service.token(TokenRequest(
        {"grant_type": "client_credentials", "client_id": "d1"}, ENDPOINT, peer_der=d1.der,
        dpop=server.proof(proof_key)))
    assert grant.response()["token_type"] == "DPoP"
    assert grant.issued.claims.thumbprint == jkt_of(proof_key)


def test_private_key_jwt_without_dpop_or_certificate_is_refused(server: Server) -> None:
    """A device with a key pair gets bound tokens only: an unbound bearer token would be
    a downgrade an attacker could ask for."""
    d1 = server.enroll("d1")
    with pytest.raises(OAuthError) as excinfo:
        server.pkjwt(d1)
    assert oauth_error(excinfo) == ("invalid_request", 400)
    assert "DPoP" in excinfo.value.description
    server.pkjwt(d1, dpop=d1.key)  # control: the same request with a proof


def test_bad_dpop_proof_at_the_token_endpoint_is_invalid_dpop_proof(server: Server) -> None:
    d1 = server.enroll("d1")
    key = ec.generate_private_key(ec.SECP256R1())
    stale = jwt.encode({"jti": "j1", "htm": "POST", "htu": TOKEN_URL,
                        "iat": server.now - 3600}, key, algorithm="ES256",
                       headers={"typ": "dpop+jwt",
                                "jwk": ECAlgorithm.to_jwk(key.public_key(), as_dict=True)})
    form = {"grant_type": "client_credentials", "client_id": "d1"}
    with pytest.raises(OAuthError) as excinfo:
        server.service.token(TokenRequest(form, ENDPOINT, peer_der=d1.der, dpop=stale))
    assert oauth_error(excinfo) == ("invalid_dpop_proof", 400)
    server.service.token(TokenRequest(form, ENDPOINT, peer_der=d1.der,
                                      dpop=server.proof(key)))  # control


@pytest.mark.parametrize(("grant_type", "error"), [
    ("password", "unsupported_grant_type"),
    ("authorization_code", "unsupported_grant_type"),
    ("urn:ietf:params:oauth:grant-type:jwt-bearer", "unsupported_grant_type"),
    (None, "invalid_request"),
])
def test_only_client_credentials_is_granted(server: Server, grant_type: str | None,
                                            error: str) -> None:
    d1 = server.enroll("d1")
    form = {"client_id": "d1"} | ({} if grant_type is None else {"grant_type": grant_type})
    with pytest.raises(OAuthError) as excinfo:
        server.service.token(TokenRequest(form, ENDPOINT, peer_der=d1.der))
    assert excinfo.value.error == error
    server.tls(d1)  # control


def test_tls_client_auth_needs_the_client_id_of_its_certificate(server: Server) -> None:
    d1 = server.enroll("d1")
    server.enroll("d2")
    base = {"grant_type": "client_credentials"}
    with pytest.raises(OAuthError) as excinfo:
        server.service.token(TokenRequest(base, ENDPOINT, peer_der=d1.der))
    assert oauth_error(excinfo) == ("invalid_request", 400)
    with pytest.raises(OAuthError) as excinfo:
        server.service.token(TokenRequest({**base, "client_id": "d2"}, ENDPOINT,
                                          peer_der=d1.der))
    assert oauth_error(excinfo) == ("invalid_client", 400)
    server.tls(d1)  # control


def test_no_or_foreign_client_authentication_is_invalid_client(server: Server) -> None:
    d1 = server.enroll("d1")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d1")])
    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(
        server.stack.authority.issuing.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri("d1"))]), critical=False)
        .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.DER)
    form = {"grant_type": "client_credentials", "client_id": "d1"}
    for peer in (None, foreign):
        with pytest.raises(OAuthError) as excinfo:
            server.service.token(TokenRequest(form, ENDPOINT, peer_der=peer,
                                              dpop=server.proof(key)))
        assert oauth_error(excinfo) == ("invalid_client", 400)
    server.tls(d1)  # control


def test_assertion_type_must_be_jwt_bearer(server: Server) -> None:
    d1 = server.enroll("d1")
    form = {"grant_type": "client_credentials", "client_assertion": server.assertion(d1),
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"}
    with pytest.raises(OAuthError) as excinfo:
        server.service.token(TokenRequest(form, ENDPOINT, dpop=server.proof(d1.key)))
    assert oauth_error(excinfo) == ("invalid_request", 400)
    server.pkjwt(d1, dpop=d1.key)  # control


# --- the device's state -------------------------------------------------------------------


@pytest.mark.parametrize("state", [LifecycleState.DISABLED, LifecycleState.COMPROMISED,
                                   LifecycleState.RETIRED])
def test_device_out_of_service_is_invalid_client(server: Server,
                                                 state: LifecycleState) -> None:
    """The device authenticates (its registered key still verifies), and its state
    alone refuses it."""
    d1 = server.keyed("d1")
    server.pkjwt(d1, dpop=d1.key)  # control: while active
    server.stack.registry.change_state("d1", state, "operator:test")
    server.sync()
    with pytest.raises(OAuthError) as excinfo:
        server.pkjwt(d1, dpop=d1.key)
    assert oauth_error(excinfo) == ("invalid_client", 400)
    assert state.value in excinfo.value.description


def test_disabled_device_with_a_valid_certificate_is_invalid_client(server: Server) -> None:
    d1 = server.enroll("d1")
    server.tls(d1)  # control
    server.stack.registry.change_state("d1", LifecycleState.DISABLED, "operator:test")
    server.sync()
    with pytest.raises(OAuthError) as excinfo:
        server.tls(d1)
    assert oauth_error(excinfo) == ("invalid_client", 400)


def test_registered_device_is_unauthorized_client(server: Server) -> None:
    d1 = server.keyed("d1", activate=False)
    with pytest.raises(OAuthError) as excinfo:
        server.pkjwt(d1, dpop=d1.key)
    assert excinfo.value.error == "unauthorized_client"
    server.stack.registry.change_state("d1", LifecycleState.ACTIVE, "operator:test")
    server.sync()
    server.pkjwt(d1, dpop=d1.key)  # control: once an operator enabled it


def test_quarantined_device_gets_recovery_scopes_only(server: Server) -> None:
    d1 = server.enroll("d1")
    assert server.tls(d1).response()["scope"] == ALL_SCOPES  # control
    server.stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    server.sync()
    grant = server.tls(d1)
    assert grant.response()["scope"] == RECOVERY_SCOPES
    assert server.service.introspect(grant.issued.token, None)["active"] is True
    assert server.tls(d1, "telemetry:write device:read").response()["scope"] == "device:read"
    with pytest.raises(OAuthError) as excinfo:
        server.tls(d1, "telemetry:write mqtt:connect")
    assert excinfo.value.error == "invalid_scope" and "quarantined" in \
        excinfo.value.description


def test_gate_admits_a_quarantined_device_with_its_recovery_token(server: Server) -> None:
    d1 = server.enroll("d1")
    server.stack.registry.change_state("d1", LifecycleState.QUARANTINED, "operator:test")
    server.sync()
    admission = admitted(server.admit(server.tls(d1).issued.token, peer_der=d1.der))
    assert admission.quarantined
    assert admission.decide("http:GET", "v1/devices/self").allowed
    assert not admission.decide("http:POST", "v1/telemetry").allowed


# --- scopes ------------------------------------------------------------------------------


def test_requested_scope_is_narrowed_to_the_policy_and_the_response_says_so(
        server: Server) -> None:
    d1 = server.enroll("d1")
    wanted = "telemetry:write commands:read"
    assert server.tls(d1, wanted).response()["scope"] == wanted  # control
    server.policies.put("telemetry-only", {"statements": [
        {"effect": "allow", "actions": ["mqtt:publish"],
         "resources": ["devices/${device.id}/telemetry/#"]}]}, "operator:test")
    server.policies.attach("telemetry-only", "device", "d1", "operator:test")
    server.sync()
    grant = server.tls(d1, wanted)
    assert grant.response()["scope"] == "telemetry:write"
    assert grant.requested == ("telemetry:write", "commands:read")
    assert grant.audit_event("device-api").details["requested"] == wanted
    assert server.service.verifier.verify(grant.issued.token).scopes == ("telemetry:write",)
    assert server.tls(d1).response()["scope"] == "telemetry:write"  # no scope: all it can
    with pytest.raises(OAuthError) as excinfo:
        server.tls(d1, "commands:read")
    assert excinfo.value.error == "invalid_scope"


@pytest.mark.parametrize("scope", ["telemetry:read", "telemetry:write admin",
                                   "telemetry:write,device:read", "device:read  ota:download"])
def test_unknown_or_malformed_scope_is_invalid_scope(server: Server, scope: str) -> None:
    d1 = server.enroll("d1")
    with pytest.raises(OAuthError) as excinfo:
        server.tls(d1, scope)
    assert oauth_error(excinfo) == ("invalid_scope", 400)
    assert server.tls(d1, "device:read ota:download").response()["scope"] == RECOVERY_SCOPES


# --- symmetric keys ------------------------------------------------------------------------


def test_client_secret_jwt_gets_a_short_unbound_token(server: Server) -> None:
    d1 = server.symmetric_only("d1")
    grant = server.pkjwt(d1, assertion=server.hs_assertion(d1))
    response = grant.response()
    assert grant.method == "client_secret_jwt"
    assert (response["token_type"], response["expires_in"]) == (
        "Bearer", CONFIG.unbound_token_lifetime_seconds)
    raw = raw_claims(response["access_token"])
    assert raw["fw_binding"] == "none" and "cnf" not in raw
    # With a proof the same device gets a key-bound token instead.
    proof_key = ec.generate_private_key(ec.SECP256R1())
    bound = server.pkjwt(d1, assertion=server.hs_assertion(d1), dpop=proof_key)
    assert bound.issued.claims.thumbprint == jkt_of(proof_key)


def test_hs256_assertion_keyed_with_the_certificate_public_key_is_refused(
        server: Server) -> None:
    """Key confusion at the endpoint: the device's certificate (public) key as the HMAC
    secret must not authenticate it, even though the device has symmetric keys too."""
    primary = server.symmetric_key_for("d1")
    d1 = server.enroll("d1")  # a key pair, a certificate and a symmetric key
    d1.symmetric_key = primary
    certificate_key = x509.load_der_x509_certificate(d1.der).public_key()
    pem = certificate_key.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(OAuthError) as excinfo:
        server.pkjwt(d1, assertion=server.hs_assertion(d1, secret=pem))
    assert oauth_error(excinfo) == ("invalid_client", 400)
    server.pkjwt(d1, assertion=server.hs_assertion(d1))  # control: the real key


def test_gate_admits_an_unbound_token_as_it_is(server: Server) -> None:
    d1 = server.symmetric_only("d1")
    token = server.pkjwt(d1, assertion=server.hs_assertion(d1)).issued.token
    assert admitted(server.admit(token)).token_binding == "none"


# --- revocation and introspection -----------------------------------------------------------


def test_state_change_revokes_the_tokens_issued_before(server: Server) -> None:
    """Disabling and re-enabling a device moves its credential generation on: every token
    issued before is refused, even though the device is active again."""
    d1 = server.enroll("d1")
    old = server.tls(d1).issued.token
    assert server.service.introspect(old, None)["active"] is True  # control
    server.stack.registry.change_state("d1", LifecycleState.DISABLED, "operator:test")
    server.stack.registry.change_state("d1", LifecycleState.ACTIVE, "operator:test")
    server.gate.apply(server.gate.poll())
    verdict = refused(server.admit(old, peer_der=d1.der))
    assert verdict.code is Refusal.BANNED and "credentials changed" in verdict.reason
    assert server.service.introspect(old, None) == {"active": False}
    new = server.tls(d1).issued.token
    assert raw_claims(new)["fw_gen"] > raw_claims(old)["fw_gen"]
    assert server.service.introspect(new, None)["active"] is True


def test_revoke_device_tokens_refuses_every_token_of_the_device(server: Server) -> None:
    d1, d2 = server.enroll("d1"), server.enroll("d2")
    t1, t2 = server.tls(d1).issued.token, server.tls(d2).issued.token
    server.service.revoke_device_tokens("d1", "operator:test", "lost")
    server.sync()
    assert refused(server.admit(t1, peer_der=d1.der)).code is Refusal.BANNED
    assert server.service.introspect(t1, None) == {"active": False}
    assert server.service.introspect(t2, None)["active"] is True  # control: other device
    assert server.service.introspect(server.tls(d1).issued.token, None)["active"] is True


def test_gate_admits_a_new_token_after_the_generation_moved(server: Server) -> None:
    d1 = server.enroll("d1")
    server.tls(d1)
    server.stack.registry.change_state("d1", LifecycleState.DISABLED, "operator:test")
    server.stack.registry.change_state("d1", LifecycleState.ACTIVE, "operator:test")
    server.sync()
    admitted(server.admit(server.tls(d1).issued.token, peer_der=d1.der))


def test_revoked_jti_is_refused_everywhere(server: Server) -> None:
    d1 = server.enroll("d1")
    revoked_grant, kept = server.tls(d1), server.tls(d1).issued.token
    token, jti = revoked_grant.issued.token, revoked_grant.issued.claims.jti
    assert server.service.introspect(token, None)["active"] is True  # control
    server.service.revoke_token(jti, "operator:test")
    assert server.service.introspect(token, None)["active"] is True  # not polled yet
    server.gate.apply(server.gate.poll())
    verdict = refused(server.admit(token, peer_der=d1.der))
    assert verdict.code is Refusal.BANNED and "revoked" in verdict.reason
    assert server.service.introspect(token, None) == {"active": False}
    assert server.service.introspect(kept, None)["active"] is True  # control: same device
    with pytest.raises(Conflict):
        server.service.revoke_token(jti, "operator:test")
    with pytest.raises(InvalidInput):
        server.service.revoke_token("not a jti!", "operator:test")


def test_revoking_a_token_closes_the_live_session_using_it(server: Server) -> None:
    d1 = server.enroll("d1")
    revoked_grant, kept = server.tls(d1), server.tls(d1).issued.token
    closed: dict[str, tuple[int, str]] = {}

    def closer_of(name: str) -> Callable[[int, str], None]:
        def close(code: int, reason: str) -> None:
            closed[name] = (code, reason)
        return close

    for name, token in (("revoked", revoked_grant.issued.token), ("kept", kept)):
        admission = admitted(server.admit(token, peer_der=d1.der))
        server.live.register(Closer("https", admission, closer_of(name)))
    server.service.revoke_token(revoked_grant.issued.claims.jti, "operator:test")
    server.sync()
    assert closed == {"revoked": (0x98, "access token revoked")}


def test_introspection_checks_the_presented_binding(server: Server) -> None:
    """RFC 7662 with the cnf extension: a resource server says what the client presented;
    a token used without its binding is not active (and says nothing about why)."""
    d1 = server.enroll("d1")
    token = server.tls(d1).issued.token
    thumb = x5t_of(d1.der)
    answer = server.service.introspect(token, {"x5t#S256": thumb})
    assert answer["active"] is True and answer["cnf"] == {"x5t#S256": thumb}
    assert (answer["sub"], answer["client_id"], answer["iss"], answer["aud"],
            answer["token_type"], answer["scope"]) == ("d1", "d1", ISSUER, ISSUER, "Bearer",
                                                       ALL_SCOPES)
    assert server.service.introspect(token, None)["active"] is True
    for presented in ({}, {"x5t#S256": x5t_of(b"another certificate")}, {"jkt": thumb},
                      {"x5t#S256": thumb, "jkt": thumb}):
        assert server.service.introspect(token, presented) == {"active": False}, presented


def test_introspection_of_key_bound_and_unbound_tokens(server: Server) -> None:
    d1 = server.enroll("d1")
    proof_key = ec.generate_private_key(ec.SECP256R1())
    bound = server.pkjwt(d1, dpop=proof_key).issued.token
    assert server.service.introspect(bound, {"jkt": jkt_of(proof_key)})["active"] is True
    assert server.service.introspect(bound, {"jkt": jkt_of(d1.key)}) == {"active": False}
    assert server.service.introspect(bound, {}) == {"active": False}
    d2 = server.symmetric_only("d2")
    unbound = server.pkjwt(d2, assertion=server.hs_assertion(d2)).issued.token
    assert server.service.introspect(unbound, {})["active"] is True
    assert server.service.introspect(unbound, {"jkt": jkt_of(proof_key)}) == {"active": False}


def test_introspection_of_expired_or_foreign_tokens_is_inactive(server: Server) -> None:
    d1 = server.enroll("d1")
    token = server.tls(d1).issued.token
    assert server.service.introspect(token, None)["active"] is True  # control
    assert server.service.introspect("not.a.token", None) == {"active": False}
    assert server.service.introspect(token[:-4] + "AAAA", None) == {"active": False}
    server.stack.clock.advance(dt.timedelta(
        seconds=CONFIG.access_token_lifetime_seconds + CONFIG.clock_skew_seconds))
    assert server.service.introspect(token, None) == {"active": False}


def test_gate_refuses_a_certificate_bound_token_over_an_expired_certificate(
        server: Server) -> None:
    """A TLS session resumed from a ticket presents the original certificate without
    OpenSSL checking its validity again (the reason admit() checks the period itself);
    a token issued just before the certificate expired must not carry it past expiry."""
    d1 = server.enroll("d1")
    not_after = x509.load_der_x509_certificate(d1.der).not_valid_after_utc
    server.stack.clock.advance(not_after - server.stack.clock.now() - dt.timedelta(
        seconds=300))
    token = server.tls(d1).issued.token  # the certificate is valid for 300 s more
    server.stack.clock.advance(dt.timedelta(seconds=301))
    assert server.service.verifier.verify(token)  # the token itself is still valid
    assert isinstance(server.gate.admit(d1.der, channel="https"), Refused)  # certificate
    verdict = refused(server.admit(token, peer_der=d1.der))
    assert verdict.code is Refusal.BAD_CREDENTIALS


def test_single_revocations_are_bounded_and_never_forgotten_early(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node holds revoked jtis in memory: beyond [tokens] max_revoked_tokens a new
    one is refused (revoke the device's tokens instead), none is dropped to make room."""
    bounded = dataclasses.replace(CONFIG, max_revoked_tokens=2)
    monkeypatch.setattr(server.service, "_config", bounded)
    server.service.revoke_token("jti-one", "operator:test")
    server.service.revoke_token("jti-two", "operator:test")
    with pytest.raises(TooManyRequests, match="max_revoked_tokens"):
        server.service.revoke_token("jti-three", "operator:test")
    server.gate.apply(server.gate.poll())
    assert server.gate.is_token_revoked("jti-one") and server.gate.is_token_revoked("jti-two")
    server.stack.clock.advance(dt.timedelta(
        seconds=CONFIG.max_access_token_lifetime_seconds + CONFIG.clock_skew_seconds))
    server.service.revoke_token("jti-three", "operator:test")  # the old ones aged out
