"""``tasklocks.connect(engine)``: a SQLAlchemy Engine's pool lends tasklocks its connections.

Each call borrows one connection and gives it back (autocommit as it was, no transaction open),
so a small pool serves many waiting tables, and the application's own use of the pool is
undisturbed.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_BACKENDS, raw_rows, raw_sql, require, server_url

import tasklocks
from tasklocks import LockHeld
from tasklocks.errors import BadURL, StoreUnavailable

sa = pytest.importorskip("sqlalchemy")
APP = "tasklocks-engine-test"  # the application_name of the engines' PostgreSQL connections
WAIT = 20.0
CHECKOUTS: dict[int, list[int]] = {}  # per engine: one item per connection its pool lent


def _engine(backend: str, **pool: Any) -> Any:
    url = server_url(backend)
    if backend == "postgresql":
        return sa.create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1),
            connect_args={"application_name": APP},
            **pool,
        )
    from pymysql.constants import CLIENT

    sep = "&" if "?" in url else "?"
    return sa.create_engine(
        url.replace("mysql://", "mysql+pymysql://", 1) + f"{sep}charset=utf8mb4",
        connect_args={"client_flag": CLIENT.MULTI_STATEMENTS},
        **pool,
    )


@pytest.fixture(params=SERVER_BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    require(request.param)
    eng = _engine(request.param, pool_size=2, max_overflow=0, pool_timeout=5)
    checkouts = CHECKOUTS.setdefault(id(eng), [])
    sa.event.listen(eng, "checkout", lambda *a: checkouts.append(1))
    try:
        yield eng
    finally:
        eng.dispose()


def test_the_engines_pool_lends_every_connection(engine: Any, namespace: str) -> None:
    with tasklocks.connect(engine, namespace=namespace) as table:
        before = len(CHECKOUTS[id(engine)])
        with table.acquire("a", owner="task:1") as lease:
            assert [h.name for h in table.held()] == ["a"]
            with pytest.raises(LockHeld):
                table.acquire("a", owner="task:2")
        assert lease.token >= 1
        assert len(CHECKOUTS[id(engine)]) >= before + 4  # one per call
        assert engine.pool.checkedout() == 0  # every one given back
    lent = len(CHECKOUTS[id(engine)])
    with pytest.raises(StoreUnavailable, match="was closed; open it again"):
        table.held()  # a closed table borrows nothing more from the pool
    assert len(CHECKOUTS[id(engine)]) == lent
    with engine.connect() as conn:  # the application finds its pool as it left it
        driver = conn.connection.driver_connection
        on = driver.get_autocommit() if hasattr(driver, "get_autocommit") else driver.autocommit
        assert on is False
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        conn.rollback()


def _count_under_lock(engine: Any, namespace: str, counter: Path, worker: int) -> None:
    with tasklocks.connect(engine, namespace=namespace) as table:
        for i in range(25):
            with table.hold(f"n{(worker + i) % 2}", owner=f"task:{worker}", timeout=WAIT):
                path = counter.with_suffix(f".n{(worker + i) % 2}")
                value = int(path.read_text())
                time.sleep(0.001)
                path.write_text(str(value + 1))


def test_six_waiting_tables_share_a_pool_of_two(
    engine: Any, namespace: str, tmp_path: Path
) -> None:
    """No connection is kept between calls, nor while waiting: six tables that wait for each
    other's locks share two connections (a pool that ran out would raise after 5 s)."""
    counter = tmp_path / "counter"
    for n in ("n0", "n1"):
        counter.with_suffix(f".{n}").write_text("0")
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _count_under_lock(engine, namespace, counter, worker)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    total = sum(int(counter.with_suffix(f".{n}").read_text()) for n in ("n0", "n1"))
    assert total == 6 * 25
    assert engine.pool.checkedout() == 0


ENDS = {  # per backend: a connection's id, and how to end it from outside
    "postgresql": ("SELECT pg_backend_pid()", "SELECT pg_terminate_backend(%s)"),
    "mysql": ("SELECT CONNECTION_ID()", "KILL %s"),
}


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_connection_the_server_ended_is_dropped_from_the_pool(
    backend: str, namespace: str
) -> None:
    """The server ends every connection of the engine between two calls: the next call finds
    its connection dead, the pool forgets it, and the call goes on with a new one (PyMySQL
    finds it dead as tasklocks turns autocommit on, psycopg at the first statement)."""
    require(backend)
    engine = _engine(backend, pool_size=2, max_overflow=0)
    try:
        with tasklocks.connect(engine, namespace=namespace) as table:
            table.acquire("a", owner="task:1").release()
            ident, end = ENDS[backend]
            with engine.connect() as c1, engine.connect() as c2:
                ids = [c.exec_driver_sql(ident).scalar() for c in (c1, c2)]
            for conn_id in ids:
                raw_sql(server_url(backend), end, (conn_id,))
            with table.acquire("a", owner="task:1") as lease:
                assert lease.token > 0
            assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_postgresql_waiters_are_still_notified(namespace: str) -> None:
    require("postgresql")
    engine = _engine("postgresql", pool_size=2, max_overflow=0)
    try:
        with (
            tasklocks.connect(engine, namespace=namespace) as holder,
            tasklocks.connect(engine, namespace=namespace) as waiter,
        ):
            lease = holder.acquire("a", owner="task:1")
            got: list[float] = []
            thread = threading.Thread(
                target=lambda: got.append(
                    time.monotonic()
                    + 0 * waiter.acquire("a", owner="task:2", wait=True, timeout=WAIT).token
                )
            )
            thread.start()
            deadline = time.monotonic() + WAIT
            while not holder.waiting() and time.monotonic() < deadline:
                time.sleep(0.01)
            released = time.monotonic()
            lease.release()
            thread.join(WAIT)
            assert got and got[0] - released < 0.5  # LISTEN, not the 1 s re-read
    finally:
        engine.dispose()


