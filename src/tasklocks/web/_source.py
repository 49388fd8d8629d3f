"""Where the dashboard's data comes from: the public API (:class:`Tasks`), read by one thread.

Requests never talk to the database themselves. One refresher thread reads the namespace's tasks,
held locks and queue of waiters every :data:`REFRESH` seconds while someone looks (it sleeps after
:data:`IDLE` seconds without a request), and every request renders the latest snapshot. So the
database sees one reader however many browsers are open, and a database that hangs cannot tie
up the server's threads: a request waits at most :data:`FRESH_WAIT` seconds for a snapshot, then
renders the last one with a banner.

When a read fails, the snapshot keeps the last data and says why and since when; the refresher
drops its connections and tries again every :data:`RETRY` seconds, so the dashboard recovers by
itself when the database returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

from tasklocks import HeldLock, QueuedWaiter, StoreUnavailable, TasklocksError, TaskRecord, Tasks
from tasklocks import current_process as _current_process
from tasklocks.store import default_url, parse_url
from tasklocks.tasks import TaskNotFound

__all__ = [
    "CannotStop",
    "LogChunk",
    "Snapshot",
    "Source",
    "read_locks",
    "read_log",
    "sqlite_file",
]

log = logging.getLogger("tasklocks.web")
T = TypeVar("T")

REFRESH = 0.2  # seconds between reads while someone looks
RETRY = 1.0  # seconds between tries while the database is unavailable
IDLE = 5.0  # seconds without a request after which the refresher sleeps
FRESH_WAIT = 2.0  # seconds a request waits for a fresh snapshot before it takes the last one
TASK_LIMIT = 500  # the newest tasks read per refresh
LOG_CHUNK = 64 * 1024  # bytes of a log sent at once
CLOSE_WAIT = 5.0  # seconds close() waits for the refresher and a database call in progress


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Snapshot:
    """What the database said at ``taken`` (the last good read), and what went wrong since."""

    tasks: list[TaskRecord] = field(default_factory=list)
    locks: list[HeldLock] = field(default_factory=list)  # one per holder: shared names repeat
    waiters: list[QueuedWaiter] = field(default_factory=list)  # the queue, in order
    taken: float | None = None  # epoch of the last good read; None: never read
    error: str | None = None  # why the latest read failed (None: it did not)
    error_since: float | None = None  # when reads started failing
    unavailable: bool = False  # the error is a database that does not answer (or hangs)

    def task(self, task_id: int) -> TaskRecord | None:
        """A task of this snapshot, or None if it is not among them."""
        return next((r for r in self.tasks if r.id == task_id), None)


class CannotStop(TasklocksError):
    """The dashboard cannot stop that task (it runs on another host)."""


class LockReader(Protocol):
    """What :func:`read_locks` needs of a :class:`~tasklocks.LockTable`."""

    def held(self) -> list[HeldLock]: ...

    def waiting(self) -> list[QueuedWaiter]: ...


def read_locks(table: LockReader) -> tuple[list[HeldLock], list[QueuedWaiter]]:
    """The held locks and the queue of ``table``, as alike as two reads of the document allow.

    ``waiting()`` and ``held()`` read the document once each, and a waiter may be granted in
    between. The queue is read first, so such a waiter is in both reads (never in neither): it
    is then left out of the queue, since its lease is among the holders'.
    """
    waiters = table.waiting()
    locks = table.held()
    leases = {h.holder.lease for h in locks}
    return locks, [q for q in waiters if q.waiter.lease not in leases]


def sqlite_file(url: str) -> Path | None:
    """The file of an ``sqlite:///`` URL, else None (``sqlite:////abs`` or ``sqlite:///rel``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        return None
    path = rest.split("?", 1)[0]
    return Path(path[1:]) if path.startswith("/") and len(path) > 1 else None


