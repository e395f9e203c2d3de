"""Acceptance 7: no credential secret reaches a log, the database files or a CLI's
unintended output — whatever the credential, and whether it was accepted or refused.

Threat: a secret copied to where it is kept longer and read by more people than the
credential store: the server's log (shipped to a log platform), the SQLite file and its
write-ahead log (backups, support bundles), a CLI's stderr (CI logs, terminal
scrollback). A refused credential matters as much as an accepted one: a forged token
differs from the real one in a byte, a wrong API key secret is often the right one with
a typo, and an expired SAS is a valid SAS of yesterday.

One server for the module; the fixture drives every credential kind through success and
failure, then stops the server (so the log is complete) and the tests scan the log, the
SQLite file and its WAL (read while the server runs: stopping checkpoints and removes
the WAL) and again after the stop, every other file in the data directory but the admin
token's own, the audit log as the admin API returns it, and every CLI call's stderr and
stdout (less the lines that are its once-shown secret). Driven:

- admin token (``fwa_``): accepted, and a forged secret for its id refused;
- bootstrap tokens (``fwb_``, from the API and the CLI): EST enrollment accepted, wrong
  secret refused, the spent token refused again;
- access tokens — certificate-bound (mTLS), key-bound (``private_key_jwt`` + DPoP),
  unbound (``client_secret_jwt``), admin- and CLI-issued: used over HTTPS and MQTT
  (password, ``FW-TOKEN``), then forged, foreign-signed, revoked (API and CLI),
  expired, a DPoP token sent as Bearer, a token under another MQTT user name, each
  refused; inspected (API, CLI from stdin and from argv) and introspected;
- DPoP proofs and client assertions: accepted, wrong ``htu``, replayed, forged, expired;
- symmetric keys (API and CLI, shown once, and a CLI rotation), SAS tokens made from
  them (accepted over HTTPS and MQTT, wrong signature, expired, malformed signature);
- API keys (API and CLI): introspection accepted, wrong secret, rotated (API and CLI;
  the old secret refused, the new accepted), revoked (API and CLI), and a whole key
  given to ``credential show`` where an id belongs.

Every secret is looked for as sent (and its secret part: a JWT's signature, a SAS's
``sig``, the part after the dot of ``fwa_``/``fwb_``/``fwk_``), URL-encoded, base64 and
base64url encoded, as raw bytes and hex for keys, and as every 10-character piece of the
secret part in each textual form. ``jti``s, credential ids and key ids are not secrets
(they are meant to be logged; a control checks that they are). Negative controls: the
scan finds a secret planted in a copy of the log, a key's raw bytes planted in a copy
of the database, and every step had the outcome it was meant to (a step that silently
did nothing would make the scan vacuous).

≈ 15 s alone (the server's start, 16 CLI processes, waiting out 8-second access
tokens); ≈ 32 s under ``-n 2``, where each worker that gets one of its tests runs the
drive on a server of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import FLEETWARD, RunningServer, start_server, stop_server
from tests.integration.channel_helpers import DeviceIdentity, make_device
from tests.integration.enroll_helpers import csr_der, est_enroll
from tests.integration.token_helpers import (
    ASSERTION_TYPE,
    BAD_USER_NAME_OR_PASSWORD,
    BANNED,
    CONTINUE_AUTHENTICATION,
    FW_TOKEN,
    SUCCESS,
    TOKEN_PATH,
    TokenSession,
    claims_of,
    device_url,
    dpop_proof,
    https,
    load_key,
    mqtt_uri,
    new_key,
    token_endpoint,
)

pytestmark = pytest.mark.slow  # every test reads the one ≈ 15 s drive below

LIFETIME_SECONDS = 8  # access tokens on this server (all kinds): expiry is waited out
PIECE = 10  # no run of this many characters of a secret part may appear
SELF = "/v1/devices/self"
INTROSPECT = "/oauth2/introspect"
CLI_TIMEOUT_SECONDS = 60
# Where a piece can be: a run of base64, base64url and URL-encoding characters.
TEXT_RUN = re.compile(b"[A-Za-z0-9+/=_%-]{" + str(PIECE).encode() + b",}")


# --- what is looked for ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Secret:
    """One secret: the byte strings that must not appear anywhere (``needles``) and the
    PIECE-character pieces of its secret part, in each textual form (``pieces``)."""

    label: str
    needles: set[bytes] = field(default_factory=set)
    pieces: set[bytes] = field(default_factory=set)

    def text(self, value: str, *, pieces: bool) -> None:
        """``value`` as is, URL-encoded, base64 and base64url; with ``pieces``, every
        PIECE-character piece of each of those forms too."""
        raw = value.encode()
        for form in (value, urllib.parse.quote(value, safe=""), b64(raw), b64url(raw)):
            encoded = form.encode()
            self.needles.add(encoded)
            if pieces:
                self.pieces.update(encoded[i:i + PIECE]
                                   for i in range(len(encoded) - PIECE + 1))

    def raw(self, value: bytes) -> None:
        """Key or MAC bytes: as bytes, hex, and every textual form of their base64."""
        self.needles.update({value, value.hex().encode()})
        self.text(b64(value), pieces=True)
        self.text(b64url(value), pieces=True)


@dataclass
class Outcome:
    step: str
    expected: Any
    got: Any


@dataclass
class CliRun:
    """A CLI call: the output that must hold no secret (its intended once-shown secret
    output taken out) and that intended output."""

    label: str
    scanned: str
    intended: list[str]
    stdout: str


@dataclass
class Ledger:
    server: RunningServer
    secrets: list[Secret] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    cli_runs: list[CliRun] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # not secrets: meant to be logged
    identity: DeviceIdentity | None = None  # the device with a certificate
    db_while_running: bytes = b""
    db_after_stop: bytes = b""
    other_files: dict[str, bytes] = field(default_factory=dict)
    log: bytes = b""

    # Recording secrets, by kind ----------------------------------------------------------

    def prefixed(self, label: str, token: str) -> str:
        """``fwa_`` / ``fwb_`` / ``fwk_`` ``<id>.<secret>``: the secret part's pieces."""
        secret = Secret(label)
        secret.text(token, pieces=False)
        secret.text(token.partition(".")[2], pieces=True)
        self.secrets.append(secret)
        return token

    def jwt(self, label: str, token: str) -> str:
        """A JWS (access token, DPoP proof, assertion): the signature is its secret part."""
        secret = Secret(label)
        secret.text(token, pieces=False)
        signature = token.rsplit(".", 1)[1]
        secret.text(signature, pieces=True)
        secret.raw(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        self.secrets.append(secret)
        return token

    def key(self, label: str, key_b64: str) -> bytes:
        """A symmetric key shown as base64; returns the raw bytes."""
        raw = base64.b64decode(key_b64)
        secret = Secret(label)
        secret.text(key_b64, pieces=True)
        secret.raw(raw)
        self.secrets.append(secret)
        return raw

    def sas(self, label: str, sas: str) -> str:
        secret = Secret(label)
        secret.text(sas, pieces=False)
        sig = sas.split("sig=", 1)[1].split("&", 1)[0]
        secret.text(sig, pieces=True)
        secret.text(urllib.parse.unquote(sig), pieces=True)
        secret.raw(base64.b64decode(urllib.parse.unquote(sig)))
        self.secrets.append(secret)
        return sas

    def basic(self, label: str, user: str, password: str) -> None:
        """``Authorization: Basic`` as sent: base64 of ``user:password``. Its pieces start
        past the characters that encode only the (non-secret) user and token id."""
        prefix = f"{user}:{password.partition('.')[0]}.".encode()
        encoded = b64(f"{user}:{password}".encode())
        secret = Secret(label, {encoded.encode()})
        start = (len(prefix) // 3 + 1) * 4
        secret.pieces.update(encoded[i:i + PIECE].encode()
                             for i in range(start, len(encoded) - PIECE + 1))
        self.secrets.append(secret)

    # Outcomes and CLI runs ----------------------------------------------------------------

    def expect(self, step: str, expected: Any, got: Any) -> Any:
        self.outcomes.append(Outcome(step, expected, got))
        return got

    def cli(self, label: str, *args: str, intended: int = 0, stdin: str | None = None,
            expect_exit: int = 0) -> subprocess.CompletedProcess[str]:
        """Run ``fleetward …``; the first ``intended`` stdout lines (the secrets it is
        meant to print, each alone or after ``name: ``) are its intended output."""
        result = subprocess.run([*FLEETWARD, *args], env={**self.server.env(), "COLUMNS": "200"},
                                input=stdin, capture_output=True, text=True,
                                timeout=CLI_TIMEOUT_SECONDS)
        self.expect(f"cli {label}: exit code", expect_exit, result.returncode)
        lines = result.stdout.splitlines()
        shown = [line.rsplit(" ", 1)[-1] for line in lines[:intended]]
        rest = "\n".join(lines[intended:])
        self.cli_runs.append(CliRun(label, result.stderr + "\n" + rest, shown, result.stdout))
        return result


def find_leaks(blob: bytes, found_in: list[Secret]) -> list[tuple[str, str]]:
    """(secret label, what matched) for each secret seen in ``blob``."""
    index = {piece: s.label for s in found_in for piece in s.pieces}
    hits: set[tuple[str, str]] = set()
    # A piece is made of base64 / base64url / URL-encoding characters only: it can only
    # occur inside a run of them, so only such runs are slid over (fast on binary files).
    for run in TEXT_RUN.finditer(blob):
        text = run.group()
        for i in range(len(text) - PIECE + 1):
            label = index.get(text[i:i + PIECE])
            if label is not None:
                hits.add((label, text[i:i + PIECE].decode()))
    for s in found_in:
        for needle in s.needles:
            if needle in blob:
                hits.add((s.label, repr(needle[:16])))
    return sorted(hits)


# --- clients that record what they send ---------------------------------------------------------


def tampered_jwt(token: str) -> str:
    """The same JWS with one bit of its signature flipped."""
    head, _, signature = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0x01
    return f"{head}.{b64url(bytes(raw))}"


def make_sas(device_id: str, key: bytes, expiry: int) -> str:
    """Azure IoT Hub's SAS (docs/credentials.md), computed here from the format."""
    sr = urllib.parse.quote(f"localhost/devices/{device_id}", safe="")
    digest = hmac.new(key, f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return (f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(b64(digest), safe='')}"
            f"&se={expiry}")


def assertion(ledger: Ledger, label: str, device_id: str, key: ec.EllipticCurvePrivateKey | bytes,
              *, exp_in: int = 60) -> str:
    """A client assertion: ES256 by a device key, or HS256 by a symmetric key."""
    now = int(time.time())
    claims = {"iss": device_id, "sub": device_id, "aud": token_endpoint(ledger.server),
              "iat": now - (120 if exp_in < 0 else 0), "exp": now + exp_in,
              "jti": secrets.token_urlsafe(16)}
    alg = "HS256" if isinstance(key, bytes) else "ES256"
    return ledger.jwt(label, jwt.encode(claims, key, algorithm=alg))


def token_request(ledger: Ledger, step: str, expected: int, *, client_assertion: str | None = None,
                  identity: DeviceIdentity | None = None, proof: str | None = None
                  ) -> httpx.Response:
    form = {"grant_type": "client_credentials"}
    if client_assertion is not None:
        form.update(client_assertion_type=ASSERTION_TYPE, client_assertion=client_assertion)
    elif identity is not None:
        form["client_id"] = identity.device_id
    headers = {"DPoP": proof} if proof is not None else {}
    with https(ledger.server, identity) as client:
        response = client.post(TOKEN_PATH, data=form, headers=headers)
    ledger.expect(step, expected, response.status_code)
    return response


def token_proof(ledger: Ledger, label: str, key: ec.EllipticCurvePrivateKey) -> str:
    return ledger.jwt(label, dpop_proof(key, "POST", token_endpoint(ledger.server)))


def device_get(ledger: Ledger, step: str, expected: int, authorization: str, *,
               identity: DeviceIdentity | None = None, proof: str | None = None) -> None:
    headers = {"Authorization": authorization}
    if proof is not None:
        headers["DPoP"] = proof
    with https(ledger.server, identity) as client:
        ledger.expect(step, expected, client.get(SELF, headers=headers).status_code)


def self_proof(ledger: Ledger, label: str, key: ec.EllipticCurvePrivateKey, token: str, *,
               url: str | None = None) -> str:
    return ledger.jwt(label, dpop_proof(key, "GET", url or device_url(ledger.server, SELF),
                                        token=token))


def mqtt_connect(ledger: Ledger, step: str, expected: int, device_id: str, *,
                 password: str | None = None, identity: DeviceIdentity | None = None,
                 fw_token: str | None = None, key: ec.EllipticCurvePrivateKey | None = None,
                 username: str | None = None) -> None:
    """One MQTT 5 CONNECT; the CONNACK code is the outcome. ``fw_token``: ``FW-TOKEN``
    enhanced authentication, the challenge answered by a recorded proof by ``key``."""
    session = TokenSession(ledger.server, device_id, identity=identity, password=password,
                           username=username,
                           auth_method=FW_TOKEN if fw_token else None,
                           auth_data=fw_token.encode() if fw_token else None)
    if fw_token is not None and key is not None:
        def answer(challenge: bytes) -> bytes:
            proof = dpop_proof(key, "CONNECT", mqtt_uri(ledger.server), token=fw_token,
                               nonce=challenge)
            return ledger.jwt(f"{step}: FW-TOKEN proof", proof).encode()
        session.answer = answer
    try:
        session.connect()
        ledger.expect(step, expected, session.wait_connack())
        if fw_token is not None and key is not None and expected == SUCCESS:
            ledger.expect(f"{step}: challenge answered", True,
                          any(a.code == CONTINUE_AUTHENTICATION for a in session.auths))
    finally:
        session.close()


def fresh_token(ledger: Ledger) -> str:
    """A new access token (operator-issued) for the certificate device: tokens here live
    a few seconds, so each introspection gets one that is surely active."""
    with ledger.server.admin() as admin:
        issued = admin.post("/v1/access-tokens", json={"device_id": "leak-cert"})
    ledger.expect("admin: issue a token to introspect", 201, issued.status_code)
    return ledger.jwt("token to introspect", issued.json()["access_token"])


def introspect(ledger: Ledger, step: str, expected: int, api_key: str) -> None:
    token = fresh_token(ledger)
    with https(ledger.server) as client:
        response = client.post(INTROSPECT, data={"token": token},
                               headers={"Authorization": f"Bearer {api_key}"})
    ledger.expect(step, expected, response.status_code)
    if expected == 200:
        ledger.expect(f"{step}: active", True, response.json().get("active"))


def forged_secret(token: str) -> str:
    """``prefix_<id>.<another secret>``: the right id, a wrong secret."""
    return f"{token.partition('.')[0]}.{secrets.token_urlsafe(32)}"


# --- the drive ---------------------------------------------------------------------------------


def drive_admin_and_bootstrap(ledger: Ledger) -> None:
    server = ledger.server
    ledger.prefixed("admin token", server.token)
    wrong_admin = ledger.prefixed("forged admin token", forged_secret(server.token))
    with server.admin(wrong_admin) as admin:
        ledger.expect("admin: forged admin token", 401, admin.get("/v1/whoami").status_code)
    with server.admin() as admin:
        ledger.expect("admin: admin token", 200, admin.get("/v1/whoami").status_code)
        for device_id in ("leak-est-api", "leak-est-cli"):
            ledger.expect(f"admin: register {device_id}", 201, admin.post(
                "/v1/devices", json={"id": device_id, "type": "default"}).status_code)
        made = admin.post("/v1/devices/leak-est-api/bootstrap-tokens", json={"ttl_hours": 1})
    ledger.expect("admin: bootstrap token", 201, made.status_code)
    by_api = ledger.prefixed("bootstrap token (API)", made.json()["token"])
    by_cli = ledger.cli("bootstrap-token create", "bootstrap-token", "create", "--device",
                        "leak-est-cli", intended=1).stdout.strip()
    ledger.prefixed("bootstrap token (CLI)", by_cli)
    for device_id, token in (("leak-est-api", by_api), ("leak-est-cli", by_cli)):
        wrong = ledger.prefixed(f"forged bootstrap token {device_id}", forged_secret(token))
        for label, presented, expected in (("wrong secret", wrong, 401), ("good", token, 200),
                                           ("spent", token, 401)):
            ledger.basic(f"Basic {label} {device_id}", device_id, presented)
            response = est_enroll(server, csr_der(device_id), basic=(device_id, presented))
            ledger.expect(f"est {device_id}: {label}", expected, response.status_code)


def drive_access_tokens(ledger: Ledger, base: Path) -> list[str]:
    """Returns the tokens to present again once expired."""
    server = ledger.server
    identity = ledger.identity = make_device(server, base / "ids", "leak-cert")
    cert_key = load_key(identity)
    device_id = identity.device_id

    # Certificate-bound (tls_client_auth).
    response = token_request(ledger, "token: mtls", 200, identity=identity)
    bound = ledger.jwt("token mtls", response.json()["access_token"])
    device_get(ledger, "https: mtls token", 200, f"Bearer {bound}", identity=identity)
    mqtt_connect(ledger, "mqtt: mtls token", SUCCESS, device_id, password=bound,
                 identity=identity)

    # Key-bound (private_key_jwt + DPoP), and what goes wrong with assertions and proofs.
    good = assertion(ledger, "assertion es256", device_id, cert_key)
    response = token_request(ledger, "token: private_key_jwt + dpop", 200,
                             client_assertion=good,
                             proof=token_proof(ledger, "proof token endpoint", cert_key))
    dpop = ledger.jwt("token dpop", response.json()["access_token"])
    token_request(ledger, "token: replayed assertion", 400, client_assertion=good,
                  proof=token_proof(ledger, "proof replayed assertion", cert_key))
    token_request(ledger, "token: assertion by another key", 400,
                  client_assertion=assertion(ledger, "assertion forged", device_id, new_key()),
                  proof=token_proof(ledger, "proof forged assertion", cert_key))
    token_request(ledger, "token: expired assertion", 400,
                  client_assertion=assertion(ledger, "assertion expired", device_id, cert_key,
                                             exp_in=-90),
                  proof=token_proof(ledger, "proof expired assertion", cert_key))
    proof = self_proof(ledger, "proof self", cert_key, dpop)
    device_get(ledger, "https: dpop token", 200, f"DPoP {dpop}", proof=proof)
    device_get(ledger, "https: replayed proof", 401, f"DPoP {dpop}", proof=proof)
    device_get(ledger, "https: proof for another url", 401, f"DPoP {dpop}",
               proof=self_proof(ledger, "proof wrong htu", cert_key, dpop,
                                url=device_url(server, "/v1/commands")))
    connect_proof = ledger.jwt("proof mqtt password", dpop_proof(
        cert_key, "CONNECT", mqtt_uri(server), token=dpop))
    mqtt_connect(ledger, "mqtt: dpop token + proof", SUCCESS, device_id,
                 password=f"{dpop} {connect_proof}")
    mqtt_connect(ledger, "mqtt: replayed password", BAD_USER_NAME_OR_PASSWORD, device_id,
                 password=f"{dpop} {connect_proof}")
    mqtt_connect(ledger, "mqtt: FW-TOKEN dpop", SUCCESS, device_id, fw_token=dpop, key=cert_key)

    # Unbound (client_secret_jwt with a symmetric key).
    sym_id = "leak-sym"
    with server.admin() as admin:
        ledger.expect("admin: register leak-sym", 201, admin.post(
            "/v1/devices", json={"id": sym_id, "type": "default"}).status_code)
        added = admin.post(f"/v1/devices/{sym_id}/credentials", json={"kind": "symmetric_key"})
        ledger.expect("admin: symmetric key", 201, added.status_code)
        ledger.expect("admin: activate leak-sym", 200, admin.post(
            f"/v1/devices/{sym_id}/state", json={"state": "active"}).status_code)
    primary = ledger.key("symmetric primary (API)", added.json()["primary_key"])
    ledger.key("symmetric secondary (API)", added.json()["secondary_key"])
    ledger.ids.append(added.json()["id"])
    response = token_request(ledger, "token: client_secret_jwt", 200,
                             client_assertion=assertion(ledger, "assertion hs256", sym_id,
                                                        primary))
    unbound = ledger.jwt("token unbound", response.json()["access_token"])
    token_request(ledger, "token: hs256 by another key", 400,
                  client_assertion=assertion(ledger, "assertion hs256 forged", sym_id,
                                             secrets.token_bytes(32)))
    device_get(ledger, "https: unbound token", 200, f"Bearer {unbound}")
    mqtt_connect(ledger, "mqtt: unbound token", SUCCESS, sym_id, password=unbound)

    # Forged (one bit of the signature) and foreign (signed by someone else's key).
    for name, token, kind in (("mtls", bound, "Bearer"), ("dpop", dpop, "DPoP"),
                              ("unbound", unbound, "Bearer")):
        forged = ledger.jwt(f"token {name} forged", tampered_jwt(token))
        proof = self_proof(ledger, f"proof for forged {name}", cert_key, forged)
        device_get(ledger, f"https: forged {name} token", 401, f"{kind} {forged}",
                   identity=identity if name == "mtls" else None,
                   proof=proof if kind == "DPoP" else None)
        mqtt_connect(ledger, f"mqtt: forged {name} token", BAD_USER_NAME_OR_PASSWORD,
                     sym_id if name == "unbound" else device_id, password=forged)
    claims = claims_of(unbound)
    foreign = ledger.jwt("token foreign", jwt.encode(
        claims, new_key(), algorithm="ES256", headers={"typ": "at+jwt",
                                                       "kid": jwt.get_unverified_header(
                                                           unbound)["kid"]}))
    device_get(ledger, "https: foreign-signed token", 401, f"Bearer {foreign}")
    device_get(ledger, "https: dpop token sent as bearer", 401, f"Bearer {dpop}")
    mqtt_connect(ledger, "mqtt: token under another user name", BAD_USER_NAME_OR_PASSWORD,
                 sym_id, password=unbound, username="leak-cert")
    mqtt_connect(ledger, "mqtt: foreign-signed token", BAD_USER_NAME_OR_PASSWORD, sym_id,
                 password=foreign)

    # Revoked by jti through the API, while it is well within its lifetime (an expired
    # token is refused as expired, 0x86, before revocation is looked at).
    with server.admin() as admin:
        ledger.expect("admin: revoke jti", 200, admin.post(
            "/v1/access-tokens/revoke", json={"jti": claims_of(bound)["jti"]}).status_code)
    device_get(ledger, "https: revoked mtls token", 401, f"Bearer {bound}", identity=identity)
    mqtt_connect(ledger, "mqtt: revoked mtls token", BANNED, device_id, password=bound,
                 identity=identity)

    # Issued by an operator: API and CLI (the CLI prints it once), inspected both ways.
    with server.admin() as admin:
        issued = admin.post("/v1/access-tokens", json={"device_id": device_id})
        ledger.expect("admin: issue access token", 201, issued.status_code)
        operator_token = ledger.jwt("token admin-issued", issued.json()["access_token"])
        inspected = admin.post("/v1/access-tokens/inspect", json={"token": operator_token})
        ledger.expect("admin: inspect", True, inspected.json().get("valid"))
    cli_token = ledger.cli("access-token issue", "access-token", "issue", "--device", device_id,
                           intended=1).stdout.strip()
    ledger.jwt("token cli-issued", cli_token)
    device_get(ledger, "https: cli-issued token", 200, f"Bearer {cli_token}", identity=identity)
    ledger.cli("access-token inspect", "access-token", "inspect", "-", stdin=cli_token)

    # Revoked by jti through the CLI.
    ledger.cli("access-token revoke", "access-token", "revoke", "--jti",
               claims_of(operator_token)["jti"])
    ledger.ids += [claims_of(t)["jti"] for t in (bound, operator_token)]
    device_get(ledger, "https: revoked admin-issued token", 401, f"Bearer {operator_token}",
               identity=identity)
    return [bound, dpop, unbound, cli_token]


def drive_symmetric_keys_and_sas(ledger: Ledger) -> None:
    server = ledger.server
    sas_id = "leak-sas"
    with server.admin() as admin:
        ledger.expect("admin: register leak-sas", 201, admin.post(
            "/v1/devices", json={"id": sas_id, "type": "default"}).status_code)
    added = ledger.cli("credential add --kind symmetric", "credential", "add", "--device",
                       sas_id, "--kind", "symmetric", intended=2)
    primary_b64, secondary_b64 = (line.split(": ", 1)[1] for line in
                                  added.stdout.splitlines()[:2])
    primary = ledger.key("symmetric primary (CLI)", primary_b64)
    ledger.key("symmetric secondary (CLI)", secondary_b64)
    with server.admin() as admin:
        ledger.expect("admin: activate leak-sas", 200, admin.post(
            f"/v1/devices/{sas_id}/state", json={"state": "active"}).status_code)
        listed = admin.get(f"/v1/devices/{sas_id}/credentials").json()["items"]
    credential_id = listed[0]["id"]
    ledger.ids.append(credential_id)
    ledger.cli("credential list", "credential", "list", "--device", sas_id)
    ledger.cli("credential show", "credential", "show", credential_id)
    rotated = ledger.cli("credential rotate", "credential", "rotate", credential_id, "--slot",
                         "secondary", intended=1).stdout.strip()
    ledger.key("symmetric secondary rotated (CLI)", rotated)

    now = int(time.time())
    good = ledger.sas("sas good", make_sas(sas_id, primary, now + 600))
    wrong = ledger.sas("sas wrong key", make_sas(sas_id, secrets.token_bytes(32), now + 600))
    expired = ledger.sas("sas expired", make_sas(sas_id, primary, now - 60))
    # The right signature with a byte more: not base64 any longer (a parse error).
    malformed = good.replace("&se=", "%21&se=")
    for label, sas, status, code in (("good", good, 202, SUCCESS),
                                     ("malformed", malformed, 401, BAD_USER_NAME_OR_PASSWORD),
                                     ("wrong signature", wrong, 401, BAD_USER_NAME_OR_PASSWORD),
                                     ("expired", expired, 401, BAD_USER_NAME_OR_PASSWORD)):
        with https(server) as client:
            response = client.post("/v1/telemetry/leak", json={"sas": label},
                                   headers={"Authorization": sas})
        ledger.expect(f"https: sas {label}", status, response.status_code)
        mqtt_connect(ledger, f"mqtt: sas {label}", code, sas_id, password=sas)


def drive_api_keys(ledger: Ledger) -> None:
    server = ledger.server
    with server.admin() as admin:
        made = admin.post("/v1/api-keys", json={"name": "leak check",
                                                "scopes": ["tokens:introspect"]})
    ledger.expect("admin: api key", 201, made.status_code)
    key_id = made.json()["id"]
    ledger.ids.append(key_id)
    first = ledger.prefixed("api key (API)", made.json()["key"])
    introspect(ledger, "introspect: api key", 200, first)
    introspect(ledger, "introspect: wrong secret", 401,
               ledger.prefixed("api key forged", forged_secret(first)))
    with server.admin() as admin:
        rotated = admin.post(f"/v1/api-keys/{key_id}/rotate", json={})
    ledger.expect("admin: rotate api key", 200, rotated.status_code)
    second = ledger.prefixed("api key rotated (API)", rotated.json()["key"])
    introspect(ledger, "introspect: rotated-out secret", 401, first)
    introspect(ledger, "introspect: rotated key", 200, second)
    third = ledger.cli("credential rotate api key", "credential", "rotate", f"fwk_{key_id}",
                       intended=1).stdout.strip()
    ledger.prefixed("api key rotated (CLI)", third)
    introspect(ledger, "introspect: cli-rotated key", 200, third)
    with server.admin() as admin:
        ledger.expect("admin: revoke api key", 200,
                      admin.delete(f"/v1/api-keys/{key_id}").status_code)
    introspect(ledger, "introspect: revoked key", 401, third)

    by_cli = ledger.cli("credential add --kind api-key", "credential", "add", "--kind",
                        "api-key", "--name", "leak check cli", "--scope", "tokens:introspect",
                        intended=1).stdout.strip()
    ledger.prefixed("api key (CLI)", by_cli)
    introspect(ledger, "introspect: cli api key", 200, by_cli)
    ledger.cli("credential list --api-keys", "credential", "list", "--api-keys")
    # A whole key where an id belongs: refused without being echoed.
    ledger.cli("credential show with a whole key", "credential", "show", by_cli,
               expect_exit=1)
    ledger.cli("credential revoke api key", "credential", "revoke",
               by_cli.partition(".")[0])
    introspect(ledger, "introspect: cli-revoked key", 401, by_cli)


def drive_expiry(ledger: Ledger, tokens: list[str]) -> None:
    """Wait until every token is past ``exp``, then present each again."""
    server = ledger.server
    latest = max(claims_of(t)["exp"] for t in tokens)
    time.sleep(max(0.0, latest + 1.1 - time.time()))
    _, dpop, unbound, cli_token = tokens
    identity = ledger.identity
    assert identity is not None
    cert_key = load_key(identity)
    device_get(ledger, "https: expired dpop token", 401, f"DPoP {dpop}",
               proof=self_proof(ledger, "proof expired dpop", cert_key, dpop))
    device_get(ledger, "https: expired unbound token", 401, f"Bearer {unbound}")
    device_get(ledger, "https: expired cli-issued token", 401, f"Bearer {cli_token}",
               identity=identity)
    mqtt_connect(ledger, "mqtt: expired unbound token", BAD_USER_NAME_OR_PASSWORD, "leak-sym",
                 password=unbound)
    mqtt_connect(ledger, "mqtt: expired dpop token", BAD_USER_NAME_OR_PASSWORD, "leak-cert",
                 password=f"{dpop} " + ledger.jwt("proof expired mqtt", dpop_proof(
                     cert_key, "CONNECT", mqtt_uri(server), token=dpop)))
    with server.admin() as admin:
        inspected = admin.post("/v1/access-tokens/inspect", json={"token": unbound})
    ledger.expect("admin: inspect expired", False, inspected.json().get("valid"))
    ledger.cli("access-token inspect expired", "access-token", "inspect", "-", stdin=unbound,
               expect_exit=1)
    # A token on the command line (discouraged, but done): not echoed either.
    ledger.cli("access-token inspect forged argv", "access-token", "inspect",
               tampered_jwt(dpop), expect_exit=1)


def database_bytes(server: RunningServer) -> bytes:
    """The SQLite file and its WAL (and shared-memory index), as on disk now."""
    files = sorted(server.data_dir.glob("fleetward.db*"))
    return b"".join(f.read_bytes() for f in files)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    base = tmp_path_factory.mktemp("secrets-not-logged")
    server = start_server(base / "data", settings={"tokens": {
        "access_token_lifetime_seconds": LIFETIME_SECONDS,
        "unbound_token_lifetime_seconds": LIFETIME_SECONDS}})
    record = Ledger(server)
    try:
        drive_admin_and_bootstrap(record)
        to_expire = drive_access_tokens(record, base)
        drive_symmetric_keys_and_sas(record)
        drive_api_keys(record)
        drive_expiry(record, to_expire)
        with server.admin() as admin:
            audit = admin.get("/v1/audit", params={"limit": 1000})
        record.other_files["audit log (admin API)"] = audit.content
        record.db_while_running = database_bytes(server)
        assert {p.name for p in server.data_dir.glob("fleetward.db*")} >= {
            "fleetward.db", "fleetward.db-wal"}, "no WAL to scan while running"
    finally:
        stop_server(server)
    record.log = server.log_file.read_bytes()
    record.db_after_stop = database_bytes(server)
    for path in sorted(server.data_dir.rglob("*")):
        # The admin token's own file is where it is meant to be; everything else counts.
        if path.is_file() and path != server.data_dir / "secrets" / "admin-token":
            record.other_files[str(path.relative_to(server.data_dir))] = path.read_bytes()
    yield record


# --- the tests -----------------------------------------------------------------------------------


def test_every_credential_was_used_and_accepted_or_refused_as_meant(ledger: Ledger) -> None:
    """Negative control for the scans: every step reached the server and had its outcome
    (a credential never presented would make "not in the log" meaningless)."""
    wrong = [(o.step, o.expected, o.got) for o in ledger.outcomes if o.expected != o.got]
    assert not wrong, wrong
    assert len(ledger.outcomes) >= 80 and len(ledger.secrets) >= 60
    for run in ledger.cli_runs:  # the CLI printed the secrets it is meant to, once
        for shown in run.intended:
            assert len(shown) >= 40 and run.stdout.count(shown) == 1, run.label


def test_no_secret_in_the_server_log(ledger: Ledger) -> None:
    assert ledger.log, "the server wrote no log"
    assert find_leaks(ledger.log, ledger.secrets) == []


def test_no_secret_in_the_database_or_its_wal(ledger: Ledger) -> None:
    assert find_leaks(ledger.db_while_running, ledger.secrets) == []
    assert find_leaks(ledger.db_after_stop, ledger.secrets) == []


def test_no_secret_in_any_other_file_the_server_keeps_or_the_audit_log(ledger: Ledger) -> None:
    leaks = {name: find_leaks(blob, ledger.secrets)
             for name, blob in ledger.other_files.items()}
    assert {name: hits for name, hits in leaks.items() if hits} == {}
    assert "fleetward.toml" in ledger.other_files and len(ledger.other_files) >= 5


def test_no_secret_in_cli_output_other_than_the_one_it_shows(ledger: Ledger) -> None:
    assert len(ledger.cli_runs) >= 12
    leaks = {}
    for run in ledger.cli_runs:  # stderr, and stdout but for the once-shown secret lines
        hits = find_leaks(run.scanned.encode(), ledger.secrets)
        if hits:
            leaks[run.label] = hits
    assert leaks == {}


def test_ids_and_jtis_are_logged_so_the_log_is_the_right_place_to_look(ledger: Ledger) -> None:
    """Positive control: the log and the database do record these credentials and
    events, by their non-secret names (credential ids, API key ids, revoked jtis)."""
    text = ledger.log.decode(errors="replace")
    assert len(ledger.ids) >= 5
    assert [i for i in ledger.ids if i not in text] == []
    assert [i for i in ledger.ids if i.encode() not in ledger.db_while_running] == []
    assert text.count("refused") >= 10


def test_the_scan_finds_a_secret_planted_in_a_copy_of_the_log(ledger: Ledger,
                                                             tmp_path: Path) -> None:
    """Negative control for the scan itself, one planted copy per kind of match."""
    copy = tmp_path / "server.log"
    by_label = {s.label: s for s in ledger.secrets}
    sas = next(n for n in by_label["sas wrong key"].needles
               if n.startswith(b"SharedAccessSignature "))
    sig = urllib.parse.unquote(sas.decode().split("sig=", 1)[1].split("&", 1)[0])
    sig_piece = sig[5:5 + PIECE + 2]  # twelve characters from inside the signature
    api_key = next(n for n in by_label["api key (CLI)"].needles if n.startswith(b"fwk_"))
    for planted, label in ((json.dumps({"event": "x", "detail": f"..{sig_piece}.."}
                                       ).encode(), "sas wrong key"),
                           (b'{"authorization": "Bearer ' + api_key + b'"}', "api key (CLI)")):
        copy.write_bytes(ledger.log + planted + b"\n")
        assert label in {hit[0] for hit in find_leaks(copy.read_bytes(), ledger.secrets)}
    raw_key = min(n for n in by_label["symmetric primary (API)"].needles if len(n) == 32)
    planted_db = ledger.db_after_stop[:4096] + raw_key + ledger.db_after_stop[4096:]
    assert "symmetric primary (API)" in {h[0] for h in find_leaks(planted_db, ledger.secrets)}


def test_the_scan_finds_what_the_cli_was_meant_to_show(ledger: Ledger) -> None:
    """Negative control: scanned, a command's intended stdout shows its secret (so the
    secrets' forms and labels are right for what the CLI printed)."""
    showing = [run for run in ledger.cli_runs if run.intended]
    assert len(showing) >= 6
    for run in showing:
        hits = find_leaks(run.stdout.encode(), ledger.secrets)
        assert len({label for label, _ in hits}) >= len(run.intended), (run.label, hits)
