"""A task's supervisor: ``python -m tasklocks.tasks._supervisor URL TABLE ID LOG [--no-wait]``.

Started by :meth:`Tasks.start` in a session of its own. It forks the task's process first, in a
new process group, blocked on a pipe; takes the task's locks with entries naming the supervisor
and that process group; records ``running`` and lets the task go; watches it (stop, timeout);
records the outcome and releases the locks once no process of the task is left.

If the supervisor dies first, the task's process group keeps the locks held until its last
process ends; then anyone can prove them dead, and ``reconcile`` marks the record ``crashed``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from tasklocks._clock import pause
from tasklocks._core import Holder, Waiter
from tasklocks._keeper import Keeper, fork_keeper, point_at_devnull
from tasklocks._waiting import WaitStatus
from tasklocks.errors import (
    Deadlock,
    LeaseLost,
    LimitMismatch,
    LockHeld,
    NotHeld,
    StoreUnreachable,
    describe_holder,
    describe_way,
    ordinal,
)
from tasklocks.locks import Lease, LockTable
from tasklocks.names import storable_text
from tasklocks.owner import ProcessIdentity, current_process, group_is_empty
from tasklocks.store import OutcomeUnknown
from tasklocks.tasks._record import TaskRecord, TaskState
from tasklocks.tasks._taskdb import TaskDB

GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the supervisor itself stops a task
PATIENCE = 1.0  # seconds between tries while the database does not answer
LONGEST_WAIT = 3600.0  # seconds of one wait for the task (a longer timeout waits again)
T = TypeVar("T")
_TEXT_FIELDS = ("message", "error_code", "error_message")  # made storable first (_storable)


class _Stopped(Exception):
    """Raised from the wait's watch: the task was stopped (or its process died) while waiting."""


def _who(entry: Holder | Waiter) -> str:
    if not entry.owner.startswith("task:"):
        return describe_holder(entry)
    who = f"task {entry.owner[5:]}"
    if entry.note:
        who += f", {entry.note}"
    return who + f", since {time.strftime('%H:%M:%S', time.localtime(entry.since))}"


def _describe_wait(
    names: Sequence[str],
    holders: Mapping[str, Sequence[Holder]],
    ahead: Sequence[Waiter],
    *,
    waits: bool = True,
) -> str:
    """``Waiting for app_task:blog (held by task 12, update blog, since 10:02:11), 2nd in line
    after task 13, restore blog, since 10:02:15`` (``Did not wait for ...``, ``would have been
    2nd in line ...`` for a task that does not wait)."""
    parts = []
    for name, hs in sorted(holders.items()):
        if hs:
            others = f" and {len(hs) - 1} more" if len(hs) > 1 else ""
            parts.append(f"{name} (held by {_who(hs[0])}{others})")
    text = ("Waiting for " if waits else "Did not wait for ") + (
        "; ".join(parts) if parts else ", ".join(names)
    )
    if ahead:
        others = f" and {len(ahead) - 1} more" if len(ahead) > 1 else ""
        place = "" if waits else "would have been "
        text += f", {place}{ordinal(len(ahead) + 1)} in line after {_who(ahead[0])}{others}"
    return text


def env_for_task(
    url: str, table: str, namespace: str, task_id: int, pgid: int
) -> Mapping[str, str]:
    """The environment variables that tell a task's processes who they are."""
    # Shell tasks call `tasklocks progress`: make this installation's scripts findable.
    scripts = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        path = path + os.pathsep + scripts if path else scripts
    return {
        "PATH": path,
        "TASKLOCKS_DB": url,
        "TASKLOCKS_TABLE": table,
        "TASKLOCKS_NAMESPACE": namespace,
        "TASKLOCKS_TASK_ID": str(task_id),
        "TASKLOCKS_TASK_PGID": str(pgid),
    }


