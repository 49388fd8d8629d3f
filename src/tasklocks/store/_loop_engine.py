"""A SQLAlchemy ``AsyncEngine`` as the source of connections (``tasklocks.aio.connect(engine)``).

tasklocks' statements are blocking code that runs on the async table's worker thread; an
``AsyncEngine``'s connections are asyncio objects that only its event loop may drive.
:class:`LoopEngine` bridges the two: it is an ``Engine`` as ``_engine.py`` describes, which
``_sql_server.py`` borrows a connection from for each call, and each thing done with that
connection (the checkout, every statement and fetch, a pipeline, the return to the pool) is a
coroutine run on the loop while the worker waits for it. The loop never waits for the worker,
so this cannot deadlock; if the loop stops running (an application that ends without closing
the table), a call fails after ``IO_TIMEOUT`` seconds as a lost connection would.

The drivers bridged are the async forms of those tasklocks speaks: psycopg 3's
``AsyncConnection`` (``postgresql+psycopg://``) and aiomysql, PyMySQL's port to asyncio
(``mysql+aiomysql://``): the statements are psycopg's and PyMySQL's. An aiosqlite engine names a
file, which tasklocks opens itself (as with a blocking engine). Other async drivers (asyncpg,
asyncmy) speak other APIs: their engines are refused, and the error names the fix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Generic, Protocol, TypeVar

from tasklocks.errors import BadURL

__all__ = ["AsyncEngine", "LoopEngine", "loop_engine"]

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
    if (dialect, driver) in (("postgresql", "psycopg"), ("mysql", "aiomysql")):
        return LoopEngine(engine, loop)
    if dialect == "mariadb" and driver == "aiomysql":
        return LoopEngine(engine, loop)
    fix = (
        "create it with a postgresql+psycopg:// URL"
        if dialect == "postgresql"
        else "create it with a mysql+aiomysql:// URL"
        if dialect in ("mysql", "mariadb")
        else "use PostgreSQL, MariaDB/MySQL or SQLite"
    )
    raise BadURL(
        f"tasklocks.aio borrows connections from an AsyncEngine on psycopg or aiomysql, and this "
        f"{dialect} engine uses {driver}; {fix}, or pass tasklocks.aio.connect() the database "
        "URL (tasklocks then keeps a connection of its own)"
    )


async def _awaited(value: Awaitable[T]) -> T:
    return await value


async def _no_warnings(conn: Any) -> None:
    return None


class _Late(Generic[T]):
    """A call whose result, once its caller stopped waiting, goes to ``late`` instead. Both
    halves run on the loop, so exactly one of them sees the result: ``run`` when it comes after
    ``abandon``, ``abandon`` when it came before (while the caller's future was still on its way
    to say so)."""

    def __init__(self, late: Callable[[T], Coroutine[Any, Any, Any]]) -> None:
        self.late = late
        self.abandoned = False
        self.came: list[T] = []

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        result = await coro
        if self.abandoned:
            await self.late(result)
        else:
            self.came.append(result)
        return result

    def abandon(self) -> None:
        self.abandoned = True
        for result in self.came:
            task = asyncio.get_running_loop().create_task(self.late(result))
            _GIVING_BACK.add(task)  # (the loop keeps weak references to its tasks)
            task.add_done_callback(_GIVING_BACK.discard)


_GIVING_BACK: set[asyncio.Task[Any]] = set()


class _Loop:
    """Runs coroutines on the engine's loop for a thread that waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, error: Callable[[str], Exception]) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # the loop's (made on it)
        self.error = error  # the driver's error for a connection that is gone

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        late: Callable[[T], Coroutine[Any, Any, Any]] | None = None,
    ) -> T:
        """``coro``'s result, run on the loop; the driver's error after ``IO_TIMEOUT``. ``late``:
        what to do on the loop with a result that comes after the wait gave up (a connection
        the pool lends then goes back); such a call is not cancelled, and whether its result
        came in time is decided on the loop (``_Late``)."""
        if self.loop.is_closed():
            coro.close()
            raise self.error("the event loop of the AsyncEngine is closed")
        if threading.get_ident() == self.thread:
            coro.close()
            raise RuntimeError("tasklocks ran an AsyncEngine's statement on its own loop")
        box = None if late is None else _Late(late)
        future = asyncio.run_coroutine_threadsafe(coro if box is None else box.run(coro), self.loop)
        try:
            return future.result(IO_TIMEOUT)
        except concurrent.futures.TimeoutError:
            if box is None:
                future.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    self.loop.call_soon_threadsafe(box.abandon)
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

    def fetchone(self) -> Any:  # (aiomysql's returns a future, psycopg's a coroutine)
        return self._loop.run(_awaited(self._cursor.fetchone()))

    def fetchall(self) -> Any:
        return self._loop.run(_awaited(self._cursor.fetchall()))


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


