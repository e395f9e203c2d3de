"""The agent's EST client and trust bootstrap, without a server.

Threats: a pinned fingerprint that is parsed loosely (accepts a prefix of the digest, or
garbage); a bundle in which an attacker's CA rides along with the genuine root and ends
up trusted; a CSR that names something else than the device, or is not P-256/SHA-256;
an answer holding a certificate for another key or from another CA that would replace a
good certificate; a server that makes the agent spin (Retry-After: 0) or sleep for days;
a refusal whose explanation is lost on the way to the user.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetward.agent.errors import (
    EnrollmentPending,
    ServerRefused,
    ServerUnreachable,
    TrustBootstrapFailed,
)
from fleetward.agent.est_client import (
    EstClient,
    build_csr,
    check_issued,
    parse_fingerprint,
    parse_retry_after,
    select_trusted,
)
from fleetward.agent.transport import HttpResponse
from fleetward.errors import InvalidInput

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    """A root and an issuing CA, and device certificates from it (shared by the agent
    unit tests)."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey
    issuing: x509.Certificate

    @staticmethod
    def ca(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
           issuer_key: ec.EllipticCurvePrivateKey | None, not_before: dt.datetime,
           not_after: dt.datetime) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name(name))
                .issuer_name(issuer.subject if issuer else _name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(issuer_key or key, hashes.SHA256()))

    @classmethod
    def create(cls, now: dt.datetime = NOW, prefix: str = "Test") -> Pki:
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = cls.ca(f"{prefix} Root", root_key, None, None, now - dt.timedelta(days=1),
                      now + dt.timedelta(days=3650))
        issuing_key = ec.generate_private_key(ec.SECP256R1())
        issuing = cls.ca(f"{prefix} Issuing", issuing_key, root, root_key,
                         now - dt.timedelta(days=1), now + dt.timedelta(days=1825))
        return cls(root_key, root, issuing_key, issuing)

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.issuing, self.root]

    def leaf(self, public_key: ec.EllipticCurvePublicKey, cn: str, *,
             not_before: dt.datetime = NOW - dt.timedelta(minutes=5),
             not_after: dt.datetime = NOW + dt.timedelta(days=90),
             eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name(cn))
                .issuer_name(self.issuing.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(self.issuing_key, hashes.SHA256()))


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


# --- fingerprints --------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [
    "{hex}", "{HEX}", "{colons}", "{COLONS}", "  {hex}\n", "sha256:{hex}",
    "SHA256 Fingerprint={COLONS}", "{spaced}"])
def test_fingerprint_spellings_all_parse_to_the_digest(spelling: str) -> None:
    digest = bytes(range(32))
    text = spelling.format(hex=digest.hex(), HEX=digest.hex().upper(),
                           colons=digest.hex(":"), COLONS=digest.hex(":").upper(),
                           spaced=digest.hex(" "))
    assert parse_fingerprint(text) == digest


@pytest.mark.parametrize("bad", [
    "", "00" * 31,  # a prefix of a digest is not a digest
    "00" * 33, "zz" * 32, "sha1:" + "00" * 20, "0x" + "00" * 32])
def test_malformed_fingerprints_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="64 hex digits"):
        parse_fingerprint(bad)


# --- which CAs become trusted --------------------------------------------------------------


def test_pinning_the_root_trusts_root_and_the_issuing_ca_it_signed() -> None:
    pki = Pki.create()
    trusted = select_trusted(pki.bundle, fingerprint(pki.root), NOW)
    assert set(trusted) == {pki.root, pki.issuing}


def test_pinning_the_issuing_ca_trusts_it_but_not_the_root_above_it() -> None:
    pki = Pki.create()
    assert select_trusted(pki.bundle, fingerprint(pki.issuing), NOW) == [pki.issuing]


def test_a_wrong_fingerprint_is_refused_with_the_offered_subjects() -> None:
    pki, other = Pki.create(), Pki.create(prefix="Other")
    with pytest.raises(TrustBootstrapFailed, match="Test Root") as caught:
        select_trusted(pki.bundle, fingerprint(other.root), NOW)
    assert "nothing was written" in caught.value.hint


