"""Shared fixtures: real SQLite files, a real PostgreSQL schema, a real server process."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from fleetward.audit import AuditLog
from fleetward.ca import Authority
from fleetward.ca.setup import ISSUING_NAME, ROOT_NAME, create_hierarchy
from fleetward.clock import FrozenClock
from fleetward.config import CAConfig, load_settings, render_settings
from fleetward.crypto.signer import FileSigner, Signer
from fleetward.model import DeviceType
from fleetward.registry import Registry
from fleetward.store import Database
from fleetward.store import devices as device_rows

PG_BASE_URL = os.environ.get("FLEETWARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent
FLEETWARD = [sys.executable, "-m", "fleetward.server"]
PUBLIC_URL_FOR_TESTS = "http://127.0.0.1:8080"


def need_service(reason: str) -> None:
    """A missing real service fails under CI=true and skips on a laptop."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


_HANDED_OUT: set[int] = set()
# pytest-xdist runs the suite in several processes: each takes ports from a range of its
# own, below the kernel's ephemeral range (32768-60999 here), so two workers never pick
# the same port between the check and the bind, and no client socket is handed one.
_WORKER_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
PORT_RANGE_START = 10000
PORTS_PER_WORKER = 2500


def free_port() -> int:
    """A port nobody listens on, never one this test session handed out before: a server
    takes four at once, and the kernel may offer the same port twice while none of them
    is bound yet (``serve`` then refuses two listeners on one port)."""
    low = PORT_RANGE_START + _WORKER_INDEX * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER * 4):
        port = low + secrets.randbelow(PORTS_PER_WORKER)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{low + PORTS_PER_WORKER - 1}")


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


def postgres_schema_url() -> Iterator[str]:
    """Generator: yields the URL of a fresh schema in `test`, drops it when resumed."""
    schema = f"fwtest_{secrets.token_hex(6)}"
    admin = create_engine(PG_BASE_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        admin.dispose()
        need_service(f"PostgreSQL at {PG_BASE_URL}: {exc}")
    sep = "&" if "?" in PG_BASE_URL else "?"
    yield f"{PG_BASE_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the `test` database, dropped afterwards."""
    yield from postgres_schema_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run a test against both backends the issue names."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@dataclass
class Stack:
    """The CA and registry wired in-process over a real database (no HTTP)."""

    db: Database
    authority: Authority
    registry: Registry
    audit: AuditLog
    clock: FrozenClock
    issuing_signer: Signer

    def add_device(self, device_id: str, type_name: str = "sensor") -> None:
        self.registry.create_device(device_id, type_name, "acme", {}, "operator:test")


def build_stack(url: str, tmp_path: Path, clock: FrozenClock,
                issuing_signer: Signer | None = None, root_signer: Signer | None = None,
                config: CAConfig | None = None) -> Stack:
    db = Database(url)
    db.migrate()
    audit = AuditLog(secrets.token_bytes(32), clock)
    passphrase = b"test-passphrase"
    root_signer = root_signer or FileSigner.create(tmp_path / "root.key", passphrase)
    issuing_signer = issuing_signer or FileSigner.create(tmp_path / "issuing.key", passphrase)
    config = config or CAConfig()
    with db.transaction() as conn:
        root, issuing = create_hierarchy(
            conn, root_signer=root_signer, issuing_signer=issuing_signer,
            organization="Test", root_validity_days=3650, issuing_validity_days=1825,
            public_url=PUBLIC_URL_FOR_TESTS, now=clock.now(), audit=audit)
        authority = Authority({ROOT_NAME: root, ISSUING_NAME: issuing}, ISSUING_NAME, config,
                              PUBLIC_URL_FOR_TESTS, clock, audit)
        authority.refresh_crl(conn, ROOT_NAME)
        authority.refresh_crl(conn, ISSUING_NAME)
        device_rows.insert_type(conn, DeviceType("sensor", "test sensors"), clock.now())
    registry = Registry(db, authority, audit, clock)
    return Stack(db, authority, registry, audit, clock, issuing_signer)


@pytest.fixture
def stack(db_url: str, tmp_path: Path, clock: FrozenClock) -> Iterator[Stack]:
    """CA + registry on SQLite and on PostgreSQL."""
    s = build_stack(db_url, tmp_path, clock)
    yield s
    s.db.dispose()


@pytest.fixture
def sqlite_stack(sqlite_url: str, tmp_path: Path, clock: FrozenClock) -> Iterator[Stack]:
    """CA + registry on SQLite only (for tests that are about something else)."""
    s = build_stack(sqlite_url, tmp_path, clock)
    yield s
    s.db.dispose()


# --- a real server process -------------------------------------------------------------


@dataclass
class RunningServer:
    data_dir: Path
    public_url: str
    admin_url: str
    public_port: int
    admin_port: int
    device_port: int
    token: str
    chain: Path
    process: subprocess.Popen[bytes]
    log_file: Path
    mqtt_port: int = 0

    def env(self) -> dict[str, str]:
        """Environment for CLI subprocesses on the 'server host'."""
        env = dict(os.environ)
        env["FLEETWARD_DATA_DIR"] = str(self.data_dir)
        env.pop("FLEETWARD_ADMIN_TOKEN", None)
        env.pop("FLEETWARD_ADMIN_URL", None)
        return env

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*FLEETWARD, *args], env=env or self.env(), capture_output=True,
                                text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"fleetward {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.chain))

    def admin(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.admin_url, verify=self.tls(), timeout=30,
                            headers={"Authorization": f"Bearer {token or self.token}"})


