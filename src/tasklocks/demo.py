"""``make demo``: the seed's server, for real, on the embedded SQLite default.

Real task processes model the server in the seed: updates of two different apps run in parallel,
a second task on one of them waits for the first, a full backup takes each app's lock in turn while
it backs that app up, a platform update needs the update lock, a mail server restart has its own
lock, and one task is killed with SIGKILL mid-way (its supervisor too, so nobody is left to clean
up: the next contender proves the holder dead). At the end a timeline shows what ran in parallel,
who waited for whom and for how long, and that no lock was left behind.

Run: ``python -m tasklocks.demo [--db URL] [--speed FACTOR]`` (a smaller factor runs faster).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tasklocks
from tasklocks import names
from tasklocks._core import Holder
from tasklocks.errors import describe_holder
from tasklocks.tasks import TaskRecord, Tasks, progress

__all__ = ["app_operation", "dashboard_hint", "full_backup", "main", "render_timeline"]


# --- the task targets (run inside task processes) -----------------------------------------------


def app_operation(app: str, operation: str, seconds: float, steps: int = 5) -> str:
    """An app update/restart/configure: some steps of work, reporting progress."""
    for step in range(steps):
        progress(100 * step / steps, f"{operation} {app}: step {step + 1}/{steps}")
        print(f"{operation} {app}: step {step + 1}/{steps}", flush=True)
        time.sleep(seconds / steps)
    return f"{operation} of {app} done"


def full_backup(site: str, apps: list[str], seconds_per_app: float) -> list[dict[str, Any]]:
    """Back up every app to one backup site, holding each app's lock only while it is copied."""
    table = tasklocks.connect(os.environ["TASKLOCKS_DB"], os.environ["TASKLOCKS_NAMESPACE"])
    steps: list[dict[str, Any]] = []
    for index, app in enumerate(apps):
        waited_for: list[str] = []

        def told(
            held: Mapping[str, Holder], app: str = app, waited_for: list[str] = waited_for
        ) -> None:
            for name, holder in held.items():
                waited_for.append(f"{name} held by {describe_holder(holder)}")
            progress(None, f"backup to {site}: waiting for {app}")
            print(f"backup to {site}: waiting for {', '.join(waited_for)}", flush=True)

        asked = time.time()
        with table.hold(names.app_task(app), on_wait=told, note=f"backup of {app} to {site}"):
            got = time.time()
            progress(100 * index / len(apps), f"backup to {site}: copying {app}")
            print(f"backup to {site}: copying {app}", flush=True)
            time.sleep(seconds_per_app)
        steps.append(
            {"app": app, "asked": asked, "got": got, "done": time.time(), "waited_for": waited_for}
        )
    table.close()
    return steps


# --- the timeline --------------------------------------------------------------------------------


def render_timeline(records: list[TaskRecord], width: int = 48) -> str:
    """One line per task: when it waited (.) and ran (#), how it ended, and whom it waited for."""
    if not records:
        return "no tasks"
    t0 = min(r.created for r in records)
    t1 = max((r.finished or time.time()) for r in records)
    span = max(t1 - t0, 1e-6)

    def col(t: float) -> int:
        return min(width - 1, int((t - t0) / span * width))

    lines = [
        f"{'id':>3}  {'task':<26} {'state':<9} {'waited':>7} {'ran':>6}  "
        f"0s{'':{width - 8}}{span:5.1f}s"
    ]
    for r in sorted(records, key=lambda r: r.id):
        bar = [" "] * width
        if r.wait_started is not None:  # only the time it was blocked on a held lock
            for i in range(col(r.wait_started), col(r.wait_ended or t1)):
                bar[i] = "."
        if r.started is not None:
            for i in range(col(r.started), col(r.finished or t1) + 1):
                bar[i] = "#"
        if r.state.value == "crashed":
            bar[col(r.finished or t1)] = "X"
        ran = (r.finished or t1) - r.started if r.started is not None else 0.0
        lines.append(
            f"{r.id:>3}  {r.title[:26]:<26} {r.state.value:<9} {r.waited:6.2f}s {ran:5.2f}s  "
            f"|{''.join(bar)}|"
        )
    notes = []
    for r in sorted(records, key=lambda r: r.id):
        for w in r.wait_history():
            owner = str(w.get("owner", "?"))
            who = f"task {owner[5:]}" if owner.startswith("task:") else owner
            if w.get("note"):
                who += f" ({w['note']})"
            wait = (w["until"] or t1) - w["since"]
            notes.append(
                f"  task {r.id} ({r.title}) waited {wait:.2f}s for {w['lock']}, held by {who}"
            )
        if r.kind == "full backup" and isinstance(r.result, list):
            for step in r.result:
                line = (
                    f"  task {r.id} backed up {step['app']} from {step['got'] - t0:.2f}s "
                    f"to {step['done'] - t0:.2f}s"
                )
                if step["waited_for"]:
                    line += f" after waiting {step['got'] - step['asked']:.2f}s for " + "; ".join(
                        step["waited_for"]
                    )
                notes.append(line)
        if r.state.value == "crashed":
            notes.append(f"  task {r.id} ({r.title}) crashed: {r.message}")
            for heir in records:
                for w in heir.waited_for or []:
                    if w.get("owner") == f"task:{r.id}" and heir.started is not None:
                        notes.append(
                            f"    its lock {w['lock']} went to task {heir.id} ({heir.title}) "
                            f"at {heir.started - t0:.2f}s"
                        )
    return "\n".join(lines + (["", "who waited for whom:", *notes] if notes else []))


