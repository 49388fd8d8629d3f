"""The task runner: start tasks as detached processes, look at them, stop them, wait for them.

Each task runs under its own *supervisor* process (:mod:`tasklocks.tasks._supervisor`), started in a
new session so that the caller may exit or crash without taking the task with it. The supervisor
forks the task's process into a process group of its own, takes the task's locks for the owner
``task:<id>`` with entries that name the supervisor's pid *and* that process group, runs the
target, records the outcome and releases the locks. Because the entries name the process group,
the locks stay held while any process of the task runs, even if the supervisor is killed, and
become reclaimable by anyone once every process of the task is gone.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import itertools
import json
import math
import numbers
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasklocks._session import DEFAULT_TTL, check_ttl
from tasklocks.errors import StoreError, StoreUnavailable, TasklocksError, quote
from tasklocks.locks import LockTable
from tasklocks.names import (
    storable_text,
    validate_duration,
    validate_name,
    validate_note,
    validate_seconds,
)
from tasklocks.owner import (
    Liveness,
    current_process,
    env_number,
    group_is_empty,
    process_liveness,
    process_start_token,
)
from tasklocks.store import DEFAULT_TABLE, parse_url
from tasklocks.tasks._record import TaskRecord, TaskState, join_locks
from tasklocks.tasks._taskdb import TaskDB, TaskNotFound
from tasklocks.tasks._zygote import fork_supervisor

__all__ = [
    "BadTarget",
    "NoWorkingDirectory",
    "NotInTask",
    "TaskNotFound",
    "Tasks",
    "current_task_id",
    "default_tasks",
    "progress",
    "reconcile",
    "start",
    "stop",
    "wait",
]

ACTIVE = (TaskState.PENDING.value, TaskState.WAITING.value, TaskState.RUNNING.value)


class BadTarget(TasklocksError, ValueError):
    """A task target is neither ``"package.module:function"`` nor a command line (argv list)."""

    exit_code = 2


class NoWorkingDirectory(TasklocksError):
    """The caller's working directory, where a task runs, cannot be read: it was deleted."""

    exit_code = 2


def _check_target(target: str | Sequence[str]) -> str | list[str]:
    if isinstance(target, str):
        module, _, func = target.partition(":")
        if not module or not func or not all(p.isidentifier() for p in module.split(".")):
            raise BadTarget(
                f"bad task target {quote(target)}: name a callable as 'package.module:function', "
                "or pass a command line as a list of arguments"
            )
        return target
    argv = list(target)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise BadTarget("a command target must be a non-empty list of strings (argv, no shell)")
    for i, arg in enumerate(argv):
        if "\x00" in arg:  # (execvp refuses it: the task would only fail)
            raise BadTarget(
                f"argument {i} of the command holds a NUL character (\\x00), which no program "
                "can be given; leave it out"
            )
    return argv


_UNSAFE = re.compile(r"[^A-Za-z0-9._]+")  # what a log directory's name does not keep


def default_log_dir(url: str, table: str = DEFAULT_TABLE) -> Path:
    """Where the logs of the tasks of ``table`` in the database at ``url`` go: a directory of
    their own, since task ids are a table's own (task 1 of another table or database must not
    write into the same file). Next to an SQLite file, ``<name>-logs/<table>-<hash>``; else under
    the user's state directory, ``tasklocks/logs/<scheme>-<host>-<port>-<db>-<table>-<hash>``
    (the host of ``postgresql:///db``, libpq's default, as ``default``). The hash is of the URL
    without its password and parameters (``ParsedURL.display()``; for SQLite, the file's absolute
    path) and of the table. An SQLite file whose path is not UTF-8 (bytes a task's record, text,
    cannot keep) has its logs in the state directory too, as ``sqlite-<name>-<table>-<hash>``."""
    parsed = parse_url(url)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    if parsed.scheme == "sqlite":
        db = Path(parsed.path).resolve()
        identity = f"sqlite:///{db}"
        base, parts = db.with_name(db.stem + "-logs"), [table]
        if not _is_utf8(str(db)):
            base, parts = Path(state) / "tasklocks" / "logs", ["sqlite", db.stem, table]
    else:
        identity = parsed.display()
        base = Path(state) / "tasklocks" / "logs"
        port = "" if parsed.port is None else str(parsed.port)
        # (postgresql:///db, libpq's default host: "default" in the name, the URL in the hash)
        parts = [parsed.scheme, parsed.host or "default", port, parsed.database, table]
    # (surrogateescape: a URL given on the command line may hold bytes that are not UTF-8.)
    digest = hashlib.sha256(f"{identity}\0{table}".encode("utf-8", "surrogateescape"))
    slug = "-".join(_UNSAFE.sub("_", p) for p in parts if p)[:80]
    return base / f"{slug}-{digest.hexdigest()[:12]}"


