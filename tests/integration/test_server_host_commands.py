"""Commands on the server host that work on the data directory itself (issue 10).

* ``audit verify --data-dir`` with the server stopped: the forensic check reads the
  database and the audit key directly, names a tampered row (exit 3) and says OK on an
  untouched log; ``--admin-url`` still asks the API (and fails when it is down).
* A second ``serve`` (or any process) on a port: one ``error:`` line naming the port and
  the pid holding it, a ``hint:``, no traceback, nothing changed in the data directory.
* ``init`` again with other flags: nothing changed, what differs, how to reissue;
  ``ca reissue-server-cert`` gives the listeners new names, audited, and the old
  certificate superseded; a server started afterwards presents the new certificate.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import create_engine, text

from fleetward.errors import ConfigurationError
from fleetward.model import format_serial
from fleetward.offline import reissue_server_certificate
from tests.conftest import (
    FLEETWARD,
    RunningServer,
    free_port,
    need_service,
    start_server,
    stop_server,
)

REISSUED = "ca.server_certificate_reissued"


def bare_env(**extra: str) -> dict[str, str]:
    """This shell without any FLEETWARD_* setting: only what a test passes counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWARD_")}
    env.update(extra)
    return env


def fleetward(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETWARD, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or bare_env(), cwd=cwd)