# --- the scenario --------------------------------------------------------------------------------


def _wait_until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: gave up waiting for {what}")
        time.sleep(0.01)


def run(url: str, speed: float = 1.0, out: Any = sys.stdout) -> list[TaskRecord]:
    """Run the scenario against ``url`` and return the final records (newest last)."""
    namespace = f"demo-{os.getpid()}-{int(time.time())}"
    tasks = Tasks(url, namespace)
    target = "tasklocks.demo:app_operation"

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def start(kind: str, locks: list[str], **kwargs: Any) -> int:
        task_id = tasks.start(target, args=kwargs, locks=locks, kind=kind)
        say(f"started task {task_id}: {kind} (locks: {', '.join(locks) or 'none'})")
        return task_id

    s = speed
    say(f"tasklocks demo on {url} (namespace {namespace})")

    def app(kind: str, lock: str, seconds: float, steps: int = 5) -> int:
        app_name, operation = kind.split()[-1], kind.split()[0]
        return start(kind, [lock], app=app_name, operation=operation, seconds=seconds, steps=steps)

    def state_is(task_id: int, *states: str) -> bool:
        return tasks.get(task_id).state.value in states

    # 1. Work on different things runs in parallel.
    blog = app("update blog", names.app_task("blog"), 2.0 * s)
    wiki = app("update wiki", names.app_task("wiki"), 2.0 * s)
    chat = app("update chat", names.app_task("chat"), 60.0, steps=60)  # killed mid-way below
    platform = app("update platform", names.platform_update(), 1.5 * s)
    mail = app("restart mail", names.mail_restart(), 1.0 * s)
    first = [blog, wiki, chat, platform, mail]
    # 2. Work on the same thing waits, visibly (started as soon as the update of the blog runs,
    #    not after the others: on a slow machine the update could end before it asked);
    #    the backup takes each app's lock in turn.
    _wait_until(lambda: state_is(blog, "running"), f"task {blog} to run")
    again = app("restart blog", names.app_task("blog"), 1.0 * s)
    for task_id in first:
        _wait_until(lambda t=task_id: state_is(t, "running"), f"task {task_id} to run")
    backup = tasks.start(
        "tasklocks.demo:full_backup",
        args={
            "site": "s3",
            "apps": ["wiki", "mail-ui", "chat", "blog"],
            "seconds_per_app": 0.6 * s,
        },
        locks=[names.full_backup("s3")],
        kind="full backup",
    )
    say(f"started task {backup}: full backup to s3 (full_backup:s3, then each app's lock in turn)")
    platform2 = app("update platform", names.platform_update(), 0.5 * s)
    _wait_until(lambda: state_is(again, "waiting"), "restart blog to wait")
    say(f"task {again}: {tasks.get(again).message}")
    # 3. A task is killed with SIGKILL mid-way, its supervisor too: nobody is left to clean up,
    #    and the next contender for its lock proves it dead.
    _wait_until(lambda: (tasks.get(chat).percent or 0) >= 2, "update chat to make progress")
    configure = app("configure chat", names.app_task("chat"), 0.5 * s)
    _wait_until(lambda: state_is(configure, "waiting"), "configure chat to wait")
    say(f"task {configure}: {tasks.get(configure).message}")
    victim = tasks.get(chat)
    assert victim.pid is not None and victim.pgid is not None
    os.kill(victim.pid, signal.SIGKILL)
    os.killpg(victim.pgid, signal.SIGKILL)
    say(f"killed task {chat} (update chat) and its supervisor with SIGKILL mid-way")
    ids = [*first, again, backup, platform2, configure]
    for task_id in ids:
        tasks.wait(task_id, timeout=120)
    records = [tasks.get(i) for i in ids]
    say("")
    say(render_timeline(records))
    held = tasks.locks.held()
    say("")
    say("locks held at the end: " + (", ".join(h.name for h in held) if held else "none"))
    tasks.close()
    say("")
    say(dashboard_hint(url, namespace, records))
    return records


def dashboard_hint(url: str, namespace: str, records: list[TaskRecord]) -> str:
    """The command that shows this run in the dashboard, and the address of its timeline."""
    script = Path(sys.executable).with_name("tasklocks")
    if script.exists():
        with contextlib.suppress(ValueError):
            script = script.relative_to(Path.cwd())
        program = shlex.quote(str(script))
    else:
        program = f"{shlex.quote(sys.executable)} -m tasklocks"
    start = math.floor(min(r.created for r in records)) - 1
    end = math.ceil(max(r.finished or time.time() for r in records)) + 1
    return (
        "see this run in the dashboard (needs tasklocks[web]; make demo installs it):\n"
        f"  {program} --db {shlex.quote(url)} --namespace {namespace} serve\n"
        f"  then open http://127.0.0.1:8765/timeline?from={start}&to={end}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasklocks.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--db", default=None, help="database URL (default: ./demo-state/tasklocks.db)"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="duration factor (default 1.0)")
    ns = parser.parse_args(argv)
    url = ns.db or "sqlite:///" + str(Path("demo-state").resolve() / "tasklocks.db")
    run(url, ns.speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
