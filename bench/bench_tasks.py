"""Task runner speed (issue 3): start latency against a bare interpreter start, and how soon a
waiter holds a lock after the task that held it exits.

The task targets below run inside task processes; they import nothing but the standard library
and tasklocks, and find this directory through PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import tasklocks
from tasklocks.tasks import Tasks

HERE = os.path.dirname(os.path.abspath(__file__))


def first_line(path: str) -> None:
    """Record when the target's first line runs."""
    with open(path, "w") as f:
        f.write(repr(time.time()))


def hold_then_exit(path: str, seconds: float) -> None:
    """Hold the task's locks a moment, then record the moment the target ends."""
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write(repr(time.time()))


def bare_python_spawn() -> float:
    """Seconds to run ``python -c pass`` to completion (the baseline)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t


def _wait_for_file(path: str, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                text = f.read()
            if text:
                return float(text)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout:g}s")
        time.sleep(0.0005)


def start_latency(url: str, namespace: str, tmpdir: str, rounds: int) -> list[float]:
    """Seconds from start() returning to the target's first line, per round."""
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = []
    with Tasks(url, namespace, log_dir=os.path.join(tmpdir, "logs")) as tasks:
        for i in range(rounds):
            path = os.path.join(tmpdir, f"first-{namespace}-{i}")
            task_id = tasks.start("bench_tasks:first_line", args=[path])
            returned = time.time()
            out.append(_wait_for_file(path) - returned)
            tasks.wait(task_id, timeout=30)
    return out


def exit_to_free(url: str, namespace: str, tmpdir: str, rounds: int) -> list[float]:
    """Seconds from a task's last line to a waiting process holding the task's lock."""
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = []
    with (
        Tasks(url, namespace, log_dir=os.path.join(tmpdir, "logs")) as tasks,
        tasklocks.connect(url, namespace) as waiter,
    ):
        for i in range(rounds):
            path = os.path.join(tmpdir, f"exit-{namespace}-{i}")
            lock = f"exit-lock-{i}"
            task_id = tasks.start("bench_tasks:hold_then_exit", args=[path, 0.05], locks=[lock])
            deadline = time.monotonic() + 30
            while tasks.get(task_id).state.value != "running":
                if time.monotonic() > deadline:
                    raise TimeoutError("task did not start")
                time.sleep(0.001)
            lease = waiter.acquire(lock, wait=True, timeout=30)
            got = time.time()
            out.append(got - _wait_for_file(path))
            lease.release()
            tasks.wait(task_id, timeout=30)
    return out