def _run_target(record: TaskRecord, result_fd: int) -> int:
    """In the task's process: run a callable target and report its outcome on ``result_fd``."""
    assert isinstance(record.target, str)
    code = 0
    try:
        module_name, _, func_name = record.target.partition(":")
        func: Any = importlib.import_module(module_name)
        for part in func_name.split("."):
            func = getattr(func, part)
        args = record.args
        if isinstance(args, dict):
            value = func(**args)
        elif isinstance(args, list):
            value = func(*args)
        elif args is None:
            value = func()
        else:
            value = func(args)
        try:
            payload = json.dumps({"result": value})
        except (TypeError, ValueError) as exc:
            code = 1
            payload = json.dumps(
                {"error": {"code": "BadResult", "message": f"result is not JSON: {exc}"}}
            )
    except BaseException as exc:  # everything, SystemExit included, becomes the task's error
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            payload = json.dumps({"result": None})
        else:
            traceback.print_exc()
            code = 1
            payload = json.dumps({"error": {"code": type(exc).__name__, "message": str(exc)}})
    data = payload.encode()
    while data:
        data = data[os.write(result_fd, data) :]
    return code


def _child(record: TaskRecord, url: str, table: str, gate: int, result_fd: int) -> None:
    """The task's process, right after the fork: wait for the go, then become the task."""
    try:
        os.setpgid(0, 0)
        point_at_devnull(keep={0, 1, 2, gate, result_fd})
        go = os.read(gate, 1)
        os.close(gate)
        if go != b"g":
            os._exit(75)
        os.environ.update(env_for_task(url, table, record.namespace, record.id, os.getpid()))
        if isinstance(record.target, list):
            os.close(result_fd)
            # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across
            # exec: restore the defaults a command expects (as `run` does, and subprocess with
            # restore_signals): else a shell loop that writes into `| head -n1` never ends. A
            # callable keeps Python's: it is Python code, and subprocess restores them for its
            # children.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            try:
                os.execvp(record.target[0], record.target)
            except OSError as exc:
                print(f"tasklocks: cannot run {record.target[0]}: {exc.strerror}", file=sys.stderr)
                sys.stderr.flush()
                os._exit(126 if isinstance(exc, PermissionError) else 127)
        code = _run_target(record, result_fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(70)


class Supervisor:
    def __init__(
        self, url: str, table: str, task_id: int, log_path: str, wait: bool, ttl: float
    ) -> None:
        self.tasks = _patient(TaskDB, url, table=table)
        self.url, self.table, self.task_id = url, table, task_id
        self.log_path = log_path
        self.wait_for_locks = wait
        self.ttl = ttl
        self.stop_reason: TaskState | None = None
        self.lost: Lease | None = None  # the lease that was lost while the task ran
        self.keeper: Keeper | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = TaskState.STOPPED
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"s")

    def _on_lost(self, lease: Lease) -> None:
        """From the session's watchdog: the task's locks are lost; stop it."""
        self.lost = lease
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"l")

    def _get(self) -> TaskRecord:
        return _patient(self.tasks.get, self.task_id)

    def _update(self, **changes: Any) -> TaskRecord | None:
        return _patient(self.tasks.update, self.task_id, **_storable(changes))

    def _update_from(self, record: TaskRecord, **changes: Any) -> TaskRecord | None:
        return _patient(self.tasks.update_from, record, **_storable(changes))

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.keeper is not None:
                self.keeper.dismiss()

    def _run(self) -> int:
        record = self._get()
        if record.state is not TaskState.PENDING:
            return 0
        gate_r, gate_w = os.pipe()
        result_r, result_w = os.pipe()
        # No SQLite connection may cross the fork: SQLite keeps per-process state about the
        # open file (locks, the WAL index) that a child must not inherit
        # (https://www.sqlite.org/howtocorrupt.html#_carrying_an_open_database_connection_across_a_fork_).
        # A server connection is only a socket: the child points its copy at /dev/null.
        local = self.tasks.locks.local_db
        if local:
            self.tasks.close()
        child = os.fork()
        if child == 0:
            os.close(gate_w)
            os.close(result_r)
            _child(record, self.url, self.table, gate_r, result_w)
        os.close(gate_r)
        os.close(result_w)
        with contextlib.suppress(OSError):  # the child may have done it first
            os.setpgid(child, child)
        # Forked while this process has no other thread: it keeps the task's locks if this
        # supervisor is killed while the task runs.
        self.keeper = fork_keeper(self.url, self.table, pgid=child)
        if local:
            self.tasks = _patient(TaskDB, self.url, table=self.table)
        self.child = child
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        me = current_process()
        claimed = self._claim(record, me, child)
        if claimed is None:  # another supervisor has this task (or it ended): leave it alone
            os.close(gate_w)  # the task's process exits without running anything
            _reap(child)
            return 0
        if claimed.stop_requested is not None or self.stop_reason:
            os.close(gate_w)
            _reap(child)
            self._finish(TaskState.STOPPED, message="stopped before it ran")
            return 0
        record = claimed
        table = LockTable(self.tasks.locks.store, record.namespace, ttl=self.ttl)
        lease: Lease | None = None
        if record.locks:
            lease = self._take_locks(table, record, me, child)
            if lease is None:
                os.close(gate_w)
                _reap(child)
                return 0
            if lease.session is not None:
                self.keeper.keep(lease.session)
                lease.session.on_lost.append(lambda: self._on_lost(lease))
                if lease.lost.is_set():
                    self._on_lost(lease)
        # From the claimed record: one round trip, unless the record changed meanwhile (a
        # wait's messages, a stop asked for), which reads it again.
        started = self._update_from(
            record, state=TaskState.RUNNING, started=time.time(), message=None
        )
        if started is None or started.stop_requested is not None or self.stop_reason:
            os.close(gate_w)
            _reap(child)
            self._release(table, lease)
            self._finish(TaskState.STOPPED, message="stopped before it ran")
            return 0
        with contextlib.suppress(BrokenPipeError):  # the task's process died already
            os.write(gate_w, b"g")
        os.close(gate_w)
        status, payload = self._watch(child, result_r, started.timeout)
        self._end_group(child)
        ended = time.time()  # before the release: a waiter starts after this "finished" time
        self._release(table, lease)
        self._record_outcome(status, payload, ended)
        return 0

    def _claim(self, record: TaskRecord, me: ProcessIdentity, child: int) -> TaskRecord | None:
        """Make the task ours in one compare-and-swap over ``record`` as last read: only a
        pending task that no other supervisor has claimed (a caller that gave up on the zygote
        may have started a second one). Returns the claimed record, or None."""
        while True:
            if record.pgid == child and record.pid == me.pid:
                return record  # ours already: a retry after a lost reply
            if record.state is not TaskState.PENDING or record.pgid is not None:
                return None
            cols = record.changed(
                pid=me.pid,
                start_token=me.start,
                boot=me.boot,
                host=me.host,
                pidns=me.pidns,
                pgid=child,
                log_path=self.log_path,
            )
            if _patient(self.tasks.store.update_task, self.task_id, record.version, cols):
                return record.updated(cols)
            record = self._get()

    def _release(self, table: LockTable, lease: Lease | None) -> None:
        """Free the task's locks: the ones taken for it here, and those its processes took
        that are provably dead (all of them, once its group is empty). An entry of a process
        that left the task's group and still runs stays until that process ends."""
        if lease is not None:
            with contextlib.suppress(NotHeld, LeaseLost):  # a lost one is given back, at least
                _patient(lease.release)
        _patient(table.reap, owner=f"task:{self.task_id}")

    def _take_locks(
        self, table: LockTable, record: TaskRecord, me: ProcessIdentity, child: int
    ) -> Lease | None:
        """Take the task's locks, waiting in the queue (state ``waiting``, a message with its
        place in line) unless the task says not to wait. None: the task ended meanwhile."""
        identity = ProcessIdentity(me.pid, me.start, me.boot, me.host, me.pidns, child)
        shared = [n for n, limit in record.shared.items() if limit is None]
        limits = {n: limit for n, limit in record.shared.items() if limit is not None}
        # The wait history: every (lock, holder or waiter ahead) the task was blocked by, with
        # when it began waiting for it. Only a wait starts the clock, so a task whose locks were
        # free records no wait at all (start-up is not waiting).
        history: list[dict[str, Any]] = []
        told: list[str] = []  # the message last written

        def watch(status: WaitStatus) -> None:
            current = self._get()
            stopped = self.stop_reason is not None or current.stop_requested is not None
            if stopped or current.state.is_final or os.waitpid(child, os.WNOHANG)[0] != 0:
                raise _Stopped
            now = time.time()
            seen = {(w["lock"], w["owner"]) for w in history}
            blockers: list[tuple[str, Holder | Waiter]] = [
                (n, h) for n, hs in sorted(status.holders.items()) for h in hs
            ]
            wanted = set(status.names)
            blockers += [(next(n for n in w.names if n in wanted), w) for w in status.ahead]
            new = [
                {"lock": name, "owner": e.owner, "note": e.note, "since": now}
                for name, e in blockers
                if (name, e.owner) not in seen
            ]
            message = _describe_wait(status.names, status.holders, status.ahead)
            if not told or new or message != told[-1]:
                history.extend(new)
                changes: dict[str, Any] = {"message": message, "waited_for": list(history)}
                if not told:
                    changes["state"] = TaskState.WAITING
                told.append(message)
                self._update(**changes)

        while True:
            try:
                return table.acquire(
                    *record.locks,
                    owner=f"task:{record.id}",
                    wait=self.wait_for_locks,
                    note=storable_text(record.title),  # (a command's arguments: any bytes)
                    process=identity,
                    shared=shared,
                    limit=limits,
                    watch=watch,
                )
            except LockHeld as exc:  # only without waiting
                way = describe_way(exc.holders, exc.queue)
                self._finish(
                    TaskState.FAILED,
                    error_code="LockHeld",
                    error_message=f"{way}; the task does not wait for its locks (--no-wait)",
                    message=_describe_wait(record.locks, exc.holders, exc.queue, waits=False),  # type: ignore[arg-type]
                )
                return None
            except (Deadlock, LimitMismatch) as exc:
                self._finish(
                    TaskState.FAILED,
                    error_code=type(exc).__name__,
                    error_message=str(exc),
                    message=f"could not wait for its locks: {exc}",
                )
                return None
            except _Stopped:
                self._finish(TaskState.STOPPED, message="stopped while waiting for locks")
                return None
            except StoreUnreachable:
                pause(PATIENCE)  # the database does not answer: the task waits meanwhile
                current = self._get()
                stopped = self.stop_reason is not None or current.stop_requested is not None
                if stopped or current.state.is_final or os.waitpid(child, os.WNOHANG)[0] != 0:
                    self._finish(TaskState.STOPPED, message="stopped while waiting for locks")
                    return None

    def _watch(self, child: int, result_r: int, timeout: float | None) -> tuple[int, bytes]:
        """Wait for the task's process to end, stopping it on request or timeout."""
        try:
            pidfd: int | None = os.pidfd_open(child)
        except (AttributeError, OSError):  # Linux before 5.3: look at the child 100 times a second
            pidfd = None
        started = time.monotonic()
        kill_at: float | None = None
        chunks: list[bytes] = []
        reading = True
        while True:
            expired = timeout is not None and time.monotonic() - started >= timeout
            if self.stop_reason is None and expired:
                self.stop_reason = TaskState.TIMED_OUT
            if self.stop_reason is None and self.lost is not None:
                self.stop_reason = TaskState.FAILED  # its locks are lost: it must not go on
            if self.stop_reason is not None and kill_at is None:
                _killpg(child, signal.SIGTERM)
                kill_at = time.monotonic() + GRACE
            if kill_at is not None and time.monotonic() >= kill_at:
                _killpg(child, signal.SIGKILL)
                kill_at = float("inf")
            waits = [t for t in (kill_at,) if t is not None and t != float("inf")]
            if timeout is not None and self.stop_reason is None:
                waits.append(started + timeout)
            left = max(0.0, min(waits) - time.monotonic()) if waits else None
            if left is not None:  # (select's timeout must fit a time_t: a longer wait loops)
                left = min(left, LONGEST_WAIT)
            if pidfd is None:
                left = 0.01 if left is None else min(left, 0.01)
            fds = [self.wake_r] + ([result_r] if reading else []) + ([pidfd] if pidfd else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
            if result_r in ready:
                data = os.read(result_r, 65536)
                if data:
                    chunks.append(data)
                else:
                    reading = False
            if pidfd is not None:
                ended = pidfd in ready
                status = os.waitpid(child, 0)[1] if ended else 0
            else:
                done, status = os.waitpid(child, os.WNOHANG)
                ended = done != 0
            if ended:
                if pidfd is not None:
                    os.close(pidfd)
                while reading:
                    data = os.read(result_r, 65536)
                    if not data:
                        break
                    chunks.append(data)
                os.close(result_r)
                return status, b"".join(chunks)

    def _end_group(self, pgid: int) -> None:
        """Never release a task's locks while a process of it still runs: stop what is left."""
        if group_is_empty(pgid):
            return
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while not group_is_empty(pgid):
            if time.monotonic() > deadline:
                _killpg(pgid, signal.SIGKILL)
            time.sleep(0.01)

    def _record_outcome(self, status: int, payload: bytes, ended: float) -> None:
        outcome: dict[str, Any] = {}
        if payload:
            try:
                outcome = json.loads(payload)
            except ValueError:
                outcome = {}
        record = self._get()
        reason = self.stop_reason
        if reason is None and record.stop_requested is not None:
            reason = TaskState.STOPPED
        fields: dict[str, Any] = {}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            fields["signal"] = sig
            name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else sig
            state = reason or TaskState.CRASHED
            fields["message"] = f"killed by {name}"
        else:
            code = os.WEXITSTATUS(status)
            fields["exit_code"] = code
            if reason is not None:  # stopped or timed out, whatever status it chose to exit with
                state = reason
                fields["message"] = f"exited with status {code} after being asked to stop"
            elif code == 0 and "error" not in outcome:
                state = TaskState.SUCCEEDED
                fields["result"] = outcome.get("result")
                fields["percent"] = 100.0
            else:
                state = TaskState.FAILED
                error = outcome.get("error") or {
                    "code": "ExitStatus",
                    "message": f"exited with status {code}",
                }
                fields["error_code"] = str(error.get("code"))
                fields["error_message"] = str(error.get("message"))
                fields["message"] = f"failed: {fields['error_message']}"
        if state is TaskState.TIMED_OUT:
            fields["message"] = f"timed out after {record.timeout:g}s"
        elif state is TaskState.STOPPED:
            fields["message"] = "stopped"
        if self.lost is not None and reason is TaskState.FAILED:
            lost = self.lost
            error = LeaseLost(lost.names, lost.owner, lost.token, self.ttl)
            fields.update(error_code="LOCK_LOST", error_message=str(error))
            fields["message"] = f"stopped: its lock {', '.join(lost.names)} was lost"
        self._finish(state, finished=ended, **fields)

    def _finish(self, state: TaskState, **fields: Any) -> None:
        fields.setdefault("finished", time.time())
        self._update(state=state, **fields)


def _storable(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` with their text as every store keeps it (:func:`storable_text`): the text
    comes from what nobody checked (an exception's message, a holder's note in a waiting
    message), and one the store refused (bytes that were not UTF-8, NUL on PostgreSQL) killed
    the supervisor before the record said how the task ended (``crashed``)."""
    return {
        k: storable_text(v) if k in _TEXT_FIELDS and isinstance(v, str) else v
        for k, v in changes.items()
    }


def _patient(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call``, again and again while the database does not answer: a supervisor has nothing
    better to do, and its task's record must end up final."""
    while True:
        try:
            return call(*args, **kwargs)
        except (StoreUnreachable, OutcomeUnknown) as exc:  # every call here may run again
            print(f"tasklocks: {exc}; trying again", file=sys.stderr, flush=True)
            pause(PATIENCE)


def _reap(child: int) -> None:
    """Wait for the task's process, unless it was already waited for."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def main(argv: list[str]) -> int:
    url, table, task_id, log_path, ttl, *flags = argv
    wait = "--no-wait" not in flags
    return Supervisor(url, table, int(task_id), log_path, wait, float(ttl)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
