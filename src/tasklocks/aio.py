"""tasklocks for asyncio: ``await tasklocks.aio.connect(url, namespace=...)``.

An :class:`AsyncLockTable` has the methods of :class:`tasklocks.LockTable` as coroutines, with the
same arguments, results and errors; ``hold`` is an ``async with``, and so is a lease.

How it waits without blocking the loop, and without a thread per waiter:

* An acquisition is the same code as ``LockTable.acquire`` (``LockTable._acquiring``: steps that
  yield where they would sleep). Its database steps run on the table's worker thread: one per
  table however many coroutines use it, since the table's connection serves one statement at a
  time. The drivers tasklocks speaks (psycopg, PyMySQL, sqlite3) block, so that bounded executor
  is what keeps the loop free; it never sleeps, it only runs statements.
* Where the acquisition would sleep, its coroutine awaits the table's :class:`_Changes`: a
  PostgreSQL notification (LISTEN on a psycopg ``AsyncConnection`` of its own), a release on
  this host (the inotify descriptor of :mod:`tasklocks._wake`, watched by the loop), or a poll
  of the namespace's version that the table's waiters share (MariaDB and SQLite, and PostgreSQL
  behind PgBouncer or as a safety net, at the sync waiters' pace).
* Cancellation is safe: a statement that is running when the coroutine is cancelled runs to its
  end (a thread cannot be stopped halfway, and its reply decides what was written), then the
  acquisition gives back whatever it may have written, in the order the blocking API does when
  it raises: nothing held, no place in the queue. The ``CancelledError`` comes after that.
  A read (``held``, ``waiting``, ``raw``) is cancelled at once: it wrote nothing, and its
  statement ends on the worker before the next call there.
* ``on_wait`` and ``watch`` are called on the event loop's thread (plain functions).
* A table serves the event loop that opened it (its wake-ups are that loop's): a call from
  another loop raises :class:`TasklocksError`, before it does anything.
* The default owner is the calling asyncio task's, ``pid:<host>:<pid>:aio-<n>``
  (``task:<id>:aio-<n>`` inside a tasklocks task), so that two coroutines of one process are two
  holders, as two processes are: one waits for the other (a blocking table's default owner is
  the process). It is the task that calls ``acquire``, ``hold`` or ``release`` (plain functions
  that return the coroutine or the context manager), even when another task runs the coroutine:
  ``asyncio.wait_for`` (a task of its own on Python 3.11), ``create_task``, ``gather``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from types import TracebackType
from typing import Any, TypeVar, cast

from tasklocks._core import Holder, Want
from tasklocks._session import DEFAULT_TTL
from tasklocks._waiting import Listen, OnWait, Pause, Request, Steps, Watch
from tasklocks.errors import BadURL, StoreError, TasklocksError
from tasklocks.locks import THIS_PROCESS, HeldLock, Lease, LockTable, QueuedWaiter, _ThisProcess
from tasklocks.locks import connect as _connect
from tasklocks.owner import ProcessIdentity, current_process, default_owner
from tasklocks.store import AsyncNotifies, Backend, Engine, Snapshot
from tasklocks.store._base import SidesDiffer, SQLStore, first_delay, next_delay
from tasklocks.store._engine import is_async_engine
from tasklocks.store._loop_engine import AsyncEngine, loop_engine

__all__ = ["AsyncLease", "AsyncLockTable", "connect", "task_owner"]

T = TypeVar("T")
LISTEN_WAIT = 2.0  # seconds a first waiter waits for the LISTEN connection before polling
RETRY_POLL = 1.0  # seconds between polls while the database does not answer


_numbers: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()
_count = itertools.count(1)


def task_owner() -> str:
    """The default owner of locks taken by the calling asyncio task: the process's default
    owner (see :func:`tasklocks.owner.default_owner`) and ``:aio-<n>``, numbered per process."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("tasklocks.aio.task_owner() is for code running in an asyncio task")
    number = _numbers.get(task)
    if number is None:
        number = _numbers[task] = next(_count)
    return f"{default_owner(current_process())}:aio-{number}"


def _callers_owner(owner: str | None) -> str | None:
    """``owner``, or the calling task's when it is None: worked out when ``acquire``, ``hold`` or
    ``release`` is called, not when its coroutine starts, which may be in a task of its own
    (``asyncio.wait_for`` on Python 3.11, ``create_task``, ``gather``, ``shield``). None outside
    a task (``asyncio.run(table.acquire(...))``): the task that runs the coroutine owns it."""
    if owner is not None:
        return owner
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
    return None if task is None else task_owner()


