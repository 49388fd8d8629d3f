"""Tasks and sessions, on every backend: a task whose supervisor cannot renew its session in time
is stopped and says it lost its lock; a task whose supervisor was killed keeps its locks (its
keeper renews them) for as long as it runs, and is stopped if they are lost anyway."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tasklocks
from tasklocks import Liveness, LockHeld
from tasklocks.owner import group_is_empty
from tasklocks.tasks import Tasks, TaskState

from .targets import ref
from .test_tasks import (
    Files,
    blocked_args,
    describe,
    finished,
    held,
    kill,
    kill_everything,
    pid_is_gone,
    poll,
    until_marked,
)

TTL = 1.0


@pytest.fixture
def short(tasks: Tasks) -> Iterator[Tasks]:
    """The ``tasks`` runner's database and namespace, with sessions of a second."""
    runner = Tasks(tasks.url, tasks.namespace, log_dir=tasks.log_dir, ttl=TTL)
    try:
        yield runner
    finally:
        kill_everything(runner)
        runner.close()


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_a_task_whose_supervisor_loses_its_lock_is_stopped_and_says_so(
    short: Tasks, files: Files
) -> None:
    task_id = short.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(short, task_id, files("a.marker"))
    assert running.pid is not None
    token = held(short)["app_task:a"].holder.token
    os.kill(running.pid, signal.SIGSTOP)  # the supervisor can renew nothing for a while
    try:
        with tasklocks.connect(short.url, short.namespace) as other:
            lease = other.acquire("app_task:a", owner="task:other", wait=True, timeout=30)
            assert lease.token > token  # taken over once the session expired
    finally:
        os.kill(running.pid, signal.SIGCONT)
    record = finished(short, task_id)
    assert record.state is TaskState.FAILED, describe(short, record)
    assert record.error_code == "LOCK_LOST"
    assert "app_task:a" in (record.error_message or "") and "lost" in (record.error_message or "")
    assert record.message == "stopped: its lock app_task:a was lost"
    assert record.signal == signal.SIGTERM or record.exit_code is not None
    assert not files("a.go").exists()  # it never got to finish its work
    # The new holder's lock was left alone.
    assert held(short)["app_task:a"].holder.owner == "task:other"


def test_a_killed_supervisors_keeper_keeps_the_locks_while_the_task_runs(
    short: Tasks, files: Files
) -> None:
    task_id = short.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(short, task_id, files("a.marker"))
    kill(running.pid)
    poll("the supervisor to be gone", lambda: True if pid_is_gone(running) else None)
    time.sleep(3 * TTL)  # long past the ttl: only the keeper can have renewed the session
    lock = held(short)["app_task:a"]
    assert lock.liveness is Liveness.ALIVE
    assert lock.expires_in is not None and lock.expires_in > 0
    with tasklocks.connect(short.url, short.namespace) as other, pytest.raises(LockHeld):
        other.acquire("app_task:a", owner="task:other")
    files("a.go").touch()  # the orphan ends: its keeper goes, and the lock is reclaimable
    record = poll(
        "reconcile to mark the orphan",
        lambda: short.get(task_id) if task_id in short.reconcile() else None,
    )
    assert record.state is TaskState.CRASHED
    assert held(short) == {}


def test_the_keeper_stops_an_orphan_whose_locks_are_lost(short: Tasks, files: Files) -> None:
    task_id = short.start(ref("blocked"), args=blocked_args(files, "a"), locks=["app_task:a"])
    running = until_marked(short, task_id, files("a.marker"))
    assert running.pid is not None and running.pgid is not None
    [keeper] = [pid for pid in _children(running.pid) if pid != running.pgid]
    os.kill(keeper, signal.SIGSTOP)  # it cannot renew either: the session will expire
    kill(running.pid)
    poll("the supervisor to be gone", lambda: True if pid_is_gone(running) else None)
    with tasklocks.connect(short.url, short.namespace) as other:
        lease = other.acquire("app_task:a", owner="task:other", wait=True, timeout=30)
    os.kill(keeper, signal.SIGCONT)  # its next renewal is refused: it stops the task
    pgid = running.pgid
    poll("the orphan to be stopped", lambda: True if group_is_empty(pgid) else None)
    assert not files("a.go").exists()
    assert held(short)["app_task:a"].holder.token == lease.token
