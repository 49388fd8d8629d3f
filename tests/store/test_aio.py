"""tasklocks.aio on every backend: what only the async API has to show.

The lock and queue contract suites run over the async API too (``blocking_aio``); these tests
are about the loop itself: many coroutines on one name, the loop's lag while they wait, the CPU
idle waiters cost, cancellation at every await of an acquisition, and the task as the owner.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from conftest import delete_rows, require, server_url

import tasklocks
import tasklocks.aio as aio
from tasklocks import (
    Deadlock,
    LeaseLost,
    LockHeld,
    LockTable,
    LockTimeout,
    StoreUnreachable,
    WaitStatus,
)
from tasklocks.store import FastPaths

T = TypeVar("T")
WAIT = 20.0  # upper bound for what should happen "soon"; never the reason a test passes


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def other(db_url: str, namespace: str) -> Iterator[LockTable]:
    """A blocking table on the same namespace: the view from outside the loop."""
    with tasklocks.connect(db_url, namespace=namespace) as t:
        yield t


async def until(cond: Callable[[], Coroutine[Any, Any, bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def flag(event: threading.Event) -> None:
    """Await a flag that a worker thread sets."""
    deadline = time.monotonic() + WAIT
    while not event.is_set():
        assert time.monotonic() < deadline, "the worker never got there"
        await asyncio.sleep(0.001)


def slow_reply(
    target: object,
    method: str,
    when: Callable[[Any], bool],
    go: threading.Event | None = None,
) -> threading.Event:
    """Make ``target.method`` sleep 0.3 s (or until ``go`` is set) after it returned a result
    ``when`` accepts (the write is done, its reply not yet given): a cancellation lands in
    between."""
    real = getattr(target, method)
    done = threading.Event()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when(result) and not done.is_set():
            done.set()
            if go is None:
                time.sleep(0.3)
            else:
                go.wait(WAIT)
        return result

    setattr(target, method, wrapper)
    return done


async def _any_set(events: list[threading.Event]) -> bool:
    return any(e.is_set() for e in events)


async def cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def elsewhere(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` called and awaited in a task of its own: as another owner."""

    async def inside() -> T:
        return await call()

    return await asyncio.create_task(inside())


def nothing_left(other: LockTable) -> None:
    assert other.held() == []
    assert other.waiting() == []
    other.acquire("a").release()  # free for anyone


# --- many coroutines, one loop --------------------------------------------------------------------


def test_fifty_coroutines_get_one_name_in_turn_and_the_loop_keeps_ticking(
    db_url: str, namespace: str
) -> None:
    async def main() -> tuple[list[int], list[float]]:
        loop = asyncio.get_running_loop()
        order: list[int] = []
        inside = [0]
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:  # every 5 ms: how late does it run?
            due = loop.time()
            while not stop.is_set():
                due += 0.005
                await asyncio.sleep(max(0.0, due - loop.time()))
                lags.append(loop.time() - due)
                due = max(due, loop.time())

        async def one(t: aio.AsyncLockTable, i: int) -> None:
            async with t.hold("a", timeout=120) as lease:
                inside[0] += 1
                assert inside[0] == 1, "two coroutines held the name at once"
                assert lease.owner.endswith(f":aio-{numbers[i]}")
                order.append(i)
                await asyncio.sleep(0)
                inside[0] -= 1

        async with await aio.connect(db_url, namespace) as t:
            first = await t.acquire("a")
            tick = asyncio.create_task(ticker())
            tasks, numbers = [], {}
            for i in range(50):
                task = asyncio.create_task(one(t, i))
                tasks.append(task)
                await until(functools.partial(_queued, t, i + 1), f"waiter {i} to queue")
                numbers[i] = int(await _owner_number(t, i))
            await asyncio.sleep(1.0)  # all wait
            await first.release()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            stop.set()
            await tick
            assert await t.held() == [] and await t.waiting() == []
        return order, lags

    order, lags = run(main())
    assert order == list(range(50))  # in the order they queued
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)]
    assert len(lags) > 100
    assert p99 < 0.020, f"loop lag p99 {p99 * 1000:.1f} ms"


async def _queued(t: aio.AsyncLockTable, n: int) -> bool:
    return len(await t.waiting()) >= n


async def _owner_number(t: aio.AsyncLockTable, i: int) -> str:
    return (await t.waiting())[i].owner.rsplit("-", 1)[1]


