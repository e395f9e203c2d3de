"""Access tokens (issue 11): issuance through the token endpoint, verification in the
data plane, and MQTT CONNECTs with a token, each against a baseline measured in the
same run.

1. **Issuance** (``issuance``): client worker processes (``tokens.py issue-worker``,
   pinned to the other CPU) POST ``/oauth2/token`` (``grant_type=client_credentials``,
   ``client_id=<device>``) to the device listener of a real ``fleetward serve``, with the
   device certificate over mTLS (``tls_client_auth``), on one keep-alive HTTPS
   connection each (httpx). Per token the server pays: the HTTP request and response
   (TLS records), client authentication by the certificate on the connection, the
   device's state, the scopes narrowed by its policy, the ES256 signature, and the
   ``access_token.issued`` audit row (SQLite, one transaction). Counted: 200 answers
   with a certificate-bound token, which must equal the audit rows written for the
   bench devices; the timed window ends when the last row is in. The baseline
   (``pyjwt-sign``) is bare PyJWT, ``jwt.encode(claims, p256_key, algorithm="ES256")``
   with the same claims and header, per CPU-second of this process: what the endpoint
   would cost if it did nothing but sign.
2. **Verification** (in this process, on the same distinct tokens, loops interleaved):
   ``AccessTokenVerifier.verify_uncached`` (what a CONNECT or an HTTPS request with a
   token not seen before costs: header checks, kid lookup, signature, iss/aud, claims,
   times), ``AccessTokenVerifier.verify`` of tokens already seen (the cache the data
   plane answers repeats from), against bare ``jwt.decode(token, public_key,
   algorithms=["ES256"], audience=…, issuer=…)``. The keys are a ``SigningKeys`` over a
   temporary SQLite database with a ``FileSigner``, as ``fleetward serve`` builds them.
   The issue's goal is verification on the hot path at ≥ 0.8 times bare PyJWT; the output
   says whether it is met, judged by the uncached figure (a cache hit is never slower).
3. **CONNECT with a token** (``fleetward+token-connect``): each client worker
   (``tokens.py connect-worker``) first gets a DPoP-bound token (``private_key_jwt``
   assertion signed with its device key, and a DPoP proof of the same key), then per
   connection makes a fresh CONNECT proof (``htm`` CONNECT, ``htu``
   ``mqtts://localhost:<port>``, ``ath``, a new ``jti``) and connects over server-auth
   TLS 1.3 (no client certificate, no resumption) with password ``<token> <proof>``:
   CONNECT → CONNACK 0 → DISCONNECT. Proof signing is client CPU (the other core). The
   baseline is ``fleetward+connect`` of bench/handshake.py — a full mTLS handshake plus
   CONNECT/CONNACK/DISCONNECT, the same ``_channel.py handshake-worker --connect``
   clients — on the same server in the same run, interleaved: half the time each, in
   the order mTLS, token, token, mTLS.

Server figures are per server-CPU-second (on-CPU time of all the server's threads over
the timed window, from /proc: ``task/*/schedstat``, else utime + stime of ``stat``), so
Python clients slower than the server do not distort them; the lines also give the rate
per wall second and how busy the server was. In-process figures are per CPU-second of
this process (``time.process_time``), measured after the server has stopped. With
the defaults the whole bench takes about a minute.

Before the clock starts each path is checked: a token request over mTLS returns a token
that verifies with the server's JWKS and is bound to that certificate, and the same
request without a certificate (or with another device's) is refused; the MQTT listener
presents Fleetward's certificate, refuses a CONNECT without credentials, a key-bound
token without a proof, and a replayed proof, and accepts a token with a fresh proof and
a device certificate. Every timed request and connection must succeed; a run with a
failure exits non-zero.

Named ``tokens.py``, not ``token.py``: a script's folder comes first on ``sys.path``, and
a ``bench/token.py`` would shadow the standard library's ``token`` module (which
``tokenize``, ``linecache`` and ``inspect`` import) for every script in bench/.

Usage:
    python bench/tokens.py [--seconds S] [--clients C] [--warmup N] [--tokens T]
                          [--no-pin] [--json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import socket
import sqlite3
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()  # the workers' program
sys.path.insert(0, str(SCRIPT.parent))
import _channel as ch  # noqa: E402 (bench/ first on sys.path)


@dataclass(frozen=True, slots=True)
class ServerRun(ch.TimedRun):
    """One timed run against ``fleetward serve``."""

    name: str  # issuance | fleetward+connect | fleetward+token-connect
    done: int  # tokens issued (and audited) / connections accepted
    failed: int
    wall_seconds: float
    cpu_seconds: float
    clients: int
    loop_cpu_seconds: float | None  # the event loop's (main) thread; None: unknown

    @property
    def count(self) -> int:
        return self.done

    def line(self) -> str:
        unit, details = RUN_DETAILS[self.name]
        return (f"{self.name}: {self.per_cpu_second:.0f} {unit} per server-CPU-s, "
                f"{self.per_wall_second:.0f}/s (wall), server busy {self.busy:.0%}  "
                f"[N={self.done}, failed {self.failed}, {self.clients} clients, "
                f"{details}]")

    def to_json(self) -> dict[str, Any]:
        loop = self.loop_cpu_seconds
        return {"count": self.done, "failed": self.failed, **self.rates_json(),
                "event_loop_share_of_server_cpu": None if loop is None
                else round(loop / self.cpu_seconds, 3)}

@dataclass(frozen=True, slots=True)
class Loop:
    """An in-process loop: how many calls in how much CPU time of this process."""

    name: str
    count: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def per_cpu_second(self) -> float:
        return self.count / self.cpu_seconds

    def line(self, extra: str = "") -> str:
        unit, details = LOOP_DETAILS[self.name]
        return (f"{self.name}: {self.per_cpu_second:.0f} {unit} per CPU-s  "
                f"[N={self.count}, {details}{extra}]")

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "cpu_seconds": round(self.cpu_seconds, 4),
                "wall_seconds": round(self.wall_seconds, 4),
                "per_cpu_second": round(self.per_cpu_second, 1)}


ALGORITHM = "ES256"
TOKEN_PATH = "/oauth2/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
ISSUED_ACTION = "access_token.issued"
DEVICE_PREFIX = "tk"
GOAL = 0.8  # the issue: verification on the hot path at >= 0.8x bare PyJWT
VERIFY_ROUNDS = 3  # the three verification loops alternate this many times
# After the clients are done the server may still be writing audit rows; a count that
# stops growing for this long is short, not slow.
AUDIT_STALL_SECONDS = 5.0
MAX_WORKER_FAILURES = 10  # a worker stops after this many; the run then fails
TLS = "TLS 1.3, P-256"
RUN_DETAILS = {
    "issuance": ("tokens", "POST /oauth2/token, mTLS keep-alive, tls_client_auth, policy "
                           "scopes, ES256, audit row"),
    "fleetward+connect": ("connects", f"{TLS}, mTLS, no resumption, "
                                      "MQTT CONNECT/CONNACK/DISCONNECT"),
    "fleetward+token-connect": ("connects", f"{TLS}, server-auth only, no resumption, "
                                            "MQTT CONNECT with DPoP-bound token + proof"),
}
LOOP_DETAILS = {
    "pyjwt-sign": ("tokens", "jwt.encode ES256, the same claims and header, in process"),
    "pyjwt-decode": ("verifications", "jwt.decode ES256 + aud + iss + exp/nbf/iat"),
    "verify-uncached": ("verifications", "AccessTokenVerifier.verify_uncached: a token "
                                         "not seen before"),
    "verify-cached": ("verifications", "AccessTokenVerifier.verify: a token seen before"),
}


# --- JOSE, client side (independent of fleetward.crypto.jose) ---------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: Any) -> dict[str, str]:
    """An EC P-256 public key as a JWK (RFC 7518 §6.2.1)."""
    numbers = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big"))}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 §3."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")},
                           separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def dpop_proof(key: Any, jwk: dict[str, str], htm: str, htu: str,
               ath: str | None = None) -> str:
    """A DPoP proof (RFC 9449 §4.2), or a CONNECT proof (``htm`` CONNECT)."""
    import jwt

    claims: dict[str, Any] = {"jti": secrets.token_urlsafe(16), "htm": htm, "htu": htu,
                              "iat": int(time.time())}
    if ath is not None:
        claims["ath"] = ath
    return jwt.encode(claims, key, algorithm=ALGORITHM,
                      headers={"typ": "dpop+jwt", "jwk": jwk})


def client_assertion(key: Any, device_id: str, audience: str) -> str:
    """A ``private_key_jwt`` client assertion (RFC 7523 §3)."""
    import jwt

    now = int(time.time())
    return jwt.encode({"iss": device_id, "sub": device_id, "aud": audience, "iat": now,
                       "exp": now + 120, "jti": secrets.token_urlsafe(16)},
                      key, algorithm=ALGORITHM)


def load_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(Path(path).read_bytes(), None)


def token_url(port: int) -> str:
    return f"https://localhost:{port}{TOKEN_PATH}"


def mqtt_uri(port: int) -> str:
    return f"mqtts://localhost:{port}"


def server_auth_context(chain: str | Path | None) -> ssl.SSLContext:
    """TLS 1.3 without a client certificate. With ``chain`` the server is verified;
    without, it is not (the timed MQTT loop: client CPU only, like
    ``_channel._client_context``; the coordinator checks the certificate first)."""
    if chain is not None:
        ctx = ssl.create_default_context(cafile=str(chain))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def dpop_token(port: int, chain: str | Path, device_id: str, key: Any,
               jwk: dict[str, str]) -> str:
    """A DPoP-bound access token: ``private_key_jwt`` + DPoP, no client certificate.

    Raises:
        ConnectionError: the token endpoint refused.
    """
    import httpx

    url = token_url(port)
    with httpx.Client(verify=server_auth_context(chain), timeout=30) as client:
        response = client.post(url, data={
            "grant_type": "client_credentials", "client_id": device_id,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(key, device_id, url)},
            headers={"DPoP": dpop_proof(key, jwk, "POST", url)})
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    if response.status_code != 200 or body.get("token_type") != "DPoP":
        raise ConnectionError(f"token endpoint: {response.status_code} {response.text[:200]}")
    return str(body["access_token"])


def _utf8(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def connect_with_password(client_id: str, username: str, password: str,
                          keepalive: int = 60) -> bytes:
    """MQTT 3.1.1 CONNECT (§3.1) with Clean Session, a user name and a password."""
    body = (_utf8(b"MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + keepalive.to_bytes(2, "big")
            + _utf8(client_id.encode()) + _utf8(username.encode()) + _utf8(password.encode()))
    return b"\x10" + ch.varint(len(body)) + body


def token_connect_packet(device_id: str, token: str, ath: str, key: Any,
                         jwk: dict[str, str], port: int) -> bytes:
    """A CONNECT whose password is the token and a fresh CONNECT proof."""
    proof = dpop_proof(key, jwk, "CONNECT", mqtt_uri(port), ath)
    return connect_with_password(device_id, device_id, f"{token} {proof}")


# --- client workers -----------------------------------------------------------------------


def issue_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Token requests over one keep-alive mTLS connection, for ``seconds``."""
    import httpx

    ctx = server_auth_context(args.chain)
    ctx.load_cert_chain(args.cert, args.key)
    url = token_url(args.port)
    form = {"grant_type": "client_credentials", "client_id": args.client_id}
    streams: list[Any] = []  # the connections the requests went over (keep-alive: one)
    with httpx.Client(verify=ctx, timeout=30) as client:

        def issue() -> str | None:
            """None when a certificate-bound token came back, else what did."""
            response = client.post(url, data=form)
            stream = response.extensions.get("network_stream")
            if not any(stream is s for s in streams):
                streams.append(stream)
            if response.status_code != 200:
                return f"{response.status_code} {response.text[:160]}"
            body = response.json()
            token = body.get("access_token")
            if body.get("token_type") != "Bearer" or not isinstance(token, str) \
                    or token.count(".") != 2:
                return f"unexpected answer {str(body)[:160]}"
            return None

        for _ in range(args.warmup):
            if (error := issue()) is not None:
                raise SystemExit(f"worker: warm-up token request failed: {error}")
        ch._wait_for_go()
        done = failed = 0
        first_error = ""
        started = time.perf_counter()
        deadline = started + args.seconds
        while time.perf_counter() < deadline and failed < MAX_WORKER_FAILURES:
            try:
                error = issue()
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                done += 1
            else:
                failed += 1
                first_error = first_error or error
        seconds = time.perf_counter() - started
    return {"done": done, "failed": failed, "error": first_error, "seconds": seconds,
            "connections": len(streams)}


