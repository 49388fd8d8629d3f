"""Many tasks over a few overlapping locks, some SIGKILLed at random while they run.

Each task appends ``start``/``end`` lines with ``time.monotonic()`` (one clock for every process
on the machine) to one file per lock it holds. Afterwards: every record is final, the intervals
of the tasks sharing a lock never overlap (a killed task's interval ends when the test killed
it), and no lock is left held. Set ``TASKLOCKS_STRESS_SEED`` to replay a run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from tasklocks.owner import group_is_empty
from tasklocks.tasks import Tasks, TaskState

from .targets import ref
from .test_tasks import describe, killpg

pytestmark = pytest.mark.stress

LOCKS = ("s0", "s1", "s2", "s3")
TASKS = 32
VICTIMS = 6
VICTIM_SECONDS = 3.0  # victims run this long unless killed (they are killed well before)


@dataclass
class Spec:
    locks: list[str]
    seconds: float
    victim: bool


def read_lines(path: Path) -> list[tuple[str, int, float]]:
    """(``start``/``tick``/``end``, task id, monotonic time) for each line of a lock's file."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, task, when, _pid = line.split()
        out.append((what, int(task), float(when)))
    return out


def test_tasks_sharing_a_lock_never_run_together(tasks: Tasks, tmp_path: Path) -> None:
    seed = int(os.environ.get("TASKLOCKS_STRESS_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    about = f"(seed {seed})"
    victims = set(rng.sample(range(TASKS), VICTIMS))
    specs = [
        Spec(
            locks=rng.sample(LOCKS, rng.choice((1, 1, 2))),
            seconds=VICTIM_SECONDS if i in victims else rng.uniform(0.02, 0.1),
            victim=i in victims,
        )
        for i in range(TASKS)
    ]
    files = {name: tmp_path / f"{name}.intervals" for name in LOCKS}

    started: dict[int, Spec] = {}
    for i, spec in enumerate(specs):
        task_id = tasks.start(
            ref("write_interval"),
            args={
                "paths": [str(files[n]) for n in spec.locks],
                "seconds": spec.seconds,
                "tick": spec.victim,
            },
            locks=spec.locks,
            kind=f"stress {i}",
        )
        started[task_id] = spec

    # Kill each victim a random moment after it wrote its first start line.
    kill_plan: dict[int, float] = {}
    # Task id -> monotonic time just *before* the SIGKILL was sent: the victim surely still ran
    # then (a time taken after killpg() returns may be late by however long this process waited
    # for a CPU, long enough for the next task to start: that measured overlaps that were none).
    killed: dict[int, float] = {}
    deadline = time.monotonic() + 60
    while True:
        records = {r.id: r for r in tasks.list(all=True) if r.id in started}
        if all(r.state.is_final for r in records.values()):
            break
        assert time.monotonic() < deadline, f"tasks still active after 60 s {about}: " + str(
            {i: r.state.value for i, r in records.items() if not r.state.is_final}
        )
        running = {task for n in LOCKS for what, task, _ in read_lines(files[n]) if what == "start"}
        now = time.monotonic()
        for task_id, spec in started.items():
            record = records[task_id]
            if not spec.victim or task_id in killed or task_id not in running:
                continue
            if record.state is not TaskState.RUNNING or record.pgid is None:
                continue
            at = kill_plan.setdefault(task_id, now + rng.uniform(0.0, 0.2))
            if now >= at:
                killed[task_id] = time.monotonic()
                killpg(record.pgid)
        time.sleep(0.01)

    # Every record is final: victims crashed by SIGKILL, the others succeeded.
    assert set(killed) == {t for t, s in started.items() if s.victim}, about
    for task_id, spec in started.items():
        record = records[task_id]
        if spec.victim:
            assert record.state is TaskState.CRASHED, describe(tasks, record)
            assert record.signal == signal.SIGKILL, about
        else:
            assert record.state is TaskState.SUCCEEDED, describe(tasks, record)
            assert record.result is not None and record.result["task"] == task_id

    # Per lock, the intervals of the tasks that held it never overlap. A task's interval runs
    # from its start line to its end line; a killed one's to the last moment it provably ran:
    # its last tick line, or the moment the test sent the SIGKILL, whichever is later.
    for name in LOCKS:
        starts: dict[int, float] = {}
        ends: dict[int, float] = {}
        for what, task, when in read_lines(files[name]):
            assert name in started[task].locks, f"task {task} wrote to {name} {about}"
            if what == "start":
                starts[task] = when
            else:
                ends[task] = max(when, ends.get(task, when))
        for task_id, spec in started.items():
            if name in spec.locks and not spec.victim:
                assert task_id in starts and task_id in ends, f"task {task_id} on {name} {about}"
        intervals = []
        for task, begin in starts.items():
            if task in killed:
                end = max(ends.get(task, begin), killed[task])
            else:
                assert task in ends, f"task {task} started on {name} but never ended {about}"
                end = ends[task]
            intervals.append((begin, end, task))
        intervals.sort()
        for (_, end, task), (begin, _, other) in pairwise(intervals):
            assert begin >= end, (
                f"tasks {task} and {other} ran together on {name}: {other} started "
                f"{end - begin:.6f}s before {task} ended {about}"
            )

    # Nothing is left: no lock held, nothing to reconcile, no process of any task.
    assert tasks.locks.held() == [], about
    assert [r for r in tasks.reconcile() if r in started] == [], about
    for record in records.values():
        assert record.pgid is not None and group_is_empty(record.pgid), describe(tasks, record)