def test_twenty_idle_waiters_cost_little_cpu(db_url: str, namespace: str, other: LockTable) -> None:
    holder = other.acquire("a")

    async def main() -> float:
        async with await aio.connect(db_url, namespace) as t:
            tasks = [asyncio.create_task(t.acquire("a", wait=True)) for _ in range(20)]
            await until(lambda: _queued(t, 20), "20 waiters")
            await asyncio.sleep(1.0)  # settled: the polls have slowed to their pace
            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.sleep(3.0)
            share = (time.process_time() - cpu) / (time.monotonic() - wall)
            for task in tasks:
                await cancelled(task)
            assert await t.waiting() == []
        return share

    share = run(main())
    holder.release()
    assert share < 0.05, f"20 idle waiters cost {share:.1%} of a core"


# --- cancellation at every await of an acquisition --------------------------------------------


def test_a_cancel_between_the_write_and_its_reply_leaves_nothing_held(
    db_url: str, namespace: str, other: LockTable
) -> None:
    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            store = t.table.store
            written = [slow_reply(store, "transact", lambda snap: '"a"' in snap.data)]
            if isinstance(store, FastPaths):  # servers: the one-statement path, if a row exists
                written.append(slow_reply(store, "fast_acquire", lambda token: token is not None))
            task = asyncio.create_task(t.acquire("a"))
            await until(lambda: _any_set(written), "the write")
            assert [h.name for h in other.held()] == ["a"]  # written, not yet answered
            await cancelled(task)

    run(main())
    nothing_left(other)