def connect_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One DPoP-bound token, then full TLS handshakes (no client certificate, no
    resumption) with CONNECT ``<token> <fresh proof>`` → CONNACK 0 → DISCONNECT."""
    key = load_key(args.key)
    jwk = public_jwk(key)
    token = dpop_token(args.token_port, args.chain, args.client_id, key, jwk)
    ath = token_hash(token)
    ctx = server_auth_context(None)

    def connect() -> None:
        ch.one_handshake(ctx, args.host, args.port,
                         token_connect_packet(args.client_id, token, ath, key, jwk,
                                              args.port))

    for _ in range(args.warmup):
        connect()
    ch._wait_for_go()
    done = failed = 0
    first_error = ""
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline and failed < MAX_WORKER_FAILURES:
        try:
            connect()
            done += 1
        except (OSError, ConnectionError) as exc:
            failed += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
    return {"done": done, "failed": failed, "error": first_error,
            "seconds": time.perf_counter() - started}


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/tokens.py")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("issue-worker", "connect-worker"):
        p = sub.add_parser(role)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--chain", required=True)
        p.add_argument("--client-id", required=True)
        p.add_argument("--seconds", type=float, required=True)
        p.add_argument("--warmup", type=int, default=0)
    sub.choices["connect-worker"].add_argument("--token-port", type=int, required=True)
    args = parser.parse_args(argv)
    result = issue_worker(args) if args.role == "issue-worker" else connect_worker(args)
    print(json.dumps(result), flush=True)
    return 0


# --- checks before the clock starts -------------------------------------------------------


def certificate_thumbprint(pem_file: Path) -> str:
    return b64url(hashlib.sha256(first_cert_der(pem_file)).digest())


def first_cert_der(pem_file: Path) -> bytes:
    pem = pem_file.read_text()
    block = pem[pem.index("-----BEGIN CERTIFICATE-----"):]
    return ssl.PEM_cert_to_DER_cert(block[:block.index("-----END CERTIFICATE-----") + 25])


def audited_issuances(db_file: Path) -> int:
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM audit_events WHERE action = ? AND target LIKE ?",
            (ISSUED_ACTION, f"device:{DEVICE_PREFIX}-%")).fetchone()[0])
    finally:
        conn.close()


def wait_for_audit(db_file: Path, expected: int) -> int:
    """The audit row count once it reaches ``expected`` (or stops growing)."""
    last, last_change = -1, time.monotonic()
    while True:
        count = audited_issuances(db_file)
        if count >= expected:
            return count
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > AUDIT_STALL_SECONDS:
            return count
        time.sleep(0.02)


def check_token_endpoint(server: ch.FleetwardServer, identities: list[ch.Identity]) -> str:
    """A token request over mTLS returns a token bound to that certificate that verifies
    with the server's published keys, and is audited; without a certificate, or with
    another device's, it is refused. Returns the scope granted."""
    import httpx
    import jwt

    identity = identities[0]
    base = f"https://localhost:{server.device_port}"
    form = {"grant_type": "client_credentials", "client_id": identity.device_id}
    before = audited_issuances(server.data_dir / "fleetward.db")
    with httpx.Client(verify=server_auth_context(server.chain), timeout=30) as anonymous:
        metadata = anonymous.get(f"{base}/.well-known/oauth-authorization-server").json()
        jwks = anonymous.get(f"{base}/.well-known/jwks.json").json()
        refused = anonymous.post(f"{base}{TOKEN_PATH}", data=form)
    if refused.status_code != 400 or refused.json().get("error") != "invalid_client":
        raise SystemExit(f"bench: the token endpoint did not refuse a client without "
                         f"credentials: {refused.status_code} {refused.text[:200]}")
    mtls = server_auth_context(server.chain)
    mtls.load_cert_chain(str(identity.cert), str(identity.key))
    with httpx.Client(verify=mtls, timeout=30) as client:
        response = client.post(f"{base}{TOKEN_PATH}", data=form)
    if response.status_code != 200 or response.json().get("token_type") != "Bearer":
        raise SystemExit(f"bench: the token endpoint refused device {identity.device_id}: "
                         f"{response.status_code} {response.text[:200]}")
    token = response.json()["access_token"]
    kid = jwt.get_unverified_header(token).get("kid")
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}
    if kid not in keys:
        raise SystemExit(f"bench: the token's kid {kid!r} is not in the JWKS")
    claims = jwt.decode(token, keys[kid].key, algorithms=[ALGORITHM],
                        audience=metadata["issuer"], issuer=metadata["issuer"])
    if (claims.get("sub") != identity.device_id or not claims.get("scope")
            or claims.get("cnf") != {"x5t#S256": certificate_thumbprint(identity.cert)}):
        raise SystemExit(f"bench: the token is not bound to {identity.device_id}'s "
                         f"certificate: {claims}")
    if len(identities) > 1:
        other = server_auth_context(server.chain)
        other.load_cert_chain(str(identities[1].cert), str(identities[1].key))
        with httpx.Client(verify=other, timeout=30) as client:
            impostor = client.post(f"{base}{TOKEN_PATH}", data=form)
        if impostor.status_code != 400:
            raise SystemExit("bench: the token endpoint gave a token for one device to "
                             f"another's certificate: {impostor.status_code}")
    if wait_for_audit(server.data_dir / "fleetward.db", before + 1) != before + 1:
        raise SystemExit("bench: the token issued in the check was not audited")
    return str(claims["scope"])


