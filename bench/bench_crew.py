"""A crew of long-lived worker processes (spawn context) and the jobs they run.

Spawning 32 interpreters that import psycopg costs seconds on this 2-core machine, so the crew is
started once and reused by every multi-process measurement. Each job opens its own connections in
the worker and closes them before it returns: no connection ever crosses a process boundary.
"""

from __future__ import annotations

import cProfile
import multiprocessing as mp
import multiprocessing.queues
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from bench_pairs import PairSpec, open_pair


@dataclass
class Shared:
    """Synchronisation objects every worker inherits when it is spawned."""

    barrier: Barrier
    held: Event  # hand-off: A holds the lock
    done: Event  # hand-off: B has taken and released it
    results: multiprocessing.queues.Queue[tuple[str, int, int, Any]]


@dataclass
class LoopResult:
    latencies: list[float]  # seconds per acquire+release pair
    elapsed: float
    queries: int  # statements sent to a server (0 for SQLite and filelock)


@dataclass
class WaitResult:
    cpu: float  # this process's user+system CPU seconds while blocked
    wall: float
    outcome: str
    queries: int  # statements sent to the server while blocked


# --- jobs (run inside a worker) -----------------------------------------------------------------


@contextmanager
def counting_queries() -> Iterator[list[int]]:
    """Count what this process sends to MariaDB and PostgreSQL while the block runs.

    Client-side, so other clients of the same servers (test suites running meanwhile) do not
    pollute the count: every PyMySQL command (queries, BEGIN, COMMIT, pings), and every round
    trip psycopg waits for (``Connection.wait``: a cursor's ``execute``, and each statement
    tasklocks' PostgreSQL adapter sends through libpq itself, its name rows' statements and
    their preparation), and each row statement tasklocks' MariaDB adapter sends itself.
    """
    box = [0]
    undo: list[tuple[Any, str, Any]] = []

    def wrap(cls: Any, attr: str) -> None:
        orig = getattr(cls, attr)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            box[0] += 1
            return orig(self, *args, **kwargs)

        setattr(cls, attr, counted)
        undo.append((cls, attr, orig))

    # Only drivers already imported (by the warm-up): importing one here would cost the
    # measurement a second.
    if "psycopg" in sys.modules:
        import psycopg

        wrap(psycopg.Connection, "wait")
    if "pymysql" in sys.modules:
        import pymysql.connections

        wrap(pymysql.connections.Connection, "_execute_command")
        # tasklocks' row statements are sent by its own connection class, as text
        # (``ok_query``) or prepared (``ok_execute``), each reply read by ``_ok_reply``, and
        # prepared once a session (``_prepare``); a statement handed back to PyMySQL (a
        # half-read result before it, which a pair never leaves) counts in ``_execute_command``
        ours = getattr(sys.modules.get("tasklocks.store.mysql"), "_CONNECTION_CLASS", None)
        if hasattr(ours, "_ok_reply"):
            wrap(ours, "_ok_reply")
            wrap(ours, "_prepare")
    try:
        yield box
    finally:
        for cls, attr, orig in reversed(undo):
            setattr(cls, attr, orig)


def job_loop(
    sh: Shared, task: int, idx: int, spec: PairSpec, duration: float, profile: str | None = None
) -> LoopResult:
    """Take and release ``spec``'s lock as often as possible for ``duration`` seconds.

    With ``profile`` (a path prefix), the timed loop runs under cProfile (wall-clock timer) and the
    statistics are written to ``<profile>.<idx>``.
    """
    p = open_pair(spec)
    prof = cProfile.Profile() if profile else None
    try:
        p.pair()  # warm-up: connect, create rows (PostgreSQL prepares at a second use, as
        # MariaDB does: those preparations fall in the timed loop, once a process)
        try:
            sh.barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            raise RuntimeError("another worker failed before the start") from None
        lat: list[float] = []
        start = time.perf_counter()
        end = start + duration
        t1 = start
        if prof is not None:
            prof.enable()
        with counting_queries() as sent:
            while t1 < end:
                t0 = time.perf_counter()
                p.pair()
                t1 = time.perf_counter()
                lat.append(t1 - t0)
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{profile}.{idx}")
        return LoopResult(lat, t1 - start, sent[0])
    except BaseException:
        sh.barrier.abort()
        raise
    finally:
        p.close()


def job_handoff_holder(
    sh: Shared, task: int, idx: int, url: str, ns: str, rounds: int, seed: int
) -> list[float]:
    """Process A: hold the lock 20-80 ms, note time.time() just before releasing it."""
    import tasklocks

    rng = random.Random(seed)
    released: list[float] = []
    with tasklocks.connect(url, ns) as table:
        table.raw()
        if not sh.done.wait(60):  # B is connected
            raise RuntimeError("the waiter never got ready")
        sh.done.clear()
        for _ in range(rounds):
            lease = table.acquire("handoff", wait=True, timeout=30)
            sh.held.set()
            time.sleep(rng.uniform(0.020, 0.080))
            released.append(time.time())
            lease.release()
            if not sh.done.wait(60):
                raise RuntimeError("the waiter did not take the lock within 60 s")
            sh.done.clear()
    return released


