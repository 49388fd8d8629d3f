"""What only the SQLite adapter does: its write lock is one for the whole file, so a change that
finds it busy spins briefly and then queues on the gate; the row statements report their token
without RETURNING; new files get small pages; the WAL is cut back once it can start over, and
past its bound a checkpoint lets it start over under a steady load."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import tasklocks
from tasklocks.store import sqlite as sqlite_store

WAIT = 20.0  # upper bound for anything that should happen "soon"; never the reason a test passes


def _gate_is_held(path: Path) -> bool:
    """Whether some change holds the gate (``<db>-lock``), seen from a descriptor of our own."""
    fd = os.open(str(path) + "-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def test_a_change_that_finds_the_write_lock_busy_queues_on_the_gate_and_then_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yields = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    path = tmp_path / "locks.db"
    table = tasklocks.connect(f"sqlite:///{path}", "ns")
    table.acquire("warm").release()
    assert not _gate_is_held(path) and not yields  # an uncontended change goes straight through
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # SQLite's one write lock, held by someone else
    result: dict[str, object] = {}

    def take() -> None:
        lease = table.acquire("job")
        result["token"] = lease.token
        result["at"] = time.monotonic()
        lease.release()

    taker = threading.Thread(target=take)
    taker.start()
    deadline = time.monotonic() + WAIT
    while not _gate_is_held(path):  # its spins ran out: it waits first in line on the gate
        assert time.monotonic() < deadline, "the busy change never queued on the gate"
        assert taker.is_alive(), f"the change ended while the write lock was held: {result}"
        time.sleep(0.005)
    assert len(yields) == sqlite_store.SPINS  # it gave up the CPU between its first tries
    released_at = time.monotonic()
    other.execute("ROLLBACK")
    taker.join(WAIT)
    assert not taker.is_alive()
    assert result["token"] == 1  # the name's first grant
    assert isinstance(result["at"], float) and result["at"] >= released_at
    assert not _gate_is_held(path)
    other.close()
    table.close()


def test_the_row_statements_report_each_token_and_a_refused_one_reports_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locks.db"
    table, rival = (
        tasklocks.connect(f"sqlite:///{path}", "ns"),
        tasklocks.connect(f"sqlite:///{path}", "ns"),
    )
    assert isinstance(table.store, sqlite_store.SQLiteStore)
    look = sqlite3.connect(str(path))
    row = "SELECT version, lease FROM tasklocks_names WHERE namespace = 'ns' AND name = 'job'"
    table.acquire("warm").release()  # the namespace's first change moves it to the row layout
    tokens = []
    for _ in range(3):  # each taken and released in its row
        lease = table.acquire("job")
        assert look.execute(row).fetchone() == (lease.token, lease.lease_id)
        tokens.append(lease.token)
        lease.release()
        assert look.execute(row).fetchone() == (lease.token, None)
    assert tokens == [1, 2, 3]
    lease = table.acquire("job")
    # Refused in the row: its statement ran tasklocks_token(1) before it found the row held.
    try:
        rival.acquire("job")
    except tasklocks.LockHeld:
        pass
    else:
        raise AssertionError("a held name was taken again")
    assert [h.holder.token for h in table.held()] == [4]
    lease.release()
    look.close()
    table.close()
    rival.close()


def test_a_new_file_gets_1_kb_pages_and_an_old_file_keeps_its_own(tmp_path: Path) -> None:
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    conn = sqlite3.connect(str(old))
    conn.execute("CREATE TABLE app (x)")  # an application's file, made before tasklocks came
    conn.close()
    for path, size in ((new, 1024), (old, 4096)):
        table = tasklocks.connect(f"sqlite:///{path}", "ns")
        lease = table.acquire("job")
        assert [h.name for h in table.held()] == ["job"]
        lease.release()
        table.close()
        check = sqlite3.connect(str(path))
        assert check.execute("PRAGMA page_size").fetchone() == (size,)
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        check.close()


def test_the_wal_is_cut_back_once_it_can_start_over(tmp_path: Path) -> None:
    """A reader that stays in the WAL keeps SQLite from starting it over, so it grows (as under
    a steady load of many processes); once it can start over, the file is cut back to
    journal_size_limit (4 MiB) instead of keeping its largest size."""
    path = tmp_path / "locks.db"
    table = tasklocks.connect(f"sqlite:///{path}", "wal")
    table.acquire("first").release()
    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tasklocks_names").fetchall()  # holds its snapshot
    for i in range(1500):
        table.acquire(f"name-{i}").release()
    wal = Path(str(path) + "-wal")
    grown = wal.stat().st_size
    assert grown > 6 << 20
    reader.execute("COMMIT")
    reader.close()
    for _ in range(3):  # a checkpoint copies it all, then the next change starts it over
        table.acquire("again").release()
    assert wal.stat().st_size <= 4 << 20
    assert table.held() == []
    table.close()


def test_past_its_bound_the_wal_is_checkpointed_and_started_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a steady load SQLite never starts the WAL over by itself (a reader is always in
    it). A store looks at its size every WAL_LOOK_EVERY changes; past WAL_LIMIT it runs a
    RESTART checkpoint. A reader that stays in the WAL makes it give up after its short wait
    (the change that looked still succeeds) and pauses the process's looks, so that it does not
    stall every writer again and again; once the reader is gone and the pause is over, the
    checkpoint goes through and the next change starts the file over, cut back to 4 MiB."""
    path = tmp_path / "locks.db"
    wal = Path(str(path) + "-wal")
    table = tasklocks.connect(f"sqlite:///{path}", "wal")
    table.acquire("first").release()
    store = table.store
    assert isinstance(store, sqlite_store.SQLiteStore) and store._conn is not None
    assert 0 <= store._changes < sqlite_store.WAL_LOOK_EVERY  # (a random start)
    sent: list[str] = []
    store._conn.set_trace_callback(sent.append)

    def checkpoints() -> int:
        return len([s for s in sent if "wal_checkpoint" in s])

    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tasklocks_names").fetchall()  # holds its snapshot
    for i in range(600):  # 1,200 changes: past WAL_LOOK_EVERY, under WAL_LIMIT
        table.acquire(f"name-{i}").release()
    assert checkpoints() == 0  # looked, and left it alone
    grown = wal.stat().st_size
    assert grown > 2 << 20
    monkeypatch.setattr(sqlite_store, "WAL_LIMIT", 1 << 20)
    monkeypatch.setattr(sqlite_store, "WAL_LOOK_EVERY", 1)  # every change looks
    started = time.monotonic()
    lease = table.acquire("pinned")  # looks, waits 20 ms for the reader, gives up
    assert time.monotonic() - started < 1.0
    assert [s for s in sent if "wal_checkpoint" in s] == ["PRAGMA wal_checkpoint(RESTART)"]
    assert sent[-1] == "PRAGMA busy_timeout=0"  # and waits no more afterwards
    assert wal.stat().st_size >= grown  # not started over: the reader is still in it
    lease.release()
    table.acquire("paused").release()
    assert checkpoints() == 1  # paused: no more waits in vain while the reader stays
    reader.execute("COMMIT")
    reader.close()
    time.sleep(max(0.0, store._wal_quiet[0] - time.monotonic()) + 0.01)  # the pause (1 s) ends
    table.acquire("after").release()  # looks: nobody is in the WAL now, it goes through...
    assert checkpoints() >= 2 and store._wal_quiet == (0.0, 0.0)
    assert wal.stat().st_size <= 4 << 20  # ...and the next change started the file over
    assert [h.name for h in table.held()] == []
    table.close()