@asynccontextmanager
async def _held(acquire: Callable[[], Awaitable[AsyncLease]]) -> AsyncIterator[AsyncLease]:
    """``hold``'s block: the lease ``acquire()`` gives, released when the block ends."""
    lease = await acquire()
    async with lease:
        yield lease


class _Abandon(BaseException):
    """Thrown into an acquisition's steps when its coroutine was cancelled or its table closes:
    they give back what they may have written, as for any exception, and raise it again."""


async def _finish(future: asyncio.Future[T]) -> T:
    """Await ``future`` (work on a thread, which cannot be stopped halfway) to its end even if
    the caller is cancelled meanwhile; then raise that ``CancelledError``, or return."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller hears of
        raise cancelled
    return future.result()


def _advance(send: Callable[[Any], Request], reply: Any) -> tuple[bool, Any]:
    """One step of an acquisition: (False, what it waits for) or (True, its result)."""
    try:
        return False, send(reply)
    except StopIteration as stop:
        return True, stop.value


def _on_loop(
    fn: Callable[[Any], None] | None, loop: asyncio.AbstractEventLoop
) -> Callable[[Any], None] | None:
    """``fn`` called on the loop's thread (from the worker, which waits for it to return)."""
    if fn is None:
        return None
    callback = fn
    thread = threading.get_ident()

    def call(arg: Any) -> None:
        if threading.get_ident() == thread:
            callback(arg)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                callback(arg)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        if loop.is_closed():
            raise TasklocksError("the event loop of this async lock table is closed")
        loop.call_soon_threadsafe(run)
        while True:
            try:
                done.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if loop.is_closed():  # it will never run the callback
                    raise TasklocksError(
                        "the event loop of this async lock table closed during a callback"
                    ) from None

    return call


