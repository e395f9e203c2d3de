"""The Alembic migrations and store/schema.py describe the same database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fleetward.store import Database
from fleetward.store.schema import metadata


def test_migrated_database_matches_the_schema_module(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    try:
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(context, metadata)
    finally:
        db.dispose()
    # Negative control lives in the assertion message: any drift is listed op by op.
    assert diff == [], "\n".join(map(str, diff))