def test_an_attacker_ca_next_to_the_genuine_root_is_not_trusted() -> None:
    """A man in the middle appends his CA to the genuine bundle: the pin still matches the
    root, but only what the root certifies is trusted."""
    pki, attacker = Pki.create(), Pki.create(prefix="Evil")
    bundle = [*pki.bundle, attacker.root, attacker.issuing]
    trusted = select_trusted(bundle, fingerprint(pki.root), NOW)
    assert attacker.root not in trusted and attacker.issuing not in trusted
    # negative control: a CA the root DID sign is trusted
    extra_key = ec.generate_private_key(ec.SECP256R1())
    sibling = Pki.ca("Sibling", extra_key, pki.root, pki.root_key, NOW - dt.timedelta(days=1),
                     NOW + dt.timedelta(days=30))
    assert sibling in select_trusted([*bundle, sibling], fingerprint(pki.root), NOW)


def test_pinning_a_non_ca_certificate_is_refused() -> None:
    pki = Pki.create()
    leaf = pki.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1")
    with pytest.raises(TrustBootstrapFailed, match="not a CA"):
        select_trusted([*pki.bundle, leaf], fingerprint(leaf), NOW)


def test_an_expired_pinned_ca_is_refused() -> None:
    pki = Pki.create()
    later = NOW + dt.timedelta(days=3651)
    with pytest.raises(TrustBootstrapFailed, match="not valid now"):
        select_trusted(pki.bundle, fingerprint(pki.root), later)


# --- CSR and issued certificate ------------------------------------------------------------


def test_csr_names_only_the_device_with_p256_and_sha256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr("sensor-042", key)
    assert csr.is_signature_valid
    assert csr.subject == _name("sensor-042")
    assert len(csr.extensions) == 0  # no SAN: the CA adds urn:fleetward:device:<id>
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)


def test_check_issued_accepts_our_certificate_from_the_pinned_ca() -> None:
    pki = Pki.create()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.leaf(key.public_key(), "dev-1")
    got = check_issued([leaf, pki.issuing], device_id="dev-1", public_key=key.public_key(),
                       trusted=[pki.root, pki.issuing], now=NOW)
    assert got == leaf


@pytest.mark.parametrize("defect", ["other key", "other name", "other CA", "not yet valid",
                                    "expired", "server auth only"])
def test_check_issued_refuses_a_certificate_that_must_not_replace_ours(defect: str) -> None:
    pki, evil = Pki.create(), Pki.create(prefix="Evil")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    leaf = {
        "other key": pki.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1"),
        "other name": pki.leaf(public, "dev-2"),
        "other CA": evil.leaf(public, "dev-1"),
        "not yet valid": pki.leaf(public, "dev-1", not_before=NOW + dt.timedelta(hours=1)),
        "expired": pki.leaf(public, "dev-1", not_before=NOW - dt.timedelta(days=2),
                            not_after=NOW - dt.timedelta(days=1)),
        "server auth only": pki.leaf(public, "dev-1", eku=ExtendedKeyUsageOID.SERVER_AUTH),
    }[defect]
    with pytest.raises(ServerUnreachable):
        check_issued([leaf], device_id="dev-1", public_key=public,
                     trusted=[pki.root, pki.issuing], now=NOW)


def test_a_device_clock_slightly_behind_the_ca_still_accepts_a_fresh_certificate() -> None:
    pki = Pki.create()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.leaf(key.public_key(), "dev-1", not_before=NOW + dt.timedelta(minutes=2))
    assert check_issued([leaf], device_id="dev-1", public_key=key.public_key(),
                        trusted=[pki.issuing], now=NOW) == leaf


# --- HTTP behaviour over an in-memory transport --------------------------------------------


def certs_only(certs: list[x509.Certificate]) -> HttpResponse:
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    return HttpResponse(200, {"content-type": CERTS_ONLY,
                              "content-transfer-encoding": "base64"},
                        base64.encodebytes(der))


@dataclass
class ScriptedTransport:
    """A Transport that answers from a script and records what was sent."""

    answers: list[HttpResponse]
    sent: list[tuple[str, str, bytes | None, dict[str, str]]] = field(default_factory=list)
    closed: bool = False

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResponse:
        self.sent.append((method, path, body, dict(headers or {})))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def close(self) -> None:
        self.closed = True


def test_cacerts_decodes_the_base64_pkcs7_bundle() -> None:
    pki = Pki.create()
    transport = ScriptedTransport([certs_only(pki.bundle)])
    assert set(EstClient(transport).cacerts()) == set(pki.bundle)  # a DER SET: no order
    assert transport.sent[0][:2] == ("GET", "/.well-known/est/cacerts")


