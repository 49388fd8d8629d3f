"""A server that hangs: the TCP connection stays up and the kernel acknowledges what is sent,
but nothing answers (a frozen server or proxy), so no TCP timeout ever fires. libpq waits for
ever, and so does PyMySQL on tasklocks' own connections, whose sockets block without a timeout
(mysql.py's _open); tasklocks' guard thread shuts the connection down once a statement has
waited for ``IO_TIMEOUT`` seconds, and the call fails (or a waiting acquire goes on to its
timeout) instead of hanging. (Not marked stress: one process and a proxy, a few seconds; it sits
here beside the proxy it uses.)"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _proxy import Proxy
from conftest import SERVER_BACKENDS, require, server_url

import tasklocks
import tasklocks.store
from tasklocks import LockTimeout, StoreUnavailable, StoreUnreachable
from tasklocks.store import _sql_server, parse_url

WAIT = 30.0  # a call that has not ended by then hangs (before the guard: for ever)


PORTS = {"postgresql": 5432, "mysql": 3306}
USERS = {"postgresql": "postgres", "mysql": "root"}


@pytest.fixture(params=SERVER_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return str(request.param)


@pytest.fixture
def proxy(backend: str) -> Iterator[Proxy]:
    p = parse_url(server_url(backend))
    proxy = Proxy(p.host, p.port or PORTS[backend])
    try:
        yield proxy
    finally:
        proxy.thaw()  # (a call still hanging ends)
        proxy.close()


def _through(proxy: Proxy, backend: str) -> str:
    p = parse_url(server_url(backend))
    user = p.user or USERS[backend]
    password = f":{p.password}" if p.password else ""
    return f"{backend}://{user}{password}@127.0.0.1:{proxy.port}/{p.database}?connect_timeout=1"


def _outcome(call: Callable[[], Any]) -> tuple[object, float]:
    """What ``call`` returned or raised, and how long it took (it must end within WAIT)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the call hangs on the silent server"
    return result[0], time.monotonic() - started


def test_calls_to_a_hung_server_fail_and_waits_end(
    backend: str, proxy: Proxy, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sql_server, "IO_TIMEOUT", 1.0)
    holder = tasklocks.connect(server_url(backend), namespace)
    table = tasklocks.connect(_through(proxy, backend), namespace, reconnect_timeout=2.0)
    try:
        table.acquire("a").release()  # connected, statements prepared
        holder.acquire("held", owner="holder")
        proxy.freeze()

        failed, took = _outcome(table.held)
        assert isinstance(failed, StoreUnreachable), failed  # (its last try: a new connection)
        assert "did not answer for" in str(failed), failed
        assert took >= 1.0  # (the guard's limit, not an error of its own)

        waited, took = _outcome(lambda: table.acquire("held", wait=True, timeout=2.0))
        assert isinstance(waited, (LockTimeout, StoreUnavailable)), waited
        assert took >= 2.0

        proxy.thaw()  # the server answers again: so does the table
        assert [h.name for h in table.held()] == ["held"]
        table.acquire("a").release()
    finally:
        proxy.thaw()  # (before close(), which would wait for a call that still hangs)
        table.close()
        holder.close()


def test_a_forked_childs_guard_leaves_the_parents_connection_alone(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork taken while a statement of the parent runs: the child inherits the store, busy
    for ever in its copy; its guard must not shut down the parent's socket, which the two
    processes share (it did, once past IO_TIMEOUT)."""
    require("postgresql")
    monkeypatch.setattr(_sql_server, "IO_TIMEOUT", 1.0)
    store = tasklocks.store.open_store(server_url("postgresql"))
    assert isinstance(store, _sql_server.ServerStore)
    try:
        running = threading.Thread(
            target=lambda: store._locked(
                lambda conn, _call: store._execute(conn, "SELECT pg_sleep(0.6)").fetchall()
            )
        )
        running.start()
        time.sleep(0.2)
        assert store._busy
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: a store of its own starts its guard
            try:
                tasklocks.store.open_store(server_url("postgresql")).version(namespace)
                time.sleep(3.0)
            finally:
                os._exit(0)
        running.join(WAIT)
        os.waitpid(pid, 0)
        assert store._conn.execute("SELECT 1").fetchone() == (1,)  # (before: EOF)
    finally:
        store.close()


def test_close_from_an_acquisitions_own_callback_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """(close() waited its full 2 s for the acquisition of the very thread that called it.)"""
    url = f"sqlite:///{tmp_path}/locks.db"
    holder = tasklocks.connect(url)
    table = tasklocks.connect(url)
    holder.acquire("x", owner="other")
    took: list[float] = []

    def close_now(_status: object) -> None:
        started = time.monotonic()
        table.close()
        took.append(time.monotonic() - started)

    with pytest.raises(StoreUnavailable, match="was closed"):
        table.acquire("x", wait=True, timeout=WAIT, on_wait=close_now)
    assert took and took[0] < 1.0, took
    assert holder.waiting() == []
    holder.close()