def mqtt_answer(ctx: ssl.SSLContext, port: int, packet: bytes) -> bytes:
    """The first 4 bytes the MQTT listener answers ``packet`` with (b"" when it closes
    or alerts instead)."""
    out = b""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="localhost") as sock:
            sock.sendall(packet)
            while len(out) < 4 and (chunk := sock.recv(4 - len(out))):
                out += chunk
    except (ssl.SSLError, OSError):
        pass
    return out


def check_mqtt(server: ch.FleetwardServer, identity: ch.Identity) -> None:
    """The MQTT listener presents Fleetward's certificate, refuses a CONNECT without
    credentials, a key-bound token without a proof and a replayed proof, and accepts
    a token with a fresh proof and a device certificate."""
    port = server.mqtt_port
    connack_ok = b"\x20\x02\x00\x00"
    anonymous = server_auth_context(server.chain)
    with anonymous.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="localhost") as sock:
        if sock.getpeercert(binary_form=True) != first_cert_der(server.server_cert):
            raise SystemExit("bench: the MQTT listener does not present Fleetward's "
                             "server certificate")
    if mqtt_answer(anonymous, port, ch.connect_packet(identity.device_id, 4)) == connack_ok:
        raise SystemExit("bench: the MQTT listener accepted a CONNECT without credentials")
    key = load_key(identity.key)
    jwk = public_jwk(key)
    token = dpop_token(server.device_port, server.chain, identity.device_id, key, jwk)
    bare = connect_with_password(identity.device_id, identity.device_id, token)
    if mqtt_answer(anonymous, port, bare) == connack_ok:
        raise SystemExit("bench: the MQTT listener accepted a DPoP-bound token without a "
                         "proof")
    packet = token_connect_packet(identity.device_id, token, token_hash(token), key, jwk,
                                  port)
    answer = mqtt_answer(anonymous, port, packet)
    if answer != connack_ok:
        raise SystemExit(f"bench: the MQTT listener refused a token with a fresh proof: "
                         f"{answer.hex()}; see {server.log_file}")
    if mqtt_answer(anonymous, port, packet) == connack_ok:
        raise SystemExit("bench: the MQTT listener accepted a replayed CONNECT proof")
    device = server_auth_context(server.chain)
    device.load_cert_chain(str(identity.cert), str(identity.key))
    if mqtt_answer(device, port, ch.connect_packet(identity.device_id, 4)) != connack_ok:
        raise SystemExit(f"bench: the MQTT listener refused device {identity.device_id}'s "
                         "certificate")


