"""Server-host commands that work on the data directory itself, not through the API.

They read the database, the audit key and the CA key the way ``serve`` does, so they run
with the server stopped as well as running: ``audit verify --data-dir`` (the forensic
check, for when the server is down or suspected), ``ca reissue-server-cert`` and what a
repeated ``init`` would have changed. Only ``server.py`` imports this module, and only
when one of these commands runs; like ``node.py`` it may build concrete stores.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fleetward.audit import AuditLog
from fleetward.ca import Authority
from fleetward.ca.setup import (
    ISSUING_NAME,
    check_server_names,
    extra_server_names,
    issue_server_certificate,
    load_handles,
    server_names,
)
from fleetward.clock import Clock, SystemClock
from fleetward.config import DataDirLayout, Settings, load_settings
from fleetward.crypto.signer import load_signer, write_encrypted_key
from fleetward.datadir_secrets import audit_key, ca_passphrase, pkcs11_pin
from fleetward.errors import ConfigurationError, StorageError
from fleetward.model import AuditEvent, format_serial
from fleetward.store import Database
from fleetward.store import cas as ca_rows
from fleetward.store import certificates as cert_rows

REISSUED_ACTION = "ca.server_certificate_reissued"


def _initialised(data_dir: Path) -> DataDirLayout:
    layout = DataDirLayout(data_dir)
    if not layout.config_file.exists():
        raise ConfigurationError(f"{data_dir} is not a Fleetward data directory",
                                 hint="pass the directory `fleetward init` created "
                                      "(--data-dir or FLEETWARD_DATA_DIR)")
    return layout


def local_actor() -> str:
    """Who ran a server-host command, for the audit log: ``local:<unix user>``."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return f"local:uid-{os.getuid()}"


# --- audit verify ---------------------------------------------------------------------


def verify_audit(data_dir: Path) -> dict[str, Any]:
    """Verify the audit chain straight from the database with the data directory's key.

    The database is not changed: SQLite is opened read-only (``mode=ro``; like any reader
    of a WAL database it may create the ``-shm``/``-wal`` companion files), PostgreSQL in
    a READ ONLY transaction; no migration runs and no audit row records the check (it must
    not change the evidence it reads). When SQLite cannot be opened in place (a read-only
    copy of a seized data directory, without its ``-shm`` file), a private copy of the
    database and its WAL is verified instead. The report has the shape of
    ``GET /v1/audit/verify``.

    Raises:
        ConfigurationError: not a data directory, the database or the audit key is
            missing, or the database URL is meant to come from the environment.
        StorageError: the database cannot be read.
    """
    layout = _initialised(data_dir)
    settings = load_settings(data_dir)
    key = audit_key(layout)
    url = settings.database_url
    try:
        sqlite_file = _sqlite_file(url)
        if sqlite_file is None:
            return _verify_at(url, key)
        try:
            return _verify_at(_read_only_url(sqlite_file), key)
        except StorageError:
            if os.access(sqlite_file.parent, os.W_OK):
                raise
        with tempfile.TemporaryDirectory(prefix="fleetward-verify-") as scratch:
            copy = Path(scratch) / sqlite_file.name
            for suffix in ("", "-wal"):
                source = sqlite_file.with_name(sqlite_file.name + suffix)
                if source.exists():
                    shutil.copyfile(source, copy.with_name(copy.name + suffix))
            return _verify_at(_read_only_url(copy), key)
    except (ArgumentError, SQLAlchemyError, OSError) as exc:
        raise StorageError(f"cannot read the audit log: {type(exc).__name__}",
                           hint="check [database] url in fleetward.toml or "
                                "FLEETWARD_DATABASE_URL, and that the database is "
                                "readable by this user") from exc