def start_server(data_dir: Path, extra_init: list[str] | None = None,
                 env: dict[str, str] | None = None,
                 settings: dict[str, dict[str, Any]] | None = None) -> RunningServer:
    """Init ``data_dir`` and start ``fleetward serve`` on free ports.

    ``settings`` overrides fleetward.toml values after init, e.g.
    ``{"enroll": {"reenroll_overlap_seconds": 2}}``.
    """
    public_port, admin_port, device_port = free_port(), free_port(), free_port()
    mqtt_port = free_port()
    public_url = f"http://127.0.0.1:{public_port}"
    env = dict(env or os.environ)
    subprocess.run([*FLEETWARD, "init", "--data-dir", str(data_dir), "--public-url", public_url,
                    "--public-port", str(public_port), "--admin-port", str(admin_port),
                    *(extra_init or [])], check=True, env=env, capture_output=True, timeout=120)
    if settings:
        current = load_settings(data_dir, env={})
        for section, values in settings.items():
            current = replace(current, **{section: replace(getattr(current, section), **values)})
        (data_dir / "fleetward.toml").write_text(render_settings(current))
    log_file = data_dir.parent / f"{data_dir.name}-server.log"
    log = log_file.open("wb")
    process = subprocess.Popen(
        [*FLEETWARD, "serve", "--data-dir", str(data_dir), "--public-port", str(public_port),
         "--admin-port", str(admin_port), "--device-port", str(device_port),
         "--mqtt-port", str(mqtt_port)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(
        data_dir=data_dir, public_url=public_url, admin_url=f"https://localhost:{admin_port}",
        public_port=public_port, admin_port=admin_port, device_port=device_port,
        token=(data_dir / "secrets" / "admin-token").read_text().strip(),
        chain=data_dir / "certs" / "chain.pem", process=process, log_file=log_file,
        mqtt_port=mqtt_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_file.read_text()}")
        try:
            if httpx.get(f"{public_url}/healthz", timeout=1).status_code == 200:
                with server.admin() as client:
                    if client.get("/v1/health").status_code == 200:
                        return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log_file.read_text()}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One `fleetward serve` process per test module, on free ports, SQLite."""
    data_dir = tmp_path_factory.mktemp("server") / "data"
    s = start_server(data_dir)
    yield s
    stop_server(s)
