"""SQLAlchemy async engine set-up shared by the scheduler's and the tracker's stores.

SQLite (aiosqlite) is the embedded default: WAL, NORMAL sync and a busy timeout
make one writer plus concurrent readers cheap. PostgreSQL (asyncpg) is used when
the URL says so, e.g. for several tracker replicas sharing one state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger
from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    MetaData,
    TypeDecorator,
    event,
    inspect,
    text,
)
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

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


T = TypeVar("T")
R = TypeVar("R")


class Transactions:
    """Runs a write transaction as one synchronous function of a `Connection`.

    Through the async engine every statement is a trip to aiosqlite's thread and back
    (and a greenlet switch): a transaction of six small statements costs a few
    milliseconds of CPU, which at light load is most of a task's cost. On SQLite a
    transaction here is one trip instead: the whole function runs in a thread of its
    own on a synchronous engine over the same file (WAL: readers on the async engine
    are not blocked). On PostgreSQL the same function runs through the async engine
    (``run_sync``), statement by statement as before.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sync: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._sync = create_sync_engine(
                engine.url.set(drivername="sqlite"), connect_args={"timeout": 30}
            )
            event.listen(self._sync, "connect", _sqlite_pragmas)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="leveret-db")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` in one transaction, committed if it returns."""
        if self._sync is not None and self._thread is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._thread, self._in_thread, fn, args)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        assert self._sync is not None
        with self._sync.begin() as conn:
            return fn(conn, *args)

    async def close(self) -> None:
        """Release the synchronous engine and its thread."""
        if self._sync is not None and self._thread is not None:
            thread, engine = self._thread, self._sync
            await asyncio.get_running_loop().run_in_executor(thread, engine.dispose)
            thread.shutdown(wait=True)
            self._sync = self._thread = None


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


def insert_for(engine: AsyncEngine | Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
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


async def until_stored(write: Callable[[], Awaitable[R]], what: str) -> R:
    """`write()`, again and again with jittered exponential backoff while the database
    is unavailable (:class:`~leveret.errors.StoreUnavailable`); any other error is
    raised at once. `what` names the write in the log."""
    async for attempt in AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
        retry=retry_if_exception_type(StoreUnavailable),
        before_sleep=lambda state: _log_retry(state, what),
        reraise=True,
    ):
        with attempt, map_db_errors():
            return await write()
    raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: RetryCallState, what: str) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.opt(exception=exc).error("{} failed; retrying in {:.2f}s", what, wait)