# --- the timed parts ----------------------------------------------------------------------


def timed_run(name: str, server: ch.FleetwardServer, argvs: list[list[str]],
              pinning: ch.Pinning, tmp: Path, script: Path,
              settle: Callable[[int], int] | None = None,
              before_go: Callable[[], None] | None = None
              ) -> tuple[ServerRun, list[dict[str, Any]]]:
    """Workers get ready, the clock starts, they run; ``settle(done)`` waits for the
    server side and returns what it counted (which must equal ``done``). Returns the
    run and what each worker reported."""
    workers = ch.Workers(argvs, pinning, tmp, script=script)
    try:
        workers.wait_ready()
        if before_go is not None:
            before_go()
        pid = server.process.pid
        meter, wall0, threads0 = ch.CpuMeter(pid), time.perf_counter(), ch._thread_ns(pid)
        workers.go()
        results = workers.results()
        done = sum(r.get("done", r.get("handshakes", 0)) for r in results)
        counted = settle(done) if settle is not None else done
        wall, cpu, threads = time.perf_counter() - wall0, meter.seconds(), ch._thread_ns(pid)
    finally:
        workers.kill()
    failed = sum(r.get("failed", r.get("errors", 0)) for r in results)
    main = str(pid)  # the main thread's tid is the pid; it runs the event loop
    loop = ((threads[main] - threads0[main]) / 1e9 if threads and threads0
            and main in threads and main in threads0 else None)
    result = ServerRun(name, counted, failed, wall, cpu, len(argvs), loop)
    if cpu > 0 and counted:
        print(f"bench: measured {result.line()}", file=sys.stderr, flush=True)
    errors = sorted({r["error"] for r in results if r.get("error")})
    if failed:
        raise SystemExit(f"bench: {name}: {failed} of {done + failed} failed"
                         + (f" ({'; '.join(errors[:3])})" if errors else ""))
    if counted != done:
        raise SystemExit(f"bench: {name}: {done} answered but {counted} counted by the "
                         "server side")
    if done == 0 or cpu <= 0:
        raise SystemExit(f"bench: {name}: {done} in {cpu:.3f} server-CPU-s; run longer "
                         "(--seconds)")
    if server.process.poll() is not None:
        raise SystemExit("bench: fleetward exited during the run:\n" + server.log_tail())
    return result, results


