"""The task runner, on every backend: each state transition, waits, stop, timeout, crashes.

Tasks run real processes. Targets live in :mod:`tests.tasks.targets` and talk to the test through
files (a marker they write once running, a go file the test creates to let them finish); the
test polls with deadlines and never relies on a sleep. Every process a test started is killed in
the fixture's teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import fractions
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import raw_sql, require, server_url

from tasklocks import HeldLock, Liveness
from tasklocks.owner import current_process, default_owner, group_is_empty, process_liveness
from tasklocks.tasks import (
    FINAL,
    BadTarget,
    NotInTask,
    NoWorkingDirectory,
    TaskNotFound,
    TaskRecord,
    Tasks,
    TaskState,
    current_task_id,
    progress,
)
from tasklocks.tasks._record import can_move
from tasklocks.tasks.runner import default_log_dir

from .targets import ref

ROOT = Path(__file__).resolve().parents[2]  # the project root: tests.tasks.targets imports
DEADLINE = 30.0  # seconds any single wait in these tests may take before it fails
T = TypeVar("T")


# --- helpers ----------------------------------------------------------------------------------


def poll(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    """Call ``probe`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def describe(tasks: Tasks, record: TaskRecord) -> str:
    """A record and the tail of its log, for assertion messages."""
    log = ""
    if record.log_path and os.path.exists(record.log_path):
        log = Path(record.log_path).read_text(errors="replace")[-2000:]
    return f"{record}\n--- log ---\n{log}"


def until_state(tasks: Tasks, task_id: int, *states: TaskState) -> TaskRecord:
    """Poll until the task is in one of ``states``; fail at once if it ends in another."""

    def probe() -> TaskRecord | None:
        record = tasks.get(task_id)
        if record.state in states:
            return record
        if record.state.is_final:
            detail = describe(tasks, record)
            raise AssertionError(f"task ended {record.state}, not {states}:\n{detail}")
        return None

    return poll(f"task {task_id} to be {'/'.join(states)}", probe)


def until_marked(tasks: Tasks, task_id: int, marker: Path) -> TaskRecord:
    """Poll until the target wrote ``marker`` (it runs); fail at once if the task ended."""

    def probe() -> TaskRecord | None:
        if marker.exists():
            return tasks.get(task_id)
        record = tasks.get(task_id)
        if record.state.is_final:
            raise AssertionError(f"task ended before it marked:\n{describe(tasks, record)}")
        return None

    return poll(f"task {task_id} to write {marker.name}", probe)


def finished(tasks: Tasks, task_id: int) -> TaskRecord:
    return tasks.wait(task_id, timeout=DEADLINE)


def held(tasks: Tasks) -> dict[str, HeldLock]:
    return {h.name: h for h in tasks.locks.held()}


def pid_is_gone(record: TaskRecord) -> bool:
    """The supervisor (the record's pid) is provably gone."""
    live = process_liveness(
        record.pid, record.start_token, record.boot, record.host, record.pidns, None
    )
    return live is Liveness.DEAD


def all_gone(record: TaskRecord) -> bool:
    """Are the supervisor and every process of the task's group gone (``reconcile`` can tell)?"""
    return pid_is_gone(record) and (record.pgid is None or group_is_empty(record.pgid))


def marked_by_reconcile(tasks: Tasks, task_id: int) -> TaskRecord | None:
    """Run ``reconcile``; the task's record once it is final. (Under ``make test`` another
    test's reconcile, which looks at every namespace of the table, may be the one that marks
    it: the same code, in another process.)"""
    tasks.reconcile()
    record = tasks.get(task_id)
    return record if record.state.is_final else None


def dead_task(tasks: Tasks, files: Files) -> int:
    """A task holding ``app_task:a`` whose supervisor and processes were all SIGKILLed: its
    record still says running, until a ``reconcile``."""
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    kill(running.pid)
    killpg(running.pgid)
    poll("the task's processes to be gone", lambda: True if all_gone(running) else None)
    return task_id


def kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def killpg(pgid: int | None) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def kill_everything(tasks: Tasks) -> None:
    """SIGKILL every still-running supervisor and task process group of this namespace."""
    for row in tasks.store.list_tasks(None, None):
        record = TaskRecord.from_row(row)
        if record.namespace != tasks.namespace:
            continue
        # (A start that failed before a supervisor claimed the record left this process there.)
        if record.pid not in (None, os.getpid()) and not pid_is_gone(record):
            kill(record.pid)
        if record.pgid is not None and not group_is_empty(record.pgid):
            killpg(record.pgid)


def ids(records: list[TaskRecord], namespace: str) -> list[int]:
    return [r.id for r in records if r.namespace == namespace]


Files = Callable[[str], Path]


def blocked_args(files: Files, name: str) -> dict[str, Any]:
    return {"marker": str(files(f"{name}.marker")), "go": str(files(f"{name}.go"))}


# --- the transition table (pure) --------------------------------------------------------------

ALLOWED = {
    TaskState.PENDING: {
        TaskState.WAITING,
        TaskState.RUNNING,
        TaskState.FAILED,
        TaskState.STOPPED,
        TaskState.TIMED_OUT,
        TaskState.CRASHED,
    },
    TaskState.WAITING: {
        TaskState.RUNNING,
        TaskState.FAILED,
        TaskState.STOPPED,
        TaskState.TIMED_OUT,
        TaskState.CRASHED,
    },
    TaskState.RUNNING: set(FINAL),
}


@pytest.mark.parametrize("old", list(TaskState))
@pytest.mark.parametrize("new", list(TaskState))
def test_only_documented_transitions_exist(old: TaskState, new: TaskState) -> None:
    assert can_move(old, new) is (new in ALLOWED.get(old, set()))
    assert old.is_final is (old not in ALLOWED)


# --- success and failure ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [{"a": 2, "b": 3}, [2, 3]], ids=["kwargs", "positional"])
def test_callable_succeeds_with_its_result(tasks: Tasks, args: Any) -> None:
    before = time.time()
    task_id = tasks.start(ref("add"), args=args, kind="sum")
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.result == 5
    assert record.percent == 100
    assert record.exit_code == 0
    assert record.signal is None
    assert record.error_code is None and record.error_message is None
    assert record.kind == "sum" and record.title == "sum"
    assert record.target == ref("add") and record.args == args
    assert record.namespace == tasks.namespace
    assert record.pid is not None and record.pgid is not None and record.pid != record.pgid
    assert record.started is not None and record.finished is not None
    assert before <= record.created <= record.started <= record.finished <= time.time()
    assert record.log_path is not None and os.path.exists(record.log_path)


def test_callable_that_raises_fails_with_its_error(tasks: Tasks) -> None:
    record = finished(tasks, tasks.start(ref("fail"), args={"msg": "boom"}))
    assert record.state is TaskState.FAILED, describe(tasks, record)
    assert record.error_code == "TargetFailed"
    assert record.error_message == "boom"
    assert record.exit_code == 1
    assert record.signal is None
    assert record.result is None
    assert record.message == "failed: boom"
    assert record.log_path is not None
    assert "TargetFailed: boom" in Path(record.log_path).read_text()


@pytest.mark.parametrize(
    ("code", "state", "error_code"),
    [(0, TaskState.SUCCEEDED, None), (4, TaskState.FAILED, "SystemExit")],
)
def test_callable_calling_sys_exit(
    tasks: Tasks, code: int, state: TaskState, error_code: str | None
) -> None:
    record = finished(tasks, tasks.start(ref("exit_with"), args=[code]))
    assert record.state is state, describe(tasks, record)
    assert record.error_code == error_code
    assert record.exit_code == (0 if code == 0 else 1)


def test_command_exit_status_fails_the_task(tasks: Tasks) -> None:
    record = finished(tasks, tasks.start(["sh", "-c", "exit 3"]))
    assert record.state is TaskState.FAILED, describe(tasks, record)
    assert record.exit_code == 3
    assert record.signal is None
    assert record.error_code == "ExitStatus"
    assert record.error_message == "exited with status 3"


def test_command_exit_zero_succeeds(tasks: Tasks) -> None:
    record = finished(tasks, tasks.start(["true"]))
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.exit_code == 0
    assert record.result is None
    assert record.percent == 100
    assert record.target == ["true"]


def test_missing_command_fails_with_127(tasks: Tasks) -> None:
    record = finished(tasks, tasks.start(["/nonexistent/tasklocks-no-such-command"]))
    assert record.state is TaskState.FAILED, describe(tasks, record)
    assert record.exit_code == 127
    assert record.log_path is not None
    assert "cannot run" in Path(record.log_path).read_text()


def test_a_command_runs_with_sigpipe_and_sigxfsz_at_their_defaults(tasks: Tasks) -> None:
    """(Python ignores both, and the task's process, forked from the supervisor, kept them
    ignored through exec: a shell loop writing into ``| head -n1`` wrote "I/O error" until its
    timeout.)"""
    script = "while true; do echo x; done | head -n1; grep SigIgn /proc/$$/status"
    record = finished(tasks, tasks.start(["sh", "-c", script], timeout=DEADLINE / 2))
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.log_path is not None
    log = Path(record.log_path).read_text()
    (ignored,) = [line.split()[1] for line in log.splitlines() if line.startswith("SigIgn:")]
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not int(ignored, 16) & 1 << (sig - 1), (sig.name, log)


@pytest.mark.parametrize(
    ("raised", "recorded"),
    [("bad file \udcff", "bad file \\udcff"), ("a\x00b", "a\\x00b")],
    ids=["surrogate", "nul"],
)
def test_an_error_message_a_store_cannot_keep_is_recorded_escaped(
    tasks: Tasks, raised: str, recorded: str
) -> None:
    """(The supervisor died writing it, a UnicodeEncodeError on every backend and "text fields
    cannot contain NUL" on PostgreSQL, and the task ended crashed; SQLite and MariaDB kept the
    NUL.)"""
    record = finished(tasks, tasks.start(ref("fail"), args={"msg": raised}))
    assert record.state is TaskState.FAILED, describe(tasks, record)
    assert (record.error_code, record.error_message) == ("TargetFailed", recorded)
    assert record.message == f"failed: {recorded}"


def test_a_command_with_arguments_that_are_not_utf8_runs_with_them(
    tasks: Tasks, files: Files
) -> None:
    """(Its title, the note of its locks, was refused by validate_note: the supervisor died
    before the task ran, and it ended crashed.)"""
    marker, go = files("a.marker"), files("a.go")
    script = (
        'printf "%s\\n" "$3"; touch "$1"; i=0\n'
        'while [ ! -e "$2" ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done'
    )
    argv = ["sh", "-c", script, "sh", str(marker), str(go), "caf\udce9"]
    task_id = tasks.start(argv, locks=["app_task:a"])
    until_marked(tasks, task_id, marker)
    assert held(tasks)["app_task:a"].holder.note == " ".join([*argv[:-1], "caf\\udce9"])
    go.touch()
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.target == argv
    assert record.log_path is not None
    assert b"caf\xe9\n" in Path(record.log_path).read_bytes()


def test_text_with_nul_is_refused_before_anything_is_written(tasks: Tasks, files: Files) -> None:
    """(PostgreSQL's store refused it, SQLite and MariaDB kept it: a kind or a progress message,
    and a command argument, which exec refuses, failed the task with status 70.)"""
    with pytest.raises(ValueError, match=r"a task's kind holds a NUL character \(\\x00\)"):
        tasks.start(["true"], kind="a\x00b")
    with pytest.raises(BadTarget, match="argument 1 of the command holds a NUL character"):
        tasks.start(["echo", "a\x00b"])
    assert tasks.list(all=True) == []
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"))
    until_marked(tasks, task_id, files("a.marker"))
    tasks.progress(task_id, 10, "fine")
    with pytest.raises(ValueError, match="a progress message holds a NUL character"):
        tasks.progress(task_id, 50, "a\x00b")
    record = tasks.get(task_id)
    assert (record.percent, record.message) == (10, "fine")
    files("a.go").touch()
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED


# --- stop, timeout, crashes -------------------------------------------------------------------


def test_stop_running_task_sends_sigterm(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    assert running.state is TaskState.RUNNING
    record = tasks.stop(task_id, grace=5.0)
    assert record.state is TaskState.STOPPED, describe(tasks, record)
    assert record.signal == signal.SIGTERM
    assert record.message == "stopped"
    assert record.stop_requested is not None
    assert record.finished is not None
    assert running.pgid is not None and group_is_empty(running.pgid)
    assert held(tasks) == {}


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("ignore_term"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    record = tasks.stop(task_id, grace=0.5)
    assert record.state is TaskState.STOPPED, describe(tasks, record)
    assert record.finished is not None
    assert running.pgid is not None and group_is_empty(running.pgid)
    assert not files("a.go").exists()  # it never got to finish on its own
    assert held(tasks) == {}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # runner logic; slow (~7 s)
def test_stop_records_the_sigkill_of_a_task_ignoring_sigterm(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("ignore_term"), args=blocked_args(files, "a"))
    until_marked(tasks, task_id, files("a.marker"))
    record = tasks.stop(task_id, grace=0.5)
    assert record.state is TaskState.STOPPED
    assert record.signal == signal.SIGKILL, describe(tasks, record)


def test_stop_waiting_task_never_runs_it(tasks: Tasks, files: Files) -> None:
    first = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    until_marked(tasks, first, files("a.marker"))
    second = tasks.start(ref("blocked"), args=blocked_args(files, "b"), locks=["app_task:a"])
    until_state(tasks, second, TaskState.WAITING)
    record = tasks.stop(second, grace=5.0)
    assert record.state is TaskState.STOPPED, describe(tasks, record)
    assert record.started is None
    assert not files("b.marker").exists()
    assert tasks.get(first).state is TaskState.RUNNING
    assert held(tasks)["app_task:a"].holder.owner == f"task:{first}"
    files("a.go").touch()
    assert finished(tasks, first).state is TaskState.SUCCEEDED
    assert held(tasks) == {}


def test_stop_right_after_start(tasks: Tasks, files: Files) -> None:
    # The supervisor may not even have set up its signal handlers yet: stopped all the same.
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    record = tasks.stop(task_id, grace=5.0)
    assert record.state is TaskState.STOPPED, describe(tasks, record)
    assert record.pgid is None or group_is_empty(record.pgid)
    assert held(tasks) == {}


def test_timeout_stops_the_task_as_timed_out(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(
        ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"], timeout=0.5
    )
    record = finished(tasks, task_id)
    assert record.state is TaskState.TIMED_OUT, describe(tasks, record)
    assert record.timeout == 0.5
    assert record.signal == signal.SIGTERM
    assert record.message == "timed out after 0.5s"
    assert files("a.marker").exists()  # it did run
    assert held(tasks) == {}


def test_sigkill_of_the_task_process_is_a_crash(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    assert held(tasks)["app_task:a"].holder.owner == f"task:{task_id}"
    killpg(running.pgid)
    record = finished(tasks, task_id)
    assert record.state is TaskState.CRASHED, describe(tasks, record)
    assert record.signal == signal.SIGKILL
    assert record.exit_code is None
    assert record.message == "killed by SIGKILL"
    assert held(tasks) == {}


@pytest.mark.parametrize("finder", ["reconcile", "list", "wait"])
def test_sigkill_of_supervisor_and_task_is_found_later(
    alone: Tasks, files: Files, finder: str
) -> None:
    """(On a table of its own: the record stays running until this test's own look.)"""
    tasks = alone
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    kill(running.pid)
    killpg(running.pgid)
    # Nothing watches any more: the record stays as it was until someone looks.
    assert tasks.get(task_id).state is TaskState.RUNNING
    assert held(tasks)["app_task:a"].holder.owner == f"task:{task_id}"

    def found() -> TaskRecord | None:
        if finder == "reconcile":
            return marked_by_reconcile(tasks, task_id)
        if finder == "list":
            listed = {r.id: r for r in tasks.list(all=True)}
            return listed[task_id] if listed[task_id].state.is_final else None
        return tasks.wait(task_id, timeout=DEADLINE)

    record = poll(f"{finder} to mark task {task_id}", found)
    assert record.state is TaskState.CRASHED, describe(tasks, record)
    assert record.finished is not None
    assert record.message == "the task's processes died without recording an outcome"
    assert held(tasks) == {}
    assert task_id not in tasks.reconcile()  # once is enough


def test_reconcile_frees_the_locks_before_it_marks_the_record(
    alone: Tasks, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a supervisor does: whoever sees the record final (``wait`` in another process, say)
    finds its locks free. (On a table of its own: this reconcile is the one that marks it.)"""
    tasks = alone
    task_id = dead_task(tasks, files)
    held_when_marked: list[dict[str, HeldLock]] = []
    update_from = tasks.update_from

    def looking(record: TaskRecord, **changes: Any) -> TaskRecord | None:
        held_when_marked.append(held(tasks))
        return update_from(record, **changes)

    monkeypatch.setattr(tasks, "update_from", looking)
    assert task_id in tasks.reconcile()
    assert held_when_marked == [{}]
    assert tasks.get(task_id).state is TaskState.CRASHED
    assert held(tasks) == {}


def test_reconcile_is_not_failed_by_another_namespaces_corrupt_document(
    alone: Tasks, files: Files, db_url: str, namespace: str
) -> None:
    """``reconcile`` (in ``list``, ``start``, ``wait``...) looks at every namespace: a dead task
    whose namespace's document is corrupt stays as it is, for a later look, and the call goes
    on for the others. (On a table of its own: the tests beside it reconcile their tables.)"""
    task_id = dead_task(alone, files)
    corrupt = f"UPDATE {alone.table} SET data = %s WHERE namespace = %s"
    assert raw_sql(db_url, corrupt, ("{not json", namespace)) == 1
    with Tasks(db_url, f"{namespace}-b", table=alone.table) as other:
        assert task_id not in other.reconcile()
        assert other.get(task_id).state is TaskState.RUNNING


def test_reconcile_passes_over_a_record_deleted_while_it_looks(
    alone: Tasks, files: Files, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reconcile`` looks at every namespace's tasks: a record that someone deletes between its
    list and its update (a cleanup of another namespace's rows, say) is passed over, not an
    error, and the dead task's locks are still reaped. (On a table of its own, as above.)"""
    task_id = dead_task(alone, files)
    listed = alone.store.list_tasks

    def list_then_delete(*args: Any) -> Any:
        rows = listed(*args)
        raw_sql(db_url, f"DELETE FROM {alone.table}_tasks WHERE id = %s", (task_id,))
        return rows

    monkeypatch.setattr(alone.store, "list_tasks", list_then_delete)
    assert task_id not in alone.reconcile()
    monkeypatch.undo()
    with pytest.raises(TaskNotFound):
        alone.get(task_id)
    assert held(alone) == {}


def test_killed_supervisor_keeps_locks_while_the_task_runs(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    kill(running.pid)
    poll("the supervisor to be gone", lambda: True if pid_is_gone(running) else None)

    # The task's process still runs: its lock is held and alive, nothing is reconciled.
    lock = held(tasks)["app_task:a"]
    assert lock.holder.owner == f"task:{task_id}"
    assert lock.liveness is Liveness.ALIVE
    assert task_id not in tasks.reconcile()
    assert tasks.get(task_id).state is TaskState.RUNNING

    # A second task must wait for the orphan, not run beside it.
    second = tasks.start(ref("add"), args=[1, 2], locks=["app_task:a"])
    until_state(tasks, second, TaskState.WAITING)
    assert held(tasks)["app_task:a"].holder.owner == f"task:{task_id}"

    files("a.go").touch()  # the orphan ends
    after = finished(tasks, second)
    assert after.state is TaskState.SUCCEEDED, describe(tasks, after)

    # (By reconcile here, or by the one in tasks.wait().)
    record = poll("reconcile to mark the orphan", lambda: marked_by_reconcile(tasks, task_id))
    assert record.state is TaskState.CRASHED
    assert held(tasks) == {}


def test_killed_supervisor_keeps_locks_while_a_grandchild_runs(tasks: Tasks, files: Files) -> None:
    args = {**blocked_args(files, "a"), "block": True}
    task_id = tasks.start(ref("spawn_child"), args=args, locks=["app_task:a"])
    running = until_marked(tasks, task_id, files("a.marker"))
    grandchild = int(files("a.marker").read_text().splitlines()[1])
    kill(running.pid)
    kill(running.pgid)  # the task's own process (the group leader), not its group
    poll("the supervisor to be gone", lambda: True if pid_is_gone(running) else None)

    assert os.path.exists(f"/proc/{grandchild}")
    lock = held(tasks)["app_task:a"]
    assert lock.liveness is Liveness.ALIVE
    assert task_id not in tasks.reconcile()

    files("a.go").touch()  # the grandchild ends
    record = poll("reconcile to mark the task", lambda: marked_by_reconcile(tasks, task_id))
    assert record.state is TaskState.CRASHED
    assert held(tasks) == {}


def test_leftover_children_end_before_the_locks_are_released(tasks: Tasks, files: Files) -> None:
    args = {**blocked_args(files, "a"), "block": False}
    record = finished(tasks, tasks.start(ref("spawn_child"), args=args, locks=["app_task:a"]))
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.pgid is not None and group_is_empty(record.pgid)
    assert not files("a.go").exists()
    assert held(tasks) == {}


def test_caller_may_die_right_after_start(tasks: Tasks, files: Files, tmp_path: Path) -> None:
    code = (
        "import json, os, sys\n"
        "from tasklocks.tasks import Tasks\n"
        "url, ns, logs, target, args = sys.argv[1:]\n"
        "t = Tasks(url, ns, log_dir=logs)\n"
        "print(t.start(target, args=json.loads(args), locks=['app_task:a']), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    import json

    caller = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            tasks.url,
            tasks.namespace,
            str(tmp_path / "logs"),
            ref("blocked"),
            json.dumps(blocked_args(files, "a")),
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert caller.returncode == -signal.SIGKILL, caller.stderr
    task_id = int(caller.stdout)
    until_marked(tasks, task_id, files("a.marker"))
    files("a.go").touch()
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.result == "released"
    assert held(tasks) == {}


# --- waiting for locks ------------------------------------------------------------------------


def test_waiting_task_names_the_holder_then_runs_after_it(tasks: Tasks, files: Files) -> None:
    first = tasks.start(
        ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:blog"], kind="update blog"
    )
    until_marked(tasks, first, files("a.marker"))
    second = tasks.start(ref("add"), args=[1, 2], locks=["app_task:blog"], kind="second")
    waiting = until_state(tasks, second, TaskState.WAITING)
    since = time.strftime("%H:%M:%S", time.localtime(held(tasks)["app_task:blog"].holder.since))
    assert waiting.message == (
        f"Waiting for app_task:blog (held by task {first}, update blog, since {since})"
    )
    assert waiting.started is None
    assert [r.id for r in tasks.list() if r.namespace == tasks.namespace] == [second, first]

    files("a.go").touch()
    done = finished(tasks, second)
    assert done.state is TaskState.SUCCEEDED, describe(tasks, done)
    assert done.result == 3
    before = finished(tasks, first)
    assert before.started is not None and done.started is not None
    assert before.started < done.started
    assert held(tasks) == {}


def test_wait_time_counts_only_the_time_blocked_on_a_held_lock(tasks: Tasks, files: Files) -> None:
    first = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:blog"])
    until_marked(tasks, first, files("a.marker"))
    second = tasks.start(ref("add"), args=[1, 2], locks=["app_task:blog"])
    waiting = until_state(tasks, second, TaskState.WAITING)
    assert waiting.waited_for is not None and waiting.wait_started is not None
    assert waiting.wait_started == waiting.waited_for[0]["since"] >= waiting.created
    assert waiting.wait_ended is None and waiting.waited >= 0.0
    files("a.go").touch()
    done = finished(tasks, second)
    before = finished(tasks, first)
    # Its locks were free: the first task waited for nothing, however long it took to start.
    assert (before.waited_for, before.wait_started, before.wait_ended) == (None, None, None)
    assert before.waited == 0.0
    # The second waited from the refusal until it got the lock, after the first had ended.
    assert done.started is not None and before.finished is not None
    assert done.wait_started == waiting.wait_started and done.wait_ended == done.started
    assert done.wait_started <= before.finished <= done.started
    assert done.waited == done.started - done.wait_started


def test_wait_history_names_holders_and_the_waiters_ahead(tasks: Tasks, files: Files) -> None:
    tasks.locks.acquire("l1", owner="admin:x", process=None)
    first = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["l1"])
    until_state(tasks, first, TaskState.WAITING)
    waiter = tasks.start(ref("add"), args=[1, 2], locks=["l1", "l2"])
    record = until_state(tasks, waiter, TaskState.WAITING)
    history = record.waited_for or []
    assert [(w["lock"], w["owner"]) for w in history] == [
        ("l1", "admin:x"),
        ("l1", f"task:{first}"),
    ]
    message = record.message or ""
    assert message.startswith("Waiting for l1 (held by admin:x "), message
    assert f", 2nd in line after task {first}, tests.tasks.targets:blocked, since " in message

    tasks.locks.release_owner("admin:x")  # the first task gets l1: the waiter is next in line
    until_marked(tasks, first, files("a.marker"))

    def moved_up() -> str | None:
        text = tasks.get(waiter).message or ""
        return text if "in line" not in text else None

    text = poll("the waiter's message without a waiter ahead", moved_up)
    assert text.startswith(f"Waiting for l1 (held by task {first}, tests.tasks.targets:blocked")
    assert len(tasks.get(waiter).waited_for or []) == 2  # the same task, now holding l1
    files("a.go").touch()
    done = finished(tasks, waiter)
    assert done.state is TaskState.SUCCEEDED, describe(tasks, done)
    assert done.wait_started == history[0]["since"]


def test_waits_for_every_lock_it_needs(tasks: Tasks, files: Files) -> None:
    first = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["l2"])
    until_marked(tasks, first, files("a.marker"))
    second = tasks.start(ref("add"), args=[1, 2], locks=["l1", "l2"])
    waiting = until_state(tasks, second, TaskState.WAITING)
    assert waiting.message is not None and waiting.message.startswith("Waiting for l2 (")
    assert "l1" not in held(tasks)  # all or nothing: it holds none while it waits
    files("a.go").touch()
    assert finished(tasks, second).state is TaskState.SUCCEEDED
    assert held(tasks) == {}


def test_without_waiting_a_held_lock_fails_the_task(tasks: Tasks, files: Files) -> None:
    first = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    until_marked(tasks, first, files("a.marker"))
    second = tasks.start(
        ref("blocked"), args=blocked_args(files, "b"), locks=["app_task:a"], wait_for_locks=False
    )
    record = finished(tasks, second)
    assert record.state is TaskState.FAILED, describe(tasks, record)
    assert record.error_code == "LockHeld"
    assert record.error_message is not None and "app_task:a" in record.error_message
    # (It said "Waiting for ..." and hinted at the Python API's wait=True.)
    assert record.error_message.endswith("; the task does not wait for its locks (--no-wait)")
    assert record.message is not None
    assert record.message.startswith(f"Did not wait for app_task:a (held by task {first}, ")
    assert record.started is None
    assert not files("b.marker").exists()
    assert tasks.get(first).state is TaskState.RUNNING
    files("a.go").touch()
    assert finished(tasks, first).state is TaskState.SUCCEEDED


# --- progress, logs, extra locks --------------------------------------------------------------


def test_progress_from_python(tasks: Tasks, files: Files) -> None:
    args = {"percent": 40, "message": "Uploading", **blocked_args(files, "a")}
    task_id = tasks.start(ref("with_progress"), args=args)
    record = until_marked(tasks, task_id, files("a.marker"))  # it reported before it marked
    assert record.state is TaskState.RUNNING
    assert record.percent == 40
    assert record.message == "Uploading"
    assert tasks.update(task_id, state=TaskState.WAITING) is None  # not a transition
    assert tasks.get(task_id).state is TaskState.RUNNING
    files("a.go").touch()
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.percent == 100


def test_progress_from_shell(tasks: Tasks, files: Files) -> None:
    marker, go = files("a.marker"), files("a.go")
    script = (
        f"{shlex.quote(sys.executable)} -m tasklocks progress 40 'Uploading' || exit 9\n"
        f"touch {shlex.quote(str(marker))}\n"
        "i=0\n"
        f"while [ ! -e {shlex.quote(str(go))} ] && [ $i -lt 6000 ]; do\n"
        "  sleep 0.01; i=$((i+1))\n"
        "done\n"
    )
    task_id = tasks.start(["sh", "-c", script])
    record = until_marked(tasks, task_id, marker)
    assert record.percent == 40
    assert record.message == "Uploading"
    go.touch()
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED


def test_progress_checks_its_range_and_needs_a_task(
    tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="a number from 0 to 100"):
        tasks.progress(1, 101)
    monkeypatch.delenv("TASKLOCKS_TASK_ID", raising=False)
    with pytest.raises(NotInTask):
        progress(50, "outside")


@pytest.mark.parametrize("kind", ["callable", "command"])
def test_stdout_and_stderr_go_to_the_log(tasks: Tasks, kind: str) -> None:
    if kind == "callable":
        task_id = tasks.start(ref("shout"), args={"out": "to-stdout", "err": "to-stderr"})
    else:
        task_id = tasks.start(["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.log_path is not None
    assert Path(record.log_path).parent == tasks.log_dir
    log = Path(record.log_path).read_text()
    assert "to-stdout" in log
    assert "to-stderr" in log


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the runner's files, not SQL
def test_a_task_whose_id_comes_again_starts_a_fresh_log(alone: Tasks, db_url: str) -> None:
    """Dropped and made again, a table numbers its tasks from 1 again: the new task 1 appended
    to the old task 1's log, and ``logs 1`` showed both. The old file is kept as it is, and a
    process of the old task that still writes it writes there."""
    from tasklocks.web._source import read_log

    first = alone.start(["sh", "-c", "echo old"])
    assert finished(alone, first).state is TaskState.SUCCEEDED
    old_log = alone.get(first).log_path
    assert old_log is not None
    with open(old_log, "a") as old_writer:
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            raw_sql(db_url, f"DROP TABLE IF EXISTS {alone.table}{suffix}")
        with Tasks(alone.url, alone.namespace, log_dir=alone.log_dir, table=alone.table) as again:
            task_id = again.start(["sh", "-c", "echo new"])
            assert task_id == first
            record = finished(again, task_id)
            assert record.state is TaskState.SUCCEEDED, describe(again, record)
            assert record.log_path == str(Path(old_log).with_name(f"task-{task_id}-2.log"))
            old_writer.write("old, later\n")
            old_writer.flush()
            assert Path(record.log_path).read_text() == "new\n"
            assert Path(old_log).read_text() == "old\nold, later\n"
            assert read_log(record, 0).text == "new\n"  # the dashboard reads the new name


def test_the_default_log_directory_is_one_of_each_database_and_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task ids are a table's own: two databases or tables that shared a directory wrote task 1
    into the same file. (Server databases all had $XDG_STATE_HOME/tasklocks/logs; an SQLite
    file had <stem>-logs, shared by its tables and by a.db and a.sqlite.)"""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    pg = "postgresql://u@db.example:5432/test"
    urls = [
        pg,
        "postgresql://u@db.example:5433/test",
        "postgresql://u@db.example/test",
        "postgresql://u@db2.example:5432/test",
        "postgresql://u@db.example:5432/test2",
        "mysql://u@db.example:5432/test",
        f"sqlite:///{tmp_path}/a.db",
        f"sqlite:///{tmp_path}/a.sqlite",
        f"sqlite:///{tmp_path}/sub/a.db",
        "postgresql://u@/test",  # libpq's default host (it was refused: no host)
        "postgresql://u@:5433/test",
    ]
    dirs = [default_log_dir(url, table) for url in urls for table in ("tasklocks", "other")]
    assert len(set(dirs)) == len(dirs), dirs
    assert default_log_dir(pg).parent == tmp_path / "state" / "tasklocks" / "logs"
    assert default_log_dir(pg).name.startswith("postgresql-db.example-5432-test-tasklocks-")
    assert default_log_dir(urls[6]).parent == tmp_path / "a-logs"  # next to the file, as before
    assert default_log_dir(urls[9]).name.startswith("postgresql-default-test-tasklocks-")
    # The URL without its password and parameters: the same database, the same directory.
    secret = "postgresql://u:s3cret@db.example:5432/test?sslmode=require&application_name=x"
    assert default_log_dir(secret) == default_log_dir(pg)
    monkeypatch.chdir(tmp_path)
    assert default_log_dir("sqlite:///a.db") == default_log_dir(urls[6])  # (the file, resolved)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_task_one_of_two_databases_and_two_tables_logs_into_its_own_file(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same task id in two tables of PostgreSQL, in MariaDB and in SQLite: six files, each
    with its own task's output (they shared one: a leak of one database's output to another)."""
    require("mysql")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    table = "tl_" + uuid.uuid4().hex[:12]
    urls = [db_url, server_url("mysql"), f"sqlite:///{tmp_path}/a.db"]
    runners = [Tasks(url, table=t) for url in urls for t in (table, table + "_b")]
    try:
        ids = [tasks.start(["echo", f"output of {tasks.url} {tasks.table}"]) for tasks in runners]
        assert ids == [1] * len(runners)  # (fresh tables)
        records = [finished(tasks, 1) for tasks in runners]
        assert len({r.log_path for r in records}) == len(records), records
        for tasks, record in zip(runners, records, strict=True):
            assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
            assert record.log_path is not None
            assert Path(record.log_path).parent == tasks.log_dir
            expected = f"output of {tasks.url} {tasks.table}\n"
            assert Path(record.log_path).read_text() == expected, describe(tasks, record)
    finally:
        for tasks in runners:
            kill_everything(tasks)
            tasks.close()
        for url in urls[:2]:
            for name in (table, table + "_b"):
                for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
                    with contextlib.suppress(Exception):
                        raw_sql(url, f"DROP TABLE IF EXISTS {name}{suffix}")


def test_task_takes_more_locks_as_itself(tasks: Tasks, files: Files) -> None:
    args = {"name": "extra", **blocked_args(files, "a")}
    task_id = tasks.start(ref("take_extra_lock"), args=args, locks=["first"])
    record = until_marked(tasks, task_id, files("a.marker"))
    locks = held(tasks)
    assert sorted(locks) == ["extra", "first"]
    for lock in locks.values():
        assert lock.holder.owner == f"task:{task_id}"
        assert lock.holder.pgid == record.pgid
        assert lock.liveness is Liveness.ALIVE
    assert locks["extra"].holder.pid == record.pgid  # the task's own process took it
    files("a.go").touch()
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.result == f"task:{task_id}"
    assert held(tasks) == {}


def test_a_lock_the_task_took_with_tasklocks_aio_is_released_when_it_ends(
    tasks: Tasks, files: Callable[[str], Path]
) -> None:
    """(The runner's cleanup reaped the owner ``task:<id>`` alone, and tasklocks.aio's owners
    inside a task are ``task:<id>:aio-<n>``: such a lock stayed held by the dead process until
    somebody's acquisition found it dead.)"""
    args = {"name": "extra", "marker": str(files("a.marker")), "go": str(files("a.go"))}
    task_id = tasks.start(ref("take_lock_async"), args=args)
    until_marked(tasks, task_id, files("a.marker"))
    assert [h.holder.owner for h in held(tasks).values()] == [f"task:{task_id}:aio-1"]
    files("a.go").touch()
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.result == f"task:{task_id}:aio-1"
    assert held(tasks) == {}


# --- records ----------------------------------------------------------------------------------


def test_a_finished_record_never_changes(tasks: Tasks) -> None:
    task_id = tasks.start(ref("add"), args=[1, 1])
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED
    for state in TaskState:
        assert tasks.update(task_id, state=state) is None
    assert tasks.update(task_id, message="changed", percent=1.0) is None
    tasks.progress(task_id, 5, "late")
    assert tasks.stop(task_id, grace=0.1) == record
    assert task_id not in tasks.reconcile()
    assert tasks.get(task_id) == record


def test_wait_with_timeout_raises_for_a_long_task(tasks: Tasks, files: Files) -> None:
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"))
    until_marked(tasks, task_id, files("a.marker"))
    with pytest.raises(TimeoutError, match=f"task {task_id} is still running"):
        tasks.wait(task_id, timeout=0.2)
    files("a.go").touch()
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED


def test_list_shows_active_tasks_or_all_newest_first(tasks: Tasks, files: Files) -> None:
    done = tasks.start(ref("add"), args=[1, 1])
    finished(tasks, done)
    active = tasks.start(ref("blocked"), args=blocked_args(files, "a"))
    until_marked(tasks, active, files("a.marker"))
    assert ids(tasks.list(), tasks.namespace) == [active]
    assert ids(tasks.list(all=True), tasks.namespace) == [active, done]
    files("a.go").touch()
    finished(tasks, active)
    assert ids(tasks.list(), tasks.namespace) == []


@pytest.mark.parametrize("target", ["nocolon", ":func", "mod:", "no such:f", [], [1]])
def test_bad_target_is_refused(tasks: Tasks, target: Any) -> None:
    with pytest.raises(BadTarget):
        tasks.start(target)
    assert ids(tasks.list(all=True), tasks.namespace) == []


def test_bad_arguments_are_refused(tasks: Tasks) -> None:
    with pytest.raises(BadTarget, match="JSON"):
        tasks.start(ref("add"), args={"a": object()})
    with pytest.raises(ValueError, match="positive"):
        tasks.start(ref("add"), timeout=0)
    assert ids(tasks.list(all=True), tasks.namespace) == []


def test_unknown_task(tasks: Tasks) -> None:
    with pytest.raises(TaskNotFound):
        tasks.get(10**9)


def test_an_update_returns_the_record_a_read_returns(tasks: Tasks) -> None:
    """update() and update_from() build the new record from the compare-and-swap they made,
    without reading it back (a supervisor's start saves those round trips): it must be what a
    read returns, on every backend (its column types, JSON columns and floats)."""
    now = time.time()
    fields: dict[str, str | int | float | None] = {
        "target": '"tests.tasks.targets:add"',
        "args": "[1, 2]",
        "locks": '["a"]',
        "namespace": tasks.namespace,
        "state": TaskState.PENDING.value,
        "created": now,
        "timeout": 5,
    }
    task_id = tasks.store.create_task(fields)
    first = tasks.get(task_id)
    dead = subprocess.Popen(["true"])  # a pid of nothing (the fixture kills tasks' pids)
    dead.wait()
    claimed = tasks.update_from(first, pid=dead.pid, pgid=dead.pid, log_path="/tmp/x")
    assert claimed == tasks.get(task_id)
    assert claimed is not None and claimed.version == first.version + 1
    waited = [{"lock": "a", "owner": "pid:h:1", "note": "backup", "since": now + 0.25}]
    waiting = tasks.update_from(claimed, state=TaskState.WAITING, waited_for=waited, message="m")
    assert waiting == tasks.get(task_id)
    # From a record that is no longer the stored one: the swap fails, the record is read again,
    # and the change is made over it.
    running = tasks.update_from(claimed, state=TaskState.RUNNING, started=now + 0.5, message=None)
    assert running == tasks.get(task_id)
    assert running is not None and running.version == first.version + 3
    assert running.waited_for == waited and running.started == now + 0.5
    done = tasks.update(task_id, state=TaskState.SUCCEEDED, result={"x": [1, 2.5]}, percent=100)
    assert done == tasks.get(task_id)
    assert tasks.update_from(running, message="late") is None  # final now: never changes


# --- how the supervisor is started: forked by the zygote, or exec'd ------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # runner logic
@pytest.mark.parametrize("zygote", ["1", "0"], ids=["zygote", "exec"])
def test_task_sees_the_callers_environment_directory_and_import_path(
    tasks: Tasks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zygote: str
) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "tasks_only_module.py").write_text(f"VALUE = {zygote!r}\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(extra), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("TASKLOCKS_ZYGOTE", zygote)
    monkeypatch.setenv("TL_TEST_VALUE", f"value-{zygote}")
    monkeypatch.chdir(workdir)
    # Twice: the first start may find no zygote yet (it starts one, and runs the task itself).
    for _ in range(2):
        record = tasks.wait(tasks.start(ref("environment"), args=["TL_TEST_VALUE"]), timeout=60)
        assert record.state is TaskState.SUCCEEDED, record.error_message
        assert record.result == {
            "env": f"value-{zygote}",
            "cwd": str(workdir),
            "imported": zygote,
            "path0": str(workdir),
        }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_zygote_forks_supervisors_in_their_own_session(
    tasks: Tasks, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLOCKS_ZYGOTE", "1")
    tasks.wait(tasks.start(ref("add"), args=[1, 2]), timeout=60)  # make sure a zygote runs
    from tasklocks.tasks._zygote import socket_path

    path = socket_path()
    assert path is not None
    poll("the zygote to listen", lambda: True if path.exists() else None)
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"))
    record = until_marked(tasks, task_id, files("a.marker"))
    assert record.pid is not None and record.pgid is not None
    cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    assert b"tasklocks.tasks._zygote" in cmdline  # forked by the zygote, not exec'd
    assert os.getsid(record.pid) == record.pid  # the supervisor leads its own session
    assert os.getpgid(record.pgid) == record.pgid != record.pid  # the task has its own group
    files("a.go").touch()
    assert tasks.wait(task_id, timeout=60).state is TaskState.SUCCEEDED


def test_limits_run_at_most_that_many_tasks_at_once_in_order(tasks: Tasks, files: Files) -> None:
    """The seed's "at most 3 app tasks at once", with 2: the others wait, in line, visibly."""
    ids = [
        tasks.start(ref("blocked"), args=blocked_args(files, f"t{i}"), limits={"app_tasks": 2})
        for i in range(4)
    ]

    def split() -> tuple[list[int], list[int]] | None:
        running = [i for i in ids if files(f"t{ids.index(i)}.marker").exists()]
        waiting = [i for i in ids if tasks.get(i).state is TaskState.WAITING]
        return (running, waiting) if len(running) == 2 and len(waiting) == 2 else None

    running, waiting = poll("two tasks running and two waiting", split)
    holders = [h for h in tasks.locks.held() if h.name == "app_tasks"]
    assert sorted(h.holder.owner for h in holders) == sorted(f"task:{i}" for i in running)
    assert {h.limit for h in holders} == {2}
    line = [int(q.owner[5:]) for q in tasks.locks.waiting()]
    assert sorted(line) == sorted(waiting)
    first, second = (tasks.get(i) for i in line)
    assert (first.message or "").startswith("Waiting for app_tasks (held by task ")
    assert "and 1 more" in (first.message or "") and "in line" not in (first.message or "")
    assert f", 2nd in line after task {line[0]}" in (second.message or ""), second.message
    assert first.shared == {"app_tasks": 2}

    files(f"t{ids.index(running[0])}.go").touch()  # one slot frees: the first in line runs
    until_marked(tasks, line[0], files(f"t{ids.index(line[0])}.marker"))
    assert tasks.get(line[1]).state is TaskState.WAITING
    for i in ids:
        files(f"t{ids.index(i)}.go").touch()
    for i in ids:
        assert finished(tasks, i).state is TaskState.SUCCEEDED
    assert tasks.locks.held() == [] and tasks.locks.waiting() == []


def test_a_lock_name_given_as_one_str_is_one_lock(tasks: Tasks, files: Files) -> None:
    """``locks="app_task:a"`` (not a list) is that name, as in ``LockTable.acquire(shared=...)``;
    it took a lock per letter."""
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"), locks="app_task:a")
    until_marked(tasks, task_id, files("a.marker"))
    assert sorted(held(tasks)) == ["app_task:a"]
    files("a.go").touch()
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED


@pytest.mark.parametrize("limit", [0, -1, True, 2.0])
def test_list_takes_a_limit_of_one_or_more(tasks: Tasks, limit: Any) -> None:
    with pytest.raises(ValueError, match="limit must be a whole number"):
        tasks.list(all=True, limit=limit)


def test_list_with_a_limit_past_every_task_lists_them_all(tasks: Tasks) -> None:
    task_id = tasks.start(ref("add"), args=[1, 2])
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED
    assert [r.id for r in tasks.list(all=True, limit=2**70)] == [task_id]


def test_ids_progress_and_timeouts_of_the_wrong_type_are_named(tasks: Tasks) -> None:
    """(They raised from inside: Tasks.wait("1") compared a str with an int, progress(id, "50")
    did too, a message of 5 was written into the record, and wait(id, timeout=-1) gave up at
    once.)"""
    task_id = tasks.start(ref("add"), args=[1, 2])
    for wrong in (str(task_id), float(task_id), True, None):
        with pytest.raises(TypeError, match="a task id is an int, not"):
            tasks.wait(wrong)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="a task id is an int, not"):
            tasks.get(wrong)  # type: ignore[arg-type]
    for percent in ("50", True, float("nan"), -1, 101):
        with pytest.raises(ValueError, match="progress must be a number from 0 to 100 or None"):
            tasks.progress(task_id, percent)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a progress message is text"):
        tasks.progress(task_id, 50, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a number of seconds, 0 or more"):
        tasks.wait(task_id, timeout=-1)
    for grace in (-1, None, "10"):  # (-1 recorded the stop, sent SIGTERM, then raised)
        with pytest.raises(ValueError, match="grace must be a number of seconds"):
            tasks.stop(task_id, grace=grace)  # type: ignore[arg-type]
    record = finished(tasks, task_id)
    assert record.state is TaskState.SUCCEEDED
    assert record.message is None  # nothing was written (the success sets percent 100)


def test_numbers_of_other_kinds_are_numbers(tasks: Tasks, files: Files) -> None:
    """(progress() took int and float alone: numpy's integers, say, were refused.)"""
    task_id = tasks.start(ref("blocked"), args=blocked_args(files, "a"))
    until_marked(tasks, task_id, files("a.marker"))
    tasks.progress(task_id, fractions.Fraction(1, 2), "half a percent")  # type: ignore[arg-type]
    assert tasks.get(task_id).percent == 0.5
    with pytest.raises(TimeoutError):
        tasks.wait(task_id, timeout=fractions.Fraction(0))  # type: ignore[arg-type]
    files("a.go").touch()
    done = tasks.wait(task_id, timeout=fractions.Fraction(30))  # type: ignore[arg-type]
    assert done.state is TaskState.SUCCEEDED


def test_a_kind_or_args_that_cannot_be_stored_are_refused_before_anything_starts(
    tasks: Tasks,
) -> None:
    """(A kind of bytes that are not UTF-8 raised UnicodeEncodeError from the store, and args
    nested past Python's recursion limit a RecursionError.)"""
    with pytest.raises(ValueError, match="a task's kind must be text UTF-8 can encode"):
        tasks.start(["true"], kind="\udcff")
    with pytest.raises(TypeError, match="a task's kind is text"):
        tasks.start(["true"], kind=7)  # type: ignore[arg-type]
    deep: list[Any] = []
    for _ in range(sys.getrecursionlimit() + 10):
        deep = [deep]
    with pytest.raises(BadTarget, match="task arguments nest too deep"):
        tasks.start(ref("add"), args=deep)
    assert tasks.list(all=True) == []


@pytest.mark.parametrize("raw", ["\u00b2", "\u0661", "12a", ""])
def test_only_ascii_digits_are_a_task_id_in_the_environment(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLOCKS_TASK_ID", raw)
    assert current_task_id() is None
    assert not default_owner(current_process()).startswith("task:")
    monkeypatch.setenv("TASKLOCKS_TASK_ID", "12")
    assert current_task_id() == 12 and default_owner(current_process()) == "task:12"


def test_a_nan_timeout_is_refused(tasks: Tasks) -> None:
    with pytest.raises(ValueError, match="timeout"):
        tasks.start(ref("add"), args=[1, 2], timeout=float("nan"))
    task_id = tasks.start(ref("add"), args=[1, 2])
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        tasks.wait(task_id, timeout=float("nan"))
    assert finished(tasks, task_id).state is TaskState.SUCCEEDED


@pytest.mark.parametrize("timeout", [float("inf"), 10**400], ids=["inf", "past-float"])
def test_an_infinite_timeout_is_no_limit(tasks: Tasks, timeout: float) -> None:
    """(MariaDB refused the record: "StoreError: inf can not be used with MySQL"; SQLite and
    PostgreSQL stored inf.)"""
    record = finished(tasks, tasks.start(ref("add"), args=[1, 2], timeout=timeout))
    assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
    assert record.timeout is None


def test_a_start_from_a_deleted_directory_is_refused_and_writes_nothing(
    tasks: Tasks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(os.getcwd() raised FileNotFoundError from the zygote's request and left a failed record;
    a supervisor exec'd there ran its task in the deleted directory.)"""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    try:
        with pytest.raises(NoWorkingDirectory, match="cannot read the working directory"):
            tasks.start(["true"])
    finally:
        os.chdir(tmp_path)  # (pytest's own reports need one)
    assert tasks.list(all=True) == []