def job_handoff_waiter(
    sh: Shared, task: int, idx: int, url: str, ns: str, rounds: int
) -> list[float]:
    """Process B: wait for the held lock; note time.time() right after acquire() returns."""
    import tasklocks

    acquired: list[float] = []
    with tasklocks.connect(url, ns) as table:
        table.raw()
        sh.done.set()
        for _ in range(rounds):
            if not sh.held.wait(60):
                raise RuntimeError("the holder never took the lock")
            sh.held.clear()
            lease = table.acquire("handoff", wait=True, timeout=30)
            acquired.append(time.time())
            lease.release()
            sh.done.set()
    return acquired


def job_block(
    sh: Shared, task: int, idx: int, url: str, ns: str, name: str, duration: float
) -> WaitResult:
    """Block on a lock someone else holds for ``duration`` seconds; measure our own CPU."""
    import tasklocks

    with tasklocks.connect(url, ns) as table:
        table.raw()
        sh.results.put(("ready", task, idx, None))
        with counting_queries() as sent:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            try:
                table.acquire(name, wait=True, timeout=duration).release()
                outcome = "acquired (the lock was released early)"
            except tasklocks.LockTimeout:
                outcome = "timed out"
            cpu1, wall1 = time.process_time(), time.perf_counter()
    return WaitResult(cpu1 - cpu0, wall1 - wall0, outcome, sent[0])


JOBS: dict[str, Callable[..., Any]] = {
    "loop": job_loop,
    "handoff_holder": job_handoff_holder,
    "handoff_waiter": job_handoff_waiter,
    "block": job_block,
}


def _worker_main(
    idx: int,
    inbox: multiprocessing.queues.Queue[tuple[int, str, tuple[Any, ...]] | None],
    sh: Shared,
) -> None:
    while True:
        item = inbox.get()
        if item is None:
            return
        task, job, args = item
        try:
            value = JOBS[job](sh, task, idx, *args)
            sh.results.put(("done", task, idx, value))
        except BaseException as exc:
            tb = traceback.format_exc(limit=4)
            sh.results.put(("error", task, idx, f"{type(exc).__name__}: {exc}\n{tb}"))


# --- the crew (parent side) ---------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Crew:
    """``size`` spawned workers; :meth:`run` hands jobs to some of them and collects the results."""

    def __init__(self, size: int) -> None:
        ctx: SpawnContext = mp.get_context("spawn")
        self.size = size
        self.shared = Shared(ctx.Barrier(size), ctx.Event(), ctx.Event(), ctx.Queue())
        self.inboxes: list[
            multiprocessing.queues.Queue[tuple[int, str, tuple[Any, ...]] | None]
        ] = [ctx.Queue() for _ in range(size)]
        self.procs: list[SpawnProcess] = [
            ctx.Process(target=_worker_main, args=(i, self.inboxes[i], self.shared), daemon=True)
            for i in range(size)
        ]
        for p in self.procs:
            p.start()
        self._task = 0

    def submit(self, jobs: dict[int, tuple[str, tuple[Any, ...]]]) -> int:
        """Send ``{worker index: (job, args)}``; return the task id for :meth:`collect`."""
        self._task += 1
        self.shared.barrier.reset()
        for idx, (job, args) in jobs.items():
            self.inboxes[idx].put((self._task, job, args))
        return self._task

    def _next(self, task: int, deadline: float) -> tuple[str, int, Any]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError("workers did not answer in time")
            try:
                kind, t, idx, value = self.shared.results.get(timeout=left)
            except queue.Empty:
                continue
            if t == task:
                return kind, idx, value

    def wait_ready(self, task: int, count: int, timeout: float) -> None:
        """Wait until ``count`` workers of ``task`` said "ready" (a job error raises)."""
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < count:
            kind, idx, value = self._next(task, deadline)
            if kind == "ready":
                ready += 1
            elif kind == "error":
                raise WorkerError(f"worker {idx}: {value}")
            else:
                raise WorkerError(f"worker {idx} finished before it was ready")

    def collect(self, task: int, count: int, timeout: float) -> dict[int, Any]:
        """The results of ``count`` workers of ``task``; raises on the first job error."""
        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        errors: list[str] = []
        while len(out) + len(errors) < count:
            kind, idx, value = self._next(task, deadline)
            if kind == "done":
                out[idx] = value
            elif kind == "error":
                errors.append(f"worker {idx}: {value}")
        if errors:
            # Prefer the root cause over the "another worker failed" echoes.
            errors.sort(key=lambda e: "another worker failed" in e)
            raise WorkerError(errors[0])
        return out

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
