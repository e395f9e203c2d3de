"""SQL storage: schema, migrations and repositories. Nothing outside store/ writes SQL."""

from fleetward.store.db import Database

__all__ = ["Database"]