def _made_engine(backend: str, app: str = APP) -> Any:
    """An engine whose URL reaches no server: its connections come from ``creator`` alone (as
    for one whose password, TLS or host is only in ``connect_args`` or a creator); on
    PostgreSQL they are named ``app``."""
    url = server_url(backend)
    if backend == "postgresql":
        import psycopg

        return sa.create_engine(
            "postgresql+psycopg://nobody@tasklocks-nowhere.invalid:1/nothing",
            creator=lambda: psycopg.connect(url, application_name=app),
            pool_size=2,
            max_overflow=0,
        )
    import pymysql
    from pymysql.constants import CLIENT

    p = sa.engine.make_url(url)
    return sa.create_engine(
        "mysql+pymysql://nobody@tasklocks-nowhere.invalid:1/nothing?charset=utf8mb4",
        creator=lambda: pymysql.connect(
            host=p.host,
            port=p.port or 3306,
            user=p.username,
            password=p.password or "",
            database=p.database,
            charset="utf8mb4",
            client_flag=CLIENT.MULTI_STATEMENTS,
        ),
        pool_size=2,
        max_overflow=0,
    )


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_the_sessions_and_listen_connections_are_made_by_the_engine(
    backend: str, namespace: str
) -> None:
    """tasklocks' own connections (the sessions', PostgreSQL's LISTEN) are made by the engine,
    as it makes its pool's, then detached from the pool: not from the engine's URL, which here
    reaches nothing. The pool lends them to no one else."""
    require(backend)
    engine = _made_engine(backend)
    try:
        with (
            tasklocks.connect(engine, namespace=namespace) as holder,
            tasklocks.connect(engine, namespace=namespace) as waiter,
        ):
            lease = holder.acquire("a", owner="task:1")  # opens this process's session
            assert lease.session is not None and lease.session.alive()
            got: list[int] = []
            thread = threading.Thread(
                target=lambda: got.append(
                    waiter.acquire("a", owner="task:2", wait=True, timeout=WAIT).token
                )
            )
            thread.start()
            deadline = time.monotonic() + WAIT
            while not holder.waiting() and time.monotonic() < deadline:
                time.sleep(0.01)
            if backend == "postgresql":  # the waiter listens on a connection the engine made
                listening = raw_rows(
                    server_url(backend),
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
                    (APP,),
                )
                assert listening[0][0] >= 1
            lease.release()
            thread.join(WAIT)
            assert got and got[0] > lease.token
            assert engine.pool.checkedout() == 0  # the pool lent its own back, kept none
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_an_engine_whose_connections_see_different_lock_tables_is_refused(
    backend: str, namespace: str
) -> None:
    """An engine whose connections do not all reach the same tables (here a creator that takes
    turns between two schemas or databases, as one over several hosts may): the sessions'
    connection, which it made, wrote where the pool's connections did not read, and the locks
    looked expired to every other process. The first session now refuses, saying so."""
    require(backend)
    url = server_url(backend)
    tasklocks.connect(url, namespace).close()  # (the tables where the URL leads)
    other = "tl_" + uuid.uuid4().hex[:12]
    kind = "SCHEMA" if backend == "postgresql" else "DATABASE"
    raw_sql(url, f"CREATE {kind} {other}")
    turns = itertools.cycle([None, other])
    p = sa.engine.make_url(url)
    if backend == "postgresql":
        import psycopg

        def make() -> Any:
            there = next(turns)
            return psycopg.connect(url, options=f"-c search_path={there}" if there else "")

        driver = "postgresql+psycopg://"
    else:
        import pymysql
        from pymysql.constants import CLIENT

        def make() -> Any:
            return pymysql.connect(
                host=p.host,
                port=p.port or 3306,
                user=p.username,
                password=p.password or "",
                database=next(turns) or p.database,
                charset="utf8mb4",
                client_flag=CLIENT.MULTI_STATEMENTS,
            )

        driver = "mysql+pymysql://"
    engine = sa.create_engine(driver, creator=make)
    try:
        next(turns)  # (the tables in `other`, by the second connection)
        with tasklocks.connect(engine, namespace) as other_tables:
            other_tables.held()
        engine.dispose()
        with tasklocks.connect(engine, namespace) as table:
            with pytest.raises(StoreUnavailable) as refused:
                table.acquire("a")
            message = str(refused.value)
            assert "connections see different tasklocks tables from one connection" in message
            assert "\n" not in message
            assert table.held() == []
    finally:
        engine.dispose()
        raw_sql(url, f"DROP {kind} {other}" + (" CASCADE" if kind == "SCHEMA" else ""))


