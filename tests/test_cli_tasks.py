"""The task commands of the command line, as real subprocesses, on every backend.

``start``, ``tasks``, ``task``, ``logs``, ``stop``, ``wait`` and ``progress``: exit statuses, what
they print, the states tasks end in, and the one-line errors of bad input. Task processes import
``tests.tasks.targets`` (the project root is on their ``PYTHONPATH``) or run shell commands; they
talk to the test through files (a *go* file the test creates to let them finish). Nothing here
passes by sleeping: the test polls for a condition with a deadline, and every task a test started
is killed in the fixture's teardown if it still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tasklocks.owner import process_start_token
from tasklocks.tasks import Tasks, TaskState

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]  # the project root: tests.tasks.targets imports
TARGETS = "tests.tasks.targets"
DEADLINE = 30.0  # seconds any awaited condition may take before the test fails
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
T = TypeVar("T")

# A shell snippet that blocks until the file "$1" exists (at most 60 s: no stray processes).
BLOCK_UNTIL_GO = 'i=0; while [ ! -e "$1" ] && [ "$i" -lt 6000 ]; do sleep 0.01; i=$((i+1)); done'


def _env(tmp_path: Path) -> dict[str, str]:
    """The environment of every command: no task variables of an outer task, the project root
    on PYTHONPATH, logs of server backends under ``tmp_path``, and *not* this installation's
    bin directory on PATH (the supervisor must add it for ``tasklocks progress``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLOCKS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    bindir = os.path.dirname(PY)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != bindir
    )
    return env