class Source:
    """The dashboard's view of one database and namespace (see the module docstring).

    :param url: the database URL (None: ``$TASKLOCKS_DB``, else the default file).
    :param namespace: the lock namespace whose tasks and locks are shown.
    :param stop_grace: seconds between SIGTERM and SIGKILL when the dashboard stops a task.
    """

    def __init__(self, url: str | None, namespace: str, *, stop_grace: float = 10.0) -> None:
        self.url = url
        parsed = parse_url(default_url() if url is None else url)
        label = {"sqlite": "SQLite", "mysql": "MySQL", "postgresql": "PostgreSQL"}[parsed.scheme]
        self._where = f"{label} at {parsed.display()}"  # for a banner while it does not answer
        self.namespace = namespace
        self.stop_grace = stop_grace
        self._sqlite = sqlite_file(default_url() if url is None else url)  # None: a server database
        self._tasks: Tasks | None = None
        self._io = threading.Lock()  # one caller of self._tasks at a time
        self._cond = threading.Condition()
        self._snapshot = Snapshot()
        self._fresh_at = -1.0  # monotonic time of the last read, good or bad
        self._started = time.monotonic()  # (a database that never answered: since then)
        self._demand = time.monotonic()
        self._poke = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stopping: set[int] = set()
        # Why the latest stop of a task failed, until it ends or a later stop succeeds.
        self.stop_errors: dict[int, str] = {}
        self.host = _current_process().host

    # --- the refresher ---------------------------------------------------------------------------

    def _open(self) -> Tasks:
        if self._sqlite is not None and not self._sqlite.exists():
            # Opening would create an empty database: say it is missing instead.
            raise StoreUnavailable(f"the database file {self._sqlite} is missing")
        if self._tasks is None:
            self._tasks = Tasks(self.url, self.namespace)
        return self._tasks

    def _drop(self) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            with contextlib.suppress(Exception):
                tasks.close()

    def call(self, body: Callable[[Tasks], T], *, timeout: float = FRESH_WAIT) -> T:
        """Run ``body`` with the open :class:`Tasks` (opened if needed), one caller at a time.

        :raises StoreUnavailable: the database cannot be reached, or is busy past ``timeout``.
        :raises TasklocksError: as ``body`` raises (connections are dropped on store errors).
        """
        if not self._io.acquire(timeout=timeout):
            raise StoreUnavailable(f"the database has not answered for {timeout:g}s")
        try:
            try:
                return body(self._open())
            except TaskNotFound:
                raise
            except TasklocksError:
                self._drop()  # reconnect on the next call
                raise
        finally:
            self._io.release()

    def _read(self) -> Snapshot:
        previous = self._snapshot
        began = time.time()  # (a read that fails has failed since it began, not since it ended)
        try:
            tasks, (locks, waiters) = self.call(
                lambda t: (t.list(all=True, limit=TASK_LIMIT), read_locks(t.locks)), timeout=30.0
            )
        except Exception as exc:  # every failure becomes the banner, never a dead thread
            why = str(exc) if isinstance(exc, TasklocksError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, TasklocksError):
                with self._io:
                    self._drop()
            if previous.error is None:
                log.warning("tasklocks serve: the database is unavailable: %s", _one_line(why))
            since = previous.error_since or began
            away = isinstance(exc, StoreUnavailable)
            return replace(previous, error=_one_line(why), error_since=since, unavailable=away)
        if previous.error is not None:
            log.warning("tasklocks serve: the database is back")
        return Snapshot(tasks=tasks, locks=locks, waiters=waiters, taken=time.time())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and time.monotonic() - self._demand > IDLE:
                    self._cond.wait()
                if self._closed:
                    return
            snapshot = self._read()
            with self._cond:
                self._snapshot = snapshot
                self._fresh_at = time.monotonic()
                for task in snapshot.tasks:
                    if task.state.is_final:
                        self.stop_errors.pop(task.id, None)
                self._cond.notify_all()
                pause = REFRESH if snapshot.error is None else RETRY
                deadline = time.monotonic() + pause
                while not self._closed and not self._poke and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                self._poke = False

    def snapshot(self, *, max_age: float = 1.0) -> Snapshot:
        """The latest snapshot, at most ``max_age`` seconds old if the database answers within
        :data:`FRESH_WAIT` seconds; else the last one, with the error set."""
        with self._cond:
            self._demand = time.monotonic()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="tasklocks-web-refresher", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()  # wake a sleeping refresher
            deadline = time.monotonic() + FRESH_WAIT
            while time.monotonic() - self._fresh_at > max_age and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            snapshot = self._snapshot
            if time.monotonic() - self._fresh_at > max_age:
                stale = time.monotonic() - max(self._fresh_at, self._started)
                error = snapshot.error or f"{self._where} has not answered for {stale:.0f}s"
                # Failing since its last answer, or since the dashboard started if it never
                # answered (a read that hangs has no error yet).
                since = snapshot.error_since
                if since is None:
                    since = time.time() - stale
                away = snapshot.unavailable or snapshot.error is None
                snapshot = replace(snapshot, error=error, error_since=since, unavailable=away)
            return snapshot

    def refresh_soon(self) -> None:
        """Read again now instead of after the pause (after a change made here)."""
        with self._cond:
            self._poke = True
            self._demand = time.monotonic()
            self._cond.notify_all()

    # --- single tasks ----------------------------------------------------------------------------

    def task(self, task_id: int, snapshot: Snapshot | None = None) -> TaskRecord:
        """One task of this namespace, from ``snapshot`` (default: the latest) or else from the
        database.

        :raises TaskNotFound: no task with that id in this namespace.
        :raises StoreUnavailable: the database cannot be reached.
        """
        snapshot = snapshot if snapshot is not None else self.snapshot()
        record = snapshot.task(task_id)
        if record is None:
            if task_id >= 2**63:  # no database keeps such an id
                raise TaskNotFound(task_id)
            if snapshot.unavailable:  # (a read of its own would wait for the reconnection too)
                raise StoreUnavailable(snapshot.error or f"{self._where} does not answer")
            record = self.call(lambda t: t.get(task_id))
        if record.namespace != self.namespace:
            raise TaskNotFound(task_id)
        return record

    def can_stop(self, record: TaskRecord) -> bool:
        """Whether the dashboard can stop the task: it is active and runs on this host."""
        return not record.state.is_final and record.host in (None, self.host)

    def request_stop(self, task_id: int) -> TaskRecord:
        """Do what ``tasklocks stop`` does, in a thread of its own (SIGTERM, SIGKILL after the
        grace period; the record says ``stopped``); return the record as it was.

        :raises TaskNotFound: no such task in this namespace.
        :raises CannotStop: it runs on another host.
        """
        record = self.task(task_id)
        if record.state.is_final:
            return record
        if not self.can_stop(record):
            raise CannotStop(f"task {task_id} runs on {record.host}; stop it from there")
        with self._cond:
            if task_id in self._stopping:
                return record
            self._stopping.add(task_id)
            self.stop_errors.pop(task_id, None)
        threading.Thread(
            target=self._stop, args=(task_id,), name=f"tasklocks-web-stop-{task_id}", daemon=True
        ).start()
        return record

    def _stop(self, task_id: int) -> None:
        try:
            with Tasks(self.url, self.namespace) as tasks:  # a connection of its own
                self.refresh_soon()
                tasks.stop(task_id, grace=self.stop_grace)
        except Exception as exc:
            message = _one_line(str(exc) or type(exc).__name__)
            with self._cond:
                self.stop_errors[task_id] = message
            log.warning("tasklocks serve: could not stop task %s: %s", task_id, message)
        else:
            with self._cond:
                self.stop_errors.pop(task_id, None)
        finally:
            with self._cond:
                self._stopping.discard(task_id)
            self.refresh_soon()

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Stop the refresher and close the connections, waiting at most ``timeout`` seconds:
        a database call that hangs keeps its connection (the process is ending) rather than
        holding up the shutdown."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout)
        if not self._io.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("tasklocks serve: a database call did not end; not closing its connection")
            return
        try:
            self._drop()
        finally:
            self._io.release()


