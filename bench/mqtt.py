"""MQTT publishes per server-CPU-second: Fleetward with full enforcement against
Mosquitto on the same machine, same TLS, same payloads, same load.

Each of C client processes (``bench/_channel.py publish-worker``, pinned to the other
CPU) connects over TLS 1.3 with its own device certificate (client id = device id),
then — when all are connected and the clock has started — writes N pre-encoded PUBLISH
packets to ``devices/<id>/telemetry/bench``, each with a JSON object payload of the same
size (100 bytes by default), as fast as the server takes them:

- QoS 0: all packets back to back, then PINGREQ; the worker reports at PINGRESP;
- QoS 1: at most ``--window`` (64, Fleetward's Receive Maximum) unacknowledged; the
  worker reports when every PUBACK is in.

Pre-encoded packets on plain ``ssl`` sockets keep the clients cheap: one paho client
tops out near 40k QoS 0 / 24k QoS 1 msgs/s (ARCHITECTURE.md §4a) and could not load
Mosquitto, and ``mosquitto_pub -l`` drops queued QoS 1 messages at end of input.

Fleetward is a real ``fleetward serve`` (fresh data directory, SQLite WAL): per PUBLISH
the listener authorizes the topic against the device's compiled policy, the ingest
checks the payload and writes it to the ``device_messages`` table (full enforcement =
authenticated connection + policy + payload check + sink write). Counted: rows in that
table for the bench devices, read from the SQLite file after the run; the timed window
ends when the last row is stored. The baseline is a private Mosquitto (temporary
config: TLS listener, Fleetward's server certificate and key, ``require_certificate
true``, no persistence, no subscribers); counted: its ``$SYS/broker/publish/messages/
received``. A QoS 1 run also needs every PUBACK. A run that stores or receives fewer
messages than were sent exits non-zero: a bench that stopped storing would print
numbers, faster ones.

Figures are per server-CPU-second (on-CPU time of all the server's threads over the
timed window, from /proc: ``task/*/schedstat``, else utime + stime of ``stat``) and per
wall second; "server busy" is server CPU over wall time (below 100 %: the clients, or
for Fleetward the fsync of each SQL batch, set the pace).

Usage:
    python bench/mqtt.py [--count N] [--clients C] [--qos 0 1] [--payload-bytes B]
                         [--window W] [--batch B] [--mqtt-version 4|5]
                         [--set SECTION.KEY=VALUE] [--no-pin] [--json]
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _channel as ch

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TOPIC = "devices/{device_id}/telemetry/bench"
# After the clients are done, Fleetward may still be writing accepted messages to
# SQLite; a run whose row count stops growing for this long is short, not slow.
STORE_STALL_SECONDS = 5.0
SYS_RECEIVED = "$SYS/broker/publish/messages/received"


@dataclass(frozen=True, slots=True)
class Result(ch.TimedRun):
    server: str  # fleetward | mosquitto
    qos: int
    messages: int  # counted by the server side: rows stored / PUBLISHes received
    wall_seconds: float
    cpu_seconds: float
    clients: int

    @property
    def count(self) -> int:
        return self.messages

    def line(self, args: argparse.Namespace) -> str:
        what = ("policy + payload check + SQLite row" if self.server == "fleetward"
                else "no subscribers, counted by $SYS")
        return (f"{self.server} qos{self.qos}: {self.per_cpu_second:.0f} msgs per "
                f"server-CPU-s, {self.per_wall_second:.0f} msgs/s (wall), server busy "
                f"{self.busy:.0%}  [N={self.messages}, {self.clients} clients, TLS 1.3, "
                f"MQTT {'3.1.1' if args.mqtt_version == 4 else '5.0'}, "
                f"{args.payload_bytes}-byte JSON, {what}]")

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.rates_json()}


def publish(server: str, qos: int, pid: int, port: int, identities: list[ch.Identity],
            args: argparse.Namespace, pinning: ch.Pinning, tmp: Path,
            settle: Callable[[int], int]) -> Result:
    """One timed run; ``settle(sent)`` waits until the server has taken every message
    it is going to take and returns how many it counted."""
    argvs = [["publish-worker", "--port", str(port), "--cert", str(i.cert), "--key",
              str(i.key), "--client-id", i.device_id, "--topic",
              TOPIC.format(device_id=i.device_id), "--qos", str(qos), "--count",
              str(args.count), "--window", str(args.window), "--payload-bytes",
              str(args.payload_bytes), "--version", str(args.mqtt_version),
              "--batch", str(args.batch)]
             for i in identities]
    workers = ch.Workers(argvs, pinning, tmp)
    try:
        workers.wait_ready()
        meter, wall0 = ch.CpuMeter(pid), time.perf_counter()
        workers.go()
        results = workers.results()
        sent = sum(r["sent"] for r in results)
        counted = settle(sent)
        wall, cpu = time.perf_counter() - wall0, meter.seconds()
    finally:
        workers.kill()
    if qos == 1:
        acked = sum(r["acked"] for r in results)
        refused = sum(r["refused"] for r in results)
        if acked != sent or refused:
            raise SystemExit(f"bench: {server} qos1: {acked} of {sent} PUBACKed, "
                             f"{refused} refused")
    if counted != sent:
        raise SystemExit(f"bench: {server} qos{qos}: {sent} sent but {counted} "
                         f"{'stored' if server == 'fleetward' else 'received'} "
                         f"({counted / max(cpu, 1e-9):.0f} per server-CPU-s)")
    if cpu <= 0:
        raise SystemExit(f"bench: {server} qos{qos} used no measurable server CPU; "
                         "raise --count")
    result = Result(server, qos, counted, wall, cpu, len(identities))
    print(f"bench: measured {result.line(args)}", file=sys.stderr, flush=True)
    return result


# --- Fleetward --------------------------------------------------------------------------


def stored_rows(db_file: Path, prefix: str) -> int:
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM device_messages WHERE device_id LIKE ? AND channel = 'mqtt'",
            (f"{prefix}-%",)).fetchone()[0])
    finally:
        conn.close()


def check_stored_row(db_file: Path, identity: ch.Identity, payload_bytes: int) -> None:
    """The last stored row is what the client sent: its device, topic and JSON object."""
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "SELECT device_id, kind, topic, payload FROM device_messages WHERE device_id = ? "
            "ORDER BY id DESC LIMIT 1", (identity.device_id,)).fetchone()
    finally:
        conn.close()
    topic = TOPIC.format(device_id=identity.device_id)
    if row is None or row[0] != identity.device_id or row[2] != topic:
        raise SystemExit(f"bench: fleetward stored {row!r}, not a message on {topic}")
    payload = json.loads(row[3]) if isinstance(row[3], str) else row[3]
    expected = json.loads(ch.json_payload(0, payload_bytes))
    if not isinstance(payload, dict) or set(payload) != set(expected):
        raise SystemExit(f"bench: fleetward stored payload {str(payload)[:120]}")


def run_fleetward(server: ch.FleetwardServer, identities: list[ch.Identity],
                  args: argparse.Namespace, pinning: ch.Pinning, tmp: Path) -> list[Result]:
    db_file = server.data_dir / "fleetward.db"
    out = []
    for qos in args.qos:
        before = stored_rows(db_file, "mq")

        def settle(sent: int, before: int = before) -> int:
            last, last_change = -1, time.monotonic()
            while True:
                count = stored_rows(db_file, "mq") - before
                if count >= sent:
                    return count
                if count != last:
                    last, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > STORE_STALL_SECONDS:
                    return count
                time.sleep(0.05)

        out.append(publish("fleetward", qos, server.process.pid, server.mqtt_port,
                           identities, args, pinning, tmp, settle))
        if server.process.poll() is not None:
            raise SystemExit("bench: fleetward exited during the run:\n" + server.log_tail())
    check_stored_row(db_file, identities[-1], args.payload_bytes)
    return out


# --- Mosquitto --------------------------------------------------------------------------


class Mosquitto:
    """A private Mosquitto: TLS listener on a free port with Fleetward's server
    certificate, key and CA chain, client certificates required."""

    def __init__(self, tmp: Path, cert: Path, key: Path, chain: Path,
                 pinning: ch.Pinning) -> None:
        if not Path(MOSQUITTO).exists():
            raise SystemExit("bench: the mosquitto broker is not installed "
                             "(apt-get install mosquitto)")
        self.port = ch.free_port()
        self.chain = chain
        self.log_file = tmp / "mosquitto.log"
        config = tmp / "mosquitto.conf"
        config.write_text("\n".join([
            f"user {getpass.getuser()}",  # stay who we are: the clear key is ours, 0600
            "per_listener_settings false",
            "allow_anonymous true",  # the certificate is the authentication
            "persistence false",
            "sys_interval 1",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            f"listener {self.port} 127.0.0.1",
            f"cafile {chain}",
            f"certfile {cert}",
            f"keyfile {key}",
            "require_certificate true",
            ""]))
        self.process = subprocess.Popen([*pinning.prefix("server"), MOSQUITTO, "-c",
                                         str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        ch.wait_for_port(self.port, self.process, "mosquitto")

    def received(self, identity: ch.Identity) -> int:
        """``$SYS/broker/publish/messages/received`` (updated every second)."""
        result = subprocess.run(
            ["mosquitto_sub", "-h", "localhost", "-p", str(self.port), "--cafile",
             str(self.chain), "--cert", str(identity.cert), "--key", str(identity.key),
             "-i", "bench-sys-reader", "-t", SYS_RECEIVED, "-C", "1", "-W", "5"],
            capture_output=True, text=True, timeout=15)
        if result.returncode != 0 or not result.stdout.strip().isdigit():
            raise SystemExit(f"bench: cannot read {SYS_RECEIVED} from mosquitto: "
                             f"{result.stdout.strip()} {result.stderr.strip()}")
        return int(result.stdout.strip())

    def stop(self) -> None:
        ch.stop_process(self.process)


def run_mosquitto(server: ch.FleetwardServer, identities: list[ch.Identity],
                  args: argparse.Namespace, pinning: ch.Pinning, tmp: Path) -> list[Result]:
    key = server.clear_server_key(tmp / "server-clear.key")
    out = []
    for qos in args.qos:
        broker = Mosquitto(tmp, server.server_cert, key, server.chain, pinning)
        try:
            def settle(sent: int, broker: Mosquitto = broker) -> int:
                # Every PUBLISH is in (PINGRESP / last PUBACK came after it on a single
                # thread); the counter trails by up to sys_interval, read outside the
                # timed window below.
                return sent

            result = publish("mosquitto", qos, broker.process.pid, broker.port, identities,
                             args, pinning, tmp, settle)
            deadline = time.monotonic() + 10
            while (received := broker.received(identities[0])) < result.messages:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: mosquitto qos{qos}: {result.messages} sent "
                                     f"but {received} received")
                time.sleep(0.5)
            if received != result.messages:
                raise SystemExit(f"bench: mosquitto qos{qos}: {result.messages} sent but "
                                 f"{received} received")
            out.append(result)
        finally:
            broker.stop()
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pinning = ch.Pinning.choose(not args.no_pin)
    pinning.pin_self()
    server = ch.FleetwardServer(tmp / "data", pinning, args.settings)
    try:
        identities = server.make_devices("mq", args.clients, tmp / "devices")
        baseline = run_mosquitto(server, identities, args, pinning, tmp)
        fleetward = run_fleetward(server, identities, args, pinning, tmp)
    finally:
        server.stop()
    return {"mosquitto": baseline, "fleetward": fleetward, "pinning": pinning.describe()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=25000,
                        help="messages per client and run (each server, each QoS)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes (one device and connection each)")
    parser.add_argument("--qos", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    parser.add_argument("--payload-bytes", type=int, default=100,
                        help="size of each JSON payload")
    parser.add_argument("--window", type=int, default=64,
                        help="unacknowledged QoS 1 messages per client")
    parser.add_argument("--batch", type=int, default=1,
                        help="PUBLISH packets per client write (1 = one TLS record per "
                             "message, like a device)")
    parser.add_argument("--mqtt-version", type=int, choices=(4, 5), default=4,
                        help="4 = MQTT 3.1.1, 5 = MQTT 5.0")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a fleetward.toml setting of the Fleetward server, "
                             "e.g. sinks.batch_max_delay_ms=5 (repeatable)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and clients to different CPUs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if min(args.count, args.clients, args.window, args.batch) < 1:
        parser.error("--count, --clients, --window and --batch must be at least 1")
    if args.payload_bytes < 64:
        parser.error("--payload-bytes must be at least 64 (a JSON record with a counter)")
    args.qos = sorted(set(args.qos))
    try:
        args.settings = ch.parse_settings(args.set)
    except ValueError as exc:
        parser.error(f"--set: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetward-bench-mqtt-") as tmp:
        outcome = run(args, Path(tmp))
    base = {r.qos: r for r in outcome["mosquitto"]}
    ours = {r.qos: r for r in outcome["fleetward"]}
    ratios = {qos: ours[qos].per_cpu_second / base[qos].per_cpu_second for qos in args.qos}
    env = ch.environment()
    if args.json:
        print(json.dumps({
            "mosquitto": {f"qos{q}": r.to_json() for q, r in base.items()},
            "fleetward": {f"qos{q}": r.to_json() for q, r in ours.items()},
            "ratios_per_server_cpu_second": {f"qos{q}": round(v, 4) for q, v in ratios.items()},
            "settings": {"count_per_client": args.count, "clients": args.clients,
                         "payload_bytes": args.payload_bytes, "window": args.window,
                         "batch": args.batch, "fleetward_settings": args.settings,
                         "mqtt_version": args.mqtt_version},
            "pinning": outcome["pinning"], "environment": env}, indent=2))
    else:
        print(f"env: python {env['python']} ({env['python_ssl']}), {env['cpus']} CPUs; "
              f"{outcome['pinning']}")
        for qos in args.qos:
            print(base[qos].line(args))
            print(ours[qos].line(args))
            print(f"ratio qos{qos} fleetward/mosquitto: {ratios[qos]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
