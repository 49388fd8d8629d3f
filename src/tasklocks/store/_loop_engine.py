"""A SQLAlchemy ``AsyncEngine`` as the source of connections (``tasklocks.aio.connect(engine)``).

tasklocks' statements are blocking code that runs on the async table's worker thread; an
``AsyncEngine``'s connections are asyncio objects that only its event loop may drive.
:class:`LoopEngine` bridges the two: it is an ``Engine`` as ``_engine.py`` describes, which
``_sql_server.py`` borrows a connection from for each call, and each thing done with that
connection (the checkout, every statement and fetch, a pipeline, the return to the pool) is a
coroutine run on the loop while the worker waits for it. The loop never waits for the worker,
so this cannot deadlock; if the loop stops running (an application that ends without closing
the table), a call fails after ``IO_TIMEOUT`` seconds as a lost connection would.

Only psycopg 3 (``postgresql+psycopg://``) is bridged: the statements are psycopg's. An
aiosqlite engine names a file, which tasklocks opens itself (as with a blocking engine). Other
async drivers (asyncpg, aiomysql, asyncmy) speak other APIs: their engines are refused, and the
error says to pass the database URL instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from tasklocks.errors import BadURL

__all__ = ["AsyncEngine", "LoopEngine", "is_async_engine", "loop_engine"]

T = TypeVar("T")
IO_TIMEOUT = 30.0  # seconds a call waits for the loop to run it


class AsyncEngine(Protocol):
    """What tasklocks uses of a SQLAlchemy ``AsyncEngine``."""

    @property
    def sync_engine(self) -> Any: ...

    @property
    def url(self) -> Any: ...

    @property
    def dialect(self) -> Any: ...


def is_async_engine(value: object) -> bool:
    """Is ``value`` a SQLAlchemy ``AsyncEngine``?"""
    return hasattr(value, "sync_engine") and hasattr(value, "dialect")


def loop_engine(engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> LoopEngine | str:
    """What tasklocks opens for an ``AsyncEngine`` used on ``loop`` (call it on the loop's
    thread): a :class:`LoopEngine` (psycopg), or an SQLite URL (aiosqlite).
    :raises BadURL: another driver."""
    dialect, driver = engine.dialect.name, engine.dialect.driver
    if dialect == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            raise BadURL("an SQLite engine for tasklocks must name a file, not :memory:")
        return f"sqlite:///{database}"
    if dialect == "postgresql" and driver == "psycopg":
        return LoopEngine(engine, loop)
    fix = (
        "create it with a postgresql+psycopg:// URL"
        if dialect == "postgresql"
        else "pass tasklocks.aio.connect() the database URL instead (tasklocks then opens a "
        "connection of its own)"
    )
    raise BadURL(
        f"tasklocks.aio can borrow connections from an AsyncEngine on psycopg only, and this "
        f"{dialect} engine uses {driver}; {fix}"
    )


class _Loop:
    """Runs coroutines on the engine's loop for a thread that waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, error: type[Exception]) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # the loop's (made on it)
        self.error = error  # the driver's error for a connection that is gone

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise self.error("the event loop of the AsyncEngine is closed")
        if threading.get_ident() == self.thread:
            coro.close()
            raise RuntimeError("tasklocks ran an AsyncEngine's statement on its own loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(IO_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise self.error(
                f"the event loop of the AsyncEngine did not run a statement in {IO_TIMEOUT:g} s"
            ) from None


class _Cursor:
    """A psycopg ``AsyncCursor`` as a blocking cursor."""

    def __init__(self, loop: _Loop, cursor: Any) -> None:
        self._loop, self._cursor = loop, cursor

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> Any:
        return self._loop.run(self._cursor.fetchone())

    def fetchall(self) -> Any:
        return self._loop.run(self._cursor.fetchall())


class _Connection:
    """A psycopg ``AsyncConnection`` as the blocking ``Connection`` that ``postgres.py`` uses."""

    def __init__(self, loop: _Loop, conn: Any) -> None:
        self._loop, self._conn = loop, conn

    def execute(self, query: Any, params: Any = None) -> _Cursor:
        return _Cursor(self._loop, self._loop.run(self._conn.execute(query, params)))

    @contextmanager
    def pipeline(self) -> Iterator[None]:
        pipeline = self._conn.pipeline()
        self._loop.run(pipeline.__aenter__())
        try:
            yield
        except BaseException as exc:
            self._loop.run(pipeline.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        self._loop.run(pipeline.__aexit__(None, None, None))

    @property
    def autocommit(self) -> bool:
        return bool(self._conn.autocommit)

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._loop.run(self._conn.set_autocommit(value))

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    @property
    def broken(self) -> bool:
        return bool(self._conn.broken)

    def close(self) -> None:
        self._loop.run(self._conn.close())


class _Lent:
    """One connection of the engine's pool, lent for one call."""

    def __init__(self, loop: _Loop, pooled: Any) -> None:
        self._loop, self._pooled = loop, pooled
        self.driver_connection = _Connection(loop, pooled.driver_connection)

    def _in_greenlet(self, fn: Any) -> None:  # the pool's own code awaits the driver
        from sqlalchemy.util import greenlet_spawn

        self._loop.run(greenlet_spawn(fn))

    def close(self) -> None:
        self._in_greenlet(self._pooled.close)

    def invalidate(self) -> None:
        self._in_greenlet(self._pooled.invalidate)


class LoopEngine:
    """An ``AsyncEngine`` (psycopg) on ``loop``, as the blocking ``Engine`` of ``_engine.py``."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        import psycopg

        self._engine = engine
        self._loop = _Loop(loop, psycopg.OperationalError)
        self.url = engine.url
        self.dialect = engine.dialect

    def raw_connection(self) -> _Lent:
        engine: Any = self._engine
        return _Lent(self._loop, self._loop.run(engine.raw_connection()))