class _MyCursor(_Cursor):
    """An aiomysql ``Cursor`` as a blocking PyMySQL cursor (buffered: rows come with replies)."""

    @property
    def lastrowid(self) -> Any:
        return self._cursor.lastrowid

    def execute(self, query: str, args: Any = None) -> int:
        return int(self._loop.run(self._cursor.execute(query, args)))

    def nextset(self) -> Any:
        return self._loop.run(self._cursor.nextset())


class _MyConnection:
    """An aiomysql ``Connection`` as the blocking PyMySQL connection that ``mysql.py`` uses."""

    def __init__(self, loop: _Loop, conn: Any) -> None:
        self._loop, self._conn = loop, conn
        self.server_version = conn.get_server_info()

    def cursor(self) -> _MyCursor:
        cursor = self._loop.run(_awaited(self._conn.cursor()))
        # aiomysql turns the server's notes ("Table ... already exists" after CREATE TABLE IF
        # NOT EXISTS) into Python warnings, at one more round trip each; PyMySQL does not.
        cursor._show_warnings = _no_warnings
        return _MyCursor(self._loop, cursor)

    def escape(self, value: Any) -> Any:  # no I/O: the session's charset and flags
        return self._conn.escape(value)

    @property
    def open(self) -> bool:  # (PyMySQL's: whether the connection is still there)
        return not self._conn.closed

    @property
    def server_status(self) -> int:
        return int(self._conn.server_status)

    @property
    def charset(self) -> str:
        return str(self._conn.charset)

    @property
    def client_flag(self) -> int:
        return int(self._conn.client_flag)

    def get_autocommit(self) -> bool:
        return bool(self._conn.get_autocommit())

    def autocommit(self, value: bool) -> None:
        self._loop.run(self._conn.autocommit(value))

    def ping(self, reconnect: bool = False) -> None:
        self._loop.run(self._conn.ping(reconnect))

    def commit(self) -> None:
        self._loop.run(self._conn.commit())

    def rollback(self) -> None:
        self._loop.run(self._conn.rollback())


class _Lent:
    """One connection of the engine's pool, lent for one call."""

    def __init__(self, loop: _Loop, pooled: Any, mysql: bool) -> None:
        self._loop, self._pooled = loop, pooled
        facade = _MyConnection if mysql else _Connection
        self.driver_connection = facade(loop, pooled.driver_connection)

    def _in_greenlet(self, fn: Any) -> None:  # the pool's own code awaits the driver
        from sqlalchemy.util import greenlet_spawn

        self._loop.run(greenlet_spawn(fn))

    def close(self) -> None:
        self._in_greenlet(self._pooled.close)

    def invalidate(self) -> None:
        self._in_greenlet(self._pooled.invalidate)


class LoopEngine:
    """An ``AsyncEngine`` (psycopg, aiomysql) on ``loop``, as the blocking ``Engine`` of
    ``_engine.py``."""

    # tasklocks' own connections (the sessions', LISTEN) are opened from the engine's URL: its
    # connections live on the loop, and a renewal must not wait for the loop.
    makes_own_connections = False

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._mysql = engine.dialect.name != "postgresql"
        error: Callable[[str], Exception]
        if self._mysql:
            import pymysql

            error = functools.partial(pymysql.err.OperationalError, 2013)  # lost connection
        else:
            import psycopg

            error = psycopg.OperationalError
        self._loop = _Loop(loop, error)
        self.url = engine.url
        # As ``_engine.py`` checks it: the statements are those of the blocking driver.
        driver = "pymysql" if self._mysql else "psycopg"
        self.dialect = SimpleNamespace(name=engine.dialect.name, driver=driver)

    def raw_connection(self) -> _Lent:
        from sqlalchemy.util import greenlet_spawn

        engine: Any = self._engine
        pooled = self._loop.run(
            engine.raw_connection(), late=lambda lent: greenlet_spawn(lent.close)
        )
        return _Lent(self._loop, pooled, self._mysql)