# --- logs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogChunk:
    """Text of a task's log from a byte offset, and the offset after it."""

    text: str
    offset: int
    missing: str | None = None  # why there is no log to read


def read_log(record: TaskRecord, offset: int | None, limit: int = LOG_CHUNK) -> LogChunk:
    """Read a task's log from ``offset`` (None: its last ``limit`` bytes, from a line start).

    Only a regular file named ``task-<id>.log`` (or ``task-<id>-<n>.log``) of that task is read,
    never through a symbolic link: the path comes from the database, and the dashboard must not
    show other files.
    """
    from tasklocks.web._view import trim_partial_utf8

    if record.log_path is None:
        return LogChunk("", offset or 0, "the task has no log yet")
    path = Path(record.log_path)
    if not re.fullmatch(rf"task-{record.id}(-[1-9][0-9]*)?\.log", path.name):
        return LogChunk("", offset or 0, f"the log path {path} is not this task's log")
    try:
        # O_NONBLOCK: opening a FIFO put there must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return LogChunk("", offset or 0, f"the log {path} is gone")
    except OSError as exc:
        return LogChunk("", offset or 0, f"cannot read the log {path}: {exc.strerror}")
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):  # a directory, a FIFO, a device...
        os.close(fd)
        return LogChunk("", offset or 0, f"the log {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        size = status.st_size
        tail = offset is None
        start = max(0, size - limit) if offset is None else min(max(0, offset), size)
        f.seek(start)
        data = f.read(limit)
    if tail and start > 0:  # begin at a line, not in the middle of one
        newline = data.find(b"\n")
        if newline >= 0:
            start += newline + 1
            data = data[newline + 1 :]
    data = trim_partial_utf8(data)
    return LogChunk(data.decode("utf-8", errors="replace"), start + len(data))