def _new_log(log_dir: Path, task_id: int) -> tuple[Path, int]:
    """A new file for task ``task_id``'s log, opened for appending (the supervisor, the task and
    its processes share it): ``task-<id>.log``, or ``task-<id>-<n>.log`` when that name is taken.
    A table dropped and made again numbers its tasks from 1 again, and a ``log_dir`` may be
    shared; the file of another task of that id is kept as it is (one of its processes may still
    write it), never appended to. The record keeps the path."""
    for n in itertools.count(1):
        path = log_dir / (f"task-{task_id}.log" if n == 1 else f"task-{task_id}-{n}.log")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND  # (EXCL: no link either)
            return path, os.open(path, flags, 0o600)
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # (itertools.count never ends)


def _is_utf8(text: str) -> bool:
    """Whether UTF-8 encodes ``text`` (a path from bytes that were not UTF-8 holds surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Tasks(TaskDB):
    """Tasks recorded in the database at ``url``, taking their locks in ``namespace``.

    :param url: the database (default ``$TASKLOCKS_DB``, else the per-user SQLite file).
    :param namespace: the lock namespace the tasks' locks live in.
    :param log_dir: where task logs go (default: a directory of this database and table, next to
        an SQLite file, else in the user's state directory: see :func:`default_log_dir`).
    :param ttl: the ttl of the sessions that keep the tasks' locks (see :func:`connect`): a
        task whose supervisor cannot renew it in time is stopped (error code ``LOCK_LOST``).
    """

    def __init__(
        self,
        url: str | None = None,
        namespace: str = "default",
        *,
        table: str = "tasklocks",
        log_dir: str | os.PathLike[str] | None = None,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        check_ttl(ttl)
        super().__init__(url, namespace, table=table)
        self.ttl = ttl
        self._default_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else default_log_dir(self.url, table)

    # --- records ------------------------------------------------------------------------------

    def list(self, *, all: bool = False, limit: int | None = None) -> builtins.list[TaskRecord]:
        """Tasks, newest first: the active ones, or every one with ``all=True``.

        Records whose processes are provably dead are marked ``crashed`` first.
        """
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit must be a whole number >= 1 or None, not {limit!r}")
            limit = min(limit, 2**63 - 1)  # (more than there can be rows: every task)
        self.reconcile()
        rows = self.store.list_tasks(None if all else ACTIVE, limit, self.namespace)
        return [TaskRecord.from_row(r) for r in rows]

    def progress(self, task_id: int, percent: float | None, message: str | None = None) -> None:
        """Record a task's progress: ``percent`` from 0 to 100 (None keeps the last one) and a
        message (None keeps the last one).

        :raises ValueError: ``percent`` is not a number from 0 to 100, or ``message`` is not
            text every store keeps (a lone surrogate, NUL): nothing is written.
        :raises TypeError: ``message`` is not a str.
        """
        if percent is not None and (
            isinstance(percent, bool)
            or not isinstance(percent, numbers.Real)  # (numpy's numbers too)
            or not 0 <= percent <= 100
        ):
            raise ValueError(f"progress must be a number from 0 to 100 or None, not {percent!r}")
        validate_note(message, "a progress message")
        changes: dict[str, Any] = {}
        if percent is not None:
            changes["percent"] = float(percent)
        if message is not None:
            changes["message"] = message
        self.update(task_id, **changes)

    # --- starting -----------------------------------------------------------------------------

    def start(
        self,
        target: str | Sequence[str],
        *,
        args: Any = None,
        locks: Sequence[str] = (),
        kind: str | None = None,
        timeout: float | None = None,
        wait_for_locks: bool = True,
        shared: Sequence[str] = (),
        limits: Mapping[str, int] | None = None,
    ) -> int:
        """Start a task in its own detached process and return its id at once.

        :param target: ``"package.module:function"`` (called with ``args``: a dict as keyword
            arguments, a list as positional ones; its return value becomes the result), or a
            command line as a list of arguments (run without a shell).
        :param args: JSON-serialisable arguments for a callable target.
        :param locks: lock names taken, all or none, before the target runs (exclusive).
        :param shared: lock names taken shared (any number of tasks at once), with ``locks``.
        :param limits: lock names taken by at most this many tasks at once, with ``locks``:
            ``limits={"app_tasks": 3}`` runs at most 3 such tasks, the others wait in order.
        :param kind: a short description (``"update blog"``), shown to those who wait.
        :param timeout: seconds the target may run before it is stopped (``timed_out``); None
            or infinity: no limit (the record says None).
        :param wait_for_locks: wait while the locks are held (state ``waiting``); if False, a
            held lock fails the task at once.
        :raises BadTarget: the target is malformed (a command's argument with NUL too).
        :raises BadLockName: a lock name is not allowed.
        :raises NoWorkingDirectory: this process's working directory, where the task would run,
            is gone (nothing is written).
        :raises TypeError, ValueError: ``kind`` is not text (or holds a lone surrogate, which
            UTF-8 cannot encode, or NUL, which PostgreSQL cannot store).
        """
        checked = _check_target(target)
        # (A str is one name, as LockTable.acquire(shared="db") takes it, not its letters.)
        locks = [locks] if isinstance(locks, str) else locks
        shared = [shared] if isinstance(shared, str) else shared
        limits = dict(limits or {})
        for name, limit in limits.items():
            if type(limit) is not int or limit < 1:
                raise ValueError(f"the limit of {name} must be a whole number >= 1, not {limit!r}")
        lock_names = [validate_name(n) for n in dict.fromkeys([*locks, *shared, *limits])]
        modes: dict[str, int | None] = {n: None for n in shared}
        modes.update(limits)
        timeout = validate_seconds("timeout", timeout)  # (NaN: never)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        if timeout == math.inf:  # (also 10**400) no limit, stored as such: MariaDB refuses inf
            timeout = None
        kind = validate_note(kind, what="a task's kind")
        try:
            json.dumps(args)
        except (TypeError, ValueError) as exc:
            raise BadTarget(f"task arguments must be JSON-serialisable: {exc}") from exc
        except RecursionError:
            raise BadTarget("task arguments nest too deep to be stored as JSON") from None
        try:
            os.getcwd()  # (the supervisor and the task run there: the zygote's fork asks for it)
        except OSError as exc:
            raise NoWorkingDirectory(
                f"cannot read the working directory ({exc.strerror}: deleted?), where a task "
                "runs; change to one that exists and start it again"
            ) from None
        self.reconcile()
        record = {
            "kind": kind,
            "target": json.dumps(checked),
            "args": json.dumps(args),
            "locks": json.dumps(join_locks(lock_names, modes)),
            "namespace": self.namespace,
            "state": TaskState.PENDING.value,
            "created": time.time(),
            "timeout": timeout,
        }
        # Until a supervisor claims it, the task is this process's: if we die before one is
        # started, reconcile() can prove it and mark the record crashed.
        me = current_process()
        record.update(pid=me.pid, start_token=me.start, boot=me.boot, host=me.host, pidns=me.pidns)
        task_id = self.store.create_task(record)
        try:
            self._spawn(task_id, wait_for_locks)
        except BaseException as exc:
            self.update(
                task_id,
                state=TaskState.FAILED,
                finished=time.time(),
                error_code=type(exc).__name__,
                error_message=storable_text(f"could not start the supervisor: {exc}"),
            )
            raise
        return task_id

    def _spawn(self, task_id: int, wait_for_locks: bool) -> None:
        """Start the task's supervisor (forked by the zygote, else exec'd) and record it."""
        if self._default_log_dir:  # (its parent too: it lists every database and table)
            self.log_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path, fd = _new_log(self.log_dir, task_id)
        env = dict(os.environ)
        env.pop("TASKLOCKS_TASK_ID", None)
        env.pop("TASKLOCKS_TASK_PGID", None)
        argv = [
            self.url,
            self.table,
            str(task_id),
            str(log_path),
            repr(self.ttl),
            *([] if wait_for_locks else ["--no-wait"]),
        ]
        try:
            pid = fork_supervisor(argv, fd, env)
            if pid is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tasklocks.tasks._supervisor", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    start_new_session=True,
                    close_fds=True,
                    env=env,
                )
                _forget(proc)
                pid = proc.pid
        finally:
            os.close(fd)
        me = current_process()
        while True:  # record the supervisor's identity unless it already claimed the task
            current = self.get(task_id)
            if current.pgid is not None or current.state.is_final or current.pid != me.pid:
                break
            cols = current.changed(
                pid=pid,
                start_token=process_start_token(pid),
                boot=me.boot,
                pidns=me.pidns,
                log_path=str(log_path),
            )
            if self.store.update_task(task_id, current.version, cols):
                break

    # --- watching -----------------------------------------------------------------------------

    def liveness(self, record: TaskRecord) -> Liveness:
        """Whether any process of the task may still run (fail closed, as for locks)."""
        if record.pid is None:
            return Liveness.UNKNOWN
        return process_liveness(
            record.pid,
            record.start_token,
            record.boot,
            record.host,
            record.pidns,
            record.pgid,
            local_db=self.locks.local_db,
        )

    def reconcile(self) -> builtins.list[int]:
        """Release the locks of active tasks whose processes are provably all gone, then mark
        them ``crashed`` (in that order, as a supervisor does: a final record's locks are
        free). Returns the ids marked."""
        marked = []
        for row in self.store.list_tasks(ACTIVE, None):
            record = TaskRecord.from_row(row)
            if self.liveness(record) is not Liveness.DEAD:
                continue
            if record.pgid is not None and not group_is_empty(record.pgid):
                continue
            changes: dict[str, Any] = {"state": TaskState.CRASHED, "finished": time.time()}
            if record.stop_requested is not None:
                changes["state"] = TaskState.STOPPED
            changes["message"] = "the task's processes died without recording an outcome"
            # Every process of the task is gone, so its entries are provably dead; an entry of
            # a process that left the task's group and still runs is not, and stays.
            try:
                LockTable(self.locks.store, record.namespace).reap(owner=f"task:{record.id}")
            except StoreUnavailable:
                raise
            except StoreError:
                # Its namespace cannot be changed now (its document is corrupt, or its row
                # was deleted meanwhile): the record stays active for a later look, and
                # another namespace's trouble does not fail this call.
                continue
            # (Every namespace's tasks: a record deleted meanwhile, as a cleanup of another
            # namespace's rows may do, is passed over.)
            with contextlib.suppress(TaskNotFound):
                if self.update_from(record, **changes) is not None:
                    marked.append(record.id)
        return marked

    def wait(self, task_id: int, timeout: float | None = None) -> TaskRecord:
        """Block until the task is finished and return its record.

        :raises TimeoutError: the task is still active after ``timeout`` seconds.
        """
        timeout = validate_seconds("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        last_check = time.monotonic()
        while True:
            record = self.get(task_id)
            if record.state.is_final:
                return record
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                if task_id in self.reconcile():
                    continue
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"task {task_id} is still {record.state} after {timeout:g}s")
            left = 0.1 if deadline is None else deadline - now
            time.sleep(max(0.0, min(delay, left)))
            delay = min(delay * 1.5, 0.1)

    def stop(self, task_id: int, *, grace: float = 10.0) -> TaskRecord:
        """Stop a task: SIGTERM to its process group, SIGKILL after ``grace`` seconds.

        The record says ``stopped`` either way (with the signal that ended the task). Returns
        the final record.

        :raises TaskNotFound: no such task.
        :raises TasklocksError: the task runs on another host.
        :raises ValueError: ``grace`` is not a number of seconds, 0 or more.
        """
        grace = validate_duration("grace", grace)
        record = self.get(task_id)
        if record.state.is_final:
            return record
        if record.host is not None and record.host != current_process().host:
            raise TasklocksError(f"task {task_id} runs on {record.host}; stop it from there")
        updated = self.update(task_id, stop_requested=time.time())
        if updated is None:
            return self.get(task_id)
        record = updated
        if self.liveness(record) is Liveness.DEAD:
            # Nothing of it runs: never signal numbers that may belong to someone else now.
            self.reconcile()
            return self.get(task_id)
        if record.pgid is None:
            # Not forked yet: the supervisor checks stop_requested before it forks; a SIGTERM
            # makes it look at once.
            supervised = record.pid not in (None, os.getpid())  # not yet claimed: it is ours
            if supervised and record.pid and self.liveness(record) is Liveness.ALIVE:
                _signal(record.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                return self.wait(task_id, timeout=grace)
            record = self.get(task_id)
        if record.pgid is not None:
            # The supervisor sees its task end and records "stopped" (stop_requested is set).
            _signal_group(record.pgid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                return self.wait(task_id, timeout=grace)
            _signal_group(record.pgid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                return self.wait(task_id, timeout=5.0)
        # The supervisor is gone or stuck: end it, and record the outcome ourselves.
        record = self.get(task_id)
        supervised = record.pid not in (None, os.getpid())
        if supervised and record.pid and self.liveness(record) is Liveness.ALIVE:
            _signal(record.pid, signal.SIGKILL)
        try:
            return self.wait(task_id, timeout=5.0)
        except TimeoutError:
            raise TasklocksError(
                f"task {task_id} did not end after SIGKILL; a process of it may be stuck in the "
                "kernel (state D): look at 'ps -o pid,stat,cmd -g "
                f"{record.pgid}' and try again"
            ) from None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _forget(proc: subprocess.Popen[bytes]) -> None:
    """Reap the detached supervisor when it ends, so that a long-lived caller collects no
    zombies; the thread only waits and dies with the caller."""
    threading.Thread(target=proc.wait, name=f"tasklocks-reap-{proc.pid}", daemon=True).start()


# --- module-level helpers: the default runner, and progress from inside a task -------------------

_default: tuple[int, Tasks] | None = None


def default_tasks() -> Tasks:
    """The runner for ``$TASKLOCKS_DB`` (else the default file), ``$TASKLOCKS_NAMESPACE`` (else
    ``default``) and ``$TASKLOCKS_TABLE``; inside a task these name the task's own database."""
    global _default
    if _default is None or _default[0] != os.getpid():
        _default = (
            os.getpid(),
            Tasks(
                os.environ.get("TASKLOCKS_DB") or None,
                os.environ.get("TASKLOCKS_NAMESPACE") or "default",
                table=os.environ.get("TASKLOCKS_TABLE") or "tasklocks",
            ),
        )
    return _default[1]


def current_task_id() -> int | None:
    """The id of the task this process belongs to, or None outside a task."""
    return env_number("TASKLOCKS_TASK_ID")


class NotInTask(TasklocksError):
    """progress() was called outside a task."""

    exit_code = 2


def progress(percent: float | None, message: str | None = None) -> None:
    """Report the current task's progress: ``percent`` (0-100) and an optional message.

    :raises NotInTask: this process is not part of a task.
    """
    task_id = current_task_id()
    if task_id is None:
        raise NotInTask("progress can only be reported from inside a task (TASKLOCKS_TASK_ID)")
    default_tasks().progress(task_id, percent, message)


def start(target: str | Sequence[str], **options: Any) -> int:
    """:meth:`Tasks.start` on the default runner (see :func:`default_tasks`)."""
    return default_tasks().start(target, **options)


def stop(task_id: int, *, grace: float = 10.0) -> TaskRecord:
    """:meth:`Tasks.stop` on the default runner."""
    return default_tasks().stop(task_id, grace=grace)


def wait(task_id: int, timeout: float | None = None) -> TaskRecord:
    """:meth:`Tasks.wait` on the default runner."""
    return default_tasks().wait(task_id, timeout)


def reconcile() -> list[int]:
    """:meth:`Tasks.reconcile` on the default runner."""
    return default_tasks().reconcile()
