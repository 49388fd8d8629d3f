"""Database restarts and cut connections under load, on MariaDB and PostgreSQL.

Eight worker processes take overlapping sets of names for a while, checking an occupancy marker
and a read-modify-write counter for every name, while the test restarts the server twice (or cuts
every connection through a TCP proxy, twice, once refusing new ones for a while). Nothing may be
held twice, no increment lost, no worker hang or be refused by its own lock, nothing stay held at
the end, no lease be lost (the outages are shorter than the ttl), and the first success after
the server is back must come within 2 s.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _harness import Message, workers
from _proxy import Proxy
from _servers import can_restart, restartable, start, stop
from conftest import SERVER_BACKENDS, raw_rows, require, server_url

import tasklocks
from tasklocks.store import parse_url, postgres

pytestmark = pytest.mark.stress

PROCESSES = 8
NAMES = ["n0", "n1", "n2"]
SECONDS = 12.0  # each worker's run
BACK_WITHIN = 2.0  # seconds from "the server answers again" to the first success


def _configs(url: str, namespace: str, directory: Path) -> list[dict[str, Any]]:
    seed = random.randrange(2**32)
    return [
        {
            "url": url,
            "namespace": namespace,
            "names": NAMES,
            "dir": str(directory),
            "seconds": SECONDS,
            "timeout": 30.0,
            "pause": 0.002,
            "seed": seed + i,
        }
        for i in range(PROCESSES)
    ]


def _run(
    url: str, namespace: str, directory: Path, faults: list[tuple[float, Any]]
) -> tuple[list[Message], list[float]]:
    """Run the workers; at each (second, fault) call fault(), which returns when the server
    answers again (its time.time()) or None. Returns the reports and the times of return."""
    results: list[Message] = []
    back: list[float] = []
    errs = directory / "stderr"
    errs.mkdir()
    with workers("outage", _configs(url, namespace, directory), stderr=errs) as w:
        w.start()
        started = time.monotonic()
        for at, fault in faults:
            time.sleep(max(0.0, started + at - time.monotonic()))
            came_back = fault()
            if came_back is not None:
                back.append(came_back)
        ended = 0
        while ended < PROCESSES:
            _index, msg = w.next()  # fails the test if a worker hangs past the deadline
            if msg is None:
                ended += 1
            else:
                results.append(msg)
        assert [proc.wait() for proc in w.procs] == [0] * PROCESSES
    noise = {f.name: f.read_text() for f in sorted(errs.iterdir()) if f.read_text()}
    assert noise == {}, "a worker wrote to stderr (a traceback, or a driver's complaint)"
    return results, back


def _check(
    results: list[Message], back: list[float], directory: Path, url: str, namespace: str
) -> dict[str, Any]:
    assert len(results) == PROCESSES
    violations = [v for r in results for v in r["violations"]]
    assert violations == []
    assert sum(r["lost"] for r in results) == 0, "a lease was lost to an outage shorter than ttl"
    expected: Counter[str] = Counter()
    for r in results:
        expected.update(r["counts"])
    for name in NAMES:
        path = directory / f"{name}.count"
        count = int(path.read_text().split()[0]) if path.exists() else 0
        assert count == expected[name], f"{name}: lost updates"
        assert not (directory / f"{name}.held").exists()
    successes = sorted(t for r in results for t in r["successes"])
    firsts = []
    for when in back:
        after = [t for t in successes if t >= when]
        assert after, "no success after the server came back"
        firsts.append(after[0] - when)
        assert after[0] - when <= BACK_WITHIN, f"first success {after[0] - when:.2f}s after"
    with tasklocks.connect(url, namespace=namespace) as table:
        assert table.held() == []
    errors = Counter(kind for r in results for _t, kind, _m in r["errors"])
    return {"successes": len(successes), "first_after_back": firsts, "errors": dict(errors)}


@pytest.fixture(params=SERVER_BACKENDS)
def server(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    require(backend)
    return backend


def test_server_restarts_lose_nothing(server: str, namespace: str, tmp_path: Path) -> None:
    url = server_url(server)
    why = can_restart(server, url)
    if why is not None:
        pytest.skip(why)

    def restart() -> float:
        stop(server)
        time.sleep(1.0)  # down for a while, with every worker trying
        return start(server)

    try:
        with restartable(server):
            results, back = _run(url, namespace, tmp_path, [(2.0, restart), (6.0, restart)])
        report = _check(results, back, tmp_path, url, namespace)
    finally:
        with tasklocks.connect(url, namespace=namespace) as table:
            table.release_all()
    print(f"{server} restarts: {report}")
    assert report["successes"] > 0


def test_cut_connections_lose_nothing(server: str, namespace: str, tmp_path: Path) -> None:
    p = parse_url(server_url(server))
    proxy = Proxy(p.host, p.port or (3306 if server == "mysql" else 5432))
    user = p.user or ("root" if server == "mysql" else "postgres")
    url = f"{p.scheme}://{user}@127.0.0.1:{proxy.port}/{p.database}"

    def cut() -> None:
        proxy.cut()

    def down() -> float:
        proxy.down(2.0)
        time.sleep(2.0)
        return time.time()

    try:
        faults = [(1.5, cut), (3.0, cut), (4.5, down), (8.5, cut)]
        results, back = _run(url, namespace, tmp_path, faults)
        report = _check(results, back, tmp_path, url, namespace)
    finally:
        proxy.close()
    print(f"{server} cuts: {report}")
    assert report["successes"] > 0


def _answers_again(url: str) -> None:
    deadline = time.monotonic() + 60.0
    while True:
        try:
            raw_rows(url, "SELECT 1")
            return
        except Exception:
            assert time.monotonic() < deadline, "PostgreSQL did not come back after its crash"
            time.sleep(0.05)


def test_a_release_that_a_crash_of_postgresql_undid_is_given_back(namespace: str) -> None:
    """PostgreSQL's row releases commit without waiting for the WAL's flush. Here the WAL
    writer is stopped (SIGSTOP) before a release and killed (SIGKILL) after it: the postmaster
    takes that for a crash, ends every session and recovers from the WAL on disk, without the
    release. The name is then held by a lease its process let go of. The process's session
    renewal finds the crash (the unlogged epoch row is gone) and gives the lease back: another
    owner takes the name while that session lives on, renewed (so no expiry freed it)."""
    url = server_url("postgresql")
    require("postgresql")
    why = can_restart("postgresql", url)
    if why is not None:
        pytest.skip(why)
    table = tasklocks.connect(url, namespace, ttl=6.0)  # renewed every 2 s, 8 s to expire
    other = tasklocks.connect(url, namespace)
    undone = 0
    try:
        with restartable("postgresql"):
            table.acquire("warm").release()  # the namespace's first change moves it to the rows
            for _attempt in range(3):  # a durable commit by another may flush it first: again
                (writer,) = raw_rows(
                    url, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
                )[0]
                os.kill(writer, signal.SIGSTOP)
                try:
                    lease = table.acquire("job")
                    lease.release()
                finally:
                    os.kill(writer, signal.SIGKILL)
                time.sleep(0.5)  # the postmaster ends every session, then recovers
                _answers_again(url)
                rows = raw_rows(
                    url,
                    "SELECT lease FROM tasklocks_names WHERE namespace = %s AND name = %s",
                    (namespace, "job"),
                )
                if rows == [(lease.lease_id,)]:
                    undone += 1
                    break
                assert rows == [(None,)]
            assert undone == 1, "the crash never undid a release: nothing was tested"
            session = table._session
            assert session is not None
            taken = other.acquire("job", owner="other", wait=True, timeout=6.0)
            taken.release()
            assert session.alive() and not session.lost.is_set() and table._session is session
            again = table.acquire("job", timeout=5.0)  # and this process takes it again
            assert again.token > lease.token
            again.release()
    finally:
        other.close()
        table.close()


def test_releases_are_remembered_until_the_wal_flush_passes_them(namespace: str) -> None:
    """With the WAL writer stopped (SIGSTOP), nothing flushes the releases made without the
    flush: a look at the epoch keeps them, by the WAL position it read. Once the writer runs
    again, the next look finds the flush past that position and forgets them."""
    url = server_url("postgresql")
    require("postgresql")
    why = can_restart("postgresql", url)
    if why is not None:
        pytest.skip(why)
    table = tasklocks.connect(url, namespace, ttl=30.0)  # no renewal during the test
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    try:
        table.acquire("warm").release()
        (writer,) = raw_rows(
            url, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
        )[0]
        os.kill(writer, signal.SIGSTOP)
        try:
            for i in range(20):
                table.acquire(f"n{i}").release()
            names = {f"n{i}" for i in range(20)}
            for _look in range(2):  # kept, however often one looks, while nothing flushes
                store._check_epoch()
                assert {k[1] for _, gen in store._older for k in gen} >= names
        finally:
            os.kill(writer, signal.SIGCONT)
        deadline = time.monotonic() + 10.0
        while store._older and time.monotonic() < deadline:
            time.sleep(0.2)
            store._check_epoch()
        assert store._older == [] and store._released == {}
        assert store.lost_releases() == []
    finally:
        table.close()
