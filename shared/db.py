"""SQLAlchemy async engine set-up shared by the scheduler's and the tracker's stores.

SQLite (aiosqlite) is the embedded default: WAL, NORMAL sync and a busy timeout
make one writer plus concurrent readers cheap. PostgreSQL (asyncpg) is used when
the URL says so, e.g. for several tracker replicas sharing one state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from leveret.errors import ConfigError


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; creates the SQLite file's directory if needed."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError for junk
        raise ConfigError(f"invalid database URL {url!r}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def insert_for(engine: AsyncEngine, table: Any) -> postgresql.Insert | sqlite.Insert:
    """A dialect-specific INSERT that supports ``on_conflict_do_nothing/update``."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
