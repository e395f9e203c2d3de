"""EST enrollment throughput end to end, against the issuance pipeline in the same run.

End to end means what a device on first boot pays for: a new TCP connection, a full
TLS 1.3 handshake with the device listener of a real ``fleetward serve`` process, an
HTTP POST of a base64 CSR to ``/.well-known/est/simpleenroll`` with HTTP Basic
``device-id:token``, bootstrap-token redemption, just-in-time registration of the device
(one claim-batch token covers the run), the CSR checks, signing, storage with audit
events in SQLite (WAL, synchronous=FULL), and the base64 PKCS#7 response.

The reference is ``bench/issue.py``'s pipeline (``Registry.issue_certificate`` in
process, no HTTP, no TLS), measured in this same run on this machine, so the ratio
shows what the protocol and the network path cost on top of issuance.

Keys and CSRs are made before the clock starts. Several client threads keep the
server busy (the server serialises SQL writes on one thread, so more clients only add
handshake concurrency); server CPU time is read from /proc for the per-CPU figure.

Usage:
    python bench/enroll.py [--count N] [--clients C] [--pipeline-count N] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
import issue as issue_bench

from fleetward.node import configure_logging

FLEETWARD = [sys.executable, "-m", "fleetward.server"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `fleetward serve` on free ports, in a temporary data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.public_port, self.admin_port, self.device_port = (free_port(), free_port(),
                                                               free_port())
        subprocess.run([*FLEETWARD, "init", "--data-dir", str(data_dir), "--public-url",
                        f"http://127.0.0.1:{self.public_port}", "--public-port",
                        str(self.public_port), "--admin-port", str(self.admin_port)],
                       check=True, capture_output=True, timeout=120)
        self.log = (data_dir.parent / "server.log").open("wb")
        self.process = subprocess.Popen(
            [*FLEETWARD, "serve", "--data-dir", str(data_dir), "--public-port",
             str(self.public_port), "--admin-port", str(self.admin_port), "--device-port",
             str(self.device_port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.chain = data_dir / "certs" / "chain.pem"
        self.token = (data_dir / "secrets" / "admin-token").read_text().strip()
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.admin().get("/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("bench: the server did not start; see server.log")
            time.sleep(0.1)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=f"https://localhost:{self.admin_port}",
                            verify=ssl.create_default_context(cafile=str(self.chain)),
                            headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def make_csrs(prefix: str, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        device_id = f"{prefix}-{i:06d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()))
        out.append((device_id, base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))))
    return out


def enroll_all(server: Server, token: str, csrs: list[tuple[str, bytes]],
               clients: int) -> list[bytes]:
    """Enroll every CSR, each over a new TLS connection; returns the response bodies."""
    url = f"https://127.0.0.1:{server.device_port}/.well-known/est/simpleenroll"
    context = ssl.create_default_context(cafile=str(server.chain))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    bodies: list[bytes] = [b""] * len(csrs)
    errors: list[str] = []
    cursor = iter(range(len(csrs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            device_id, body = csrs[i]
            # A new client per enrollment: a device enrolls once, with a full handshake.
            with httpx.Client(verify=context, timeout=60) as client:
                response = client.post(url, content=body,
                                       headers={"Content-Type": "application/pkcs10"},
                                       auth=(device_id, token))
            if response.status_code != 200:
                with lock:
                    errors.append(f"{device_id}: {response.status_code} {response.text[:200]}")
                return
            bodies[i] = response.content

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("bench: enrollment failed: " + "; ".join(errors[:3]))
    return bodies


def check(server: Server, csrs: list[tuple[str, bytes]], bodies: list[bytes]) -> dict[str, Any]:
    """Every response is a certificate for its device, and the (stopped) server stored
    every one of them with its audit event: a bench that stopped storing would still
    print numbers, faster ones."""
    for (device_id, _), body in zip(csrs, bodies, strict=True):
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if cn != device_id:
            raise SystemExit(f"bench: got a certificate for {cn!r}, expected {device_id!r}")
    conn = sqlite3.connect(server.data_dir / "fleetward.db")
    try:
        stored = conn.execute("SELECT count(*) FROM certificates WHERE device_id LIKE 'est-%'"
                              ).fetchone()[0]
        audited = conn.execute("SELECT count(*) FROM audit_events WHERE action = "
                               "'enroll.succeeded' AND target LIKE 'device:est-%'").fetchone()[0]
        active = conn.execute("SELECT count(*) FROM devices WHERE id LIKE 'est-%' "
                              "AND state = 'active'").fetchone()[0]
    finally:
        conn.close()
    if not stored == audited == active == len(csrs):
        raise SystemExit(f"bench: {len(csrs)} enrollments answered but {stored} stored, "
                         f"{audited} audited, {active} devices active")
    return {"responses_checked": len(bodies), "certificates_stored": stored,
            "enroll_audit_events": audited, "devices_active": active}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = Server(tmp / "server")
    try:
        total = args.count + args.warmup
        with server.admin() as client:
            response = client.post("/v1/bootstrap-tokens", json={
                "type": "default", "count": total, "ttl_hours": 2})
            if response.status_code != 201:
                raise SystemExit(f"bench: cannot create a batch token: {response.text}")
            token = response.json()["token"]
        warm, timed = make_csrs("warm", args.warmup), make_csrs("est", args.count)
        enroll_all(server, token, warm, args.clients)
        cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
        bodies = enroll_all(server, token, timed, args.clients)
        wall, cpu = time.perf_counter() - wall0, max(server.cpu_seconds() - cpu0, 1e-9)
    finally:
        server.stop()
    checks = check(server, timed, bodies)
    est = issue_bench.Measurement(args.count, wall, cpu)
    (tmp / "pipeline").mkdir()
    pipeline = issue_bench.build_pipeline(tmp / "pipeline")
    try:
        pipe = issue_bench.run_pipeline(pipeline, args.pipeline_count, args.warmup)
    finally:
        pipeline.db.dispose()
    return {"est": est, "pipeline": pipe, "checks": checks}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="timed EST enrollments")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--pipeline-count", type=int, default=1000,
                        help="timed in-process issuances for the reference figure")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs before each loop")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if min(args.count, args.clients, args.pipeline_count, args.warmup) < 1:
        parser.error("--count, --clients, --pipeline-count and --warmup must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with open(os.devnull, "w") as sink, tempfile.TemporaryDirectory(
            prefix="fleetward-bench-enroll-") as tmp:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
        result = run(args, Path(tmp))
    est, pipe = result["est"], result["pipeline"]
    ratio = est.per_wall_second / pipe.per_wall_second
    if args.json:
        print(json.dumps({
            "est": est.to_json() | {"clients": args.clients, "tls": "1.3",
                                    "per_server_cpu_second": round(est.per_cpu_second, 1)},
            "pipeline": pipe.to_json(), "ratio_wall": round(ratio, 4),
            "checks": result["checks"], "environment": issue_bench.environment()}, indent=2))
    else:
        print(f"est: {est.per_wall_second:.0f} enrollments/s (wall), "
              f"{est.per_cpu_second:.0f} per server-CPU-s  [N={est.count}, "
              f"{args.clients} clients, TLS 1.3 full handshake, HTTP Basic token, "
              "JIT registration, SQLite WAL]")
        print(f"pipeline: {pipe.per_wall_second:.0f} certs/s (wall), "
              f"{pipe.per_cpu_second:.0f} certs/CPU-s  [N={pipe.count}, in process, no HTTP]")
        print(f"ratio est/pipeline: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