def measure_issuance(server: ch.FleetwardServer, identities: list[ch.Identity],
                     args: argparse.Namespace, pinning: ch.Pinning, tmp: Path) -> ServerRun:
    db_file = server.data_dir / "fleetward.db"
    argvs = [["issue-worker", "--port", str(server.device_port), "--cert", str(i.cert),
              "--key", str(i.key), "--chain", str(server.chain), "--client-id", i.device_id,
              "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
             for i in identities]
    start = {"audited": audited_issuances(db_file)}

    def before_go() -> None:
        # The warm-up requests' audit rows are written before the clock starts.
        expected = start["audited"] + args.warmup * len(identities)
        start["audited"] = wait_for_audit(db_file, expected)
        if start["audited"] != expected:
            raise SystemExit("bench: the warm-up token requests were not all audited")

    def settle(done: int) -> int:
        return wait_for_audit(db_file, start["audited"] + done) - start["audited"]

    result, reports = timed_run("issuance", server, argvs, pinning, tmp, SCRIPT, settle,
                                before_go)
    connections = sum(r["connections"] for r in reports)
    if connections != len(identities):
        # Not an error (the server may close a keep-alive connection), but the figure
        # then includes handshakes.
        print(f"bench: note: {len(identities)} issuance clients used {connections} "
              "connections", file=sys.stderr)
    return result


def measure_connects(server: ch.FleetwardServer, identities: list[ch.Identity],
                     args: argparse.Namespace, pinning: ch.Pinning,
                     tmp: Path) -> list[ServerRun]:
    """mTLS CONNECTs and token CONNECTs, half the time each in the order A B B A (a
    drift in the machine's speed over the run then weighs on both alike); each figure
    sums its two halves."""
    common = ["--port", str(server.mqtt_port), "--seconds", str(args.seconds / 2),
              "--warmup", str(args.warmup)]
    mtls = [["handshake-worker", *common, "--cert", str(i.cert), "--key", str(i.key),
             "--client-id", i.device_id, "--connect"] for i in identities]
    token = [["connect-worker", *common, "--cert", str(i.cert), "--key", str(i.key),
              "--chain", str(server.chain), "--client-id", i.device_id, "--token-port",
              str(server.device_port)] for i in identities]
    plan = [("fleetward+connect", mtls, ch.WORKER), ("fleetward+token-connect", token, SCRIPT)]
    halves: dict[str, list[ServerRun]] = {name: [] for name, _, _ in plan}
    for name, argvs, script in [*plan, *reversed(plan)]:
        halves[name].append(timed_run(name, server, argvs, pinning, tmp, script)[0])
    return [add_runs(runs) for runs in halves.values()]


def add_runs(runs: list[ServerRun]) -> ServerRun:
    loops = [r.loop_cpu_seconds for r in runs if r.loop_cpu_seconds is not None]
    return ServerRun(runs[0].name, sum(r.done for r in runs), sum(r.failed for r in runs),
                     sum(r.wall_seconds for r in runs), sum(r.cpu_seconds for r in runs),
                     runs[0].clients, sum(loops) if len(loops) == len(runs) else None)


def cpu_loop(name: str, fn: Callable[[Any], Any], items: list[Any], seconds: float) -> Loop:
    """``fn`` over ``items``, whole passes, for at least ``seconds``."""
    count = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    while True:
        for item in items:
            fn(item)
        count += len(items)
        if time.perf_counter() >= deadline:
            break
    return Loop(name, count, time.process_time() - cpu0, time.perf_counter() - wall0)


def combine(loops: list[Loop]) -> Loop:
    return Loop(loops[0].name, sum(x.count for x in loops), sum(x.cpu_seconds for x in loops),
                sum(x.wall_seconds for x in loops))


def measure_signing(scope: str, seconds: float) -> Loop:
    """Bare PyJWT signing of the claims Fleetward signs (a fresh jti and times each)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = "https://127.0.0.1:8443"
    headers = {"kid": jwk_thumbprint(public_jwk(key)), "typ": "at+jwt"}
    thumbprint = b64url(secrets.token_bytes(32))

    def sign(_: object) -> str:
        now = int(time.time())
        claims = {"iss": issuer, "sub": "tk-000", "aud": issuer, "iat": now, "nbf": now,
                  "exp": now + 900, "jti": secrets.token_urlsafe(16), "client_id": "tk-000",
                  "scope": scope, "fw_binding": "x5t#S256", "fw_gen": 0,
                  "cnf": {"x5t#S256": thumbprint}}
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers=headers)

    cpu_loop("pyjwt-sign", sign, [None] * 50, min(seconds, 0.2))  # warm-up
    return cpu_loop("pyjwt-sign", sign, [None] * 50, seconds)


def measure_verification(scope: str, count: int, seconds: float, tmp: Path) -> list[Loop]:
    """Fleetward's verifier (uncached, cached) and bare PyJWT on the same ``count``
    tokens, issued by Fleetward's issuer with its signing keys."""
    import jwt

    from fleetward.audit import AuditLog
    from fleetward.clock import SystemClock
    from fleetward.config import TokensConfig
    from fleetward.crypto.signer import FileSigner, Signer
    from fleetward.store import Database
    from fleetward.tokens.access import (
        VERIFIED_CACHE_ENTRIES,
        AccessTokenIssuer,
        AccessTokenVerifier,
    )
    from fleetward.tokens.keys import SigningKeys

    if count > VERIFIED_CACHE_ENTRIES:
        raise SystemExit(f"bench: --tokens must be at most {VERIFIED_CACHE_ENTRIES} (the "
                         "verifier's cache) for the cached figure to mean a cache hit")
    (tmp / "verify").mkdir()
    db = Database(f"sqlite:///{tmp / 'verify' / 'tokens.db'}")
    try:
        db.migrate()
        clock, config = SystemClock(), TokensConfig()
        passphrase = secrets.token_bytes(16)

        def open_signer(ref: Any) -> Signer:
            return FileSigner.load(Path(ref["path"]), passphrase)

        def new_signer(label: str) -> Signer:
            return FileSigner.create(tmp / "verify" / f"token-{label}.key", passphrase)

        keys = SigningKeys(db, AuditLog(secrets.token_bytes(32), clock), clock, config,
                           open_signer=open_signer, new_signer=new_signer)
        keys.load()
        issuer = "https://127.0.0.1:8443"
        issue = AccessTokenIssuer(keys, issuer, issuer, config, clock)
        verifier = AccessTokenVerifier(keys, issuer, issuer, config, clock)
        scopes = tuple(scope.split())
        tokens = [issue.issue(f"{DEVICE_PREFIX}-{i % 1000:03d}", scopes, "x5t#S256",
                              b64url(secrets.token_bytes(32)), 0, 900).token
                  for i in range(count)]
        public_key = keys.signing_key().public_key

        def pyjwt_decode(token: str) -> Any:
            return jwt.decode(token, public_key, algorithms=[ALGORITHM], audience=issuer,
                              issuer=issuer)

        # Both sides accept every token and agree on what it says.
        for token in tokens:
            ours, theirs = verifier.verify_uncached(token), pyjwt_decode(token)
            if (ours.jti, ours.device_id, ours.scope) != (theirs["jti"], theirs["sub"],
                                                          theirs["scope"]):
                raise SystemExit("bench: Fleetward and PyJWT read a token differently")
            verifier.verify(token)  # now cached
        loops: dict[str, list[Loop]] = {"pyjwt-decode": [], "verify-uncached": [],
                                        "verify-cached": []}
        functions = {"pyjwt-decode": pyjwt_decode,
                     "verify-uncached": verifier.verify_uncached,
                     "verify-cached": verifier.verify}
        for _ in range(VERIFY_ROUNDS):
            for name, fn in functions.items():
                loops[name].append(cpu_loop(name, fn, tokens, seconds / VERIFY_ROUNDS))
        return [combine(v) for v in loops.values()]
    finally:
        db.dispose()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pinning = ch.Pinning.choose(not args.no_pin)
    pinning.pin_self()
    server = ch.FleetwardServer(tmp / "data", pinning)
    try:
        identities = server.make_devices(DEVICE_PREFIX, args.clients, tmp / "devices")
        scope = check_token_endpoint(server, identities)
        issuance = measure_issuance(server, identities, args, pinning, tmp)
        check_mqtt(server, identities[0])
        connects = measure_connects(server, identities, args, pinning, tmp)
    finally:
        server.stop()
    # In process, on the clients' CPU, with the server stopped.
    signing = measure_signing(scope, args.seconds / 4)
    verification = measure_verification(scope, args.tokens, args.seconds / 2, tmp)
    return {"issuance": issuance, "signing": signing, "verification": verification,
            "connects": connects, "scope": scope, "pinning": pinning.describe()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="timed seconds of each server figure (issuance, mTLS connects, "
                             "token connects) and half of it for each verification loop, "
                             "a quarter for PyJWT signing")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed requests / connections per client before the clock "
                             "starts")
    parser.add_argument("--tokens", type=int, default=500,
                        help="distinct tokens the verification loops go over")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and clients to different CPUs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.warmup < 0 or args.tokens < 1:
        parser.error("--seconds must be > 0, --clients and --tokens at least 1, --warmup "
                     "at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    import structlog

    args = parse_args(argv)
    # Fleetward's signing keys log their first rotation: warnings and worse only, on
    # stderr (stdout is the report).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-token-") as tmp:
        outcome = run(args, Path(tmp))
    issuance: ServerRun = outcome["issuance"]
    signing: Loop = outcome["signing"]
    decode, uncached, cached = outcome["verification"]
    mtls, token = outcome["connects"]
    ratios = {
        "issuance/pyjwt-sign": issuance.per_cpu_second / signing.per_cpu_second,
        "verify-uncached/pyjwt-decode": uncached.per_cpu_second / decode.per_cpu_second,
        "verify-cached/pyjwt-decode": cached.per_cpu_second / decode.per_cpu_second,
        "fleetward+token-connect/fleetward+connect": token.per_cpu_second
        / mtls.per_cpu_second}
    met = min(ratios["verify-uncached/pyjwt-decode"],
              ratios["verify-cached/pyjwt-decode"]) >= GOAL
    env = ch.environment()
    if args.json:
        print(json.dumps({
            "issuance": issuance.to_json(), "pyjwt-sign": signing.to_json(),
            **{loop.name: loop.to_json() for loop in (decode, uncached, cached)},
            **{run.name: run.to_json() for run in (mtls, token)},
            "ratios": {k: round(v, 4) for k, v in ratios.items()},
            "goal": {"verify_over_pyjwt_at_least": GOAL, "met": met},
            "settings": {"seconds": args.seconds, "clients": args.clients,
                         "warmup": args.warmup, "tokens": args.tokens,
                         "scope": outcome["scope"]},
            "pinning": outcome["pinning"], "environment": env}, indent=2))
        return 0
    print(f"env: python {env['python']} ({env['python_ssl']}), {env['cpus']} CPUs; "
          f"{outcome['pinning']}")
    print(issuance.line())
    print(signing.line())
    print(f"ratio issuance/pyjwt-sign: {ratios['issuance/pyjwt-sign']:.3f}")
    for loop in (decode, uncached, cached):
        print(loop.line(f", {args.tokens} distinct tokens"))
    print(f"ratio verify-uncached/pyjwt-decode: {ratios['verify-uncached/pyjwt-decode']:.2f}")
    print(f"ratio verify-cached/pyjwt-decode: {ratios['verify-cached/pyjwt-decode']:.2f}")
    print(f"goal verify >= {GOAL}x pyjwt-decode: {'met' if met else 'NOT met'}")
    print(mtls.line())
    print(token.line())
    print("ratio fleetward+token-connect/fleetward+connect: "
          f"{ratios['fleetward+token-connect/fleetward+connect']:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].endswith("-worker"):
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
