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
from conftest import delete_rows, mysql_session, raw_rows, raw_sql, require, server_url

import tasklocks
from tasklocks.store import DEFAULT_TABLE, mysql


@pytest.fixture
def url(namespace: str) -> Iterator[str]:
    require("mysql")
    yield server_url("mysql")
    delete_rows(server_url("mysql"), namespace)


@pytest.fixture(autouse=True)
def _steady(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine may take more than HOT_GAP between two releases of a test: they are
    marked all the same (a test that wants otherwise sets it again)."""
    monkeypatch.setattr(mysql, "HOT_GAP", 60.0)


@pytest.fixture
def tables(url: str, namespace: str) -> Iterator[list[tasklocks.LockTable]]:
    """Two lock tables of ``namespace``, each with its own store (two processes, as the server
    sees them), whose sessions are not renewed during a test (a renewal runs a batch); closed
    afterwards."""
    made = [tasklocks.connect(url, namespace, ttl=600.0) for _ in range(2)]
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
    assert _store(mine).renew_session(session.id)  # (the batch runs on a thread of its own)
    _eventually(lambda: _row(url, namespace, "d") == (token, None, False))

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


def _cut(url: str, table: tasklocks.LockTable, namespace: str, name: str) -> None:
    """End the table's server session from outside (a restart, a proxy's cut), and wait until
    the server has let its markers go (a KILL is carried out by the killed thread)."""
    raw_sql(url, f"KILL {int(_store(table)._conn.thread_id())}")
    _eventually(lambda: not _row(url, namespace, name)[2], 10, "the killed session kept its marker")


def _eventually(check: Any, seconds: float = 5.0, what: str = "not within the time") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_lease_whose_marker_a_lost_connection_took_is_given_back(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """A connection cut (a server restart, a proxy) takes its markers with it, and their leases
    are held in their rows again: the store's next connection writes those rows free (a batch
    on a thread of its own) and says the leases (``lost_releases``) for the table to give back
    through the document too. The process's own acquisition of such a name, before that,
    finds its own lease in the way, gives it back and takes the name."""
    mine, other = tables
    _warm(mine)
    token, lease = _take_and_release(mine, "b")
    assert _row(url, namespace, "b") == (token, lease, True)
    _cut(url, mine, namespace, "b")
    assert _row(url, namespace, "b") == (token, lease, False)
    assert [(h.name, h.holder.lease) for h in other.held()] == [("b", lease)]
    assert _take_and_release(mine, "b")[0] > token
    assert other.held() == []

    _take_and_release(mine, "c")
    token, lease = _take_and_release(mine, "c")
    _cut(url, mine, namespace, "c")
    assert [(h.name, h.holder.lease) for h in other.held()] == [("c", lease)]
    _take_and_release(mine, "d")  # reconnects: the row of c is written free
    _eventually(lambda: other.held() == [])
    assert _row(url, namespace, "c")[1:] == (None, False)
    with other.hold("c", timeout=0) as taken:
        assert taken.token > token


def test_a_lost_marker_that_a_dying_session_still_holds_is_written_free(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """After a network cut the server may keep the old session (and its markers) for a long
    time: a give-back through the document then reads the name free and changes nothing, and
    the name would be held again once that session ends. The batch writes the row itself, which
    no marker can hide."""
    mine, other = tables
    _warm(mine)
    token, lease = _take_and_release(mine, "n")
    # The process loses its connection; a session of the test's stands for the server's
    # old session, which would still hold the marker.
    with mysql_session(url) as stand_in, stand_in.cursor() as cur:
        _cut(url, mine, namespace, "n")
        cur.execute("SELECT GET_LOCK(%s, 0)", (f"tasklocks.free:{lease}",))
        assert cur.fetchone()[0] == 1
        assert other.held() == []  # (read as released)
        _take_and_release(mine, "m")  # a new connection: the batch and the give-back
        _eventually(lambda: _row(url, namespace, "n")[1] is None)
        assert other.held() == []
    assert _row(url, namespace, "n") == (token, None, False)  # the stand-in is gone
    assert other.held() == []


def test_close_gives_back_what_a_lost_connection_took(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """``close`` writes the marked releases, on a new connection if the last was lost, and
    gives back those whose markers it took, while the store is open (the session that would
    give them back ends with the table)."""
    mine, other = tables
    _warm(mine)
    _take_and_release(mine, "a")
    token, lease = _take_and_release(mine, "b")
    assert _row(url, namespace, "b") == (token, lease, True)
    _cut(url, mine, namespace, "b")
    assert [h.name for h in other.held()] == ["a", "b"]
    mine.close()
    assert other.held() == []
    assert _row(url, namespace, "b")[1:] == (None, False)


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


def test_a_marked_name_that_a_document_took_over_is_given_back(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """A process of an earlier tasklocks reads a marked name as held; a waiter of its own moves
    the name into the document with the marked lease as its holder (the row marked, its lease
    cleared). The batch finds such rows and says their leases, for the table to give back."""
    mine, _ = tables
    _warm(mine)
    token, lease = _take_and_release(mine, "n")
    raw_sql(
        url,
        f"UPDATE {DEFAULT_TABLE}_names SET mark = 1, lease = NULL, record = NULL "
        "WHERE namespace = %s AND name = 'n'",
        (namespace,),
    )
    store = _store(mine)
    assert not store.has_lost()
    store.flush_releases()
    assert store.lost_releases() == [(namespace, lease)]
    assert store._markers == [] and store._marked == {}
    assert _row(url, namespace, "n") == (token, None, False)


def test_a_server_that_refuses_markers_gets_the_written_release(
    tables: list[tasklocks.LockTable], url: str, namespace: str
) -> None:
    """A server without GET_LOCK (ER_SP_DOES_NOT_EXIST here; a Galera node of some MariaDB
    releases says ER_NOT_SUPPORTED_YET): the store stops marking and releases as it did
    before, in the same call."""
    mine, other = tables
    _warm(mine)
    store = _store(mine)
    store._sql["name_release_marked"] = store._sql["name_release_marked"].replace(
        "GET_LOCK(", "tasklocks_no_such_function("
    )
    token, _lease = _take_and_release(mine, "n")  # refused (1305), then written
    assert _row(url, namespace, "n") == (token, None, False)
    assert not store._marking
    token, _lease = _take_and_release(mine, "n")
    assert _row(url, namespace, "n") == (token, None, False)
    assert other.held() == []


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
