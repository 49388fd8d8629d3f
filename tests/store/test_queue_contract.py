"""The queue through the public API, once per database URL: FIFO waiters, shared and exclusive
modes, counted limits, deadlock detection, and what ``waiting()``, ``held()`` and ``watch`` show.

Waiters here are threads of this process with owners of their own (``task:N``); the real-process
scenarios (starvation, SIGKILLed waiters, two-process deadlocks) are in ``tests/stress``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from blocking_aio import BlockingAio

import tasklocks
from tasklocks import (
    Deadlock,
    LimitMismatch,
    LockHeld,
    LockTable,
    LockTimeout,
    WaitStatus,
)

WAIT = 20.0  # upper bound for anything that should happen "soon"; never the reason a test passes


@pytest.fixture(params=["blocking", "aio"])
def table(request: pytest.FixtureRequest, db_url: str, namespace: str) -> Iterator[LockTable]:
    """The table under test: a LockTable, or the async API driven from here (blocking_aio)."""
    if request.param == "aio":
        with BlockingAio(db_url, namespace) as b:
            yield cast(LockTable, b)  # the same methods, not the same class
        return
    with tasklocks.connect(db_url, namespace=namespace) as t:
        yield t


class Waiter(threading.Thread):
    """A thread that waits for locks with a table of its own, and keeps what happened."""

    def __init__(self, url: str, namespace: str, *names: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.table = tasklocks.connect(url, namespace=namespace)
        self.names, self.kwargs = names, kwargs
        self.lease: tasklocks.Lease | None = None
        self.error: BaseException | None = None
        self.granted_at: float | None = None
        self.release = threading.Event()

    def run(self) -> None:
        try:
            kwargs = {"timeout": WAIT, **self.kwargs}
            self.lease = self.table.acquire(*self.names, wait=True, **kwargs)
            self.granted_at = time.monotonic()
            self.release.wait(WAIT)
            self.lease.release()
        except BaseException as exc:  # kept for the test to look at
            self.error = exc
        finally:
            self.table.close()

    def granted(self) -> bool:
        return self.granted_at is not None


def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def queued(table: LockTable, n: int) -> None:
    until(lambda: len(table.waiting()) == n, f"{n} waiters in the queue")


def start(url: str, namespace: str, table: LockTable, *names: str, **kwargs: Any) -> Waiter:
    """Start a waiter and return once it is in the queue (or holds its locks)."""
    before = len(table.waiting())
    w = Waiter(url, namespace, *names, **kwargs)
    w.start()
    until(lambda: w.granted() or len(table.waiting()) > before or w.error is not None, "queued")
    return w


def finish(*waiters: Waiter) -> None:
    for w in waiters:
        w.release.set()
    for w in waiters:
        w.join(WAIT)
        assert not w.is_alive()


# --- FIFO -----------------------------------------------------------------------------------------


def test_waiters_are_granted_in_arrival_order(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("a", owner="task:0")
    ws = [start(db_url, namespace, table, "a", owner=f"task:{i}") for i in range(1, 4)]
    assert [q.owner for q in table.waiting()] == ["task:1", "task:2", "task:3"]
    assert [q.position for q in table.waiting()] == [1, 2, 3]
    lease.release()
    order: list[Waiter] = []
    for w in ws:
        until(w.granted, f"{w.kwargs['owner']} granted")
        assert not any(o.granted() for o in ws if o not in (*order, w))
        order.append(w)
        finish(w)
    assert [w.error for w in ws] == [None, None, None]
    assert table.waiting() == []
    assert table.held() == []


def test_a_try_never_overtakes_the_queue(db_url: str, namespace: str, table: LockTable) -> None:
    b = table.acquire("b", owner="task:b")
    w = start(db_url, namespace, table, "a", "b", owner="task:w")  # a is free, b is not
    assert not w.granted()
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:late")
    assert info.value.held == {}
    assert [q.owner for q in info.value.queue] == ["task:w"]
    assert "1 waiter is ahead in the queue: task:w" in str(info.value)
    b.release()
    until(w.granted, "the waiter granted a and b together")
    finish(w)
    assert w.error is None
    table.acquire("a", owner="task:late").release()


def test_a_multi_name_waiter_is_not_starved(db_url: str, namespace: str, table: LockTable) -> None:
    """Holders of a and b come and go in turn; once {a, b} queues, later ones wait behind it."""
    a = table.acquire("a", owner="task:a")
    w = start(db_url, namespace, table, "a", "b", owner="task:ab")
    b_later = start(db_url, namespace, table, "b", owner="task:b")  # b is free, but ab is ahead
    assert not b_later.granted()
    a.release()
    until(w.granted, "ab granted")
    assert not b_later.granted()
    finish(w)
    until(b_later.granted, "b granted after ab")
    finish(b_later)
    assert (w.error, b_later.error) == (None, None)


def test_a_timed_out_waiter_leaves_the_queue(db_url: str, namespace: str, table: LockTable) -> None:
    lease = table.acquire("a", owner="task:0")
    with tasklocks.connect(db_url, namespace=namespace) as other:
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            other.acquire("a", owner="task:1", wait=True, timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert info.value.held["a"].owner == "task:0"
    assert table.waiting() == []
    lease.release()
    assert json.loads(table.raw().data) == {"format": 3, "procs": {}, "locks": {}}


def test_a_waiter_after_a_timed_out_one_is_granted(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("a", owner="task:0")
    first = start(db_url, namespace, table, "a", owner="task:1", timeout=0.5)
    second = start(db_url, namespace, table, "a", owner="task:2")
    first.join(WAIT)
    assert isinstance(first.error, LockTimeout)
    assert [q.owner for q in table.waiting()] == ["task:2"]
    assert table.waiting()[0].position == 1
    lease.release()
    until(second.granted, "the second waiter granted")
    finish(second)


# --- shared and exclusive -------------------------------------------------------------------------


def test_shared_holders_coexist_and_exclude_an_exclusive_one(
    db_url: str, namespace: str, table: LockTable
) -> None:
    r1 = table.acquire("db", owner="task:r1", shared=True)
    r2 = table.acquire("db", owner="task:r2", shared=["db"])
    held = table.held()
    assert [(h.holder.owner, h.shared, h.limit) for h in held] == [
        ("task:r1", True, None),
        ("task:r2", True, None),
    ]
    with pytest.raises(LockHeld) as info:
        table.acquire("db", owner="task:w")
    assert len(info.value.holders["db"]) == 2
    assert "db is held by task:r1" in str(info.value) and "and 1 other" in str(info.value)
    r1.release()
    r2.release()
    table.acquire("db", owner="task:w").release()


def test_a_queued_writer_stops_later_readers(db_url: str, namespace: str, table: LockTable) -> None:
    reader = table.acquire("db", owner="task:r1", shared=True)
    writer = start(db_url, namespace, table, "db", owner="task:w")
    with pytest.raises(LockHeld):  # a reader would fit next to r1, but the writer came first
        table.acquire("db", owner="task:r2", shared=True)
    late = start(db_url, namespace, table, "db", owner="task:r3", shared=True)
    reader.release()
    until(writer.granted, "the writer granted")
    assert not late.granted()
    finish(writer)
    until(late.granted, "the late reader granted")
    finish(late)
    assert (writer.error, late.error) == (None, None)


def test_readers_queued_together_are_granted_together(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("db", owner="task:w")
    readers = [
        start(db_url, namespace, table, "db", owner=f"task:r{i}", shared=True) for i in range(3)
    ]
    lease.release()
    for r in readers:
        until(r.granted, "every reader granted")
    assert len(table.held()) == 3
    finish(*readers)


# --- counted limits -------------------------------------------------------------------------------


def test_a_limit_admits_that_many_holders(db_url: str, namespace: str, table: LockTable) -> None:
    one = table.acquire("slots", owner="task:1", limit=2)
    two = table.acquire("slots", owner="task:2", limit={"slots": 2})
    assert [h.limit for h in table.held()] == [2, 2]
    third = start(db_url, namespace, table, "slots", owner="task:3", limit=2)
    assert not third.granted()
    assert table.waiting()[0].wants[0].limit == 2
    one.release()
    until(third.granted, "the third granted a freed slot")
    assert len(table.held()) == 2
    two.release()
    finish(third)


def test_a_different_limit_is_a_clear_error(table: LockTable) -> None:
    lease = table.acquire("slots", owner="task:1", limit=3)
    with pytest.raises(LimitMismatch) as info:
        table.acquire("slots", owner="task:2", limit=4)
    assert "slots is taken with limit 3 by task:1" in str(info.value)
    assert "asked for limit 4" in str(info.value)
    assert info.value.exit_code == 2
    with pytest.raises(LimitMismatch):
        table.acquire("slots", owner="task:2", shared=True)
    lease.release()
    table.acquire("slots", owner="task:2", limit=4).release()  # nobody holds it now


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"limit": 0}, "at least 1, not 0"),
        ({"limit": True}, "not True"),
        ({"limit": {"b": 2}}, "names b, which is not among the lock names"),
        ({"shared": ["b"]}, "names b, which is not among the lock names"),
    ],
)
def test_bad_shared_or_limit_arguments_are_refused(
    table: LockTable, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        table.acquire("a", **kwargs)
    assert table.held() == []


# --- deadlocks ------------------------------------------------------------------------------------


def test_a_wait_that_closes_a_cycle_raises_deadlock_at_once(
    db_url: str, namespace: str, table: LockTable
) -> None:
    x = table.acquire("x", owner="task:12")
    y = table.acquire("y", owner="task:13")
    older = start(db_url, namespace, table, "y", owner="task:12")
    started = time.monotonic()
    with pytest.raises(Deadlock) as info:
        table.acquire("x", owner="task:13", wait=True, timeout=WAIT)
    assert time.monotonic() - started < WAIT / 2
    assert info.value.owners == ("task:13", "task:12")
    assert info.value.cycle == (
        "task:13 holds y and waits for x",
        "task:12 holds x and waits for y",
    )
    assert str(info.value).startswith("deadlock: task:13 holds y and waits for x; task:12 holds")
    assert info.value.exit_code == 75
    assert [q.owner for q in table.waiting()] == ["task:12"]  # the youngest was not queued
    y.release()
    until(older.granted, "the older waiter granted once the cycle is broken")
    finish(older)
    x.release()


def test_a_cycle_through_a_waiter_ahead_is_a_deadlock(
    db_url: str, namespace: str, table: LockTable
) -> None:
    """task:1 holds a and waits for b behind task:2's wait for b; task:2 then waits for a."""
    a = table.acquire("a", owner="task:1")
    b = table.acquire("b", owner="task:0")
    w2 = start(db_url, namespace, table, "b", owner="task:2")
    w1 = start(db_url, namespace, table, "b", owner="task:1")
    with pytest.raises(Deadlock) as info:
        table.acquire("a", owner="task:2", wait=True, timeout=WAIT)
    assert set(info.value.owners) == {"task:1", "task:2"}
    b.release()
    until(w2.granted, "task:2 granted b")
    finish(w2)
    until(w1.granted, "task:1 granted b")
    finish(w1)
    a.release()