def poll(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    """Call ``probe`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (exactly one, and no traceback)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tasklocks: "), result.stderr
    return lines[0]


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a ``tasks`` table, by column name (columns start where their headers do)."""
    header, *rows = text.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return [
        {n: row[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)} for row in rows
    ]


def parse_fields(text: str) -> dict[str, str]:
    """The ``key: value`` lines of ``task ID``."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def is_supervisor_of(pid: int, start_token: object) -> bool:
    """Is ``pid`` still the supervisor the record names (same process start time)?"""
    return start_token is not None and process_start_token(pid) == start_token


class Cli:
    """The command line on one database and namespace; remembers the tasks it started."""

    def __init__(self, url: str, namespace: str, tmp_path: Path) -> None:
        self.url = url
        self.namespace = namespace
        self.tmp_path = tmp_path
        self.env = _env(tmp_path)
        self.started: list[int] = []

    def argv(self, *args: str) -> list[str]:
        return [PY, "-m", "tasklocks", "--db", self.url, "--namespace", self.namespace, *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=DEADLINE,
            check=False,
        )

    def ok(self, *args: str) -> str:
        """Run a command that must succeed; return its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        return result.stdout

    def start(self, *args: str) -> int:
        """``tasklocks start ARGS``: it must print the new id (an integer) and nothing else."""
        out = self.ok("start", *args)
        assert re.fullmatch(r"[0-9]+\n", out), repr(out)
        task_id = int(out)
        self.started.append(task_id)
        return task_id

    def record(self, task_id: int) -> dict[str, Any]:
        record: dict[str, Any] = json.loads(self.ok("task", str(task_id), "--json"))
        assert record["id"] == task_id
        return record

    def listing(self, *args: str) -> list[dict[str, Any]]:
        """``tasks --json ARGS``, only the records of this namespace."""
        records: list[dict[str, Any]] = json.loads(self.ok("tasks", "--json", *args))
        return [r for r in records if r["namespace"] == self.namespace]

    def held(self) -> dict[str, str]:
        """The held locks: name -> owner."""
        locks: list[dict[str, Any]] = json.loads(self.ok("locks", "--json"))
        return {lock["name"]: lock["owner"] for lock in locks}

    def log(self, task_id: int) -> str:
        path = self.record(task_id).get("log_path")
        if path and os.path.exists(path):
            return Path(path).read_text(errors="replace")[-2000:]
        return "(no log)"

    def until(self, task_id: int, *states: str) -> dict[str, Any]:
        """Poll until the task is in one of ``states``; fail at once if it ends in another."""

        def probe() -> dict[str, Any] | None:
            record = self.record(task_id)
            if record["state"] in states:
                return record
            if TaskState(record["state"]).is_final:
                pytest.fail(
                    f"task {task_id} ended {record['state']}, not {states}: {record}\n"
                    f"--- log ---\n{self.log(task_id)}"
                )
            return None

        return poll(f"task {task_id} to be {'/'.join(states)}", probe)

    def wait(self, task_id: int, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.run("wait", str(task_id), *args)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def cleanup(self) -> None:
        """SIGKILL the process group, then the supervisor, of every task still active."""
        if not self.started:
            return
        with Tasks(self.url, self.namespace) as tasks:
            for task_id in self.started:
                record = tasks.get(task_id)
                if record.state.is_final:
                    continue
                if record.pgid is not None and record.pgid > 1 and record.pgid != os.getpgrp():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(record.pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                while not tasks.get(task_id).state.is_final and time.monotonic() < deadline:
                    time.sleep(0.02)
                last = tasks.get(task_id)
                pid = last.pid
                if pid is not None and is_supervisor_of(pid, last.start_token):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            tasks.reconcile()


@pytest.fixture
def cli(db_url: str, namespace: str, tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(db_url, namespace, tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


def blocking_shell(go: Path, before: str = "", after: str = "") -> list[str]:
    """``-- sh -c ...``: run ``before``, block until ``go`` exists, run ``after``."""
    script = "; ".join(filter(None, [before, BLOCK_UNTIL_GO, after]))
    return ["--", "sh", "-c", script, "sh", str(go)]


# --- outcomes ------------------------------------------------------------------------------------


def test_call_with_args_succeeds_and_wait_prints_the_result(cli: Cli) -> None:
    task_id = cli.start("--call", f"{TARGETS}:add", "--args", '{"a": 2, "b": 40}')
    result = cli.wait(task_id)
    assert (result.returncode, result.stdout) == (0, f"task {task_id} succeeded: 42\n"), result
    record = cli.record(task_id)
    assert (record["state"], record["result"], record["args"]) == (
        "succeeded",
        42,
        {"a": 2, "b": 40},
    )
    assert record["target"] == f"{TARGETS}:add"
    assert record["percent"] == 100.0


def test_call_with_a_list_of_args_and_a_stdlib_callable(cli: Cli) -> None:
    task_id = cli.start("--call", "json:loads", "--args", '["{\\"k\\": [1, 2]}"]')
    result = cli.wait(task_id)
    assert (result.returncode, result.stdout) == (0, f'task {task_id} succeeded: {{"k": [1, 2]}}\n')


def test_call_that_raises_fails_with_its_exception(cli: Cli) -> None:
    task_id = cli.start("--call", f"{TARGETS}:fail", "--args", '["it broke"]')
    result = cli.wait(task_id)
    assert result.returncode == EXIT_FAILED, result
    assert result.stdout == f"task {task_id} failed: TargetFailed: it broke\n"
    record = cli.record(task_id)
    assert (record["state"], record["error_code"], record["error_message"]) == (
        "failed",
        "TargetFailed",
        "it broke",
    )


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_writes_a_result_that_is_not_finite_as_null(cli: Cli) -> None:
    """(It printed "result": {"nan": NaN, ...}, which no JSON reader but Python's takes.)"""
    task_id = cli.start("--call", f"{TARGETS}:not_finite")
    assert cli.wait(task_id).returncode == 0, cli.log(task_id)
    expected = {"nan": None, "inf": [None, None], "one": 1.5}
    assert _strict_json(cli.ok("task", str(task_id), "--json"))["result"] == expected
    (listed,) = [r for r in _strict_json(cli.ok("tasks", "--all", "--json")) if r["id"] == task_id]
    assert listed["result"] == expected


def test_command_exit_status_fails_the_task(cli: Cli) -> None:
    task_id = cli.start("--", "sh", "-c", "exit 3")
    result = cli.wait(task_id)
    assert result.returncode == EXIT_FAILED, result
    assert result.stdout.startswith(f"task {task_id} failed: ExitStatus: ")
    record = cli.record(task_id)
    assert (record["state"], record["exit_code"], record["error_code"]) == (
        "failed",
        3,
        "ExitStatus",
    )
    assert record["target"] == ["sh", "-c", "exit 3"]


def test_stop_prints_stopped_and_wait_exits_75(cli: Cli) -> None:
    task_id = cli.start("--lock", "db", "--", "sleep", "30")
    cli.until(task_id, "running")
    assert cli.held() == {"db": f"task:{task_id}"}
    began = time.monotonic()
    stopped = cli.run("stop", str(task_id), "--grace", "1")
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (
        0,
        f"task {task_id} stopped\n",
        "",
    )
    assert time.monotonic() - began < 10  # SIGTERM ends sleep at once: no SIGKILL needed
    result = cli.wait(task_id)
    assert (result.returncode, result.stdout) == (
        EXIT_TEMPFAIL,
        f"task {task_id} stopped: stopped\n",
    )
    record = cli.record(task_id)
    assert (record["state"], record["signal"]) == ("stopped", signal.SIGTERM)
    assert cli.held() == {}


def test_stop_kills_a_task_that_ignores_sigterm_after_the_grace(cli: Cli, tmp_path: Path) -> None:
    marker, go = tmp_path / "marker", tmp_path / "go"
    task_id = cli.start(
        "--call", f"{TARGETS}:ignore_term", "--args", json.dumps([str(marker), str(go)])
    )
    poll("the target to run", lambda: True if marker.exists() else None)
    began = time.monotonic()
    stopped = cli.run("stop", str(task_id), "--grace", "1")
    took = time.monotonic() - began
    assert (stopped.returncode, stopped.stdout) == (0, f"task {task_id} stopped\n"), stopped
    assert 0.9 <= took < 10, took
    assert cli.wait(task_id).returncode == EXIT_TEMPFAIL
    record = cli.record(task_id)
    assert (record["state"], record["signal"]) == ("stopped", signal.SIGKILL)


def test_timeout_ends_the_task_as_timed_out(cli: Cli) -> None:
    task_id = cli.start("--timeout", "0.5", "--lock", "db", "--", "sleep", "30")
    began = time.monotonic()
    result = cli.wait(task_id)
    assert result.returncode == EXIT_TEMPFAIL, result
    assert time.monotonic() - began < 15
    assert result.stdout.startswith(f"task {task_id} timed_out"), result.stdout
    record = cli.record(task_id)
    assert (record["state"], record["timeout"]) == ("timed_out", 0.5)
    assert cli.held() == {}


def test_sigkill_of_the_task_records_crashed_and_releases_its_lock(cli: Cli) -> None:
    task_id = cli.start("--lock", "site", "--kind", "doomed", "--", "sleep", "30")
    record = cli.until(task_id, "running")
    pgid = record["pgid"]
    assert isinstance(pgid, int) and pgid > 1 and pgid != os.getpgrp(), record
    assert cli.held() == {"site": f"task:{task_id}"}
    os.killpg(pgid, signal.SIGKILL)
    result = cli.wait(task_id)
    assert result.returncode == EXIT_TEMPFAIL, result
    assert result.stdout.startswith(f"task {task_id} crashed"), result.stdout
    record = cli.record(task_id)
    assert (record["state"], record["signal"]) == ("crashed", signal.SIGKILL)
    assert "site" not in cli.held()


def test_sigkill_of_supervisor_and_task_is_cleaned_up_by_the_next_look(
    cli: Cli, tmp_path: Path
) -> None:
    task_id = cli.start("--lock", "site", "--", "sleep", "30")
    record = cli.until(task_id, "running")
    pid, pgid = record["pid"], record["pgid"]
    assert is_supervisor_of(pid, record["start_token"]), record
    assert isinstance(pgid, int) and pgid > 1 and pgid != os.getpgrp(), record
    out_path = tmp_path / "follow.out"
    with out_path.open("w") as out:
        follow = subprocess.Popen(
            cli.argv("logs", str(task_id), "--follow"),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.env,
        )
    try:
        os.kill(pid, signal.SIGKILL)
        os.killpg(pgid, signal.SIGKILL)
        _, err = follow.communicate(timeout=DEADLINE)  # logs --follow notices the crash too
        assert (follow.returncode, err) == (0, "")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    result = cli.wait(task_id)
    assert result.returncode == EXIT_TEMPFAIL, result
    record = cli.record(task_id)
    assert record["state"] == "crashed", record
    assert "site" not in cli.held()


# --- listing and showing -------------------------------------------------------------------------


def test_tasks_lists_active_ones_and_all_with_json(cli: Cli) -> None:
    assert cli.ok("tasks") == "no active tasks (see --all)\n"
    assert cli.ok("tasks", "--all") == "no tasks\n"
    running = cli.start("--kind", "alpha job", "--", "sleep", "30")
    done = cli.start("--kind", "beta", "--", "sh", "-c", "exit 0")
    broken = cli.start("--kind", "gamma", "--", "sh", "-c", "exit 4")
    assert cli.wait(done).returncode == 0
    assert cli.wait(broken).returncode == EXIT_FAILED
    cli.until(running, "running")

    rows = parse_table(cli.ok("tasks"))
    assert [(r["ID"], r["KIND"], r["STATE"]) for r in rows] == [
        (str(running), "alpha job", "running")
    ]
    assert [r["id"] for r in cli.listing()] == [running]

    every = cli.listing("--all")
    assert [(r["id"], r["kind"], r["state"]) for r in every] == [
        (broken, "gamma", "failed"),
        (done, "beta", "succeeded"),
        (running, "alpha job", "running"),
    ]  # newest first
    assert [r["id"] for r in cli.listing("--all", "--limit", "1")] == [broken]
    text = {r["ID"]: r for r in parse_table(cli.ok("tasks", "--all"))}
    assert (text[str(done)]["STATE"], text[str(done)]["PERCENT"]) == ("succeeded", "100%")
    assert text[str(broken)]["STATE"] == "failed"
    assert "exited with status 4" in text[str(broken)]["MESSAGE"]


def test_a_kind_of_several_lines_keeps_its_row_on_one_line(cli: Cli) -> None:
    task_id = cli.start("--kind", "update\nblog\tnow", "--", "true")
    assert cli.wait(task_id).returncode == 0
    (row,) = parse_table(cli.ok("tasks", "--all"))
    assert (row["ID"], row["KIND"], row["STATE"]) == (str(task_id), "update blog now", "succeeded")
    assert cli.record(task_id)["kind"] == "update\nblog\tnow"  # kept as given


def test_control_characters_of_a_task_are_shown_escaped_but_kept_in_json(cli: Cli) -> None:
    """A kind, a progress message and a command with escape codes (ESC, BEL, DEL, C1's CSI)
    cannot reach the terminal through tasks, task or wait; --json keeps them exact."""
    raw = "k\x1b]0;pwned\x07\x1b[31m\x7f\x9b2J"
    shown = "k\\x1b]0;pwned\\x07\\x1b[31m\\x7f\\x9b2J"
    script = 'tasklocks progress 40 "$1"'
    task_id = cli.start("--kind", raw, "--", "sh", "-c", script, "sh", raw)
    summary = cli.wait(task_id)
    assert summary.returncode == 0, cli.log(task_id)
    assert summary.stdout == f"task {task_id} succeeded: {shown}\n"
    table = cli.ok("tasks", "--all")
    fields = cli.ok("task", str(task_id))
    for text in (table, fields):
        assert not [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)]
    (row,) = parse_table(table)
    assert (row["KIND"], row["MESSAGE"]) == (shown, shown)
    parsed = parse_fields(fields)
    assert (parsed["kind"], parsed["message"]) == (shown, shown)
    assert parsed["target"] == f"sh -c {script} sh {shown}"
    record = cli.record(task_id)
    assert (record["kind"], record["message"], record["target"][-1]) == (raw, raw, raw)


def test_task_text_shows_state_locks_and_log(cli: Cli) -> None:
    task_id = cli.start(
        "--lock", "db", "--lock", "site", "--kind", "show me", "--", "sh", "-c", "echo hello"
    )
    assert cli.wait(task_id).returncode == 0
    fields = parse_fields(cli.ok("task", str(task_id)))
    assert fields["id"] == str(task_id)
    assert fields["kind"] == "show me"
    assert fields["target"] == "sh -c echo hello"
    assert fields["locks"] == "db, site"
    assert fields["state"] == "succeeded"
    assert fields["percent"] == "100%"
    assert fields["exit code"] == "0"
    assert fields["log"] == cli.record(task_id)["log_path"]
    assert "hello" in Path(fields["log"]).read_text()


def test_logs_prints_stdout_and_stderr(cli: Cli) -> None:
    task_id = cli.start("--", "sh", "-c", "echo to-stdout; echo to-stderr >&2")
    assert cli.wait(task_id).returncode == 0
    out = cli.ok("logs", str(task_id))
    assert "to-stdout\n" in out and "to-stderr\n" in out, out


def test_logs_of_a_callable_include_its_output(cli: Cli) -> None:
    task_id = cli.start("--call", f"{TARGETS}:shout", "--args", '["out-line", "err-line"]')
    assert cli.wait(task_id).returncode == 0
    out = cli.ok("logs", str(task_id))
    assert "out-line\n" in out and "err-line\n" in out, out


def test_logs_follow_prints_later_output_and_returns_when_the_task_ends(
    cli: Cli, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    task_id = cli.start(*blocking_shell(go, before="echo first-line", after="echo second-line"))
    out_path = tmp_path / "follow.out"
    with out_path.open("w") as out:
        follow = subprocess.Popen(
            cli.argv("logs", str(task_id), "--follow"),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.env,
        )
    try:
        poll(
            "first-line to be followed",
            lambda: True if "first-line" in out_path.read_text() else None,
        )
        assert follow.poll() is None, "logs --follow returned while the task still runs"
        assert "second-line" not in out_path.read_text()
        go.touch()
        _, err = follow.communicate(timeout=DEADLINE)
        assert (follow.returncode, err) == (0, "")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    text = out_path.read_text()
    assert 0 <= text.index("first-line") < text.index("second-line"), text
    assert cli.record(task_id)["state"] == "succeeded"


def test_logs_of_two_databases_are_each_their_own(tmp_path: Path, namespace: str) -> None:
    """Task 1 of a.db and task 1 of a.sqlite (or of two server databases, or two tables) wrote
    into one file, <stem>-logs/task-1.log: ``logs`` showed the other database's output too."""
    clis = [
        Cli(f"sqlite:///{tmp_path}/{name}", namespace, tmp_path) for name in ("a.db", "a.sqlite")
    ]
    try:
        for cli in clis:
            assert cli.start("--", "echo", f"output of {cli.url}") == 1
        for cli in clis:
            assert cli.wait(1).returncode == 0, cli.log(1)
        assert clis[0].record(1)["log_path"] != clis[1].record(1)["log_path"]
        for cli in clis:
            assert cli.ok("logs", "1") == f"output of {cli.url}\n"
    finally:
        for cli in clis:
            cli.cleanup()


def test_a_database_whose_path_is_not_utf8_takes_locks_and_runs_tasks(
    tmp_path: Path, namespace: str
) -> None:
    """A file name with a byte that is not UTF-8 (\\xff, a lone surrogate once decoded) made
    every command fail with "unexpected error": the wake-up channel's name and the log's path
    (a task's record keeps it as text) were encoded as UTF-8. The logs of such a database go to
    the state directory."""
    cli = Cli(
        os.fsdecode(os.fsencode(f"sqlite:///{tmp_path}/") + b"caf\xff.db"), namespace, tmp_path
    )
    try:
        assert cli.ok("acquire", "x", "--owner", "me") == "1\n"
        assert cli.held() == {"x": "me"}
        assert cli.ok("release", "x", "--owner", "me") == "x\n"
        assert cli.start("--", "echo", "hello") == 1
        assert cli.wait(1).returncode == 0, cli.log(1)
        assert cli.ok("logs", "1") == "hello\n"
        assert cli.record(1)["log_path"].startswith(str(tmp_path / "state" / "tasklocks" / "logs"))
    finally:
        cli.cleanup()


def test_logs_reads_the_path_the_record_keeps(cli: Cli, tmp_path: Path) -> None:
    """A task started before log directories were per database and table keeps its log where it
    was written: the record's ``log_path`` says where."""
    with Tasks(cli.url, cli.namespace) as tasks:
        task_id = tasks.store.create_task(
            {
                "kind": "old",
                "target": '["true"]',
                "locks": "[]",
                "namespace": cli.namespace,
                "state": "succeeded",
                "created": time.time() - 60,
                "started": time.time() - 60,
                "finished": time.time() - 59,
                "exit_code": 0,
            }
        )
        old = tmp_path / "state" / "tasklocks" / "logs" / f"task-{task_id}.log"
        old.parent.mkdir(parents=True)
        old.write_text("written before\n")
        assert tasks.store.update_task(task_id, tasks.get(task_id).version, {"log_path": str(old)})
    assert cli.ok("logs", str(task_id)) == "written before\n"
    assert parse_fields(cli.ok("task", str(task_id)))["log"] == str(old)


# --- locks between tasks -------------------------------------------------------------------------


def test_a_task_needing_a_held_lock_waits_and_says_for_whom(cli: Cli) -> None:
    holder = cli.start("--lock", "db", "--kind", "holder kind", "--", "sleep", "30")
    cli.until(holder, "running")
    waiter = cli.start("--lock", "db", "--kind", "waiter", "--", "sh", "-c", "exit 0")
    record = cli.until(waiter, "waiting")
    expected = re.compile(
        rf"Waiting for db \(held by task {holder}, holder kind, since \d\d:\d\d:\d\d\)"
    )
    assert expected.fullmatch(record["message"]), record["message"]
    [entry] = record["waited_for"]
    assert entry.pop("since") >= record["created"]
    assert entry == {"lock": "db", "owner": f"task:{holder}", "note": "holder kind"}
    rows = {r["ID"]: r for r in parse_table(cli.ok("tasks"))}
    assert (rows[str(waiter)]["STATE"], rows[str(waiter)]["KIND"]) == ("waiting", "waiter")
    assert expected.fullmatch(rows[str(waiter)]["MESSAGE"]), rows[str(waiter)]
    assert rows[str(holder)]["STATE"] == "running"
    listed = {r["id"]: r for r in cli.listing()}
    assert expected.fullmatch(listed[waiter]["message"])

    assert cli.ok("stop", str(holder), "--grace", "1") == f"task {holder} stopped\n"
    result = cli.wait(waiter)
    assert result.returncode == 0, result
    assert cli.record(waiter)["state"] == "succeeded"
    assert cli.held() == {}


def test_no_wait_with_a_held_lock_fails_the_task(cli: Cli) -> None:
    holder = cli.start("--lock", "db", "--kind", "holder kind", "--", "sleep", "30")
    cli.until(holder, "running")
    refused = cli.start("--no-wait", "--lock", "db", "--", "sh", "-c", "exit 0")
    result = cli.wait(refused)
    assert result.returncode == EXIT_FAILED, result
    assert result.stdout.startswith(f"task {refused} failed: LockHeld: "), result.stdout
    assert "wait=True" not in result.stdout and "(--no-wait)" in result.stdout, result.stdout
    record = cli.record(refused)
    assert record["message"].startswith(f"Did not wait for db (held by task {holder}, ")
    assert (record["state"], record["error_code"], record["started"]) == (
        "failed",
        "LockHeld",
        None,
    )
    assert cli.held() == {"db": f"task:{holder}"}
    assert cli.record(holder)["state"] == "running"


# --- progress ------------------------------------------------------------------------------------


def test_progress_from_a_shell_task_shows_in_tasks(cli: Cli, tmp_path: Path) -> None:
    assert os.path.dirname(PY) not in cli.env["PATH"].split(os.pathsep)
    go = tmp_path / "go"
    task_id = cli.start(*blocking_shell(go, before="tasklocks progress 40 Uploading || exit 9"))

    def reported() -> dict[str, Any] | None:
        record = cli.record(task_id)
        assert not TaskState(record["state"]).is_final, (record, cli.log(task_id))
        return record if record["percent"] == 40.0 else None

    record = poll("progress 40%", reported)
    assert (record["state"], record["message"]) == ("running", "Uploading")
    rows = {r["ID"]: r for r in parse_table(cli.ok("tasks"))}
    row = rows[str(task_id)]
    assert (row["STATE"], row["PERCENT"], row["MESSAGE"]) == ("running", "40%", "Uploading")
    go.touch()
    assert cli.wait(task_id).returncode == 0
    assert cli.record(task_id)["percent"] == 100.0


def test_progress_out_of_range_inside_a_task_is_refused(cli: Cli) -> None:
    script = (
        "tasklocks progress 140 too-much; echo status=$?; "
        "tasklocks progress 25 quarter; echo status=$?"
    )
    task_id = cli.start("--", "sh", "-c", script)
    assert cli.wait(task_id).returncode == 0
    log = cli.ok("logs", str(task_id))
    assert "status=2\nstatus=0\n" in log, log
    assert "tasklocks: progress must be a number from 0 to 100" in log, log
    assert "Traceback" not in log, log


def test_tasks_of_another_namespace_are_not_listed(cli: Cli) -> None:
    task_id = cli.start("--", "sh", "-c", "exit 0")
    assert cli.wait(task_id).returncode == 0
    assert [r["id"] for r in cli.listing("--all")] == [task_id]
    other = Cli(cli.url, cli.namespace + "-other", cli.tmp_path)
    assert other.ok("tasks", "--all") == "no tasks\n"
    assert json.loads(other.ok("tasks", "--all", "--json")) == []


def test_args_100_deep_reach_the_callable(cli: Cli) -> None:
    task_id = cli.start("--call", "json:dumps", "--args", "[" + "[" * 99 + "]" * 99 + "]")
    assert cli.wait(task_id).returncode == 0
    assert cli.record(task_id)["result"] == "[" * 99 + "]" * 99


def test_a_progress_message_that_is_not_utf8_is_a_usage_error(cli: Cli) -> None:
    result = cli.run("progress", "40", "\udcff")
    assert result.returncode == EXIT_USAGE
    assert "argument message: not UTF-8 text" in one_error_line(result)


def test_progress_outside_a_task_is_a_usage_error(cli: Cli) -> None:
    result = cli.run("progress", "40")
    assert result.returncode == EXIT_USAGE
    assert "inside a task" in one_error_line(result)


@pytest.mark.parametrize("value", ["abc", "\u0661", "\u00b2", "-1"])
def test_progress_with_a_task_id_variable_that_is_no_id_says_so(cli: Cli, value: str) -> None:
    """Not 'is not set' for a variable that is set; and an Arabic-Indic one is not task 1."""
    cli.env["TASKLOCKS_TASK_ID"] = value
    result = cli.run("progress", "40")
    assert result.returncode == EXIT_USAGE
    assert one_error_line(result).startswith(
        f"tasklocks: TASKLOCKS_TASK_ID is {value!r}, not a task id; "
    )


# --- waiting with a deadline, and bad input ------------------------------------------------------


def test_wait_timeout_on_a_long_task_exits_75(cli: Cli) -> None:
    task_id = cli.start("--", "sleep", "30")
    began = time.monotonic()
    result = cli.wait(task_id, "--timeout", "0.3")
    assert result.returncode == EXIT_TEMPFAIL, result
    assert time.monotonic() - began < 10
    assert result.stdout == ""
    assert f"task {task_id} is still" in one_error_line(result)
    assert not TaskState(cli.record(task_id)["state"]).is_final


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        pytest.param((), "either --call", id="neither"),
        pytest.param(("--call", "json:loads", "--", "echo", "hi"), "either --call", id="both"),
        pytest.param(("--call", "nocolon"), "bad task target 'nocolon'", id="no-colon"),
        pytest.param(("--call", "json:loads", "--args", "{bad"), "not valid JSON", id="bad-json"),
        pytest.param(("--args", "[1]", "--", "echo", "hi"), "--args goes with --call", id="args"),
        pytest.param(("--lock", "bad name!", "--", "true"), "bad lock name", id="lock-name"),
        pytest.param(
            ("--kind", "\udcff", "--", "true"), "argument --kind: not UTF-8 text", id="kind"
        ),
        pytest.param(
            ("--call", "json:dumps", "--args", "[" * 50000 + "]" * 50000),
            "--args nests arrays or objects more than 100 deep",
            id="args-past-the-recursion-limit",
        ),
        pytest.param(
            ("--call", "json:dumps", "--args", '{"a": ' * 101 + "1" + "}" * 101),
            "--args nests arrays or objects more than 100 deep",
            id="args-101-deep",
        ),
        pytest.param(
            ("--lock", "a", "--shared", "a", "--", "true"),
            "a is asked for both exclusively and with --shared",
            id="exclusive-and-shared",
        ),
    ],
)
def test_bad_start_exits_2_with_one_line_and_starts_nothing(
    cli: Cli, args: tuple[str, ...], complaint: str
) -> None:
    result = cli.run("start", *args)
    assert (result.returncode, result.stdout) == (EXIT_USAGE, "")
    assert complaint in one_error_line(result)
    assert cli.listing("--all") == []


def test_start_from_a_deleted_directory_exits_2_with_one_line_and_starts_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    """(It printed "unexpected error: FileNotFoundError", exit 1, and left a failed record.)"""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
    result = subprocess.run(
        ["sh", "-c", script, "sh", str(gone), *cli.argv("start", "--", "true")],
        capture_output=True,
        text=True,
        env=cli.env,
        timeout=DEADLINE,
        check=False,
    )
    assert (result.returncode, result.stdout) == (EXIT_USAGE, ""), result
    assert "cannot read the working directory" in one_error_line(result)
    assert cli.listing("--all") == []


@pytest.mark.parametrize("task_id", ["999999", "99999999999999999999999999"])
@pytest.mark.parametrize("command", ["task", "wait", "stop", "logs"])
def test_a_task_that_does_not_exist_exits_2(cli: Cli, command: str, task_id: str) -> None:
    result = cli.run(command, task_id)
    assert (result.returncode, result.stdout) == (EXIT_USAGE, "")
    assert f"no task {task_id}" in one_error_line(result)


@pytest.mark.parametrize("limit", ["0", "-5", "abc"])
def test_tasks_limit_must_be_one_or_more(cli: Cli, limit: str) -> None:
    result = cli.run("tasks", f"--limit={limit}")
    assert result.returncode == EXIT_USAGE
    assert "--limit: must be a whole number from 1" in one_error_line(result)


def test_tasks_limit_past_every_task_lists_them_all(cli: Cli) -> None:
    task_id = cli.start("--", "true")
    assert cli.wait(task_id).returncode == 0
    listed = cli.listing("--all", "--limit", "99999999999999999999999")
    assert [r["id"] for r in listed] == [task_id]


@pytest.mark.parametrize("task_id", ["\u00b2", "\u0661", "1\u0661"])
@pytest.mark.parametrize("command", ["task", "wait", "stop", "logs"])
def test_a_task_id_is_ascii_digits(cli: Cli, command: str, task_id: str) -> None:
    """A superscript two was 'invalid _task_id value'; an Arabic-Indic one was task 1."""
    task = cli.start("--", "true")  # task 1 of a fresh database, or another id: never shown
    assert cli.wait(task).returncode == 0
    result = cli.run(command, task_id)
    assert (result.returncode, result.stdout) == (EXIT_USAGE, "")
    assert one_error_line(result) == (
        f"tasklocks: argument id: a task id is a whole number, not {task_id!r} "
        f"(see 'tasklocks {command} --help')"
    )


@pytest.mark.parametrize("limit", ["\u00b2", "\u0661"])
def test_tasks_limit_is_ascii_digits(cli: Cli, limit: str) -> None:
    result = cli.run("tasks", "--limit", limit)
    assert result.returncode == EXIT_USAGE
    assert f"--limit: must be a whole number from 1: {limit!r}" in one_error_line(result)


def test_wait_with_a_bad_id_is_an_argparse_usage_error(cli: Cli) -> None:
    # Like every argparse error of this command line (see test_cli.py): one line, naming the
    # command's help.
    result = cli.run("wait", "abc")
    assert (result.returncode, result.stdout) == (EXIT_USAGE, "")
    assert one_error_line(result) == (
        "tasklocks: argument id: a task id is a whole number, not 'abc' "
        "(see 'tasklocks wait --help')"
    )


# --- on a terminal: progress bars -------------------------------------------------------------


def run_on_a_terminal(cli: Cli, *args: str, seconds: float = 30.0, until: str = "") -> str:
    """Run the command line with a pseudo-terminal as stdin, stdout and stderr; return what it
    drew on the screen (it is stopped after ``seconds``, or once ``until`` is on the screen)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        cli.argv(*args), stdin=follower, stdout=follower, stderr=follower, env=cli.env
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the terminal closed: the command ended
                    break
                if not chunk:
                    break
                screen += chunk
                if until and until.encode() in screen:
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
        os.close(leader)
    return screen.decode(errors="replace")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wait_draws_a_progress_bar_on_a_terminal(cli: Cli) -> None:
    script = 'for i in 10 40 80; do tasklocks progress $i "step $i"; sleep 0.3; done'
    task_id = cli.start("--kind", "update blog", "--", "sh", "-c", script)
    screen = run_on_a_terminal(cli, "wait", str(task_id))
    assert "\r" in screen  # the bar is redrawn in place
    assert f"task {task_id} [" in screen
    assert "100%" in screen and "succeeded" in screen
    assert "#" * 30 in screen  # a full bar at the end


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tasks_watch_redraws_progress_bars_on_a_terminal(cli: Cli) -> None:
    task_id = cli.start(
        "--kind", "backup", "--", "sh", "-c", "tasklocks progress 30 copying; sleep 2"
    )
    screen = run_on_a_terminal(cli, "tasks", "--watch", until="no active tasks")
    assert f"task {task_id} [#########" in screen and "30%" in screen and "copying" in screen
    assert "\x1b[" in screen  # the list is redrawn in place
    assert "no active tasks" in screen  # ... until the task has ended


def test_start_takes_shared_and_counted_locks(cli: Cli, tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = cli.start("--limit", "app_tasks=1", "--shared", "db", *blocking_shell(go))
    cli.until(first, "running")
    second = cli.start("--limit", "app_tasks=1", "--shared", "db", "--", "true")
    waiting = cli.until(second, "waiting")
    assert waiting["locks"] == ["db", "app_tasks"]  # --lock, --shared, then --limit names
    assert waiting["shared"] == {"app_tasks": 1, "db": None}
    assert waiting["message"].startswith(f"Waiting for app_tasks (held by task {first}, sh")
    go.touch()
    assert cli.wait(second).returncode == 0
    assert cli.wait(first).returncode == 0


def test_start_keeps_the_locks_with_the_global_ttl(cli: Cli, tmp_path: Path) -> None:
    """``tasklocks --ttl S start ...``: the task's session has that ttl (it had the default)."""
    go = tmp_path / "go"
    result = cli.run("--ttl", "2", "start", "--lock", "ttlx", *blocking_shell(go))
    assert result.returncode == 0, result.stderr
    task_id = int(result.stdout)
    cli.started.append(task_id)
    cli.until(task_id, "running")
    (lock,) = json.loads(cli.ok("locks", "--json"))
    assert lock["owner"] == f"task:{task_id}"
    assert 0 < lock["expires_in"] <= 2 * 4 / 3  # renewed every ttl/3 to ttl + ttl/3 from now
    go.touch()
    assert cli.wait(task_id).returncode == 0


def test_a_timeout_past_what_select_takes_still_lets_the_task_succeed(cli: Cli) -> None:
    """(A timeout of 1e10 s overflowed the supervisor's wait: the task ended "crashed".)"""
    task_id = cli.start("--timeout", "1e10", "--lock", "bigtimeout", "--", "true")
    assert cli.wait(task_id).returncode == 0
    assert cli.record(task_id)["state"] == "succeeded"
