"""SQLAlchemy async engine set-up shared by the scheduler's and the tracker's stores.

SQLite (aiosqlite) is the embedded default: WAL, NORMAL sync and a busy timeout
make one writer plus concurrent readers cheap. PostgreSQL (asyncpg) is used when
the URL says so, e.g. for several tracker replicas sharing one state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    MetaData,
    TypeDecorator,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from leveret.errors import ConfigError, StoreError, StoreUnavailable


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


#: SQLSTATE prefixes of PostgreSQL failures worth waiting out: connection exceptions,
#: insufficient resources (too many connections), operator intervention (shutdown, cannot
#: connect now), serialization failure, deadlock.
_TRANSIENT_SQLSTATES = ("08", "53", "57P", "40001", "40P01")


def is_transient(exc: BaseException) -> bool:
    """True for database failures worth waiting out: unreachable, locked, connection lost,
    or a server that refuses new sessions for now (database not accepting connections,
    renamed away, shutting down, out of connections)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        # No statement: it failed while connecting, before anything ran.
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return (
            exc.connection_invalidated
            or exc.statement is None
            or sqlstate.startswith(_TRANSIENT_SQLSTATES)
        )
    return isinstance(exc, OSError | TimeoutError)


@contextmanager
def map_db_errors() -> Iterator[None]:
    """The database boundary: SQLAlchemy and driver errors raised inside become
    :class:`StoreUnavailable` (transient, see :func:`is_transient`) or :class:`StoreError`."""
    try:
        yield
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise StoreUnavailable(f"database unavailable: {_first_line(exc)}") from exc
        raise StoreError(f"database error: {_first_line(exc)}") from exc
    except (OSError, TimeoutError) as exc:  # the driver failing below SQLAlchemy
        raise StoreUnavailable(f"database unavailable: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


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


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect (naive input is taken as UTC).

    SQLite stores it naive, in a form that sorts and compares as text correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC; SQLite stores it naive."""
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back aware, in UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Key of the PostgreSQL advisory lock that serialises schema upgrades ("levs").
_SCHEMA_LOCK = 0x6C657673


def add_missing_columns(conn: Connection, metadata: MetaData) -> None:
    """Create missing tables, then the nullable columns and indexes added since
    (a database made by an older version is brought up to date; nothing is dropped).

    On PostgreSQL replicas starting together take turns (a transaction-level advisory
    lock): concurrent CREATE TABLEs of the same name fail rather than wait.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
    metadata.create_all(conn)
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn, checkfirst=True)
