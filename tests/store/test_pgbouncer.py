"""PostgreSQL through a real PgBouncer in transaction pooling mode (``?pool=transaction``).

Consecutive statements of one client connection may run on different server connections there.
The tests start their own PgBouncer (Debian's ``pgbouncer``; ``.ci/run`` installs it) in front
of the test server, with a small server pool, so that real processes share server connections.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, server_url

import tasklocks
import tasklocks.aio
from tasklocks import LockHeld, LockTimeout
from tasklocks.errors import BadURL
from tasklocks.store import parse_url

PGBOUNCER = "/usr/sbin/pgbouncer"
WAIT = 20.0  # upper bound for what should happen soon; never the reason a test passes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bouncer() -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test server; its URL (with pool=)."""
    require("postgresql")
    if not Path(PGBOUNCER).exists():
        why = f"PgBouncer is missing ({PGBOUNCER}): apt-get install pgbouncer"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    target = parse_url(server_url("postgresql"))
    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="tasklocks-pgbouncer-"))
    home.chmod(0o755)
    user = target.user or "postgres"
    (home / "users.txt").write_text(f'"{user}" ""\n')
    (home / "pgbouncer.ini").write_text(
        textwrap.dedent(
            f"""\
            [databases]
            * = host={target.host} port={target.port or 5432}
            [pgbouncer]
            listen_addr = 127.0.0.1
            listen_port = {port}
            unix_socket_dir =
            auth_type = trust
            auth_file = {home}/users.txt
            pool_mode = transaction
            default_pool_size = 4
            max_client_conn = 200
            logfile = {home}/pgbouncer.log
            """
        )
    )
    argv = [PGBOUNCER, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(home, "postgres")
        for f in home.iterdir():
            shutil.chown(f, "postgres")
        argv[1:1] = ["-u", "postgres"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"PgBouncer did not start: {err.strip()}")
                time.sleep(0.05)
        yield f"postgresql://{user}@127.0.0.1:{port}/{target.database}?pool=transaction"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(home, ignore_errors=True)


def _count_under_lock(url: str, namespace: str, counter: str, worker: int) -> str:
    """A process: 60 times, take one of two names (waiting) and add one to the counter file of
    that name by read-modify-write, slowly enough that two holders at once would lose updates."""
    try:
        with tasklocks.connect(url, namespace=namespace) as table:
            for i in range(60):
                name = f"n{(worker + i) % 2}"
                with table.hold(name, timeout=WAIT):
                    path = f"{counter}.{name}"
                    value = int(Path(path).read_text() or "0")
                    time.sleep(0.0005)
                    Path(path).write_text(str(value + 1))
        return "ok"
    except Exception as exc:  # reported to the test
        return f"{type(exc).__name__}: {exc}"


def test_processes_share_the_pool_and_never_hold_a_name_together(
    bouncer: str, namespace: str, tmp_path: Path
) -> None:
    """8 processes, 4 server connections: psycopg's prepared statements (which a transaction
    pool breaks: "prepared statement _pg3_0 does not exist") are off, and every change is one
    transaction; lost updates of the counters would show two holders at once."""
    counter = str(tmp_path / "counter")
    for name in ("n0", "n1"):
        Path(f"{counter}.{name}").write_text("0")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        results = pool.starmap(
            _count_under_lock, [(bouncer, namespace, counter, w) for w in range(8)]
        )
    assert results == ["ok"] * 8
    total = sum(int(Path(f"{counter}.{n}").read_text()) for n in ("n0", "n1"))
    assert total == 8 * 60
    with tasklocks.connect(bouncer, namespace=namespace) as table:
        assert table.held() == []
        assert json.loads(table.raw().data) == {"format": 3, "procs": {}, "locks": {}}


def test_a_waiter_in_another_process_is_woken_by_polling(bouncer: str, namespace: str) -> None:
    """No LISTEN through the pool: the waiter polls at MariaDB's pace and still takes over
    within a fraction of a second (LISTEN through the pool, and the re-read every second, would
    take about a second). The waiter runs without this host's wake-up channel, as on another
    host."""
    waiter_code = textwrap.dedent(
        """
        import sys, time, tasklocks, tasklocks._wake
        tasklocks._wake._inotify_init1 = None  # no same-host wake-up: the database alone
        with tasklocks.connect(sys.argv[1], namespace=sys.argv[2]) as t:
            print("waiting", flush=True)
            with t.hold("a", timeout=20):
                print(time.time(), flush=True)
        """
    )
    with tasklocks.connect(bouncer, namespace=namespace) as table:
        lease = table.acquire("a")
        child = subprocess.Popen(
            [sys.executable, "-c", waiter_code, bouncer, namespace],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "waiting"
            deadline = time.monotonic() + WAIT
            while not table.waiting() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [w.wants[0].name for w in table.waiting()] == ["a"]
            released = time.time()
            lease.release()
            granted = float(child.stdout.readline())
            assert child.wait(WAIT) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        assert granted - released < 0.3


def test_pooled_waiters_poll_and_never_listen(bouncer: str, namespace: str) -> None:
    """LISTEN's server connection would go back to the pool after the statement: a waiter
    behind the pool must not rely on it (no listening thread is started)."""
    with (
        tasklocks.connect(bouncer, namespace=namespace) as a,
        tasklocks.connect(bouncer, namespace=namespace) as b,
    ):
        lease = a.acquire("x", owner="task:1")
        with pytest.raises(LockTimeout):
            b.acquire("x", owner="task:2", wait=True, timeout=0.3)
        assert b.store._reader_pid == 0  # type: ignore[attr-defined]  # (white-box) never started
        lease.release()


def test_async_waiters_go_through_the_pool_by_polling(bouncer: str, namespace: str) -> None:
    """tasklocks.aio behind the pool: no LISTEN (its waiters poll), and 10 coroutines queued
    on one name all get it in turn."""

    async def main() -> list[int]:
        async with await tasklocks.aio.connect(bouncer, namespace) as table:
            first = await table.acquire("x")
            order: list[int] = []

            async def one(i: int) -> None:
                async with table.hold("x", timeout=WAIT):
                    order.append(i)

            tasks = []
            for i in range(10):
                tasks.append(asyncio.create_task(one(i)))
                while len(await table.waiting()) < i + 1:
                    await asyncio.sleep(0.005)
            assert table._changes._listener is None  # (white-box) never listened
            await first.release()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
            assert await table.held() == []
        return order

    assert asyncio.run(main()) == list(range(10))


def test_queues_modes_and_sessions_go_through_the_pool(bouncer: str, namespace: str) -> None:
    with tasklocks.connect(bouncer, namespace=namespace, ttl=3.0) as table:
        shared = [table.acquire("db", shared=True, limit=2, owner=f"task:{i}") for i in (1, 2)]
        with pytest.raises(LockHeld):
            table.acquire("db", shared=True, limit=2, owner="task:3")
        held = table.held()
        assert sorted(h.holder.owner for h in held) == ["task:1", "task:2"]
        assert all(h.expires_in is not None and 0 < h.expires_in <= 4.0 for h in held)  # ttl * 4/3
        time.sleep(1.5)  # past a renewal (every ttl/3): the session lives on
        assert [h.liveness for h in table.held()] == ["alive", "alive"]
        for lease in shared:
            lease.release()
        with table.acquire("x", "y", owner="task:4") as both:
            assert both.token > shared[1].token
        assert table.held() == []


def test_an_unknown_pool_value_is_a_bad_url(bouncer: str) -> None:
    with pytest.raises(BadURL, match=r"unknown pool='sometimes'.*pool=transaction"):
        tasklocks.connect(bouncer.replace("pool=transaction", "pool=sometimes"))


@pytest.mark.parametrize("url", ["mysql://root@127.0.0.1/test", "sqlite:///x.db"])
def test_pool_is_for_postgresql_urls_only(url: str) -> None:
    with pytest.raises(BadURL, match=r"pool= is for PostgreSQL URLs"):
        tasklocks.connect(url + "?pool=transaction")
