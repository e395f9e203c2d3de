"""Full mTLS handshakes per server-CPU-second: Fleetward's MQTT listener against
``openssl s_server`` with the same certificates, in the same run.

A full handshake is what a device pays on every reconnect without resumption: a new TCP
connection, TLS 1.3, ECDHE on P-256, the server's P-256 certificate and CertificateVerify,
the client's certificate chain verified by the server to our issuing CA, and the
client's CertificateVerify. Clients never resume (a fresh context every time in each
worker holds no session) and use no tickets.

The baseline is ``openssl s_server -num_tickets 0 -Verify 1`` with Fleetward's own
server certificate and key (decrypted to a temporary file) and CA chain: C, the same
OpenSSL library Python's ``ssl`` uses, no tickets (ARCHITECTURE.md §4a: ≈ 1,300 per
server-CPU-second on these machines; ≈ 950 with the default two tickets). Fleetward is
measured as it ships: the MQTT listener of a real ``fleetward serve`` (uvloop), with
whatever session tickets its TLS context sends (the line says how many, counted with
``openssl s_client``). Two Fleetward figures:

- ``fleetward``: TLS handshake only, then close (the ratio the issue asks for);
- ``fleetward+connect``: the handshake plus MQTT CONNECT → gate decision (certificate →
  device, revocation, lifecycle, policy, client id = device id) → CONNACK, DISCONNECT.

Client worker processes (``bench/_channel.py handshake-worker``) run pinned to the other
CPU (``taskset``), one device identity each. Figures are per server-CPU-second (on-CPU
time of all the server's threads over the timed window, from /proc:
``task/*/schedstat``, else utime + stime of ``stat``): a client slower than the server
(Python's, or an ``openssl s_time``) then does not distort the comparison; the line
also says how busy the server was.

Before the clock starts each server is checked: it presents Fleetward's certificate,
gives a client without a certificate no session, accepts a device certificate, and its ticket
count is read. Every timed handshake must succeed.

Usage:
    python bench/handshake.py [--seconds S] [--clients C] [--warmup N] [--no-connect]
                               [--with-tickets] [--no-pin] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _channel as ch

DETAILS = "TLS 1.3, P-256, mTLS, no resumption"


@dataclass(frozen=True, slots=True)
class Result(ch.TimedRun):
    name: str
    handshakes: int
    wall_seconds: float
    cpu_seconds: float
    clients: int
    tickets: int

    @property
    def count(self) -> int:
        return self.handshakes

    def line(self) -> str:
        extra = ", + MQTT CONNECT/CONNACK/DISCONNECT" if self.name.endswith("+connect") else ""
        return (f"{self.name}: {self.per_cpu_second:.0f} handshakes per server-CPU-s, "
                f"{self.per_wall_second:.0f}/s (wall), server busy {self.busy:.0%}  "
                f"[N={self.handshakes}, {self.clients} clients, {DETAILS}, "
                f"{self.tickets} tickets{extra}]")

    def to_json(self) -> dict[str, Any]:
        return {"handshakes": self.handshakes, **self.rates_json(),
                "tickets_per_handshake": self.tickets}


# --- checks before the clock starts ---------------------------------------------------


def first_cert_der(pem_file: Path) -> bytes:
    pem = pem_file.read_text()
    block = pem[pem.index("-----BEGIN CERTIFICATE-----"):]
    block = block[:block.index("-----END CERTIFICATE-----") + 25]
    return ssl.PEM_cert_to_DER_cert(block)


def _answer(sock: ssl.SSLSocket, request: bytes) -> bytes:
    """What the server says to ``request`` (b"" when it closes or alerts instead)."""
    out = b""
    try:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            out += chunk
            if request.startswith(b"\x10") and len(out) >= 4:
                break  # a CONNACK
    except (ssl.SSLError, OSError):
        pass
    return out


def check_server(name: str, port: int, identity: ch.Identity, server_cert: Path) -> None:
    """The server presents ``server_cert``, gives a client without a certificate no session and
    accepts ``identity``: otherwise the run would compare different work."""
    is_mqtt = name.startswith("fleetward")
    request = ch.connect_packet(identity.device_id, 4) if is_mqtt else b"GET / HTTP/1.0\r\n\r\n"
    # No verification here: the certificate is compared byte for byte instead.
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    with anonymous.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="localhost") as sock:
        if sock.getpeercert(binary_form=True) != first_cert_der(server_cert):
            raise SystemExit(f"bench: {name} does not present Fleetward's server certificate")
        answer = _answer(sock, request)
        # s_server -Verify 1 refuses in the handshake; Fleetward's MQTT listener also
        # serves token devices, so it completes TLS and refuses the credential-less
        # CONNECT (3.1.1 return code 4). Either way the client gets no session.
        if answer and not (is_mqtt and answer[:3] == b"\x20\x02\x00" and answer[3] != 0):
            raise SystemExit(f"bench: {name} answered a client without a certificate")
    device = ssl.create_default_context(cafile=str(identity.cafile))
    device.load_cert_chain(str(identity.cert), str(identity.key))
    with device.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                            server_hostname="localhost") as sock:
        answer = _answer(sock, request)
    # s_server -www echoes the client certificate it verified: its first base64 line.
    accepted = (answer[:4] == b"\x20\x02\x00\x00" if is_mqtt else
                answer.startswith(b"HTTP/1.0 200")
                and identity.cert.read_text().splitlines()[1].encode() in answer)
    if not accepted:
        raise SystemExit(f"bench: {name} did not accept device {identity.device_id}: "
                         f"{answer[:80]!r}")


def count_tickets(port: int, identity: ch.Identity) -> int:
    """Session tickets the server sends after one full TLS 1.3 handshake."""
    process = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-servername",
         "localhost", "-cert", str(identity.cert), "-key", str(identity.key), "-CAfile",
         str(identity.cafile)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    time.sleep(1.0)  # tickets follow the handshake at once
    out, _ = process.communicate(b"", timeout=10)
    if b"Verify return code: 0 (ok)" not in out:
        raise SystemExit(f"bench: openssl s_client could not connect to port {port}")
    return len(re.findall(rb"Post-Handshake New Session Ticket arrived", out))


# --- the timed part --------------------------------------------------------------------


def measure(name: str, pid: int, port: int, identities: list[ch.Identity],
            args: argparse.Namespace, pinning: ch.Pinning, tmp: Path, tickets: int,
            connect: bool = False) -> Result:
    argvs = [["handshake-worker", "--port", str(port), "--cert", str(i.cert), "--key",
              str(i.key), "--client-id", i.device_id, "--seconds", str(args.seconds),
              "--warmup", str(args.warmup), *(["--connect"] if connect else [])]
             for i in identities]
    workers = ch.Workers(argvs, pinning, tmp)
    try:
        workers.wait_ready()
        meter, wall0 = ch.CpuMeter(pid), time.perf_counter()
        workers.go()
        results = workers.results()
        wall, cpu = time.perf_counter() - wall0, meter.seconds()
    finally:
        workers.kill()
    handshakes = sum(r["handshakes"] for r in results)
    errors = sum(r["errors"] for r in results)
    if errors:
        raise SystemExit(f"bench: {errors} of {handshakes + errors} {name} handshakes failed")
    if handshakes == 0 or cpu <= 0:
        raise SystemExit(f"bench: {name}: {handshakes} handshakes in {cpu:.3f} server-CPU-s; "
                         "run longer (--seconds)")
    result = Result(name, handshakes, wall, cpu, len(identities), tickets)
    print(f"bench: measured {result.line()}", file=sys.stderr, flush=True)
    return result


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pinning = ch.Pinning.choose(not args.no_pin)
    pinning.pin_self()
    server = ch.FleetwardServer(tmp / "data", pinning)
    results: list[Result] = []
    try:
        identities = server.make_devices("hs", args.clients, tmp / "devices")
        key = server.clear_server_key(tmp / "server-clear.key")
        baselines = [("s_server", 0)]
        if args.with_tickets:
            baselines.append(("s_server-default-tickets", 2))  # OpenSSL's default
        for name, num_tickets in baselines:
            port = ch.free_port()
            s_server = subprocess.Popen(
                [*pinning.prefix("server"), "openssl", "s_server", "-accept", str(port),
                 "-num_tickets", str(num_tickets), "-Verify", "1", "-cert",
                 str(server.server_cert), "-key", str(key), "-CAfile", str(server.chain),
                 "-www", "-quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                ch.wait_for_port(port, s_server, "openssl s_server")
                check_server(name, port, identities[0], server.server_cert)
                tickets = count_tickets(port, identities[0])
                results.append(measure(name, s_server.pid, port, identities, args, pinning,
                                       tmp, tickets))
            finally:
                ch.stop_process(s_server)
        check_server("fleetward", server.mqtt_port, identities[0], server.server_cert)
        tickets = count_tickets(server.mqtt_port, identities[0])
        results.append(measure("fleetward", server.process.pid, server.mqtt_port, identities,
                               args, pinning, tmp, tickets))
        if not args.no_connect:
            results.append(measure("fleetward+connect", server.process.pid, server.mqtt_port,
                                   identities, args, pinning, tmp, tickets, connect=True))
        if server.process.poll() is not None:
            raise SystemExit("bench: fleetward exited during the run:\n" + server.log_tail())
    finally:
        server.stop()
    return {"results": results, "pinning": pinning.describe()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="timed seconds per server (each client runs this long)")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed handshakes per client before the clock starts")
    parser.add_argument("--no-connect", action="store_true",
                        help="skip the handshake+CONNECT figure")
    parser.add_argument("--with-tickets", action="store_true",
                        help="also measure s_server with OpenSSL's default 2 session "
                             "tickets (s_server-default-tickets)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and clients to different CPUs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.warmup < 0:
        parser.error("--seconds and --clients must be at least 1 (--seconds > 0), "
                     "--warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-handshake-") as tmp:
        outcome = run(args, Path(tmp))
    results: list[Result] = outcome["results"]
    baselines = [r for r in results if r.name.startswith("s_server")]
    ratios = {f"{r.name}/{b.name}": r.per_cpu_second / b.per_cpu_second
              for b in baselines for r in results if r.name.startswith("fleetward")}
    env = ch.environment()
    if args.json:
        print(json.dumps({
            **{r.name: r.to_json() for r in results},
            "ratios_per_server_cpu_second": {k: round(v, 4) for k, v in ratios.items()},
            "pinning": outcome["pinning"], "environment": env}, indent=2))
    else:
        print(f"env: python {env['python']} ({env['python_ssl']}), {env['openssl']}, "
              f"{env['cpus']} CPUs; {outcome['pinning']}")
        for r in results:
            print(r.line())
        for key, value in ratios.items():
            print(f"ratio {key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