def _verify_at(url: str, key: bytes) -> dict[str, Any]:
    db = Database(url)
    try:
        with db.read() as conn:
            if db.dialect == "postgresql":
                conn.execute(text("SET TRANSACTION READ ONLY"))
            return AuditLog(key, SystemClock()).verify(conn).to_json()
    finally:
        db.dispose()


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (it must exist: opening would otherwise create
    an empty database that "verifies"); None for other databases."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    path = Path(parsed.database or "")
    if not parsed.database or not path.is_file():
        raise ConfigurationError(f"no database at {path}",
                                 hint="pass the data directory `fleetward init` created; "
                                      "[database] url in fleetward.toml names any other")
    return path.resolve()


def _read_only_url(path: Path) -> str:
    return f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true"


# --- server certificate ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reissued:
    serial: str
    names: tuple[str, ...]
    not_after: dt.datetime
    cert_file: Path
    previous_serial: str | None  # the certificate it replaces, if server.pem had one
    previous_revoked_at: dt.datetime | None  # when that one is (or was) revoked


def current_server_certificate(layout: DataDirLayout) -> x509.Certificate | None:
    """The leaf of ``certs/server.pem``; None if the file is missing or unreadable."""
    try:
        return x509.load_pem_x509_certificates(layout.server_cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def reissue_server_certificate(data_dir: Path, hostnames: list[str] | None, *,
                               revoke_previous_after: dt.timedelta, actor: str,
                               clock: Clock | None = None) -> Reissued:
    """Issue a new TLS server certificate (and key) for the listeners.

    Args:
        hostnames: names besides localhost, 127.0.0.1 and ::1; they replace the current
            certificate's. None or empty: keep the current certificate's names.
        revoke_previous_after: the replaced certificate is marked superseded and revoked
            (reason ``superseded``, RFC 5280 §5.3.1) this long from now by the server's
            supersede sweep; zero revokes it now, in the same transaction.

    The certificate, the supersession and the audit events commit together. The new key
    and certificate are written to staged files (0600 key, fsynced) before the commit and
    moved into place after it, the key last but restored if the certificate cannot
    follow, so the two files always match. A running server keeps presenting the
    certificate it loaded until it restarts. One reissue runs at a time (a lock on the
    ``certs/`` folder).

    Raises:
        ConfigurationError, KeyUnavailable: not a data directory, secrets or the issuing
            CA's key cannot be opened, the files cannot be written, another reissue runs.
        InvalidInput: a host name is not valid.
    """
    layout = _initialised(data_dir)
    with _reissue_lock(layout):
        return _reissue(layout, data_dir, hostnames, revoke_previous_after, actor, clock)


def _reissue(layout: DataDirLayout, data_dir: Path, hostnames: list[str] | None,
             revoke_previous_after: dt.timedelta, actor: str, clock: Clock | None
             ) -> Reissued:
    settings = load_settings(data_dir)
    previous = current_server_certificate(layout)
    extra = list(hostnames) if hostnames else (extra_server_names(previous) if previous else [])
    check_server_names(extra)
    clock = clock or SystemClock()
    passphrase = ca_passphrase(layout)
    audit = AuditLog(audit_key(layout), clock)
    db = Database(settings.database_url)
    staged: list[Path] = []
    try:
        db.migrate()  # as serve would: a newer Fleetward may bring new migrations
        authority = _authority(db, settings, passphrase, clock, audit)
        now = clock.now()
        revoke_at = now + max(revoke_previous_after, dt.timedelta(0))
        with db.transaction() as conn:
            record, key = issue_server_certificate(conn, authority, extra, actor)
            superseded: int | None = None
            if previous is not None:
                old = cert_rows.get_certificate(conn, previous.serial_number)
                if old is not None and cert_rows.schedule_supersede(
                        conn, old.serial, record.serial, revoke_at):
                    superseded = old.serial
                    if revoke_at <= now:
                        authority.revoke(conn, old.serial, "superseded", actor,
                                         planned_rotation=True)
            names = server_names(extra)
            audit.append(conn, AuditEvent(
                action=REISSUED_ACTION, actor=actor, target=f"ca:{ISSUING_NAME}",
                details={"serial": record.serial_hex, "names": list(names),
                         "previous_serial": format_serial(superseded) if superseded else None,
                         "previous_revoked_at": revoke_at.isoformat() if superseded else None}))
            # Staged inside the transaction: a file that cannot be written rolls it back.
            staged_key = _stage(layout.server_key_file, staged)
            write_encrypted_key(staged_key, key, passphrase)  # 0600 from the start
            _fsync(staged_key)
            staged_cert = _stage(layout.server_cert_file, staged)
            staged_cert.write_text(record.pem + authority.issuing.pem)
            _fsync(staged_cert)
        _install(staged_cert, layout.server_cert_file, staged_key, layout.server_key_file)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the new server certificate or key: {exc.strerror or exc}",
            hint="free space or fix the permissions of the data directory, then run the "
                 "command again; the server keeps its current certificate") from exc
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
        db.dispose()
    return Reissued(record.serial_hex, names, record.not_after, layout.server_cert_file,
                    format_serial(superseded) if superseded else None,
                    revoke_at if superseded else None)