def test_tasklocks_aio_on_an_engine_listens_on_a_connection_the_engine_made(
    namespace: str,
) -> None:
    """(tasklocks.aio's LISTEN connection was made from the engine's URL alone: with a
    ``creator`` or ``connect_args`` it never connected, and waiters fell back to the 1 s re-read,
    retrying the connection every second.) It is now the blocking reader's, made by the engine,
    told to the loop."""
    require("postgresql")
    import asyncio

    import tasklocks.aio

    app = f"{APP}-aio"  # (not the other test's, which may run beside it)
    engine = _made_engine("postgresql", app)

    def listening() -> int:
        rows = raw_rows(
            server_url("postgresql"),
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
            (app,),
        )
        return int(rows[0][0])

    async def main() -> tuple[int, int, int]:
        holder = await tasklocks.aio.connect(engine, namespace)
        waiter = await tasklocks.aio.connect(engine, namespace)
        try:
            lease = await holder.acquire("a", owner="task:1")
            taking = asyncio.ensure_future(
                waiter.acquire("a", owner="task:2", wait=True, timeout=WAIT)
            )
            deadline = time.monotonic() + WAIT
            while not await holder.waiting() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            while not listening() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            heard = listening()
            await lease.release()
            taken = await taking
            await taken.release()
            return heard, lease.token, taken.token
        finally:
            await waiter.close()
            await holder.close()

    try:
        heard, first, second = asyncio.run(main())
        assert heard >= 1
        assert second > first
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_pool_that_lends_nothing_is_named_with_the_time_it_took(
    backend: str, namespace: str
) -> None:
    """A pool whose connections are all lent holds a call for its ``pool_timeout``, however short
    ``reconnect_timeout`` is: the error says how long it took and why (it said "did not answer
    for 0.3s" after a second)."""
    require(backend)
    engine = _engine(backend, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        table = tasklocks.connect(engine, namespace=namespace, reconnect_timeout=0.3)
        table.held()  # (its schema checked while the pool lends)
        with engine.connect():  # the application holds the pool's only connection
            began = time.monotonic()
            with pytest.raises(StoreUnavailable) as refused:
                table.acquire("a", owner="task:1")
            took = time.monotonic() - began
        message = str(refused.value)
        seconds = float(message.split(" did not answer for ", 1)[1].split("s (", 1)[0])
        assert 1.0 <= seconds <= took + 0.05, message
        assert "QueuePool limit" in message, message
        assert table.held() == []  # the pool lends again
        table.close()
    finally:
        engine.dispose()


def test_a_mariadb_engine_without_multi_statements_is_refused_with_the_fix() -> None:
    require("mysql")
    engine = sa.create_engine(
        server_url("mysql").replace("mysql://", "mysql+pymysql://", 1) + "?charset=utf8mb4"
    )
    try:
        with pytest.raises(StoreUnavailable, match=r"client_flag.*MULTI_STATEMENTS"):
            tasklocks.connect(engine)
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_an_sqlite_engine_names_the_file(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/locks.db")
    with tasklocks.connect(engine, namespace="n") as table, table.acquire("a"):
        assert [h.name for h in table.held()] == ["a"]
    assert (tmp_path / "locks.db").exists()


class _FakeDialect:
    def __init__(self, name: str, driver: str) -> None:
        self.name, self.driver = name, driver


class _FakeEngine:
    def __init__(self, name: str, driver: str) -> None:
        self.dialect, self.url = _FakeDialect(name, driver), None

    def raw_connection(self) -> None:
        raise AssertionError("never reached")


@pytest.mark.parametrize(
    ("engine", "problem"),
    [
        (
            _FakeEngine("postgresql", "psycopg2"),
            "needs the psycopg driver.*postgresql\\+psycopg://",
        ),
        (_FakeEngine("mysql", "mysqldb"), "needs the pymysql driver.*mysql\\+pymysql://"),
        (_FakeEngine("oracle", "oracledb"), "cannot use a oracle engine"),
        (object(), "a database URL or a SQLAlchemy Engine was expected, not object"),
    ],
)
def test_an_engine_tasklocks_cannot_use_is_a_bad_url(engine: Any, problem: str) -> None:
    with pytest.raises(BadURL, match=problem):
        tasklocks.connect(engine)
