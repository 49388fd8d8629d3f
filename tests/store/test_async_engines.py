"""``tasklocks.aio.connect(engine)``: a SQLAlchemy AsyncEngine's pool lends its connections.

With psycopg or aiomysql, every call of the async table borrows one connection of the pool and
gives it back; the table's worker thread drives it through the engine's event loop
(``store/_loop_engine.py``).
An aiosqlite engine names a file. Other async drivers are refused with the fix named.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import urllib.parse
import uuid
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from conftest import delete_rows, pg_url_without_host, raw_sql, require, server_url

import tasklocks
import tasklocks.aio as aio
from tasklocks.errors import BadURL, StoreError, StoreUnavailable

sa = pytest.importorskip("sqlalchemy")
sa_async = pytest.importorskip("sqlalchemy.ext.asyncio")
APP = "tasklocks-async-engine-test"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _engine(backend: str, **pool: Any) -> Any:
    url = server_url(backend)
    if backend == "postgresql":
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
        return sa_async.create_async_engine(url, connect_args={"application_name": APP}, **pool)
    url = url.replace("mysql://", "mysql+aiomysql://", 1)
    return sa_async.create_async_engine(url + "?charset=utf8mb4", **pool)


# per backend: the connection's id, and how to end it from outside
ENDS = {
    "postgresql": ("SELECT pg_backend_pid()", "SELECT pg_terminate_backend(%s)"),
    "mysql": ("SELECT CONNECTION_ID()", "KILL %s"),
}


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_the_async_engines_pool_lends_every_call_and_gets_it_back(
    backend: str, namespace: str
) -> None:
    require(backend)
    if backend == "mysql":
        pytest.importorskip("aiomysql")

    async def main() -> tuple[list[int], list[int]]:
        engine = _engine(backend, pool_size=2, max_overflow=0, pool_timeout=5)
        out, back = [], []
        sa.event.listen(engine.sync_engine, "checkout", lambda *a: out.append(1))
        sa.event.listen(engine.sync_engine, "checkin", lambda *a: back.append(1))
        tables: list[aio.AsyncLockTable] = []
        try:
            tables += [await aio.connect(engine, namespace) for _ in range(4)]
            first = await tables[0].acquire("a")
            assert engine.pool.checkedout() == 0
            order: list[str] = []

            async def one(t: aio.AsyncLockTable) -> None:
                async with t.hold("a", timeout=20) as lease:
                    order.append(lease.owner)

            waiters = [asyncio.create_task(one(t)) for t in tables[1:]]
            while len(await tables[0].waiting()) < 3:  # four tables on a pool of two
                await asyncio.sleep(0.01)
            samples = []
            for _ in range(50):  # while they wait: a connection is out only during a call
                samples.append(engine.pool.checkedout())
                await asyncio.sleep(0.01)
            assert samples.count(0) >= 25, samples
            await first.release()
            await asyncio.wait_for(asyncio.gather(*waiters), 20)
            assert len(order) == 3
            assert await tables[0].held() == []
            # The server ends the pool's connections: the next call gets another.
            ident, end = ENDS[backend]
            async with engine.connect() as c1, engine.connect() as c2:
                ids = [(await c.exec_driver_sql(ident)).scalar() for c in (c1, c2)]
            for conn_id in ids:
                raw_sql(server_url(backend), end, (conn_id,))
            async with tables[0].hold("a") as lease:
                assert lease.token > 0
        finally:
            for t in tables:
                await t.close()
            assert engine.pool.checkedout() == 0
            await engine.dispose()
        return out, back

    out, back = run(main())
    assert len(out) > 10 and len(out) == len(back)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_connection_lent_as_the_wait_for_it_gave_up_goes_back_to_the_pool(
    backend: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker waits 30 s for the loop to lend a connection; one lent just as that wait gave
    up was dropped on the floor, and a pool of one lent nothing any more. It now goes back.
    (The race is made here: the first checkout's wait gives up once the checkout is done.)"""
    require(backend)
    if backend == "mysql":
        pytest.importorskip("aiomysql")
    real = asyncio.run_coroutine_threadsafe
    tricked: list[bool] = []

    class GaveUp:
        def __init__(self, future: concurrent.futures.Future[Any]) -> None:
            self.future = future

        def result(self, timeout: float | None = None) -> Any:
            if timeout is not None and not tricked:
                self.future.exception()  # (until the checkout is done)
                tricked.append(True)
                raise concurrent.futures.TimeoutError
            return self.future.result(timeout)

        def cancel(self) -> bool:
            return self.future.cancel()

        def exception(self, timeout: float | None = None) -> BaseException | None:
            return self.future.exception(timeout)

    def threadsafe(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        future = real(coro, loop)
        checkout = getattr(coro, "cr_code", None) is not None and (
            coro.cr_code.co_qualname == "_Late.run"  # (only the checkouts have a late)
        )
        return GaveUp(future) if checkout else future

    async def main() -> None:
        engine = _engine(backend, pool_size=1, max_overflow=0, pool_timeout=2)
        table = await aio.connect(engine, namespace, reconnect_timeout=5)
        try:
            monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", threadsafe)
            assert await table.held() == []  # its first checkout gave up; it tried again
            assert tricked == [True]
            deadline = time.monotonic() + 5
            while engine.pool.checkedout() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.pool.checkedout() == 0
        finally:
            monkeypatch.undo()
            await table.close()
            await engine.dispose()

    run(main())


@pytest.mark.parametrize("blocking", [False, True])
def test_a_result_that_comes_after_the_wait_gave_up_goes_to_late(
    blocking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_Loop.run(coro, late=...)``: a checkout that ends after the worker stopped waiting
    (``blocking=False``), or as it stopped, while the loop was busy and the worker's future had
    not heard yet (``blocking=True``: the gap in which ``cancel()`` still succeeded and the
    result was thrown away), is handed to ``late``, once."""
    from tasklocks.store import _loop_engine

    monkeypatch.setattr(_loop_engine, "IO_TIMEOUT", 0.05)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        runner = _loop_engine._Loop(loop, RuntimeError)
        runner.thread = thread.ident or 0
        got: list[str] = []

        async def lend() -> str:
            if blocking:
                time.sleep(0.2)  # the loop is busy past the worker's wait
            else:
                await asyncio.sleep(0.2)
            return "conn"

        async def back(conn: str) -> None:
            got.append(conn)

        with pytest.raises(RuntimeError, match="did not run a statement"):
            runner.run(lend(), late=back)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert got == ["conn"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_an_aiosqlite_engine_names_its_file(tmp_path: Path, namespace: str) -> None:
    pytest.importorskip("aiosqlite")
    path = tmp_path / "locks.db"

    async def main() -> None:
        engine = sa_async.create_async_engine(f"sqlite+aiosqlite:///{path}")
        try:
            async with await aio.connect(engine, namespace) as t, t.hold("a"):
                with tasklocks.connect(f"sqlite:///{path}", namespace) as other:
                    assert [h.name for h in other.held()] == ["a"]
        finally:
            await engine.dispose()

    run(main())


@pytest.mark.parametrize(
    ("dialect", "driver", "fix"),
    [
        ("postgresql", "asyncpg", "create it with a postgresql+psycopg:// URL"),
        ("mysql", "asyncmy", "create it with a mysql+aiomysql:// URL"),
        ("oracle", "oracledb_async", "use PostgreSQL, MariaDB/MySQL or SQLite"),
    ],
)
def test_other_async_drivers_are_refused_with_the_fix(dialect: str, driver: str, fix: str) -> None:
    engine = SimpleNamespace(
        sync_engine=None, url=None, dialect=SimpleNamespace(name=dialect, driver=driver)
    )

    async def main() -> None:
        with pytest.raises(BadURL) as refused:
            await aio.connect(engine)
        assert driver in str(refused.value) and fix in str(refused.value)
        assert "pass tasklocks.aio.connect() the database URL" in str(refused.value)

    run(main())


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"])
def test_an_async_connection_is_refused_naming_its_engine(
    backend: str, tmp_path: Path, namespace: str
) -> None:
    """An ``AsyncConnection`` has a ``sync_engine`` as an ``AsyncEngine`` does: it was taken for
    one, and connect() failed with AttributeError ('AsyncConnection' object has no attribute
    'url'). A Connection, a Session and an AsyncSession were refused with BadURL."""
    if backend == "sqlite":
        pytest.importorskip("aiosqlite")
    else:
        require(backend)
    if backend == "mysql":
        pytest.importorskip("aiomysql")

    async def main() -> None:
        if backend == "sqlite":
            engine = sa_async.create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'locks.db'}")
        else:
            engine = _engine(backend)
        try:
            async with engine.connect() as conn:
                with pytest.raises(BadURL) as refused:
                    await aio.connect(conn, namespace)
            message = str(refused.value)
            assert "not AsyncConnection" in message and "pass the AsyncEngine" in message
            async with engine.connect() as conn:  # the blocking connect(): not an AsyncEngine
                with pytest.raises(BadURL) as blocking:
                    tasklocks.connect(conn, namespace)
            assert str(blocking.value) == (
                "a database URL or a SQLAlchemy Engine was expected, not AsyncConnection"
            )
            async with await aio.connect(engine, namespace) as t:  # the fix works
                assert await t.held() == []
        finally:
            await engine.dispose()

    run(main())


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_an_async_engine_whose_url_does_not_reach_the_database_fails_connect(
    backend: str,
) -> None:
    """tasklocks' own connections (the sessions', LISTEN) come from the AsyncEngine's URL: an
    engine whose connections come from its ``async_creator`` alone connected, and the first
    acquisition failed after ``reconnect_timeout`` naming a host the application never uses.
    ``connect()`` now fails, saying so."""
    require(backend)
    if backend == "mysql":
        aiomysql = pytest.importorskip("aiomysql")
    real = sa.engine.make_url(server_url(backend))

    async def make() -> Any:
        if backend == "postgresql":
            import psycopg

            return await psycopg.AsyncConnection.connect(
                host=real.host, port=real.port, user=real.username, dbname=real.database
            )
        return await aiomysql.connect(
            host=real.host, port=real.port or 3306, user=real.username, db=real.database
        )

    driver = "postgresql+psycopg" if backend == "postgresql" else "mysql+aiomysql"

    async def main() -> None:
        engine = sa_async.create_async_engine(
            f"{driver}://nobody@127.0.0.1:1/nothing", async_creator=make
        )
        try:
            async with engine.connect() as conn:  # the engine itself works
                assert (await conn.exec_driver_sql("SELECT 1")).scalar() == 1
            with pytest.raises(StoreUnavailable) as refused:
                await aio.connect(engine, reconnect_timeout=0.5)
            message = str(refused.value)
            assert "from the AsyncEngine's URL, without its connect_args or async_creator" in (
                message
            )
            assert "127.0.0.1:1" in message and "\n" not in message
        finally:
            await engine.dispose()

    run(main())


def test_an_async_engine_whose_url_reaches_another_database_fails_connect() -> None:
    """The engine's URL names a database without the lock table (PostgreSQL's ``postgres``,
    which the tests never write) while its ``async_creator`` reaches the tests' one: the
    sessions would have lived elsewhere, or failed at the first acquisition."""
    require("postgresql")
    import psycopg

    real = sa.engine.make_url(server_url("postgresql"))

    async def make() -> Any:
        return await psycopg.AsyncConnection.connect(
            host=real.host, port=real.port, user=real.username, dbname=real.database
        )

    async def main() -> None:
        url = f"postgresql+psycopg://{real.username}@{real.host}:{real.port or 5432}/postgres"
        engine = sa_async.create_async_engine(url, async_creator=make)
        try:
            with pytest.raises(StoreError) as refused:
                await aio.connect(engine, reconnect_timeout=0.5)
            message = str(refused.value)
            assert "from the AsyncEngine's URL" in message and "tasklocks_sessions" in message
        finally:
            await engine.dispose()

    run(main())


@pytest.mark.parametrize(
    ("backend", "where"),
    [("postgresql", "url"), ("postgresql", "connect_args"), ("mysql", "connect_args")],
)
def test_an_async_engine_whose_connections_see_other_lock_tables_is_refused_at_connect(
    backend: str, where: str, namespace: str
) -> None:
    """The engine's connections reach another schema (a search_path in the URL's options= or
    in connect_args) or database (MariaDB's db in connect_args) than tasklocks' own connections,
    opened from its URL alone, and both have lock tables: the locks lived in one, the sessions
    that renew them in the other, and every other process saw them expired and took them.
    ``connect()`` now refuses, saying so; the same settings in a blocking engine, which makes
    tasklocks' own connections too, work."""
    require(backend)
    if backend == "mysql":
        pytest.importorskip("aiomysql")
    url = server_url(backend)
    tasklocks.connect(url, namespace).close()  # (the tables where its URL alone leads)
    other = "tl_" + uuid.uuid4().hex[:12]
    kind = "SCHEMA" if backend == "postgresql" else "DATABASE"
    if backend == "postgresql":
        driver = url.replace("postgresql://", "postgresql+psycopg://", 1)
        search_path = f"-c search_path={other}"
        blocking = sa.create_engine(driver, connect_args={"options": search_path})
        args = {"options": search_path} if where == "connect_args" else {}
        sep = "&" if "?" in driver else "?"
        quoted = urllib.parse.quote(search_path.replace(" ", ""), safe="")
        async_url = driver if args else f"{driver}{sep}options={quoted}"
    else:
        from pymysql.constants import CLIENT

        driver = url.replace("mysql://", "mysql+pymysql://", 1) + "?charset=utf8mb4"
        flags = {"client_flag": CLIENT.MULTI_STATEMENTS}
        blocking = sa.create_engine(driver, connect_args={**flags, "database": other})
        args = {"db": other}
        async_url = driver.replace("+pymysql", "+aiomysql", 1)

    async def main() -> None:
        engine = sa_async.create_async_engine(async_url, connect_args=args)
        try:
            with pytest.raises(StoreUnavailable) as refused:
                await aio.connect(engine, namespace, reconnect_timeout=0.5)
        finally:
            await engine.dispose()
        message = str(refused.value)
        assert "the engine's connections see other tasklocks tables" in message
        assert "name the database in the URL, not in connect_args" in message
        assert "\n" not in message
        assert "and that failed" not in message  # (not wrapped as if nothing was reached)

    raw_sql(url, f"CREATE {kind} {other}")
    try:
        with tasklocks.connect(blocking, namespace) as watcher:  # its tables, in `other`
            with watcher.acquire("a") as lease:
                assert [(h.name, h.liveness.value) for h in watcher.held()] == [("a", "alive")]
                assert lease.token > 0
            run(main())
    finally:
        blocking.dispose()
        raw_sql(url, f"DROP {kind} {other}" + (" CASCADE" if kind == "SCHEMA" else ""))


def test_the_blocking_connect_refuses_an_async_engine() -> None:
    engine = sa_async.create_async_engine("sqlite+aiosqlite:///unused.db")
    with pytest.raises(BadURL, match=r"AsyncEngine is for tasklocks\.aio\.connect"):
        tasklocks.connect(engine)


def test_an_engine_without_a_host_is_libpqs_default_host_for_tasklocks_too(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine made from ``postgresql+psycopg://user@/db`` reaches libpq's default host (its
    Unix socket here): an AsyncEngine's own connections (the sessions', LISTEN), opened from its
    URL, went to 127.0.0.1 over TCP instead, which may sign in otherwise or be another server;
    a blocking engine's store was named ``postgresql://user@127.0.0.1/db``."""
    require("postgresql")
    no_host = pg_url_without_host(server_url("postgresql"))
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    driver = no_host.replace("postgresql://", "postgresql+psycopg://", 1)

    blocking = sa.create_engine(driver)
    try:
        table = tasklocks.connect(blocking, namespace)
        assert table.store.url == no_host
        table.acquire("job").release()
        table.close()
    finally:
        blocking.dispose()

    def client_address(table: aio.AsyncLockTable) -> list[Any]:  # (of tasklocks' own connection)
        store: Any = table.table.store
        side = store._sessions_store()
        return list(side._locked(lambda c, _: c.execute("SELECT inet_client_addr()").fetchall()))

    async def main() -> None:
        engine = sa_async.create_async_engine(driver)
        try:
            table = await aio.connect(engine, namespace)
            try:
                await (await table.acquire("job")).release()
                assert client_address(table) == [(None,)]  # the Unix socket, not TCP
            finally:
                await table.close()
        finally:
            await engine.dispose()

    try:
        run(main())
    finally:
        delete_rows(server_url("postgresql"), namespace)