def _authority(db: Database, settings: Settings, passphrase: bytes, clock: Clock,
               audit: AuditLog) -> Authority:
    """The CA with the issuing CA's key only (the root's may be offline; it is not needed).

    Raises:
        ConfigurationError: no issuing CA in the database.
        KeyUnavailable: its key cannot be opened (passphrase, token, PIN).
    """
    with db.read() as conn:
        handles = load_handles(conn, lambda _ref: None)
        issuing = ca_rows.get_ca(conn, ISSUING_NAME)
    if issuing is None or not issuing.key_ref or ISSUING_NAME not in handles:
        raise ConfigurationError("this data directory has no issuing CA with a key",
                                 hint="run `fleetward init` first")
    signer = load_signer(issuing.key_ref, passphrase, pkcs11_pin(settings))
    handles[ISSUING_NAME] = replace(handles[ISSUING_NAME], signer=signer)
    return Authority(handles, ISSUING_NAME, settings.ca, settings.listeners.public_url, clock,
                     audit)


def _stage(path: Path, staged: list[Path]) -> Path:
    staged_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    staged.append(staged_path)
    return staged_path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staged_cert: Path, cert_file: Path, staged_key: Path, key_file: Path) -> None:
    """Move the staged certificate, then the key, into place; if the key cannot follow,
    the old certificate is put back, so the two files never belong to different pairs."""
    backup = cert_file.with_name(f".{cert_file.name}.previous")
    had_cert = cert_file.exists()
    if had_cert:
        shutil.copy2(cert_file, backup)
    try:
        os.replace(staged_cert, cert_file)
        try:
            os.replace(staged_key, key_file)
        except OSError:
            if had_cert:
                os.replace(backup, cert_file)
            raise
    finally:
        backup.unlink(missing_ok=True)
    for folder in {cert_file.parent, key_file.parent}:  # the renames outlive a crash
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _reissue_lock(layout: DataDirLayout) -> Iterator[None]:
    """One reissue at a time: an exclusive flock(2) on the ``certs`` folder itself, so no
    lock file is left behind."""
    fd = os.open(layout.certs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError("another `fleetward ca reissue-server-cert` is running "
                                     "on this data directory",
                                     hint="wait for it to finish, then check "
                                          "certs/server.pem") from None
        yield
    finally:
        os.close(fd)


# --- init run again -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """An init flag that differs from what the data directory already has."""

    flag: str
    stored: str  # what the data directory has
    asked: str  # what this run asked for
    todo: str  # what to do instead


_LISTENER_FLAGS = ("host", "public_port", "admin_port", "device_port", "mqtt_port")
_CA_KEY_FLAGS = ("ca_key_backend", "pkcs11_module", "pkcs11_token_label")
_IMPORT_FLAGS = ("import_ca_cert", "import_ca_key", "import_root_cert")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def init_differences(data_dir: Path, given: Mapping[str, Any]) -> list[Difference]:
    """What ``init`` was asked for (``given``: the flags typed, by parameter name) that
    differs from an already initialised ``data_dir``; init changes none of it."""
    layout = DataDirLayout(data_dir)
    stored = load_settings(data_dir, env={})  # the file, not this shell's overrides
    out: list[Difference] = []
    hostnames = given.get("hostname")
    current = current_server_certificate(layout)
    if hostnames and current is not None:
        have = extra_server_names(current)
        want = [n for n in server_names(hostnames) if n not in server_names([])]
        if set(have) != set(want):
            flags = " ".join(f"--hostname {n}" for n in want)
            out.append(Difference(
                "--hostname", "the server certificate names " + ", ".join(server_names(have)),
                ", ".join(server_names(want)),
                f"to serve under these names: fleetward ca reissue-server-cert --data-dir "
                f"{data_dir} {flags} (the server presents it from its next start)"))
    public_url = given.get("public_url")
    if public_url and public_url != stored.listeners.public_url:
        url = stored.listeners.public_url
        out.append(Difference(
            "--public-url", f"the public URL is {url}", public_url,
            "the public URL cannot change after init: every certificate issued so far "
            "carries it (CRL distribution point, OCSP and CA-issuer addresses; the issuing "
            f"CA's own too). Keep {url} reachable (a DNS name or proxy in front of the "
            "public listener), or initialise a new data directory with the new URL (a new "
            "CA: every device enrolls again)"))
    organization = given.get("organization")
    issuing = _ca_certificate(layout, "issuing-ca.pem")
    if organization and issuing is not None:
        names = issuing.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        have_org = str(names[0].value) if names else ""
        if organization != have_org:
            out.append(Difference(
                "--organization", f"the CAs are named for {have_org or '(no organisation)'}",
                organization, "CA names cannot change; another organisation name needs a new "
                              "CA (a new data directory)"))
    for name in _LISTENER_FLAGS:
        if name in given and given[name] != getattr(stored.listeners, name):
            note = (f"; the public URL in certificates stays {stored.listeners.public_url}"
                    if name == "public_port" else "")
            out.append(Difference(
                _flag(name), f"fleetward.toml has {name} = {getattr(stored.listeners, name)}",
                str(given[name]),
                f"edit [listeners] {name} in {layout.config_file}, or pass {_flag(name)} to "
                f"fleetward serve{note}"))
    for name in _CA_KEY_FLAGS:
        if name in given and given[name] != getattr(stored.ca, name):
            out.append(Difference(
                _flag(name), f"the CA keys were made with {name} = "
                             f"{getattr(stored.ca, name) or '(none)'}", str(given[name]),
                "the CA keys exist and init never replaces them; another key store needs a "
                "new data directory"))
    if "pkcs11_pin_file" in given and given["pkcs11_pin_file"] != stored.ca.pkcs11_pin_file:
        out.append(Difference(
            "--pkcs11-pin-file", f"fleetward.toml has {stored.ca.pkcs11_pin_file or '(none)'}",
            str(given["pkcs11_pin_file"]),
            f"edit [ca] pkcs11_pin_file in {layout.config_file} (or set "
            "FLEETWARD_PKCS11_PIN_FILE)"))
    imported = [name for name in _IMPORT_FLAGS if given.get(name)]
    if imported:
        out.append(Difference(
            _flag(imported[0]), "this data directory already has its CAs",
            ", ".join(str(given[name]) for name in imported),
            "import the CA into a new data directory"))
    database_url = given.get("database_url")
    if database_url and not stored.database.url_from_env:
        have_url = stored.database.url or f"sqlite:///{data_dir / 'fleetward.db'}"
        if database_url != have_url:
            out.append(Difference(
                "--database-url", f"the records are in {_safe_url(have_url)}",
                _safe_url(database_url),
                "init neither moves nor switches databases; serve uses [database] url in "
                "fleetward.toml (or FLEETWARD_DATABASE_URL)"))
    return out


def _ca_certificate(layout: DataDirLayout, name: str) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate((layout.certs / name).read_bytes())
    except (OSError, ValueError):
        return None


def _safe_url(url: str) -> str:
    """A database URL without its password (it is never printed)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL at all: print nothing of it
        return "(an unparsable URL)"
