"""The task commands of the command line: start, tasks, task, logs, stop, wait, progress."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasklocks._cli_args import add_mode_options, lock_spec, print_table, printable, utf8_text
from tasklocks.errors import EXIT_FAILURE, EXIT_LOCKED, EXIT_USAGE, TasklocksError, clock, quote
from tasklocks.tasks import TaskRecord, Tasks, TaskState, current_task_id

__all__ = ["add_task_commands"]

EXIT_OK = 0
_WAIT_EXIT = {
    TaskState.SUCCEEDED: EXIT_OK,
    TaskState.FAILED: EXIT_FAILURE,
    TaskState.STOPPED: EXIT_LOCKED,
    TaskState.TIMED_OUT: EXIT_LOCKED,
    TaskState.CRASHED: EXIT_LOCKED,
}


# How deep --args may nest: the task's record is written and read again by json, which recurses.
MAX_ARGS_DEPTH = 100


class TaskUsageError(TasklocksError):
    exit_code = EXIT_USAGE


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in a JSON value (without recursion)."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


def _open(args: argparse.Namespace) -> Tasks:
    return Tasks(args.db, args.namespace, ttl=args.ttl)


def _json_text(value: Any) -> str:
    """``value`` as JSON text (``--json``), where a number that is not finite (a callable's NaN
    result, say) is null, as JavaScript's JSON.stringify writes it: JSON has no NaN or Infinity,
    and json.dumps would write them anyway."""
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError:  # (json reads its NaN and Infinity back through parse_constant)
        return json.dumps(json.loads(json.dumps(value), parse_constant=lambda _: None), indent=2)


def _clock(epoch: float | None) -> str:
    return "-" if epoch is None else clock(epoch)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _percent(record: TaskRecord) -> str:
    return "-" if record.percent is None else f"{record.percent:.0f}%"


def _list_rows(records: list[TaskRecord]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        ("ID", "KIND", "STATE", "PERCENT", "MESSAGE", "STARTED", "DURATION")
    ]
    for r in records:
        message = " ".join((r.message or r.error_message or "").split())
        rows.append(
            (
                str(r.id),
                " ".join(r.title.split())[:30],  # (one line, whatever --kind held)
                r.state.value,
                _percent(r),
                message[:70],
                _clock(r.started),
                _duration(r.duration),
            )
        )
    return rows


def _bar(record: TaskRecord, width: int = 30) -> str:
    fraction = 0.0 if record.percent is None else max(0.0, min(1.0, record.percent / 100))
    filled = round(fraction * width)
    message = " ".join((record.message or "").split())[:60]
    bar = "#" * filled + "." * (width - filled)
    return printable(
        f"task {record.id} [{bar}] {_percent(record):>4} {record.state.value}  {message}"
    )


# --- commands ------------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if (args.call is None) == (not command):
        raise TaskUsageError("start needs either --call module:function or -- CMD [ARG...]")
    if args.args is not None and args.call is None:
        raise TaskUsageError("--args goes with --call (a command takes its arguments after --)")
    call_args: Any = None
    if args.args is not None:
        try:
            call_args = json.loads(args.args)
            too_deep = _depth(call_args) > MAX_ARGS_DEPTH
        except ValueError as exc:
            raise TaskUsageError(
                f"--args is not valid JSON ({exc}); quote it: --args '{{...}}'"
            ) from None
        except RecursionError:  # deeper than Python's recursion limit lets json read
            too_deep = True
        if too_deep:
            raise TaskUsageError(
                f"--args nests arrays or objects more than {MAX_ARGS_DEPTH} deep; "
                "give a flatter value"
            )
    spec = lock_spec(args.locks, args.shared, args.limits)
    with _open(args) as tasks:
        task_id = tasks.start(
            args.call if args.call is not None else command,
            args=call_args,
            locks=spec.names,
            shared=spec.shared,
            limits=spec.limits,
            kind=args.kind,
            timeout=args.timeout,
            wait_for_locks=not args.no_wait,
        )
    print(task_id)
    return EXIT_OK


def cmd_tasks(args: argparse.Namespace) -> int:
    with _open(args) as tasks:
        if args.watch:
            return _watch(tasks, args)
        records = tasks.list(all=args.all, limit=args.limit)
    if args.json:
        print(_json_text([r.to_json() for r in records]))
        return EXIT_OK
    if not records:
        print("no tasks" if args.all else "no active tasks (see --all)")
        return EXIT_OK
    print_table(_list_rows(records))
    return EXIT_OK


def _watch(tasks: Tasks, args: argparse.Namespace) -> int:
    """Redraw the active tasks with progress bars until interrupted (or, off a terminal, once)."""
    tty = sys.stdout.isatty()
    drawn = 0
    while True:
        records = tasks.list(all=args.all, limit=args.limit or 20)
        lines = [_bar(r) for r in records] or ["no active tasks"]
        if tty and drawn:
            sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        drawn = len(lines)
        if not tty:
            return EXIT_OK
        time.sleep(0.5)


def cmd_task(args: argparse.Namespace) -> int:
    with _open(args) as tasks:
        tasks.reconcile()
        record = tasks.get(args.id)
    if args.json:
        print(_json_text(record.to_json()))
        return EXIT_OK
    target = record.target if isinstance(record.target, str) else " ".join(record.target)
    fields = [
        ("id", str(record.id)),
        ("kind", record.kind or "-"),
        ("target", target),
        ("args", "-" if record.args is None else json.dumps(record.args)),
        ("locks", ", ".join(record.locks) or "-"),
        ("state", record.state.value),
        ("percent", _percent(record)),
        ("message", record.message or "-"),
        ("result", "-" if record.result is None else json.dumps(record.result)),
        (
            "error",
            "-" if record.error_code is None else f"{record.error_code}: {record.error_message}",
        ),
        ("exit code", "-" if record.exit_code is None else str(record.exit_code)),
        ("signal", "-" if record.signal is None else str(record.signal)),
        ("pid", "-" if record.pid is None else f"{record.pid} on {record.host}"),
        ("created", _clock(record.created)),
        ("started", _clock(record.started)),
        ("finished", _clock(record.finished)),
        ("duration", _duration(record.duration)),
        ("timeout", "-" if record.timeout is None else f"{record.timeout:g}s"),
        ("log", record.log_path or "-"),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {printable(value)}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    with _open(args) as tasks:
        record = tasks.get(args.id)
        if record.log_path is None:
            raise TasklocksError(f"task {args.id} has no log yet; try again in a moment")
        path = Path(record.log_path)
        if not path.exists():
            raise TasklocksError(
                f"the log of task {args.id} is gone ({path}); it may have been cleaned up"
            )
        with path.open("rb") as log:
            while True:
                chunk = log.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    continue
                if not args.follow:
                    return EXIT_OK
                if tasks.get(args.id).state.is_final:
                    rest = log.read()
                    sys.stdout.buffer.write(rest)
                    sys.stdout.flush()
                    return EXIT_OK
                time.sleep(0.1)
                if int(time.monotonic() * 10) % 10 == 0:
                    tasks.reconcile()


def cmd_stop(args: argparse.Namespace) -> int:
    with _open(args) as tasks:
        record = tasks.stop(args.id, grace=args.grace)
    print(f"task {record.id} {record.state.value}")
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _open(args) as tasks:
        if sys.stderr.isatty():
            record = _wait_with_bar(tasks, args.id, args.timeout)
        else:
            try:
                record = tasks.wait(args.id, timeout=args.timeout)
            except TimeoutError as exc:
                raise _WaitTimeout(str(exc)) from None
    summary = f"task {record.id} {record.state.value}"
    if record.state is TaskState.SUCCEEDED and record.result is not None:
        summary += f": {json.dumps(record.result)}"
    elif record.error_message:
        summary += f": {record.error_code}: {record.error_message}"
    elif record.message:
        summary += f": {record.message}"
    print(printable(summary))
    return _WAIT_EXIT[record.state]


class _WaitTimeout(TasklocksError):
    exit_code = EXIT_LOCKED


def _wait_with_bar(tasks: Tasks, task_id: int, timeout: float | None) -> TaskRecord:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            record = tasks.wait(task_id, timeout=0.25)
        except TimeoutError:
            record = tasks.get(task_id)
        sys.stderr.write("\r\x1b[K" + _bar(record))
        sys.stderr.flush()
        if record.state.is_final:
            sys.stderr.write("\n")
            return record
        if deadline is not None and time.monotonic() >= deadline:
            sys.stderr.write("\n")
            raise _WaitTimeout(f"task {task_id} is still {record.state} after {timeout:g}s")


def cmd_progress(args: argparse.Namespace) -> int:
    task_id = current_task_id()
    if task_id is None:
        raw = os.environ.get("TASKLOCKS_TASK_ID", "")
        if not raw:
            raise TaskUsageError(
                "progress works only inside a task (TASKLOCKS_TASK_ID is not set); "
                "start the command with 'tasklocks start'"
            )
        raise TaskUsageError(
            f"TASKLOCKS_TASK_ID is {quote(raw)}, not a task id; progress works only inside a "
            "task, which 'tasklocks start' gives its id"
        )
    if not math.isfinite(args.percent) or not 0 <= args.percent <= 100:
        raise TaskUsageError(f"progress must be a number from 0 to 100, not {args.percent:g}")
    from tasklocks.tasks import default_tasks

    default_tasks().progress(task_id, args.percent, args.message)
    return EXIT_OK


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {quote(text)}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero seconds: {quote(text)}")
    return value


def _is_number(text: str) -> bool:
    """Is ``text`` ASCII digits alone? (``str.isdigit`` also takes a superscript two, which
    ``int`` refuses, and other scripts' digits, which it reads as numbers.)"""
    return text.isascii() and text.isdigit()


def _task_id(text: str) -> int:
    if not _is_number(text):
        raise argparse.ArgumentTypeError(f"a task id is a whole number, not {quote(text)}")
    return int(text)


def _count(text: str) -> int:
    if not _is_number(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1: {quote(text)}")
    return int(text)  # (Tasks.list takes any size: more than there are tasks is every task)


def add_task_commands(add: Callable[..., Any]) -> None:
    """Register the task commands with the parser's ``add(name, func, **kw)`` helper."""
    p = add(
        "start",
        cmd_start,
        help="start a task in its own process; print its id",
        usage="tasklocks start [--lock NAME]... [--shared NAME]... [--limit NAME=N]... "
        "[--timeout S] [--kind K] [--no-wait] "
        "(--call module:function [--args JSON] | -- CMD [ARG...])",
        description="Start a task: a Python callable ('package.module:function', called with "
        "--args) or a command (no shell). The task takes its locks (all or none) before it "
        "runs, as owner task:<id>, and releases them when it ends, however it ends.",
    )
    p.add_argument(
        "--lock",
        dest="locks",
        action="append",
        default=[],
        metavar="NAME",
        help="a lock the task needs exclusively (repeat)",
    )
    add_mode_options(p)
    p.add_argument(
        "--timeout", type=_positive, metavar="S", help="stop the task after S seconds of running"
    )
    p.add_argument(
        "--kind",
        metavar="K",
        type=utf8_text,
        help="what the task does, e.g. 'update blog' (shown to waiters)",
    )
    p.add_argument("--no-wait", action="store_true", help="fail the task at once if a lock is held")
    p.add_argument("--call", metavar="MODULE:FUNCTION", help="a Python callable to run")
    p.add_argument(
        "--args",
        metavar="JSON",
        help=f"arguments for --call: an object or an array (nested at most {MAX_ARGS_DEPTH} deep)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")

    p = add("tasks", cmd_tasks, help="list tasks (active ones; --all for every one)")
    p.add_argument("--all", action="store_true", help="finished tasks too")
    p.add_argument(
        "--json", action="store_true", help="print a JSON array (NaN and Infinity as null)"
    )
    p.add_argument("--watch", action="store_true", help="redraw with progress bars (on a terminal)")
    p.add_argument("--limit", type=_count, metavar="N", help="at most N tasks, newest first")

    p = add("task", cmd_task, help="show one task's record")
    p.add_argument("id", type=_task_id)
    p.add_argument(
        "--json", action="store_true", help="print a JSON object (NaN and Infinity as null)"
    )

    p = add("logs", cmd_logs, help="print a task's log (stdout and stderr)")
    p.add_argument("id", type=_task_id)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the task ends")

    p = add("stop", cmd_stop, help="stop a task: SIGTERM, then SIGKILL after a grace period")
    p.add_argument("id", type=_task_id)
    p.add_argument(
        "--grace",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds before SIGKILL (default 10)",
    )

    p = add(
        "wait",
        cmd_wait,
        help="wait for a task to finish (exit 0 succeeded, 1 failed, 75 stopped/timed out/crashed)",
    )
    p.add_argument("id", type=_task_id)
    p.add_argument(
        "--timeout", type=_positive, metavar="S", help="give up after S seconds (exit 75)"
    )

    p = add("progress", cmd_progress, help="report progress from inside a task (shell tasks)")
    p.add_argument("percent", type=float, help="0 to 100")
    p.add_argument("message", nargs="?", type=utf8_text, help="what the task is doing")
