"""What only the MySQL / MariaDB adapter does: a process that releases names often marks its
releases with a user-level lock instead of writing the rows (``name_release_marked``), and writes
them free in a batch later (``flush_releases``); a marker lost with its connection is given back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import delete_rows, raw_rows, raw_sql, require, server_url

import tasklocks
from tasklocks.store import DEFAULT_TABLE, mysql


@pytest.fixture
def url(namespace: str) -> Iterator[str]:
    require("mysql")
    yield server_url("mysql")
    delete_rows(server_url("mysql"), namespace)


@pytest.fixture
def tables(url: str, namespace: str) -> Iterator[list[tasklocks.LockTable]]:
    """Two lock tables of ``namespace``, each with its own store (two processes, as the server
    sees them); closed afterwards."""
    made = [tasklocks.connect(url, namespace) for _ in range(2)]
    yield made
    for table in made:
        table.close()


def _row(url: str, namespace: str, name: str) -> tuple[int, str | None, bool]:
    """The name's row: its version, its lease, and whether that lease's marker is held."""
    [(version, lease, marked)] = raw_rows(
        url,
        f"SELECT version, lease, IS_USED_LOCK(CONCAT('tasklocks.free:', lease)) IS NOT NULL "
        f"FROM {DEFAULT_TABLE}_names WHERE namespace = %s AND name = %s",
        (namespace, name),
    )
    return int(version), None if lease is None else str(lease), bool(marked)


def _take_and_release(table: tasklocks.LockTable, name: str) -> tuple[int, str]:
    """Hold ``name`` and release it: its token and lease."""
    with table.hold(name, timeout=0) as lease:
        return lease.token, lease.lease_id


def _warm(table: tasklocks.LockTable) -> None:
    """Move the namespace to its rows (its first change) and release a name in its row, so
    that the table's next release, within HOT_GAP, is marked."""
    for _ in range(2):
        _take_and_release(table, "warm")


def _store(table: tasklocks.LockTable) -> Any:
    store = table.store
    assert isinstance(store, mysql.MySQLStore)
    return store