def flat(output: str) -> str:
    return " ".join(output.split())


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every file but the database (a running server writes to it)."""
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.is_file() and "fleetward.db" not in p.name}


@contextmanager
def sqlite_db(data_dir: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(data_dir / "fleetward.db", timeout=30)) as conn, conn:
        yield conn


def audit_rows(data_dir: Path) -> int:
    with sqlite_db(data_dir) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_events").fetchone()[0])


# --- 1. audit verify with the server stopped ----------------------------------------------


def test_audit_verify_with_the_server_stopped_names_a_tampered_row(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    for device in ("forensic-1", "forensic-2"):
        server.cli("device", "add", device, "--type", "default")
    stop_server(server)
    data_dir = server.data_dir
    rows = audit_rows(data_dir)
    assert rows > 4

    untouched = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert untouched.returncode == 0, untouched.stdout + untouched.stderr
    assert f"audit chain OK: {rows} rows verified" in flat(untouched.stdout)

    middle = rows // 2
    with sqlite_db(data_dir) as conn:
        original = conn.execute("SELECT actor FROM audit_events WHERE seq = ?",
                                (middle,)).fetchone()[0]
        conn.execute("UPDATE audit_events SET actor = 'operator:nobody' WHERE seq = ?",
                      (middle,))
    broken = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert broken.returncode == 3, broken.stdout + broken.stderr
    assert f"audit chain BROKEN at row {middle} (edited)" in flat(broken.stderr)
    assert "Traceback" not in broken.stderr
    # FLEETWARD_DATA_DIR works as the flag does.
    from_env = fleetward("audit", "verify", env=bare_env(FLEETWARD_DATA_DIR=str(data_dir)))
    assert from_env.returncode == 3 and f"row {middle} (edited)" in flat(from_env.stderr)
    # --admin-url asks the API, as before: with the server down there is nobody to ask.
    remote = fleetward("audit", "verify", "--admin-url", server.admin_url, "--ca-file",
                       str(server.chain), env=bare_env(FLEETWARD_ADMIN_TOKEN=server.token))
    assert remote.returncode == 1 and "cannot reach the admin API" in flat(remote.stderr)

    with sqlite_db(data_dir) as conn:
        conn.execute("UPDATE audit_events SET actor = ? WHERE seq = ?", (original, middle))
    restored = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert restored.returncode == 0, restored.stderr
    assert f"audit chain OK: {rows} rows verified" in flat(restored.stdout)
    assert audit_rows(data_dir) == rows, "verifying wrote to the log it verifies"


def test_audit_verify_of_a_never_started_server_finds_a_deleted_row(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    rows = audit_rows(data_dir)
    ok = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert ok.returncode == 0 and f"{rows} rows verified" in flat(ok.stdout), ok.stderr
    with sqlite_db(data_dir) as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = 2")
    broken = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert broken.returncode == 3
    assert "audit chain BROKEN at row 2 (deleted)" in flat(broken.stderr)


def test_audit_verify_of_a_missing_database_is_an_error_not_an_empty_log(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    (data_dir / "fleetward.db").rename(tmp_path / "moved.db")
    result = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "no database at" in flat(result.stderr) and "hint:" in result.stderr
    assert not (data_dir / "fleetward.db").exists(), "verify created an empty database"


@pytest.mark.postgres
def test_audit_verify_offline_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    data_dir = tmp_path / "data"
    init = fleetward("init", "--data-dir", str(data_dir),
                     env=bare_env(FLEETWARD_DATABASE_URL=postgres_url))
    assert init.returncode == 0, init.stderr
    ok = fleetward("audit", "verify", "--data-dir", str(data_dir))  # URL from fleetward.toml
    assert ok.returncode == 0, ok.stderr
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE seq = 3"))
    finally:
        engine.dispose()
    broken = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert broken.returncode == 3
    assert "audit chain BROKEN at row 3 (edited)" in flat(broken.stderr)


@pytest.mark.postgres
def test_audit_verify_offline_takes_a_password_url_from_the_environment(
        tmp_path: Path, postgres_url: str) -> None:
    if "://postgres@" not in postgres_url:
        pytest.skip("needs the password-less test URL to add a (trust-ignored) password")
    with_password = postgres_url.replace("://postgres@", "://postgres:not-stored@")
    data_dir = tmp_path / "data"
    env = bare_env(FLEETWARD_DATABASE_URL=with_password)
    assert fleetward("init", "--data-dir", str(data_dir), env=env).returncode == 0
    missing = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert missing.returncode == 1
    assert "FLEETWARD_DATABASE_URL" in flat(missing.stderr)
    ok = fleetward("audit", "verify", "--data-dir", str(data_dir), env=env)
    assert ok.returncode == 0 and "audit chain OK" in flat(ok.stdout), ok.stderr


# --- 2. a port in use -----------------------------------------------------------------------


def serve_args(data_dir: Path, *, public: int, admin: int, device: int, mqtt: int) -> list[str]:
    return ["serve", "--data-dir", str(data_dir), "--public-port", str(public),
            "--admin-port", str(admin), "--device-port", str(device), "--mqtt-port", str(mqtt)]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 2, result.stderr  # one error line and its hint
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    return lines


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("ports") / "data")
    yield server
    stop_server(server)


def test_audit_verify_with_an_admin_url_asks_the_running_server(running: RunningServer,
                                                                 tmp_path: Path) -> None:
    # No data directory in reach: the API answers (and its database says the same).
    result = fleetward("audit", "verify", "--admin-url", running.admin_url, "--ca-file",
                       str(running.chain), env=bare_env(FLEETWARD_ADMIN_TOKEN=running.token),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with running.admin() as admin:
        rows = admin.get("/v1/audit/verify").json()["rows_checked"]
    assert f"audit chain OK: {rows} rows verified" in flat(result.stdout)


def test_a_second_serve_on_the_same_ports_names_the_first_servers_pid(
        running: RunningServer) -> None:
    before = snapshot(running.data_dir)
    result = fleetward(*serve_args(running.data_dir, public=running.public_port,
                                   admin=running.admin_port, device=running.device_port,
                                   mqtt=running.mqtt_port), timeout=30)
    assert result.returncode != 0
    error, hint = error_lines(result)
    assert error.startswith(
        f"error: port {running.public_port} (public HTTP) on 127.0.0.1 is in use by pid "
        f"{running.process.pid} (fleetward serve)"), error
    for port in (running.admin_port, running.device_port, running.mqtt_port):
        assert str(port) in error, "the other held ports are not named"
    assert "--public-port" in hint and "fleetward.toml" in hint
    assert snapshot(running.data_dir) == before, "the failed serve changed the data directory"
    assert httpx.get(f"{running.public_url}/healthz", timeout=5).status_code == 200


def test_serve_on_another_data_dir_names_the_holder_of_the_one_port_it_shares(
        running: RunningServer, tmp_path: Path) -> None:
    data_dir = tmp_path / "other"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    before = snapshot(data_dir)
    result = fleetward(*serve_args(data_dir, public=free_port(), admin=running.admin_port,
                                   device=free_port(), mqtt=free_port()), timeout=30)
    assert result.returncode != 0
    error, _ = error_lines(result)
    assert error == (f"error: port {running.admin_port} (admin HTTPS) on 127.0.0.1 is in use "
                     f"by pid {running.process.pid} (fleetward serve)"), error
    assert snapshot(data_dir) == before


def test_a_plain_listening_socket_is_named_with_this_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    before = snapshot(data_dir)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = fleetward(*serve_args(data_dir, public=free_port(), admin=free_port(),
                                       device=free_port(), mqtt=port), timeout=30)
    assert result.returncode != 0
    error, hint = error_lines(result)
    assert error.startswith(f"error: port {port} (MQTT over TLS) on 127.0.0.1 is in use by pid "
                            f"{os.getpid()} ("), error
    assert "--mqtt-port" in hint
    assert snapshot(data_dir) == before


def test_a_bound_socket_that_does_not_listen_is_in_use_without_a_pid(tmp_path: Path) -> None:
    # Bound-only sockets are in neither /proc/net/tcp table: the holder cannot be found.
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = fleetward(*serve_args(data_dir, public=free_port(), admin=port,
                                       device=free_port(), mqtt=free_port()), timeout=30)
    assert result.returncode != 0
    error, hint = error_lines(result)
    assert error == f"error: port {port} (admin HTTPS) on 127.0.0.1 is in use", error
    assert "ss -ltnp" in hint


# --- 3. init again, and reissuing the server certificate -----------------------------------


def san_text(cert_file: Path) -> str:
    result = subprocess.run(["openssl", "x509", "-in", str(cert_file), "-noout", "-ext",
                             "subjectAltName"], capture_output=True, text=True, check=True)
    return result.stdout


def leaf(data_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((data_dir / "certs/server.pem").read_bytes())[0]


def presented(port: int, chain: Path, server_name: str) -> x509.Certificate:
    """The certificate a listener presents, verified against our chain for ``server_name``
    (which must therefore be one of its SANs)."""
    ctx = ssl.create_default_context(cafile=str(chain))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def dns_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def test_init_again_with_another_hostname_changes_nothing_and_says_how_to_reissue(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = fleetward("init", "--data-dir", str(data_dir), "--hostname", "a.example.com",
                      "--public-url", "http://a.example.com:8080")
    assert first.returncode == 0, first.stderr
    before = snapshot(data_dir)

    same = fleetward("init", "--data-dir", str(data_dir), "--hostname", "a.example.com")
    assert same.returncode == 0
    assert "already initialised; nothing changed" in same.stdout
    assert "differ" not in same.stdout, same.stdout

    again = fleetward("init", "--data-dir", str(data_dir), "--hostname", "b.example.com",
                      "--public-url", "http://b.example.com:8080", "--admin-port", "9999")
    assert again.returncode == 0, again.stderr
    out = flat(again.stdout)
    assert "already initialised; nothing changed" in out
    assert ("--hostname: the server certificate names localhost, 127.0.0.1, ::1, "
            "a.example.com; asked for localhost, 127.0.0.1, ::1, b.example.com") in out, out
    assert (f"fleetward ca reissue-server-cert --data-dir {data_dir} --hostname "
            "b.example.com") in out, out
    assert "--public-url: the public URL is http://a.example.com:8080" in out
    assert "cannot change after init" in out
    assert "--admin-port: fleetward.toml has admin_port = 9443; asked for 9999" in out
    assert snapshot(data_dir) == before, "init changed the data directory"


def test_the_readme_commands_init_then_reissue(tmp_path: Path) -> None:
    init = fleetward("init", "--data-dir", "./prod-data", "--hostname", "iot.example.com",
                     "--host", "0.0.0.0", "--public-url", "http://iot.example.com:8080",
                     cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "DNS:iot.example.com" in san_text(tmp_path / "prod-data/certs/server.pem")
    reissue = fleetward("ca", "reissue-server-cert", "--data-dir", "./prod-data",
                        "--hostname", "iot.example.com", "--hostname", "mqtt.example.com",
                        cwd=tmp_path)
    assert reissue.returncode == 0, reissue.stderr
    assert "Traceback" not in reissue.stderr
    san = san_text(tmp_path / "prod-data/certs/server.pem")
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1",
                 "DNS:iot.example.com", "DNS:mqtt.example.com"):
        assert name in san, san


def test_reissue_while_running_takes_effect_at_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, extra_init=["--hostname", "old.example.com"])
    try:
        old = leaf(data_dir)
        assert "old.example.com" in dns_names(old)
        result = fleetward("ca", "reissue-server-cert", "--data-dir", str(data_dir),
                           "--hostname", "iot.example.com", "--hostname", "mqtt.example.com")
        assert result.returncode == 0, result.stdout + result.stderr
        new = leaf(data_dir)
        assert new.serial_number != old.serial_number
        out = flat(result.stdout)
        assert (f"issued server certificate {format_serial(new.serial_number)} for localhost, "
                "127.0.0.1, ::1, iot.example.com, mqtt.example.com") in out, out
        assert f"replaced: {format_serial(old.serial_number)}, superseded" in out, out
        san = san_text(data_dir / "certs/server.pem")
        assert "DNS:mqtt.example.com" in san and "old.example.com" not in san, san
        # Until it restarts, the running server still presents the certificate it loaded.
        assert presented(server.admin_port, server.chain, "localhost").serial_number == (
            old.serial_number)
    finally:
        stop_server(server)

    restarted = start_server(data_dir)  # init is a no-op; serve loads the new pair
    try:
        for port in (restarted.admin_port, restarted.device_port):
            cert = presented(port, restarted.chain, "mqtt.example.com")
            assert cert.serial_number == new.serial_number
            assert {"localhost", "iot.example.com", "mqtt.example.com"} <= dns_names(cert)
        with restarted.admin() as admin:
            rows = admin.get("/v1/audit", params={"action": REISSUED}).json()["items"]
            previous = admin.get(f"/v1/certificates/{format_serial(old.serial_number)}"
                                 ).json()
        assert len(rows) == 1, rows
        details: dict[str, Any] = rows[0]["details"]
        assert rows[0]["actor"].startswith("local:")
        assert details["serial"] == format_serial(new.serial_number)
        assert details["previous_serial"] == format_serial(old.serial_number)
        assert details["names"] == ["localhost", "127.0.0.1", "::1", "iot.example.com",
                                    "mqtt.example.com"]
        # Superseded, revoked after the overlap (24 h by default): not yet.
        assert previous["superseded_by"] == format_serial(new.serial_number)
        assert previous["status"] == "valid"
        revoke_after = dt.datetime.fromisoformat(previous["revoke_after"].replace("Z", "+00:00"))
        hours = (revoke_after - dt.datetime.now(dt.UTC)).total_seconds() / 3600
        assert 23 < hours <= 24, previous
        assert restarted.cli("audit", "verify").returncode == 0
    finally:
        stop_server(restarted)


def test_reissue_without_hostnames_keeps_them_and_zero_hours_revokes_now(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir), "--hostname", "keep.example.com",
                     "--hostname", "10.0.0.7").returncode == 0
    old = leaf(data_dir)
    result = fleetward("ca", "reissue-server-cert", "--data-dir", str(data_dir),
                       "--revoke-old-after-hours", "0")
    assert result.returncode == 0, result.stderr
    new = leaf(data_dir)
    assert new.serial_number != old.serial_number
    assert dns_names(new) == {"localhost", "keep.example.com"}
    assert "IP Address:10.0.0.7" in san_text(data_dir / "certs/server.pem")
    with sqlite_db(data_dir) as conn:
        revoked_at, reason = conn.execute(
            "SELECT revoked_at, revocation_reason FROM certificates WHERE serial = ?",
            (format_serial(old.serial_number),)).fetchone()
        crl_der = conn.execute("SELECT crl_der FROM cas WHERE name = 'issuing'").fetchone()[0]
    assert revoked_at is not None and reason == "superseded"
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None
    verify = fleetward("audit", "verify", "--data-dir", str(data_dir))
    assert verify.returncode == 0, verify.stderr


def test_reissue_refuses_a_bad_hostname_and_keeps_the_certificate(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    before = snapshot(data_dir)
    rows = audit_rows(data_dir)
    result = fleetward("ca", "reissue-server-cert", "--data-dir", str(data_dir),
                       "--hostname", "bad name!")
    assert result.returncode == 1
    assert "neither an IP address nor a DNS name" in flat(result.stderr)
    assert "Traceback" not in result.stderr
    assert snapshot(data_dir) == before and audit_rows(data_dir) == rows


def test_reissue_on_a_directory_that_was_never_initialised_says_so(tmp_path: Path) -> None:
    result = fleetward("ca", "reissue-server-cert", "--data-dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "is not a Fleetward data directory" in flat(result.stderr)
    assert not (tmp_path / "none").exists()


def test_audit_verify_reads_a_read_only_copy_of_a_seized_data_dir(tmp_path: Path) -> None:
    """A forensic copy on read-only media, without SQLite's -shm file (``mode=ro`` alone
    cannot open a WAL database there): verified through a private copy, the evidence
    untouched. The media is a tmpfs remounted read-only (root ignores file modes)."""
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    rows = audit_rows(data_dir)
    media = tmp_path / "media"
    media.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(media)],
                      capture_output=True).returncode != 0:
        need_service("mount (root) for a read-only tmpfs")
    try:
        copy = media / "data"
        shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("*-shm"))
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        before = snapshot(copy) | {"db": (copy / "fleetward.db").read_bytes()}
        result = fleetward("audit", "verify", "--data-dir", str(copy))
        assert result.returncode == 0, result.stderr
        assert f"audit chain OK: {rows} rows verified" in flat(result.stdout)
        assert snapshot(copy) | {"db": (copy / "fleetward.db").read_bytes()} == before
    finally:
        subprocess.run(["umount", str(media)], check=True)


def _fail_when(monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    """The OS refuses ``os.<name>`` for a path whose name ends with ``target`` (a full
    disk, a read-only remount): fault injection below our code, which stays real."""
    real = getattr(os, name)

    def refusing(src: Any, dst: Any = None, *args: Any, **kwargs: Any) -> Any:
        if str(dst if dst is not None else src).endswith(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, *args, **kwargs) if dst is None else real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, name, refusing)


def _pair(data_dir: Path) -> tuple[bytes, bytes]:
    return ((data_dir / "certs/server.pem").read_bytes(),
            (data_dir / "keys/server.key").read_bytes())


def test_reissue_that_cannot_install_the_key_keeps_the_old_pair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    before = _pair(data_dir)
    _fail_when(monkeypatch, "replace", "server.key")
    with pytest.raises(ConfigurationError, match="cannot write the new server certificate"):
        reissue_server_certificate(data_dir, ["new.example.com"],
                                   revoke_previous_after=dt.timedelta(hours=24),
                                   actor="local:test")
    monkeypatch.undo()
    assert _pair(data_dir) == before, "certificate and key no longer belong together"
    assert not [p for p in data_dir.rglob(".server*")], "staged files left behind"


def test_reissue_that_cannot_stage_its_files_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    assert fleetward("init", "--data-dir", str(data_dir)).returncode == 0
    before, rows = _pair(data_dir), audit_rows(data_dir)
    with sqlite_db(data_dir) as conn:
        certificates = conn.execute("SELECT count(*) FROM certificates").fetchone()[0]
    _fail_when(monkeypatch, "fsync", "")  # every fsync: the staged key is the first
    with pytest.raises(ConfigurationError, match="cannot write the new server certificate"):
        reissue_server_certificate(data_dir, ["new.example.com"],
                                   revoke_previous_after=dt.timedelta(0), actor="local:test")
    monkeypatch.undo()
    assert _pair(data_dir) == before
    assert audit_rows(data_dir) == rows, "the reissue was committed without its files"
    with sqlite_db(data_dir) as conn:
        assert conn.execute("SELECT count(*) FROM certificates").fetchone()[0] == certificates
        assert conn.execute("SELECT count(*) FROM certificates WHERE revoked_at IS NOT NULL"
                            ).fetchone()[0] == 0
    assert not [p for p in data_dir.rglob(".server*")]
