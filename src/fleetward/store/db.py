"""Engine creation, transactions and migrations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError

from fleetward.errors import StorageError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
log = structlog.get_logger("fleetward.store")


class Database:
    """An engine plus the one way to run a transaction on it."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: Engine = _create_engine(url, echo=echo)
        # Called on the committing thread after each successful ``transaction()``.
        self.on_commit: Callable[[], None] | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A read-write transaction; commits on success, rolls back on any error.

        On SQLite it starts with BEGIN IMMEDIATE so that two writers never both read
        the audit chain head and then race to append (SQLite's deferred BEGIN would
        fail one of them with SQLITE_BUSY on upgrade instead of waiting).
        """
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise _storage_error(exc) from exc
        if self.on_commit is not None:
            self.on_commit()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only unit of work (on SQLite a deferred BEGIN: readers never queue)."""
        try:
            with self.engine.connect().execution_options(fleetward_read_only=True) as conn:
                yield conn
        except OperationalError as exc:
            raise _storage_error(exc) from exc

    def migrate(self) -> None:
        """Apply every Alembic migration not yet applied (idempotent)."""
        with self.engine.begin() as conn:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def _storage_error(exc: OperationalError) -> StorageError:
    # The driver's text names hosts, ports and paths: it goes to the log, not to callers.
    log.error("database operation failed", error=str(exc.orig))
    return StorageError("the database is unavailable or failed")


def _create_engine(url: str, *, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so BEGIN IMMEDIATE is ours to send.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # FULL: every commit is fsynced. With NORMAL a power loss can roll back a
            # certificate already handed to a client, leaving a valid certificate that the
            # registry cannot revoke and the audit log never saw (SQLite WAL docs, §"Performance
            # Considerations"). Costs ≈ 30 % of issuance throughput; see docs/performance.md.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            read_only = conn.get_execution_options().get("fleetward_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, echo=echo, pool_pre_ping=True)
