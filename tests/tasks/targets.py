"""Callable targets that the task tests start as ``tests.tasks.targets:<name>``.

They run inside task processes, so they talk to the test only through files: a *marker* file a
target writes once it is running (the test polls for it), and a *go* file the test creates to let a
blocked target finish. Every wait here is bounded so that no stray process outlives a test run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import tasklocks
from tasklocks.tasks import current_task_id, progress

MODULE = "tests.tasks.targets"
LIMIT = 60.0  # seconds any blocked target waits at most before giving up on its own


def ref(name: str) -> str:
    """The start() target for the function ``name`` of this module."""
    if not callable(globals().get(name)):
        raise AttributeError(f"{MODULE} has no target {name!r}")
    return f"{MODULE}:{name}"


def _mark(marker: str, text: str = "") -> None:
    """Write ``marker`` atomically (the test polls for it): the pid, then ``text``."""
    tmp = f"{marker}.{os.getpid()}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n{text}", encoding="utf-8")
    os.replace(tmp, marker)


def _wait_for(path: str, limit: float = LIMIT) -> bool:
    """Block until ``path`` exists (True) or ``limit`` seconds passed (False)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def add(a: int, b: int) -> int:
    return a + b


def not_finite() -> dict[str, Any]:
    """A result with numbers JSON has no word for, as Python's json writes them anyway."""
    return {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "one": 1.5}


class TargetFailed(Exception):
    """The exception ``fail`` raises (its class name becomes the task's error code)."""


def fail(msg: str) -> NoReturn:
    print("about to fail", flush=True)
    raise TargetFailed(msg)


def exit_with(code: int) -> NoReturn:
    sys.exit(code)


def sleepy(seconds: float, marker: str) -> str:
    """Mark that the target runs, sleep, return ``"slept"``."""
    _mark(marker)
    time.sleep(seconds)
    return "slept"


def blocked(marker: str, go: str) -> str:
    """Mark that the target runs, then block until the test creates ``go``."""
    _mark(marker)
    if not _wait_for(go):
        raise TimeoutError(f"nobody created {go}")
    return "released"


def ignore_term(marker: str, go: str) -> str:
    """Like :func:`blocked`, but SIGTERM does nothing: only SIGKILL ends it early."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return blocked(marker, go)


def spawn_child(marker: str, go: str, block: bool) -> str:
    """Start a grandchild (same process group) that blocks until ``go``; mark (the grandchild's
    pid on the marker's second line); then block on ``go`` too, or return at once."""
    import subprocess

    code = (
        "import os, sys, time\n"
        "d = time.monotonic() + 60\n"
        "while not os.path.exists(sys.argv[1]) and time.monotonic() < d: time.sleep(0.005)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, go])
    _mark(marker, str(child.pid))
    if block and not _wait_for(go):
        raise TimeoutError(f"nobody created {go}")
    return "parent done"


def with_progress(percent: float, message: str, marker: str, go: str) -> str:
    """Report progress from Python, mark, and block until ``go``."""
    progress(percent, message)
    _mark(marker)
    if not _wait_for(go):
        raise TimeoutError(f"nobody created {go}")
    return "done"


def shout(out: str, err: str) -> None:
    """Write one line to stdout and one to stderr (for the log file test)."""
    print(out)
    print(err, file=sys.stderr)


def take_extra_lock(name: str, marker: str, go: str) -> str:
    """Take one more lock through the normal API while running; leave it to the runner to release.

    Returns the owner the entry got (it must be ``task:<id>``).
    """
    table = tasklocks.connect(os.environ["TASKLOCKS_DB"], os.environ["TASKLOCKS_NAMESPACE"])
    lease = table.acquire(name)
    owners = {h.name: h.holder.owner for h in table.held()}
    expected = f"task:{current_task_id()}"
    if lease.owner != expected or owners.get(name) != expected:
        raise AssertionError(f"lock {name} owned by {owners.get(name)!r}, not {expected!r}")
    _mark(marker, lease.owner)
    if not _wait_for(go):
        raise TimeoutError(f"nobody created {go}")
    return lease.owner


def take_lock_async(name: str, marker: str, go: str) -> str:
    """``take_extra_lock`` through ``tasklocks.aio``, whose owner is ``task:<id>:aio-<n>``; the
    process ends without releasing it."""
    import asyncio

    import tasklocks.aio

    async def main() -> str:
        url, namespace = os.environ["TASKLOCKS_DB"], os.environ["TASKLOCKS_NAMESPACE"]
        table = await tasklocks.aio.connect(url, namespace)
        lease = await table.acquire(name)
        _mark(marker, lease.owner)
        if not _wait_for(go):
            raise TimeoutError(f"nobody created {go}")
        return lease.owner

    return asyncio.run(main())


def _append(path: str, line: str) -> None:
    # One small O_APPEND write per line: lines of different processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_interval(paths: list[str], seconds: float, tick: bool = False) -> dict[str, Any]:
    """Append ``start <task> <t> <pid>`` to every file of ``paths``, sleep, append ``end ...``.

    With ``tick``, append a ``tick`` line to every file about once a millisecond while it runs:
    the last tick of a task killed midway proves it still ran (held its locks) at that time.
    ``t`` is ``time.monotonic()``: one clock for every process on the machine (Linux
    CLOCK_MONOTONIC), immune to wall-clock steps, so the lines of different tasks compare.
    """
    task = current_task_id()
    pid = os.getpid()
    for path in paths:
        _append(path, f"start {task} {time.monotonic():.6f} {pid}\n")
    if tick:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            for path in paths:
                _append(path, f"tick {task} {time.monotonic():.6f} {pid}\n")
            time.sleep(0.001)
    else:
        time.sleep(seconds)
    for path in paths:
        _append(path, f"end {task} {time.monotonic():.6f} {pid}\n")
    return {"task": task, "pid": pid}


def environment(name: str) -> dict[str, object]:
    """What the task's process sees: an environment variable, its directory, its import path."""
    import sys

    import tasks_only_module  # type: ignore[import-not-found]  # on the caller's PYTHONPATH only

    return {
        "env": os.environ.get(name),
        "cwd": os.getcwd(),
        "imported": tasks_only_module.VALUE,
        "path0": sys.path[0],
    }