class AsyncLease:
    """:class:`tasklocks.Lease` for asyncio: ``await lease.release()``, ``async with lease``."""

    def __init__(self, table: AsyncLockTable, lease: Lease) -> None:
        self.table = table
        self.lease = lease
        self.names: tuple[str, ...] = lease.names
        self.wants: tuple[Want, ...] = lease.wants
        self.owner: str = lease.owner
        self.token: int = lease.token  # the fencing token (see tasklocks.Lease)
        self.lease_id: str = lease.lease_id

    @property
    def released(self) -> bool:
        return self.lease.released

    @property
    def lost(self) -> threading.Event:
        """Set once the lease is lost (see :attr:`tasklocks.Lease.lost`)."""
        return self.lease.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is lost (no I/O: it may be called anywhere)."""
        self.lease.check()

    async def release(self) -> None:
        """Release every lock of this lease (see :meth:`tasklocks.Lease.release`); cancelled
        meanwhile, the release still completes before ``CancelledError`` is raised."""
        await self.table._call(self.lease.release)

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.lease.released:
            await self.release()

    def __repr__(self) -> str:
        return "<Async" + repr(self.lease)[1:]


class AsyncLockTable:
    """The locks of one namespace, for asyncio: :class:`tasklocks.LockTable`'s methods as
    coroutines. Open it with :func:`connect`; close it with ``await table.close()`` or
    ``async with``."""

    def __init__(self, table: LockTable, worker: concurrent.futures.ThreadPoolExecutor) -> None:
        self.table = table  # the blocking table the steps run on (in the worker only)
        self._worker = worker
        self._loop = asyncio.get_running_loop()  # the loop it serves (connect()'s)
        self._changes = _Changes(self)
        self._closed = False  # the worker takes no more calls
        self._closing: asyncio.Future[None] | None = None  # close() began: no new acquisitions
        self._driving = 0  # acquisitions in progress
        self._idle = asyncio.Event()  # set while there are none
        self._idle.set()

    @property
    def namespace(self) -> str:
        return self.table.namespace

    @property
    def ttl(self) -> float:
        return self.table.ttl

    def _submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        self._check_loop()
        if self._closed:
            raise self._closed_error()
        return self._loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def _check_loop(self) -> None:
        """Refuse a call from another event loop than the one that opened the table: its
        wake-ups (the inotify reader, LISTEN, the poll) and its events belong to that loop."""
        if asyncio.get_running_loop() is not self._loop:
            if self._closed and self._loop.is_closed():  # (closed after its loop ended)
                raise self._closed_error()
            raise TasklocksError(
                f"the async lock table of namespace {self.namespace} was opened in another "
                "event loop (a second asyncio.run()?), and a table serves the loop that opened "
                "it; open the table inside the loop that uses it (await tasklocks.aio.connect() "
                "there)"
            )

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the worker; if cancelled meanwhile, after it returns."""
        return await _finish(self._submit(fn, *args, **kwargs))

    async def _read(self, fn: Callable[[], T]) -> T:
        """``fn``, which writes nothing, on the worker; if cancelled meanwhile, at once: a read
        still queued there is dropped, one running ends there (the next call waits for it),
        and what it returns or raises is dropped. (A read waited, as a change must, for a
        statement whose outcome nobody would read.)"""
        future = self._submit(fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.cancel()  # (queued: never run; so retries under a timeout do not pile up)
            raise

    # --- acquiring ----------------------------------------------------------------------------

    def acquire(
        self,
        *names: str,
        owner: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
        note: str | None = None,
        on_wait: OnWait | None = None,
        process: ProcessIdentity | _ThisProcess | None = THIS_PROCESS,
        shared: bool | Iterable[str] = False,
        limit: int | Mapping[str, int] | None = None,
        watch: Watch | None = None,
    ) -> Coroutine[Any, Any, AsyncLease]:
        """Take every one of ``names``, or none of them: :meth:`tasklocks.LockTable.acquire`,
        awaiting where it would block (``await table.acquire(...)``). A cancelled call leaves
        nothing held and no place in the queue, whenever the cancellation lands. The default
        owner is the task that calls ``acquire``, whichever task awaits the coroutine."""
        if process is THIS_PROCESS:
            owner = _callers_owner(owner)

        def steps(loop: asyncio.AbstractEventLoop, owner: str | None) -> Steps[Lease]:
            return self.table._acquiring(
                names,
                owner,
                wait,
                timeout,
                note,
                _on_loop(on_wait, loop),
                process,
                shared,
                limit,
                _on_loop(watch, loop),
            )

        return self._acquire(steps, owner, process is THIS_PROCESS)

    async def _acquire(
        self,
        steps: Callable[[asyncio.AbstractEventLoop, str | None], Steps[Lease]],
        owner: str | None,
        this_process: bool,
    ) -> AsyncLease:
        """``acquire``'s coroutine: its steps, made on the loop that runs it, for ``owner``;
        for this process's entries called outside any task (no caller's owner), the task that
        runs this."""
        if owner is None and this_process:
            owner = task_owner()
        return AsyncLease(self, await self._drive(steps(asyncio.get_running_loop(), owner)))

    async def _drive(self, steps: Steps[Lease]) -> Lease:
        """``LockTable._run`` for the loop: each step on the worker, each sleep awaited. A
        cancellation, or the table's closing, is thrown into the steps (on the worker) so that
        they give back what they wrote, as they do when anything else interrupts them."""
        try:
            self._check_loop()
        except TasklocksError:
            steps.close()  # not started: nothing to give back
            raise
        if self._closing is not None:
            steps.close()  # not started: nothing to give back
            raise self._closed_error()
        self._driving += 1
        self._idle.clear()
        try:
            return await self._steps(steps)
        finally:
            self._driving -= 1
            if not self._driving:
                self._idle.set()

    async def _steps(self, steps: Steps[Lease]) -> Lease:
        send: Callable[[Any], Request] = steps.send
        reply: Any = None
        cancelled: asyncio.CancelledError | None = None
        while True:
            changed = self._changes.event  # before the step: a change during it wakes the sleep
            step = self._submit(_advance, send, reply)
            try:
                done, value = await _finish(step)
            except asyncio.CancelledError as exc:  # the step ran to its end
                cancelled = exc
                if step.exception() is not None:
                    raise  # the steps raised: they cleaned up as they do for any error
                done, value = step.result()
            except _Abandon:  # the steps gave back what they had written
                if cancelled is not None:
                    raise cancelled from None
                raise self._closed_error() from None
            if done:
                # Granted just as the cancellation came, or as close() began (a lease the closed
                # table could never release, held until its expiry): given back now, while the
                # store is open (close() waits for this acquisition), as LockTable.close() does.
                if cancelled is not None or self._closing is not None:
                    await _finish(self._submit(_give_back, value))
                    if cancelled is not None:
                        raise cancelled
                    raise self._closed_error()
                return value  # type: ignore[no-any-return]
            if cancelled is not None or self._closing is not None:
                send, reply = steps.throw, _Abandon()
                continue
            try:
                reply = await self._sleep(value, changed)
                send = steps.send
            except asyncio.CancelledError as exc:
                cancelled = exc
                send, reply = steps.throw, _Abandon()
            except BaseException as exc:
                send, reply = steps.throw, exc

    async def _sleep(self, request: Request, changed: asyncio.Event) -> bool:
        if isinstance(request, Pause):
            await asyncio.sleep(request.seconds)
            return False
        return await self._changes.wait(request, changed)

    def _closed_error(self) -> TasklocksError:
        return TasklocksError(
            f"the async lock table of namespace {self.namespace} is closed; "
            "open another with tasklocks.aio.connect()"
        )

    def hold(
        self,
        *names: str,
        timeout: float | None = None,
        owner: str | None = None,
        note: str | None = None,
        on_wait: OnWait | None = None,
        shared: bool | Iterable[str] = False,
        limit: int | Mapping[str, int] | None = None,
        watch: Watch | None = None,
    ) -> AbstractAsyncContextManager[AsyncLease]:
        """``async with table.hold(...) as lease``: wait for ``names`` (up to ``timeout``), hold
        them in the block, then release (see :meth:`tasklocks.LockTable.hold`). The default
        owner is the task that calls ``hold``."""
        owner = _callers_owner(owner)
        return _held(
            lambda: self.acquire(
                *names,
                owner=owner,
                wait=True,
                timeout=timeout,
                note=note,
                on_wait=on_wait,
                shared=shared,
                limit=limit,
                watch=watch,
            )
        )

    # --- releasing and looking ------------------------------------------------------------------

    def release(self, *names: str, owner: str | None = None) -> Coroutine[Any, Any, None]:
        """``await table.release(*names)``: see :meth:`tasklocks.LockTable.release` (``owner``:
        by default the task that calls ``release``, whichever task awaits the coroutine)."""
        return self._release(names, _callers_owner(owner))

    async def _release(self, names: tuple[str, ...], owner: str | None) -> None:
        owner = task_owner() if owner is None else owner
        await self._call(self.table.release, *names, owner=owner)

    async def release_owner(self, owner: str) -> list[str]:
        """See :meth:`tasklocks.LockTable.release_owner`."""
        return await self._call(self.table.release_owner, owner)

    async def release_all(self) -> list[str]:
        """See :meth:`tasklocks.LockTable.release_all`."""
        return await self._call(self.table.release_all)

    async def reap(self, *, owner: str | None = None) -> list[tuple[str, Holder]]:
        """See :meth:`tasklocks.LockTable.reap`."""
        return await self._call(self.table.reap, owner=owner)

    async def held(self) -> list[HeldLock]:
        """See :meth:`tasklocks.LockTable.held`."""
        return await self._read(self.table.held)

    async def waiting(self) -> list[QueuedWaiter]:
        """See :meth:`tasklocks.LockTable.waiting`."""
        return await self._read(self.table.waiting)

    async def raw(self) -> Snapshot:
        """See :meth:`tasklocks.LockTable.raw`."""
        return await self._read(self.table.raw)

    async def repair(self) -> Snapshot:
        """See :meth:`tasklocks.LockTable.repair`."""
        return await self._call(self.table.repair)

    # --- lifetime -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the table (see :meth:`LockTable.close`), once the calls before this one have
        ended; acquisitions still waiting give up their place in the queue, and those granted
        meanwhile give the lease back, and raise :class:`TasklocksError`. Idempotent: every
        caller returns when it is closed.

        A table whose event loop has ended (its ``asyncio.run()`` returned) may be closed from
        another loop: its calls and wake-ups ended with that loop, and the worker closes the
        table.

        :raises TasklocksError: called from another event loop than the one that opened it,
            while that loop is open, before the table was closed."""
        if self._closing is not None and self._closing.done():
            return  # (closed already: from any loop, as a teardown may close it again)
        if self._loop.is_closed():  # (so this is another loop)
            if self._closing is None or self._closing.get_loop() is not asyncio.get_running_loop():
                self._closing = asyncio.ensure_future(self._close_after_its_loop())
            await asyncio.shield(self._closing)
            return
        self._check_loop()
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close_after_its_loop(self) -> None:
        """``close()`` once the table's loop has ended: nothing of it runs again (its tasks were
        cancelled, and its reader is gone with it), so the table's own close runs on the worker,
        awaited from this loop."""
        self._changes.abandon()
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self.table.close)
        finally:
            self._worker.shutdown(wait=False)

    async def _close(self) -> None:
        self._changes.fire()  # every waiting acquisition sees _closing and gives up
        await self._idle.wait()
        await self._changes.close()
        closing = self._submit(self.table.close)  # after the calls queued before it
        self._closed = True
        try:
            await _finish(closing)
        finally:
            self._worker.shutdown(wait=False)

    async def __aenter__(self) -> AsyncLockTable:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncLockTable {self.table.store.url} namespace={self.namespace}>"


def _give_back(lease: Lease) -> None:
    """Release a lease granted to a cancelled acquisition (what is gone is gone)."""
    with suppress(TasklocksError):
        lease.release()


class _Changes:
    """What a table's waiting coroutines await: the namespace may have moved on from the version
    they read. Three sources fire it, and every waiter then reads again (as a woken blocking
    waiter does): a notification (PostgreSQL), a local wake-up (inotify, on the loop), and a
    poll of the version, one per table whatever the number of waiters, at the store's pace."""

    def __init__(self, table: AsyncLockTable) -> None:
        self._table = table
        store = table.table.store
        assert isinstance(store, Backend)  # (tasklocks.aio.connect opens one)
        self._store = store
        self._namespace = table.namespace
        self._event = asyncio.Event()  # set (and replaced) on each change
        self._waiting: Counter[int] = Counter()  # the versions waiters wait to move on from
        self._seen = 0  # the newest version polled
        self._now = asyncio.Event()  # poll now (a waiter starts afresh)
        self._poller: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncio.Event | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def event(self) -> asyncio.Event:
        """Set by the next change: take it before reading, wait on it after."""
        return self._event

    def fire(self) -> None:
        """Wake every waiter: it reads again (a change, or the table is closing)."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _heard(self, namespace: str | None) -> None:
        if namespace is None or namespace == self._namespace:
            self.fire()

    def _ready(self, listening: bool) -> None:
        if self._listening is not None:  # the first attempt to LISTEN is over, either way
            self._listening.set()

    def _woken(self) -> None:
        if self._table.table._waker.drain():
            self.fire()

    def _start(self, wake_fd: int | None) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            store = self._store
            if isinstance(store, AsyncNotifies) and store.listens():
                self._listening = asyncio.Event()
                self._listener = loop.create_task(store.listen_async(self._heard, self._ready))
        if wake_fd is not None and wake_fd != self._fd:
            if self._fd is not None:
                loop.remove_reader(self._fd)
            loop.add_reader(wake_fd, self._woken)
            self._fd = wake_fd

    async def wait(self, request: Listen, event: asyncio.Event) -> bool:
        """True once the namespace may have moved on from ``request.version`` (a local wake-up
        counts) or ``event`` (taken before the read of that version) is set; False after
        ``request.timeout`` seconds."""
        if self._closed or event.is_set():
            return True
        self._start(request.wake_fd)
        if self._listening is not None and not self._listening.is_set():
            with suppress(TimeoutError):  # listen first, then poll: a change after it is heard
                async with asyncio.timeout(min(request.timeout, LISTEN_WAIT)):
                    await self._listening.wait()
        if self._seen > request.version:
            return True
        self._waiting[request.version] += 1
        try:
            if not request.pace:
                self._now.set()
            if self._poller is None:
                self._poller = asyncio.get_running_loop().create_task(self._poll())
            with suppress(TimeoutError):
                async with asyncio.timeout(request.timeout):
                    await event.wait()
                    return True
            return False
        finally:
            self._waiting[request.version] -= 1
            if not self._waiting[request.version]:
                del self._waiting[request.version]

    async def _poll(self) -> None:
        """Poll the version while anyone waits: fast after a waiter starts afresh or a change,
        slower while nothing happens (``Store.pace``, as the blocking waiters poll)."""
        pace = self._store.pace()
        woken = self._fd is not None  # a local release wakes them at once: poll slowly
        first = first_delay(pace, woken)
        start = time.monotonic()
        delay = 0.0
        try:
            while self._waiting:
                if not self._now.is_set():
                    with suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._now.wait()
                    if not self._waiting:
                        break
                if self._now.is_set():
                    self._now.clear()
                    start, delay = time.monotonic(), first
                try:
                    seen = await self._table._call(self._store.version, self._namespace)
                except TasklocksError:  # an outage: the waiters go on waiting
                    delay = RETRY_POLL
                    continue
                self._seen = max(self._seen, seen)
                if any(version < seen for version in self._waiting):
                    self.fire()
                    start, delay = time.monotonic(), first
                    continue
                waited = time.monotonic() - start
                delay = next_delay(pace, max(delay, first), waited, woken)
        finally:
            self._poller = None

    def abandon(self) -> None:
        """Its loop has ended, with its tasks and its reader: nothing is left to stop."""
        self._closed = True
        self._poller = self._listener = None
        self._fd = None

    async def close(self) -> None:
        self._closed = True
        for task in (self._poller, self._listener):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        self._listener = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None


async def connect(
    url: str | Engine | AsyncEngine | None = None,
    namespace: str = "default",
    *,
    ttl: float = DEFAULT_TTL,
    reconnect_timeout: float = 5.0,
) -> AsyncLockTable:
    """Open the lock table at ``url`` for asyncio: :func:`tasklocks.connect`'s arguments and
    errors; the table's statements run on a worker thread of its own (see the module's doc).
    ``url`` may also be a SQLAlchemy ``AsyncEngine`` on psycopg (``postgresql+psycopg://``) or
    aiomysql (``mysql+aiomysql://``), whose pool then lends a connection for each call, driven on
    this loop (see ``store/_loop_engine.py``), or on aiosqlite (its file).

    :raises BadURL: the URL is malformed, or ``url`` is another object (a connection, a session).
    :raises StoreUnavailable: the database cannot be reached or its driver is missing.
    """
    loop = asyncio.get_running_loop()
    source: Any = url
    if hasattr(url, "sync_connection"):  # an AsyncConnection, which has a sync_engine too
        raise BadURL(
            "a database URL, a SQLAlchemy Engine or an AsyncEngine was expected, not "
            f"{type(url).__name__}; pass the AsyncEngine it came from (connection.engine): "
            "tasklocks borrows a connection of its pool for each call"
        )
    if is_async_engine(url):
        source = loop_engine(cast(AsyncEngine, url), loop)
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tasklocks-aio")
    opening = loop.run_in_executor(
        worker,
        functools.partial(
            _connect, source, namespace, ttl=ttl, reconnect_timeout=reconnect_timeout
        ),
    )
    try:
        table = await _finish(opening)
        if source is not url:  # an AsyncEngine: its own connections come from its URL alone
            await _finish(loop.run_in_executor(worker, _own_connections, table))
    except BaseException:
        if opening.done() and not opening.cancelled() and opening.exception() is None:
            await asyncio.shield(loop.run_in_executor(worker, opening.result().close))
        worker.shutdown(wait=False)
        raise
    return AsyncLockTable(table, worker)


def _own_connections(table: LockTable) -> None:
    """Open the sessions' connection of a table on an AsyncEngine now, from the engine's URL
    (its ``connect_args`` and ``async_creator`` cannot make a blocking connection), and read
    the sessions there, so that a URL that does not reach the database fails ``connect()``,
    saying so, rather than the first acquisition after ``reconnect_timeout``, naming a host or a
    table the application never uses.

    :raises StoreUnavailable: the URL does not reach the database.
    :raises StoreError: it reaches a database without the lock table (another one, say)."""
    store = table.store
    if not isinstance(store, SQLStore):
        return
    try:
        store._on_side("sessions", ())  # (on the sessions' own connection, as renewals run)
    except SidesDiffer:
        raise  # (it reached a database: the message names the problem and the fix)
    except StoreError as exc:
        why = (
            f"tasklocks opens its own connections (its sessions', PostgreSQL's LISTEN) from the "
            f"AsyncEngine's URL, without its connect_args or async_creator, and that failed: "
            f"{exc}; make the engine's URL reach the database, or pass "
            "tasklocks.aio.connect() the database's URL"
        )
        raise type(exc)(why) from exc
