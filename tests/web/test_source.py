"""The dashboard's :class:`Source` on an SQLite file of the test: shutdown, the default URL, what
it remembers about stop requests, and the queue of waiters read with the held locks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tasklocks import CorruptLockTable, HeldLock, QueuedWaiter, StoreUnavailable
from tasklocks.store import TaskValue
from tasklocks.tasks import Tasks
from tasklocks.web._source import Snapshot, Source, read_locks

from .conftest import DEADLINE, LockScene


@pytest.fixture
def url(tmp_path: Path) -> str:
    """An SQLite database of this test, created."""
    url = f"sqlite:///{tmp_path}/locks.db"
    Tasks(url, "web").close()
    return url


def test_close_does_not_wait_for_a_database_call_that_hangs(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(url, "web")
    inside, release = threading.Event(), threading.Event()

    def hang(tasks: Tasks) -> None:
        inside.set()
        release.wait(DEADLINE)

    caller = threading.Thread(target=source.call, args=(hang,), daemon=True)
    caller.start()
    assert inside.wait(DEADLINE)
    try:
        closer = threading.Thread(target=source.close, kwargs={"timeout": 0.1}, daemon=True)
        closer.start()
        closer.join(DEADLINE)
        assert not closer.is_alive(), "close() waited for the hung call"
        assert "a database call did not end" in caplog.text
    finally:
        release.set()
        caller.join(DEADLINE)
    caplog.clear()
    source.close()  # nothing in progress now: it closes the connection
    assert "did not end" not in caplog.text


def test_without_a_url_a_missing_default_file_is_reported_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state" / "tasklocks" / "tasklocks.db"
    monkeypatch.delenv("TASKLOCKS_DB", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where the default file is
    source = Source(None, "web")
    try:
        snapshot = source.snapshot()
    finally:
        source.close()
    assert snapshot.error == f"the database file {db} is missing", snapshot
    assert not db.exists() and not db.parent.exists()


def test_a_stop_error_is_forgotten_when_the_task_ends(url: str) -> None:
    with Tasks(url, "web") as tasks:
        now = time.time()
        fields: dict[str, TaskValue] = {
            "kind": "ended",
            "target": '["true"]',
            "locks": "[]",
            "namespace": "web",
            "created": now - 2,
            "started": now - 2,
        }
        ended = tasks.store.create_task({**fields, "state": "succeeded", "finished": now - 1})
        running = tasks.store.create_task({**fields, "state": "running"})
    source = Source(url, "web")
    source.stop_errors.update({ended: "permission denied", running: "permission denied"})
    try:
        snapshot = source.snapshot()  # the first read
    finally:
        source.close()
    assert {r.id for r in snapshot.tasks} == {ended, running}
    assert source.stop_errors == {running: "permission denied"}


def test_the_snapshot_has_the_queue_in_order_with_the_holders(
    url: str, lock_scene: Callable[[str, str], LockScene]
) -> None:
    scene = lock_scene(url, "web")
    scene.hold("a", owner="task:1")
    scene.hold("db", owner="task:5", shared=True)
    scene.hold("db", owner="task:6", shared=True)
    scene.wait("a", owner="task:2")
    scene.wait("db", owner="task:3")
    scene.wait("a", "slots", owner="task:4", limit={"slots": 3})
    source = Source(url, "web")
    try:
        snapshot = source.snapshot()
    finally:
        source.close()
    assert snapshot.error is None, snapshot.error
    assert [(h.name, h.holder.owner, h.shared) for h in snapshot.locks] == [
        ("a", "task:1", False),
        ("db", "task:5", True),
        ("db", "task:6", True),
    ]
    assert [(q.position, q.owner) for q in snapshot.waiters] == [
        (1, "task:2"),
        (2, "task:3"),
        (3, "task:4"),
    ]
    assert [x.describe() for x in snapshot.waiters[2].wants] == ["a", "slots (limit 3)"]
    assert [w.owner for w in snapshot.waiters[2].ahead] == ["task:2"]


class Reads:
    """Two reads of a lock table: the queue, then the held locks (as :func:`read_locks` reads)."""

    def __init__(self, waiters: list[QueuedWaiter], locks: list[HeldLock]) -> None:
        self.waiters, self.locks = waiters, locks

    def waiting(self) -> list[QueuedWaiter]:
        return self.waiters

    def held(self) -> list[HeldLock]:
        return self.locks


def test_a_waiter_granted_between_the_two_reads_is_shown_as_a_holder_only(
    url: str, lock_scene: Callable[[str, str], LockScene]
) -> None:
    scene = lock_scene(url, "web")
    scene.hold("a", owner="task:1")
    scene.wait("a", owner="task:2")
    scene.wait("a", "b", owner="task:3")
    queue = scene.table.waiting()
    # task:1 released "a" right after the queue was read, and task:2 got it: the held locks,
    # read next, have task:2's entry (same lease), and task:3 is first in line now.
    first = queue[0]
    entry = first.waiter.holder(first.wants[0], token=2, since=time.time())
    locks, waiters = read_locks(Reads(queue, [HeldLock("a", entry, first.liveness)]))
    assert [h.holder.owner for h in locks] == ["task:2"]
    assert [q.owner for q in waiters] == ["task:3"]


def test_a_task_outside_a_snapshot_of_a_database_away_is_unavailable_without_a_read(
    url: str,
) -> None:
    """A task's page outside the snapshot read the task alone: with the database away, that read
    waited for the reconnection (4-7.5 s before its 503). Once the snapshot says the database
    does not answer (or a read hangs), the page is a 503 at once; another failure of the
    snapshot (a corrupt lock document, say) still reads the task."""
    with Tasks(url, "web") as tasks:
        task_id = tasks.start(["true"])
    source = Source(url, "web")
    reads: list[int] = []
    source.call = lambda body, **kw: reads.append(task_id)  # type: ignore[method-assign,assignment]
    try:
        away = Snapshot(error="the database did not answer", unavailable=True)
        with pytest.raises(StoreUnavailable, match="the database did not answer"):
            source.task(task_id, away)
        assert reads == []
        corrupt = Snapshot(error="the lock table of namespace 'web' is corrupt")
        with pytest.raises(AttributeError):  # (the stand-in read returns None, not a record)
            source.task(task_id, corrupt)
        assert reads == [task_id]
    finally:
        source.close()


def test_a_read_that_fails_on_a_database_away_makes_the_snapshot_unavailable(url: str) -> None:
    source = Source(url, "web")
    corrupt = CorruptLockTable("web", "not JSON")
    try:
        for error, away in ((StoreUnavailable("gone"), True), (corrupt, False)):

            def fail(body: object, *, timeout: float = 0.0, error: Exception = error) -> None:
                raise error

            source.call = fail  # type: ignore[method-assign,assignment]
            snapshot = source._read()
            assert snapshot.error == str(error) and snapshot.unavailable is away
    finally:
        source.close()