def test_a_cancel_between_the_queueing_write_and_its_reply_leaves_no_waiter(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            queued = slow_reply(t.table.store, "transact", lambda snap: '"queue"' in snap.data)
            task = asyncio.create_task(t.acquire("a", wait=True))
            await flag(queued)
            assert len(other.waiting()) == 1
            await cancelled(task)

    run(main())
    assert [h.name for h in other.held()] == ["a"]
    holder.release()
    nothing_left(other)


def test_a_cancel_while_queued_leaves_the_queue(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            task = asyncio.create_task(t.acquire("a", wait=True))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            await asyncio.sleep(0.1)
            await cancelled(task)
            assert await t.waiting() == []

    run(main())
    holder.release()
    nothing_left(other)


def test_a_cancel_as_the_grant_is_read_gives_the_lock_back(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            task = asyncio.create_task(t.acquire("a", wait=True))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            task_n = await _owner_number(t, 0)
            # The waiter reads only when woken: the next read is the one after the release.
            granted = slow_reply(t.table.store, "read", lambda snap: True)
            holder.release()  # promotes the waiter: its next read finds it granted
            await flag(granted)
            assert [h.holder.owner.rsplit(":", 1)[1] for h in other.held()] == ["aio-" + task_n]
            await cancelled(task)

    run(main())
    nothing_left(other)


def test_a_cancel_during_an_outage_pause_leaves_the_queue(
    db_url: str, namespace: str, other: LockTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            task = asyncio.create_task(t.acquire("a", wait=True))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            store, down, paused = t.table.store, threading.Event(), threading.Event()
            real_read = store.read

            def read(namespace: str) -> Any:
                if down.is_set():
                    paused.set()
                    raise StoreUnreachable("the database went away (a test)")
                return real_read(namespace)

            monkeypatch.setattr(store, "read", read)
            down.set()
            other.acquire("b", "c").release()  # a change of the document: the waiter reads, fails
            # and pauses (two names: one would be taken in its own row, a change of no document)
            await flag(paused)
            await asyncio.sleep(0.05)  # in the pause (0.2 s)
            down.clear()  # back, so the cancelled wait can give its place back
            await cancelled(task)

    run(main())
    holder.release()
    nothing_left(other)


def test_a_cancelled_release_still_releases(db_url: str, namespace: str, other: LockTable) -> None:
    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            lease = await t.acquire("a")
            slow_reply(t.table.store, "transact", lambda snap: True)
            if isinstance(t.table.store, FastPaths):
                slow_reply(t.table.store, "fast_release", lambda version: True)
            task = asyncio.create_task(lease.release())
            await asyncio.sleep(0.1)
            await cancelled(task)
            assert lease.released

    run(main())
    nothing_left(other)


def test_a_cancelled_read_returns_at_once_and_the_table_goes_on(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """(A read waited for its statement to end, as a change must: ``wait_for(held(), 0.2)``
    took as long as the statement, up to the guard's 30 s on a silent server.)"""
    other.acquire("a", owner="other")
    go = threading.Event()
    runs: list[Callable[[], Any]] = []  # the reads that ran on the worker

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            for read in ("held", "waiting", "raw"):
                go.clear()
                real = getattr(t.table, read)

                def slow(real: Callable[[], Any] = real) -> Any:
                    runs.append(real)
                    go.wait(WAIT)
                    return real()

                setattr(t.table, read, slow)
                ran = len(runs)
                began = time.monotonic()
                for _ in range(5):  # (a retry loop under a timeout)
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(getattr(t, read)(), 0.1)
                assert time.monotonic() - began < 2.0, read  # (not the statement's 30 s each)
                setattr(t.table, read, real)
                go.set()
                assert [h.name for h in await t.held()] == ["a"]  # the worker goes on
                assert len(runs) - ran == 1, read  # the four still queued were dropped

    run(main())
    other.release("a", owner="other")
    nothing_left(other)


def test_a_timeout_around_a_wait_leaves_the_queue(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await t.acquire("a", wait=True)
            with pytest.raises(LockTimeout) as timed_out:
                await t.acquire("a", wait=True, timeout=0.2)
            assert "a" in str(timed_out.value)
            assert await t.waiting() == []

    run(main())
    holder.release()
    nothing_left(other)


# --- owners, callbacks, notifications ------------------------------------------------------------


def test_each_task_is_an_owner_and_a_refusal_names_the_holder(
    db_url: str, namespace: str, other: LockTable
) -> None:
    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            lease = await t.acquire("a", note="deploying")
            with pytest.raises(LockHeld) as refused:
                await elsewhere(lambda: t.acquire("a"))  # another task
            assert lease.owner in str(refused.value)
            assert refused.value.holders["a"][0].note == "deploying"
            with pytest.raises(tasklocks.NotHeld):
                await elsewhere(lambda: t.release("a"))  # not that task's
            await t.release("a")  # this task's
            assert await t.held() == []
            async with t.hold("a", "b") as held:
                assert {h.name for h in await t.held()} == {"a", "b"}
                assert held.token > lease.token
            assert held.released

    run(main())
    nothing_left(other)


def test_the_task_that_calls_acquire_owns_the_lock_whichever_task_awaits_it(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """``asyncio.wait_for`` (a task of its own on Python 3.11), ``create_task``, ``gather`` and
    ``shield`` run the coroutine in another task: the owner was that task's, and the caller's
    ``release(name)`` raised NotHeld."""

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            me = aio.task_owner()
            leases = [
                await asyncio.wait_for(t.acquire("a"), WAIT),
                await asyncio.create_task(t.acquire("b")),
                *await asyncio.gather(t.acquire("c")),
                await asyncio.shield(t.acquire("d")),
            ]
            async with t.hold("e") as held:
                leases.append(held)
                assert {lease.owner for lease in leases} == {me}
                assert {h.holder.owner for h in await t.held()} == {me}
            with pytest.raises(LockHeld):
                await asyncio.wait_for(t.acquire("a"), WAIT)  # not re-entrant: the same owner
            await asyncio.wait_for(t.release("a"), WAIT)  # this task's, released by name
            await asyncio.create_task(t.release("b"))
            await t.release("c", "d")
            assert await t.held() == []

    run(main())
    nothing_left(other)


def test_a_deadlock_through_a_lock_taken_in_wait_for_is_refused(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """A takes x through ``asyncio.wait_for``, B takes y; A waits for y, then B for x: a cycle
    between the tasks A and B (the owner of x was wait_for's task, which waits for nothing)."""

    async def main() -> list[str]:
        async with await aio.connect(db_url, namespace) as t:
            got_x, got_y = asyncio.Event(), asyncio.Event()

            async def a() -> str:
                x = await asyncio.wait_for(t.acquire("x"), WAIT)
                got_x.set()
                await got_y.wait()
                try:
                    async with t.hold("y", timeout=WAIT):
                        return "A got y"
                finally:
                    await x.release()

            async def b() -> str:
                y = await t.acquire("y")
                got_y.set()
                await got_x.wait()
                await until(lambda: _queued(t, 1), "A to wait for y")
                try:
                    async with t.hold("x", timeout=WAIT):
                        return "B got x"
                except Deadlock:
                    return "B: Deadlock"
                finally:
                    await y.release()

            return list(await asyncio.gather(a(), b()))

    assert run(main()) == ["A got y", "B: Deadlock"]
    nothing_left(other)


def test_on_wait_and_watch_run_on_the_loop_thread(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")
    threads: list[str] = []
    seen: list[WaitStatus] = []

    async def main() -> None:
        async with await aio.connect(db_url, namespace) as t:
            loop_thread = threading.get_ident()

            def on_wait(holders: Any) -> None:
                threads.append("loop" if threading.get_ident() == loop_thread else "other")

            def watch(status: WaitStatus) -> None:
                threads.append("loop" if threading.get_ident() == loop_thread else "other")
                seen.append(status)
                if len(seen) == 3:
                    raise RuntimeError("enough")  # ends the wait

            with pytest.raises(RuntimeError, match="enough"):
                await t.acquire("a", wait=True, on_wait=on_wait, watch=watch)
            assert await t.waiting() == []

    run(main())
    holder.release()
    assert threads and set(threads) == {"loop"}
    assert seen[0].position == 1 and seen[0].holders["a"][0].owner == holder.owner


def test_postgresql_waiters_hear_notifications_on_the_loop(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("postgresql")  # LISTEN/NOTIFY is PostgreSQL's
    db_url = server_url("postgresql")
    other = tasklocks.connect(db_url, namespace)
    holder = other.acquire("a")

    async def main() -> float:
        async with await aio.connect(db_url, namespace) as t:
            monkeypatch.setattr(t.table._waker, "fileno", lambda: None)  # no local wake-up
            heard: list[str | None] = []
            changes = t._changes
            real = changes._heard

            def hear(ns: str | None) -> None:
                heard.append(ns)
                real(ns)

            monkeypatch.setattr(changes, "_heard", hear)
            task = asyncio.create_task(t.acquire("a", wait=True))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            await asyncio.sleep(1.5)  # the version is polled once a second: now just done
            start = time.monotonic()
            holder.release()
            lease = await asyncio.wait_for(task, WAIT)
            took = time.monotonic() - start
            assert namespace in heard
            await lease.release()
        return took

    try:
        took = run(main())
    finally:
        other.close()
        delete_rows(db_url, namespace)
    assert took < 0.5, f"woken after {took:.2f} s: polled, not notified"


def test_a_lost_lease_is_told_and_its_release_raises(
    db_url: str, namespace: str, other: LockTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with await aio.connect(db_url, namespace, ttl=1.0) as t:
            lease = await t.acquire("a")
            lease.check()
            monkeypatch.setattr(t.table.store, "renew_session", lambda session: False)  # expired
            deadline = time.monotonic() + WAIT
            while not lease.lost.is_set():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            with pytest.raises(LeaseLost):
                lease.check()
            with pytest.raises(LeaseLost):
                await lease.release()
            assert lease.released

    run(main())
    nothing_left(other)


def test_closing_the_table_ends_its_waits_and_leaves_no_waiter(
    db_url: str, namespace: str, other: LockTable
) -> None:
    holder = other.acquire("a")

    async def main() -> None:
        t = await aio.connect(db_url, namespace)
        waiters = [asyncio.create_task(t.acquire("a", wait=True)) for _ in range(3)]
        await until(lambda: _queued(t, 3), "3 waiters")
        assert len(other.waiting()) == 3
        await asyncio.gather(t.close(), t.close())  # idempotent, also at once
        for waiter in waiters:
            with pytest.raises(tasklocks.TasklocksError, match="is closed"):
                await waiter
        assert t._changes._fd is None  # (white-box) the loop watches no descriptor of it
        with pytest.raises(tasklocks.TasklocksError, match="is closed"):
            await t.acquire("b")

    run(main())
    assert other.waiting() == []
    holder.release()
    nothing_left(other)


def test_an_acquisition_granted_as_the_table_closes_gives_the_lock_back(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """``close()`` while an acquisition's write was on its way: the acquisition returned a lease
    that the closed table could never release (held until its expiry). It gives the lease back
    and raises, as LockTable's acquisitions do when another thread closes the table."""

    async def main() -> None:
        t = await aio.connect(db_url, namespace)
        store, go = t.table.store, threading.Event()
        written = [slow_reply(store, "transact", lambda snap: '"a"' in snap.data, go)]
        if isinstance(store, FastPaths):  # servers: the one-statement path, if a row exists
            written.append(slow_reply(store, "fast_acquire", lambda token: token is not None, go))
        task = asyncio.create_task(t.acquire("a"))
        await until(lambda: _any_set(written), "the write")
        closing = asyncio.create_task(t.close())
        await asyncio.sleep(0)  # close() began
        assert t._closing is not None and not task.done()
        go.set()
        await closing
        with pytest.raises(tasklocks.TasklocksError, match="is closed"):
            await task

    run(main())
    nothing_left(other)


def test_a_table_refuses_calls_from_another_event_loop(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """A table opened in one loop and used in the next (a second ``asyncio.run()``) waited ~40 s
    for a freed lock, or hit its timeout: its wake-ups (the inotify reader, the poll's event)
    stayed with the first loop. Such a call is refused, before it does anything."""
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        t = first.run_until_complete(aio.connect(db_url, namespace))

        async def wait_for_b() -> None:  # on its loop, woken by the release
            holder = other.acquire("b")
            task = asyncio.create_task(t.acquire("b", wait=True, timeout=WAIT))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            holder.release()
            await (await task).release()

        first.run_until_complete(wait_for_b())  # the wake-ups now watch the first loop
        lease = first.run_until_complete(t.acquire("a"))

        async def from_the_second_loop() -> None:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: t.acquire("c"),
                lambda: t.acquire("b", wait=True, timeout=WAIT),
                lambda: t.hold("c").__aenter__(),
                lambda: t.release("a"),
                lease.release,
                t.held,
                t.close,
            ]
            for call in calls:
                with pytest.raises(tasklocks.TasklocksError) as refused:
                    await call()
                message = str(refused.value)
                assert "open the table inside the loop that uses it" in message
                assert "\n" not in message

        second.run_until_complete(from_the_second_loop())
        assert [h.name for h in other.held()] == ["a"] and other.waiting() == []
        first.run_until_complete(lease.release())
        first.run_until_complete(wait_for_b())  # still whole on its own loop
        first.run_until_complete(t.close())
        second.run_until_complete(t.close())  # closed: a no-op from any loop (a teardown's)
    finally:
        first.close()
        second.close()
    nothing_left(other)


def test_a_table_whose_loop_has_ended_is_closed_from_another(
    db_url: str, namespace: str, other: LockTable
) -> None:
    """A table left open when its ``asyncio.run()`` returned could not be closed through the
    async API (every loop but its own was refused), and its worker thread and connection stayed
    until the process ended. Once its loop has ended, ``close()`` from another loop closes it;
    a call after that says the table is closed."""

    async def opened() -> tuple[aio.AsyncLockTable, aio.AsyncLease]:
        t = await aio.connect(db_url, namespace)
        holder = other.acquire("b")  # a wait, so that its wake-ups watch this loop
        task = asyncio.create_task(t.acquire("b", wait=True, timeout=WAIT))
        await until(lambda: _queued(t, 1), "the waiter to queue")
        holder.release()
        await (await task).release()
        return t, await t.acquire("a")

    t, lease = asyncio.run(opened())  # (its loop closed now, the table open)
    workers = list(t._worker._threads)
    assert workers and all(w.is_alive() for w in workers)
    asyncio.run(t.close())
    for w in workers:
        w.join(timeout=WAIT)
        assert not w.is_alive()
    assert t.table._closed
    with pytest.raises(tasklocks.TasklocksError, match="is closed"):
        asyncio.run(t.acquire("c"))
    asyncio.run(t.close())  # again: a no-op
    other.release("a", owner=lease.owner)  # (kept until its session expires: given back here)
    nothing_left(other)


def test_a_release_during_the_waiters_read_wakes_it_at_once(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change that a waiter's own read just missed must still wake it: on PostgreSQL the
    next poll would come a second later."""
    require("postgresql")
    db_url = server_url("postgresql")
    other = tasklocks.connect(db_url, namespace)
    holder = other.acquire("a")

    async def main() -> float:
        async with await aio.connect(db_url, namespace) as t:
            task = asyncio.create_task(t.acquire("a", wait=True))
            await until(lambda: _queued(t, 1), "the waiter to queue")
            await asyncio.sleep(1.2)  # its polls have slowed to their pace
            store, reading = t.table.store, threading.Event()
            real = store.read

            def read(ns: str) -> Any:
                snap = real(ns)
                if not reading.is_set():
                    reading.set()
                    time.sleep(0.3)  # between this read and the wait that follows it
                return snap

            monkeypatch.setattr(store, "read", read)
            other.acquire("b", "c").release()  # a change of the document: the waiter reads
            await flag(reading)
            start = time.monotonic()
            holder.release()  # during that read
            lease = await asyncio.wait_for(task, WAIT)
            took = time.monotonic() - start
            await lease.release()
        return took

    try:
        took = run(main())
    finally:
        other.close()
        delete_rows(db_url, namespace)
    assert took < 0.6, f"granted {took:.2f} s after the release"