# --- what is shown --------------------------------------------------------------------------------


def test_watch_hears_the_place_in_line_and_can_end_the_wait(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("app", owner="task:12", note="update blog")
    first = start(db_url, namespace, table, "app", owner="task:1")
    heard: list[WaitStatus] = []
    stop = threading.Event()

    def watch(status: WaitStatus) -> None:
        heard.append(status)
        if stop.is_set():
            raise KeyboardInterrupt

    def second() -> None:
        with tasklocks.connect(db_url, namespace=namespace) as t:
            try:
                t.acquire("app", owner="task:2", wait=True, timeout=WAIT, watch=watch)
            except KeyboardInterrupt:
                heard.append(None)  # type: ignore[arg-type]

    thread = threading.Thread(target=second)
    thread.start()
    until(lambda: bool(heard), "watch called when the wait began")
    status = heard[0]
    assert status.position == 2
    assert [w.owner for w in status.ahead] == ["task:1"]
    assert status.holders["app"][0].owner == "task:12"
    text = status.describe()
    assert text.startswith("waiting for app, 2nd in line; app is held by task:12")
    assert "1 waiter is ahead in the queue: task:1" in text
    n = len(heard)
    until(lambda: len(heard) > n, "watch called again soon")
    stop.set()
    thread.join(WAIT)
    assert heard[-1] is None  # the watch's exception ended the wait
    assert [q.owner for q in table.waiting()] == ["task:1"]  # and it left the queue
    lease.release()
    until(first.granted, "the first waiter granted")
    finish(first)


def test_waiting_lists_the_queue_with_modes(db_url: str, namespace: str, table: LockTable) -> None:
    lease = table.acquire("a", "b", owner="task:0")
    w1 = start(db_url, namespace, table, "a", owner="task:1", note="first")
    w2 = start(db_url, namespace, table, "a", "b", owner="task:2", shared=["b"])
    q = table.waiting()
    assert [(x.position, x.owner, x.names) for x in q] == [
        (1, "task:1", ("a",)),
        (2, "task:2", ("a", "b")),
    ]
    assert [(w.name, w.mode, w.limit) for w in q[1].wants] == [("a", "x", None), ("b", "s", None)]
    assert q[0].waiter.note == "first"
    assert q[0].liveness is tasklocks.Liveness.ALIVE
    assert q[0].expires_in is not None and q[0].expires_in > 0
    assert [w.owner for w in q[1].ahead] == ["task:1"]
    assert q[0].since <= q[1].since
    lease.release()
    until(w1.granted, "task:1 granted")
    finish(w1)
    until(w2.granted, "task:2 granted")
    finish(w2)


def test_a_waiter_without_a_process_waits_as_this_process(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("a", owner="task:0")
    w = start(db_url, namespace, table, "a", owner="cli:ops", process=None)
    [q] = table.waiting()
    assert q.waiter.pid == tasklocks.current_process().pid  # a crash frees its place
    assert q.waiter.session is not None
    lease.release()
    until(w.granted, "granted")
    [h] = table.held()
    assert (h.holder.owner, h.holder.pid, h.holder.session) == ("cli:ops", None, None)
    finish(w)