def test_a_release_soon_after_another_is_marked_and_read_as_free(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """The first release is written (a process that releases once in a while writes each); the
    next, within HOT_GAP, leaves the lease in the row under its marker. Another process reads
    the name free, takes it with the next token, and the batch leaves its row alone."""
    mine, other = tables
    _take_and_release(mine, "warm")  # the namespace moves to its rows
    token, lease = _take_and_release(mine, "n")
    assert _row(url, namespace, "n") == (token, None, False)  # written: its first row release
    token, lease = _take_and_release(mine, "n")
    assert _row(url, namespace, "n") == (token, lease, True)  # marked
    assert _store(mine)._markers == [lease]
    assert mine.held() == [] and other.held() == []
    with other.hold("n", timeout=0) as taken:
        assert taken.token == token + 1
        assert [h.name for h in mine.held()] == ["n"]
    _store(mine).flush_releases()  # the row is another lease's now: left as it is
    assert _row(url, namespace, "n") == (token + 1, None, False)
    assert _store(mine)._markers == []


def test_marked_releases_are_written_free_in_a_batch(
    tables: list[tasklocks.LockTable], url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At MARKED_MAX markers the rows are written free and the markers let go (one round trip);
    a renewal writes them too; so does ``close``."""
    monkeypatch.setattr(mysql, "MARKED_MAX", 3)
    mine, _ = tables
    _warm(mine)
    names = ["a", "b", "c"]
    tokens = [_take_and_release(mine, name)[0] for name in names]
    assert [_row(url, namespace, n) for n in names] == [(t, None, False) for t in tokens]
    assert _store(mine)._markers == []

    token, lease = _take_and_release(mine, "d")
    assert _row(url, namespace, "d") == (token, lease, True)
    session = mine._session
    assert session is not None
    assert _store(mine).renew_session(session.id)
    assert _row(url, namespace, "d") == (token, None, False)

    token, lease = _take_and_release(mine, "e")
    assert _row(url, namespace, "e") == (token, lease, True)
    mine.close()
    assert _row(url, namespace, "e") == (token, None, False)


def test_a_release_seconds_after_the_last_one_is_written(
    tables: list[tasklocks.LockTable], url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mysql, "HOT_GAP", 0.0)
    mine, _ = tables
    _warm(mine)
    for _ in range(3):
        token, _lease = _take_and_release(mine, "n")
        assert _row(url, namespace, "n") == (token, None, False)


def test_a_lease_whose_marker_a_lost_connection_took_is_given_back(
    url: str, namespace: str
) -> None:
    """A connection cut (a server restart, a proxy) takes its markers with it, and their leases
    are held in their rows again: the next call's new connection says so (``lost_releases``),
    and the table gives them back at its next acquisition (or its session's next renewal, as
    PostgreSQL's releases undone by a crash). The process's own acquisition of such a name
    finds them too, and takes it."""
    mine = tasklocks.connect(url, namespace)
    other = tasklocks.connect(url, namespace)
    try:
        _warm(mine)
        token, lease = _take_and_release(mine, "b")
        assert _row(url, namespace, "b") == (token, lease, True)
        raw_sql(url, f"KILL {int(_store(mine)._conn.thread_id())}")
        assert _row(url, namespace, "b") == (token, lease, False)
        assert [(h.name, h.holder.lease) for h in other.held()] == [("b", lease)]

        # The process's own take of the name: its row holds a lease of this owner, which a
        # lost connection may have left; given back, the name is taken.
        assert _take_and_release(mine, "b")[0] > token
        assert other.held() == []

        # A name it does not take again: given back before the next acquisition.
        _take_and_release(mine, "c")
        token, lease = _take_and_release(mine, "c")
        raw_sql(url, f"KILL {int(_store(mine)._conn.thread_id())}")
        assert [(h.name, h.holder.lease) for h in other.held()] == [("c", lease)]
        _take_and_release(mine, "d")  # reconnects: the marker of c is found lost
        assert [h.name for h in other.held()] == ["c"]
        _take_and_release(mine, "e")  # gives c back first
        assert other.held() == []
        with other.hold("c", timeout=0) as taken:
            assert taken.token > token
    finally:
        mine.close()
        other.close()


def test_close_gives_back_what_a_lost_connection_took(url: str, namespace: str) -> None:
    """``close`` writes the marked releases, on a new connection if the last was lost, and
    gives back those whose markers it took, while the store is open (the session that would
    give them back ends with the table)."""
    mine = tasklocks.connect(url, namespace)
    other = tasklocks.connect(url, namespace)
    try:
        _warm(mine)
        _take_and_release(mine, "a")
        token, lease = _take_and_release(mine, "b")
        assert _row(url, namespace, "b") == (token, lease, True)
        raw_sql(url, f"KILL {int(_store(mine)._conn.thread_id())}")
        assert [h.name for h in other.held()] == ["a", "b"]
        mine.close()
        assert other.held() == []
        assert _row(url, namespace, "b")[1:] == (None, False)
    finally:
        mine.close()
        other.close()


def _marking_process(url: str, namespace: str, then: str) -> subprocess.CompletedProcess[str]:
    """A process that marks the release of ``n`` (its table's third release, within HOT_GAP of
    the second), then runs ``then`` and exits without closing its table."""
    script = f"""
        import os, signal, tasklocks
        table = tasklocks.connect({url!r}, {namespace!r})
        for name in ("warm", "warm", "n"):
            with table.hold(name, timeout=0):
                pass
        assert table.store._markers, "not marked"
        {then}
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )


def test_the_markers_of_a_process_that_exits_without_closing_are_let_go(
    url: str, namespace: str
) -> None:
    """At the interpreter's exit, a process's marked releases are written free (its session
    would otherwise hold them until it expires)."""
    done = _marking_process(url, namespace, then="")
    assert done.returncode == 0, done.stderr
    assert _row(url, namespace, "n")[1:] == (None, False)


def test_a_killed_process_s_marked_releases_are_held_until_it_is_found_dead(
    url: str, namespace: str
) -> None:
    """A process killed after marking releases takes its markers with it: those names are held
    again by its lease, as the names it held when killed are, until its session expires or a
    waiter on its host proves it dead (``reap`` here)."""
    done = _marking_process(url, namespace, then="os.kill(os.getpid(), signal.SIGKILL)")
    assert done.returncode == -9, done.stderr
    deadline = time.monotonic() + 10
    while _row(url, namespace, "n")[2] and time.monotonic() < deadline:
        time.sleep(0.05)  # the server sees the connection end
    table = tasklocks.connect(url, namespace)
    try:
        assert [h.name for h in table.held()] == ["n"]
        assert [name for name, _ in table.reap()] == ["n"]
        assert table.held() == []
        with table.hold("n", timeout=0):
            pass
    finally:
        table.close()