def test_simpleenroll_sends_base64_der_with_basic_auth_on_the_labelled_path() -> None:
    pki = Pki.create()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr("dev-1", key)
    transport = ScriptedTransport([certs_only([pki.leaf(key.public_key(), "dev-1")])])
    EstClient(transport, label="gateway").simpleenroll(csr, "dev-1", "fwb_1.secret")
    method, path, body, headers = transport.sent[0]
    assert (method, path) == ("POST", "/.well-known/est/gateway/simpleenroll")
    assert body is not None
    assert base64.b64decode(body) == csr.public_bytes(serialization.Encoding.DER)
    assert headers["Content-Type"] == "application/pkcs10"
    assert headers["Authorization"] == "Basic " + base64.b64encode(
        b"dev-1:fwb_1.secret").decode()


def test_a_device_id_with_a_colon_uses_the_bearer_form() -> None:
    """RFC 7617 §2: a Basic user-id cannot hold ':' (it would split the token)."""
    pki = Pki.create()
    key = ec.generate_private_key(ec.SECP256R1())
    transport = ScriptedTransport([certs_only([pki.leaf(key.public_key(), "a:b")])])
    EstClient(transport).simpleenroll(build_csr("a:b", key), "a:b", "fwb_1.secret")
    assert transport.sent[0][3]["Authorization"] == "Bearer fwb_1.secret"


def test_202_waits_retry_after_and_resends_the_same_request() -> None:
    pki = Pki.create()
    key = ec.generate_private_key(ec.SECP256R1())
    pending = HttpResponse(202, {"retry-after": "7"}, b"waiting")
    transport = ScriptedTransport([pending, pending,
                                   certs_only([pki.leaf(key.public_key(), "dev-1")])])
    slept: list[float] = []
    EstClient(transport, sleep=slept.append).simpleenroll(build_csr("dev-1", key), "dev-1", "t")
    assert slept == [7, 7]
    assert len(transport.sent) == 3 and len({s[2] for s in transport.sent}) == 1


def test_endless_202_gives_up_with_enrollment_pending() -> None:
    transport = ScriptedTransport([HttpResponse(202, {"retry-after": "1"}, b"")])
    slept: list[float] = []
    client = EstClient(transport, sleep=slept.append, max_pending_attempts=4)
    with pytest.raises(EnrollmentPending):
        client.simpleenroll(build_csr("dev-1", ec.generate_private_key(ec.SECP256R1())),
                            "dev-1", "t")
    assert len(transport.sent) == 4


def test_problem_details_reach_the_user_with_detail_and_hint() -> None:
    problem = {"type": "https://fleetward.dev/problems/unauthenticated", "status": 401,
               "detail": "bootstrap token refused: token already used",
               "hint": "ask the operator for a new bootstrap token for this device"}
    transport = ScriptedTransport([HttpResponse(
        401, {"content-type": "application/problem+json"}, json.dumps(problem).encode())])
    with pytest.raises(ServerRefused) as caught:
        EstClient(transport).simpleenroll(
            build_csr("dev-1", ec.generate_private_key(ec.SECP256R1())), "dev-1", "t")
    assert caught.value.status == 401
    assert "token already used" in caught.value.message
    assert caught.value.hint == problem["hint"]


def test_a_plain_text_error_is_shown_without_control_characters() -> None:
    transport = ScriptedTransport([HttpResponse(415, {"content-type": "text/plain"},
                                                b"expected application/pkcs10\x1b[31m")])
    with pytest.raises(ServerRefused, match="expected application/pkcs10") as caught:
        EstClient(transport).cacerts()
    assert "\x1b" not in caught.value.message


def test_a_non_pkcs7_answer_is_refused() -> None:
    transport = ScriptedTransport([HttpResponse(200, {"content-type": "text/html"}, b"<html>")])
    with pytest.raises(ServerUnreachable, match="expected application/pkcs7-mime"):
        EstClient(transport).cacerts()


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30), (None, 60), ("soon", 60), ("0", 1), ("999999", 3600),
    ("Mon, 01 Jun 2026 12:02:00 GMT", 120), ("Mon, 01 Jun 2026 11:00:00 GMT", 1)])
def test_retry_after_is_parsed_and_clamped(value: str | None, seconds: int) -> None:
    assert parse_retry_after(value, NOW) == seconds
