"""Shared parts of bench/handshake.py and bench/mqtt.py.

- a real ``fleetward serve`` in a fresh data directory, pinned to one CPU, with device
  identities registered and certified through its admin API;
- the server key in clear (the baselines, ``openssl s_server`` and Mosquitto, cannot
  read our encrypted key), so every server in a run presents the same certificate;
- server CPU time from ``/proc/<pid>/stat`` (all threads: utime + stime);
- the client worker processes, pinned to the other CPU. Run as
  ``python bench/_channel.py handshake-worker|publish-worker ...``: a worker sets up
  (TLS connection, CONNECT, packets built), prints ``ready``, waits for one line on
  stdin, does its work, and prints one JSON line with what it did.

Clients are plain ``ssl`` sockets writing pre-encoded MQTT packets: a paho client tops
out near 40k QoS 0 msgs/s (ARCHITECTURE.md §4a), and the client must not be what is
measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKER = Path(__file__).resolve()
# Workers report within this after the run they were told to do; a silent worker is a
# hung client, and a bench must not hang.
WORKER_GRACE_SECONDS = 120.0
# The key exchange group for every client: P-256, like the certificates (OpenSSL would
# pick X25519 by default). Set through OPENSSL_CONF because Python 3.11's ssl has no
# client-side groups setter; the system default section is what libssl applies to
# every new context.
P256_ONLY_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Groups = P-256
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and all its threads, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _thread_ns(pid: int) -> dict[str, int] | None:
    """On-CPU nanoseconds per thread of ``pid`` (/proc/<pid>/task/*/schedstat), or None
    where the kernel has no schedstat."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                out[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return out


class CpuMeter:
    """Server CPU time over a window, read from /proc.

    /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for a short run against a
    fast server; the per-thread schedstat counters are in nanoseconds. They lose a
    thread that ends inside the window, so then (and without schedstat) the meter falls
    back to utime + stime.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks = cpu_seconds(pid)
        self._threads = _thread_ns(pid)

    def seconds(self) -> float:
        ticks = cpu_seconds(self.pid) - self._ticks
        threads = _thread_ns(self.pid)
        if self._threads is None or threads is None or set(self._threads) - set(threads):
            return ticks
        return sum(ns - self._threads.get(tid, 0) for tid, ns in threads.items()) / 1e9


def environment() -> dict[str, Any]:
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    return {"python": platform.python_version(), "python_ssl": ssl.OPENSSL_VERSION,
            "openssl": openssl.stdout.strip(), "cpus": os.cpu_count(),
            "platform": platform.platform()}


class TimedRun:
    """The rates of one timed run, mixed into each bench's frozen ``Result`` dataclass,
    which has ``wall_seconds``, ``cpu_seconds`` and ``clients`` fields and says what it
    counted through ``count``."""

    __slots__ = ()
    wall_seconds: float
    cpu_seconds: float  # the server's, from /proc
    clients: int

    @property
    def count(self) -> int:
        raise NotImplementedError("each Result says what it counted")

    @property
    def per_cpu_second(self) -> float:
        return self.count / self.cpu_seconds

    @property
    def per_wall_second(self) -> float:
        return self.count / self.wall_seconds

    @property
    def busy(self) -> float:
        return self.cpu_seconds / self.wall_seconds

    def rates_json(self) -> dict[str, Any]:
        return {"wall_seconds": round(self.wall_seconds, 4),
                "server_cpu_seconds": round(self.cpu_seconds, 4),
                "per_server_cpu_second": round(self.per_cpu_second, 1),
                "per_wall_second": round(self.per_wall_second, 1),
                "server_busy": round(self.busy, 3), "clients": self.clients}


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs the server and the clients run on (``taskset -c``); None = unpinned."""

    server: str | None
    clients: str | None

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        # Server and clients on different cores, so neither steals the other's CPU and
        # the server's CPU time is the server's work only.
        if enabled and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
            return cls("0", "1")
        return cls(None, None)

    def prefix(self, role: str) -> list[str]:
        cpus = self.server if role == "server" else self.clients
        return ["taskset", "-c", cpus] if cpus is not None else []

    def pin_self(self) -> None:
        """The coordinating process sits with the clients (it mostly sleeps)."""
        if self.clients is not None:
            os.sched_setaffinity(0, {int(c) for c in self.clients.split(",")})

    def describe(self) -> str:
        if self.server is None:
            return "server and clients unpinned"
        return f"server on CPU {self.server}, clients on CPU {self.clients} (taskset)"


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    cert: Path
    key: Path
    cafile: Path


class FleetwardServer:
    """A real ``fleetward serve`` on free ports in a fresh data directory."""

    def __init__(self, data_dir: Path, pinning: Pinning,
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        import httpx  # the coordinator only; workers start without it

        self._httpx = httpx
        self.data_dir = data_dir
        ports = [free_port() for _ in range(4)]
        self.public_port, self.admin_port, self.device_port, self.mqtt_port = ports
        fleetward = [sys.executable, "-m", "fleetward.server"]
        subprocess.run([*fleetward, "init", "--data-dir", str(data_dir), "--public-url",
                        f"http://127.0.0.1:{self.public_port}", "--public-port",
                        str(self.public_port), "--admin-port", str(self.admin_port)],
                       check=True, capture_output=True, timeout=120)
        if settings:
            apply_settings(data_dir, settings)
        self.log_file = data_dir.parent / "fleetward-server.log"
        self._log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            [*pinning.prefix("server"), *fleetward, "serve", "--data-dir", str(data_dir),
             "--public-port", str(self.public_port), "--admin-port", str(self.admin_port),
             "--device-port", str(self.device_port), "--mqtt-port", str(self.mqtt_port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.chain = data_dir / "certs" / "chain.pem"
        self.token = (data_dir / "secrets" / "admin-token").read_text().strip()
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.admin() as client:
                    if client.get("/v1/health").status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit(f"bench: fleetward did not start; see {self.log_file}:\n"
                                 + self.log_tail())
            time.sleep(0.1)
        wait_for_port(self.mqtt_port, self.process, "fleetward's MQTT listener")

    def admin(self) -> Any:
        return self._httpx.Client(
            base_url=f"https://localhost:{self.admin_port}",
            verify=ssl.create_default_context(cafile=str(self.chain)),
            headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def make_devices(self, prefix: str, count: int, directory: Path) -> list[Identity]:
        """Register ``count`` devices of the default type and issue each a certificate
        (they become active); their keys and certificates are written to ``directory``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        directory.mkdir(parents=True, exist_ok=True)
        out = []
        with self.admin() as admin:
            for i in range(count):
                device_id = f"{prefix}-{i:03d}"
                key = ec.generate_private_key(ec.SECP256R1())
                csr = (x509.CertificateSigningRequestBuilder()
                       .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   device_id)]))
                       .sign(key, hashes.SHA256()))
                created = admin.post("/v1/devices", json={"id": device_id, "type": "default",
                                                          "owner": "bench"})
                issued = admin.post(f"/v1/devices/{device_id}/certificates", json={
                    "csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
                if created.status_code != 201 or issued.status_code != 201:
                    raise SystemExit(f"bench: cannot make device {device_id}: "
                                     f"{created.text} {issued.text}")
                cert, key_file = directory / f"{device_id}.pem", directory / f"{device_id}.key"
                cert.write_text(issued.json()["pem"])
                key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
                key_file.chmod(0o600)
                out.append(Identity(device_id, cert, key_file, self.chain))
        return out

    def clear_server_key(self, out: Path) -> Path:
        """Fleetward's server key (encrypted with the CA passphrase), decrypted to
        ``out`` (mode 0600) for the baselines, which must present the same certificate."""
        from cryptography.hazmat.primitives import serialization

        from fleetward.crypto.signer import read_passphrase

        passphrase = read_passphrase(os.environ, self.data_dir / "secrets" / "ca-passphrase")
        key = serialization.load_pem_private_key(
            (self.data_dir / "keys" / "server.key").read_bytes(), passphrase)
        out.touch(mode=0o600)
        out.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return out

    @property
    def server_cert(self) -> Path:
        return self.data_dir / "certs" / "server.pem"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` overrides for fleetward.toml (true/false, integers, text).

    Raises:
        ValueError: an item is not of that form.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not (sep and dot and section and key):
            raise ValueError(f"{item!r} is not section.key=value")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        out.setdefault(section, {})[key] = value
    return out


def apply_settings(data_dir: Path, settings: dict[str, dict[str, Any]]) -> None:
    """Rewrite the data directory's fleetward.toml with ``settings`` applied."""
    from dataclasses import replace

    from fleetward.config import load_settings, render_settings

    current = load_settings(data_dir, env={})
    for section, values in settings.items():
        current = replace(current, **{section: replace(getattr(current, section), **values)})
    (data_dir / "fleetward.toml").write_text(render_settings(current))


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for_port(port: int, process: subprocess.Popen[Any], what: str,
                  timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: {what} is not listening on port {port}") from None
            time.sleep(0.05)


# --- worker processes (clients) ------------------------------------------------------------


class Workers:
    """Client processes, pinned, started together on one ``go``. ``script`` is the worker
    program (this file by default; another bench may run its own workers, which speak
    the same ready / go / one JSON line protocol)."""

    def __init__(self, argvs: list[list[str]], pinning: Pinning, tmp: Path,
                 script: Path = WORKER) -> None:
        conf = tmp / "openssl-p256.cnf"
        conf.write_text(P256_ONLY_CONF)
        env = dict(os.environ, OPENSSL_CONF=str(conf))
        self.processes = [
            subprocess.Popen([*pinning.prefix("clients"), sys.executable, str(script), *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
            for argv in argvs]

    def wait_ready(self, timeout: float = 60.0) -> None:
        for process in self.processes:
            line = _read_line(process.stdout, timeout)
            if line.strip() != "ready":
                self.fail(f"a client did not get ready (said {line.strip()!r})")

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    def results(self) -> list[dict[str, Any]]:
        out = []
        for process in self.processes:
            line = _read_line(process.stdout, WORKER_GRACE_SECONDS)
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                self.fail(f"a client failed (said {line.strip()!r})")
        for process in self.processes:
            process.wait(10)
        return out

    def fail(self, message: str) -> None:
        for process in self.processes:
            process.kill()
        errors = []
        for process in self.processes:
            _, err = process.communicate()
            if err.strip():
                errors.append(err.strip().splitlines()[-1])
        raise SystemExit(f"bench: {message}" + ("\n  " + "\n  ".join(errors[:4])
                                                if errors else ""))

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)


def _read_line(stream: IO[str] | None, timeout: float) -> str:
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def _client_context(identity: tuple[str, str]) -> ssl.SSLContext:
    """TLS 1.3 only, our certificate; no session reuse (a new context never resumes).

    The client does not check the server's certificate in the timed loop: that is client
    CPU only (the server's work is unchanged), and one client core must keep the server
    busy. The coordinator checks the server's certificate before the clock starts.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(identity[0], identity[1])
    return ctx


def varint(n: int) -> bytes:
    """MQTT Remaining Length / Variable Byte Integer (MQTT 3.1.1 §2.2.3, 5.0 §1.5.5)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, version: int, keepalive: int = 60) -> bytes:
    """CONNECT with Clean Session / Clean Start (3.1.1 §3.1, 5.0 §3.1); no credentials:
    the certificate is the identity."""
    body = _utf8("MQTT") + bytes([version, 0x02]) + keepalive.to_bytes(2, "big")
    if version == 5:
        body += b"\x00"  # no CONNECT properties
    body += _utf8(client_id)
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int, version: int) -> bytes:
    body = _utf8(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if version == 5:
        body += b"\x00"  # no PUBLISH properties
    body += payload
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


def json_payload(seq: int, size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (a telemetry record with padding)."""
    head = f'{{"seq":{seq},"temperature":21.5,"humidity":40.2,"pad":"'.encode()
    if len(head) + 2 > size:
        raise SystemExit(f"bench: payload size {size} is too small for a JSON record")
    return head + b"x" * (size - len(head) - 2) + b'"}'


DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


class PacketReader:
    """Splits the server's byte stream into (packet type, body) pairs."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.pending: deque[tuple[int, bytes]] = deque()

    def feed(self) -> None:
        """Read what the server sent (blocking) and parse every complete packet."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data
        buf, pos = self.buffer, 0
        while pos + 2 <= len(buf):
            length, shift, i = 0, 0, pos + 1
            while i < len(buf):
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break
            if i + length > len(buf):
                break
            self.pending.append((buf[pos] >> 4, bytes(buf[i:i + length])))
            pos = i + length
        del buf[:pos]

    def next(self) -> tuple[int, bytes]:
        while not self.pending:
            self.feed()
        return self.pending.popleft()


def mqtt_connect(host: str, port: int, ctx: ssl.SSLContext, client_id: str,
                 version: int) -> tuple[ssl.SSLSocket, PacketReader]:
    """TLS handshake, CONNECT, CONNACK checked (return code / reason code 0)."""
    sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=30))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, version))
    reader = PacketReader(sock)
    kind, body = reader.next()
    if kind != 2 or len(body) < 2 or body[1] != 0:
        raise ConnectionError(f"CONNECT refused: packet type {kind}, body {body[:8].hex()}")
    return sock, reader


def _wait_for_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("worker: no go")


def one_handshake(ctx: ssl.SSLContext, host: str, port: int, connect: bytes) -> None:
    """New TCP connection, full TLS handshake; with ``connect``, CONNECT → CONNACK 0 →
    DISCONNECT. Raises OSError / ConnectionError when anything is refused."""
    raw = socket.create_connection((host, port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw) as sock:
        if connect:
            sock.sendall(connect)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    break
                connack += chunk
            if connack != b"\x20\x02\x00\x00":
                raise ConnectionError(f"CONNACK {connack.hex()}")
            sock.sendall(DISCONNECT)


def handshake_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Full handshakes in a loop for ``seconds``: new TCP connection, TLS 1.3 with the
    client certificate, no session reuse; with ``--connect`` also CONNECT / CONNACK /
    DISCONNECT."""
    ctx = _client_context((args.cert, args.key))
    connect = connect_packet(args.client_id, 4) if args.connect else b""
    for _ in range(args.warmup):
        one_handshake(ctx, args.host, args.port, connect)
    _wait_for_go()
    done = errors = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        try:
            one_handshake(ctx, args.host, args.port, connect)
            done += 1
        except (OSError, ConnectionError) as exc:
            errors += 1
            if errors > 10:
                raise SystemExit(f"worker: handshakes keep failing: {exc}") from exc
    return {"handshakes": done, "errors": errors,
            "seconds": time.perf_counter() - started}


def publish_worker(args: argparse.Namespace) -> dict[str, Any]:
    """``count`` PUBLISHes of one topic with a JSON payload, pre-encoded, written as
    fast as the server takes them, ``batch`` packets per write (1: one TLS record per
    message, as a device sends them). QoS 0: then PINGREQ/PINGRESP, so the server has
    read everything before the worker reports. QoS 1: at most ``window`` unacknowledged."""
    ctx = _client_context((args.cert, args.key))
    sock, reader = mqtt_connect(args.host, args.port, ctx, args.client_id, args.version)
    packets = [publish_packet(args.topic, json_payload(i, args.payload_bytes), args.qos,
                              i % 65535 + 1, args.version) for i in range(args.count)]
    sock.settimeout(WORKER_GRACE_SECONDS)
    _wait_for_go()
    started = time.perf_counter()
    acked = refused = 0
    batch = args.batch
    if args.qos == 0:
        for i in range(0, len(packets), batch):
            sock.sendall(b"".join(packets[i:i + batch]))
        sock.sendall(PINGREQ)
        while True:
            kind, _ = reader.next()
            if kind == 13:  # PINGRESP
                break
            if kind == 14:
                raise SystemExit("worker: the server sent DISCONNECT")
    else:
        sent = min(args.window, len(packets))
        for i in range(0, sent, batch):
            sock.sendall(b"".join(packets[i:min(i + batch, sent)]))
        while acked + refused < len(packets):
            reader.feed()
            fresh = 0
            while reader.pending:
                kind, body = reader.pending.popleft()
                if kind == 4:  # PUBACK; MQTT 5 §3.4.2.1: a reason code >= 0x80 is a refusal
                    if args.version == 5 and len(body) > 2 and body[2] >= 0x80:
                        refused += 1
                    else:
                        acked += 1
                    fresh += 1
                elif kind == 14:
                    raise SystemExit("worker: the server sent DISCONNECT")
            end = min(sent + fresh, len(packets))
            for i in range(sent, end, batch):
                sock.sendall(b"".join(packets[i:min(i + batch, end)]))
            sent = end
    seconds = time.perf_counter() - started
    sock.sendall(DISCONNECT)
    sock.close()
    return {"sent": len(packets), "acked": acked, "refused": refused, "seconds": seconds}


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/_channel.py")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("handshake-worker", "publish-worker"):
        p = sub.add_parser(role)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--client-id", required=True)
    hs = sub.choices["handshake-worker"]
    hs.add_argument("--seconds", type=float, required=True)
    hs.add_argument("--connect", action="store_true")
    hs.add_argument("--warmup", type=int, default=0)
    pub = sub.choices["publish-worker"]
    pub.add_argument("--topic", required=True)
    pub.add_argument("--qos", type=int, choices=(0, 1), required=True)
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--window", type=int, default=64)
    pub.add_argument("--payload-bytes", type=int, default=100)
    pub.add_argument("--version", type=int, choices=(4, 5), default=4)
    pub.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    result = handshake_worker(args) if args.role == "handshake-worker" else publish_worker(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
