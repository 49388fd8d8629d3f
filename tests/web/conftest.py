"""Fixtures of the dashboard tests: a real ``tasklocks serve`` in a subprocess, the command line to
start tasks, and one headless Chromium (Debian's package, driven by Playwright) per session.

Without the web extra every test here is skipped; without Chromium or Playwright the browser tests
are skipped with the reason, and both fail instead when ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import tasklocks
from tasklocks import Lease, current_process
from tasklocks.tasks import TaskRecord, Tasks, TaskState

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds any awaited condition may take before the test fails
CHROMIUM = "/usr/bin/chromium"
# As the machine notes say: without the networking flags Chromium tries to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A shell snippet that blocks until the file "$1" exists (at most 60 s: no stray processes).
BLOCK_UNTIL = 'i=0; while [ ! -e "$1" ] && [ "$i" -lt 6000 ]; do sleep 0.01; i=$((i+1)); done'
T = TypeVar("T")


NOW = 1_800_000_000.0  # the time of records made by record() in pure tests


def record(task_id: int = 1, **fields: Any) -> TaskRecord:
    """A task record with every field defaulted (created a minute before NOW, not started)."""
    values: dict[str, Any] = {
        "id": task_id,
        "version": 0,
        "kind": f"task {task_id}",
        "target": ["sleep", "1"],
        "args": None,
        "locks": ["app_task:blog"],
        "namespace": "default",
        "state": TaskState.PENDING,
        "percent": None,
        "message": None,
        "result": None,
        "error_code": None,
        "error_message": None,
        "exit_code": None,
        "signal": None,
        "pid": 4711,
        "pgid": None,
        "host": "web-1",
        "start_token": None,
        "boot": None,
        "pidns": None,
        "created": NOW - 60,
        "started": None,
        "finished": None,
        "log_path": None,
        "timeout": None,
        "stop_requested": None,
        "waited_for": None,
    }
    values.update(fields)
    return TaskRecord(**values)


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - the dev install has the web extra
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"the web extra is not installed ({exc})", allow_module_level=True)


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
        delay = min(delay * 1.5, 0.1)


def environment(tmp_path: Path) -> dict[str, str]:
    """The environment of every command: no TASKLOCKS_ variables from outside, task logs of
    server backends under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLOCKS_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    """``tasklocks serve`` in a subprocess on a free port; ``url`` is its address."""

    def __init__(self, proc: subprocess.Popen[str], url: str, stderr: Path) -> None:
        self.proc = proc
        self.url = url
        self.stderr = stderr

    @property
    def netloc(self) -> str:
        return self.url.split("://", 1)[1].rstrip("/")

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")


class Cli:
    """The command line on one database and namespace; remembers the tasks it started."""

    def __init__(self, url: str, namespace: str, tmp_path: Path) -> None:
        self.url = url
        self.namespace = namespace
        self.tmp_path = tmp_path
        self.env = environment(tmp_path)
        self.started: list[int] = []
        self.servers: list[Server] = []

    def argv(self, *args: str) -> list[str]:
        return [PY, "-m", "tasklocks", "--db", self.url, "--namespace", self.namespace, *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            stdin=subprocess.DEVNULL,
        )

    def start(self, *args: str) -> int:
        """``tasklocks start ARGS``; the new task's id."""
        result = self.run("start", *args)
        assert result.returncode == 0, result
        task_id = int(result.stdout)
        self.started.append(task_id)
        return task_id

    def start_steps(self, kind: str, lock: str, gates: Path, steps: int = 3) -> int:
        """A shell task holding ``lock`` that reports progress: 10 % at once, then one step
        of 30 % (and a log line) each time the test creates ``gates/go<N>``; it ends after
        ``gates/done``."""
        script = ['d="$1"; set -- "$d/go0"', "tasklocks progress 10 'starting'", "echo step 0"]
        for n in range(1, steps + 1):
            script += [
                f'set -- "$d/go{n}"',
                BLOCK_UNTIL,
                f"tasklocks progress {min(100, 10 + 30 * n)} 'step {n}'",
                f"echo step {n}",
            ]
        script += ['set -- "$d/done"', BLOCK_UNTIL]
        gates.mkdir(parents=True, exist_ok=True)
        command = ["sh", "-c", "; ".join(script), "sh", str(gates)]
        return self.start("--lock", lock, "--kind", kind, "--", *command)

    def serve(self, *args: str, env: dict[str, str] | None = None) -> Server:
        """Start ``tasklocks serve --port 0 ARGS`` and wait until it listens."""
        stderr = self.tmp_path / f"serve-{len(self.servers)}.err"
        with stderr.open("w") as err:
            proc = subprocess.Popen(
                self.argv("serve", "--port", "0", *args),
                env=env or self.env,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"(http://\S+/)", line)
        if match is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"serve did not start: {line!r} {stderr.read_text()}")
        server = Server(proc, match.group(1), stderr)
        self.servers.append(server)
        return server

    def close(self) -> None:
        """Stop the servers (they must not have printed a traceback), then every task."""
        problems = []
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.terminate()
                try:
                    server.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()
            assert server.proc.stdout is not None
            server.proc.stdout.close()
            if "Traceback" in server.errors():
                problems.append(server.errors())
        if not self.started:
            assert not problems, "the server printed a traceback:\n" + "\n".join(problems)
            return
        with Tasks(self.url, self.namespace) as tasks:
            for task_id in self.started:
                with contextlib.suppress(Exception):
                    if not tasks.get(task_id).state.is_final:
                        tasks.stop(task_id, grace=2)
        assert not problems, "the server printed a traceback:\n" + "\n".join(problems)


class LockScene:
    """Real locks of one namespace, in this process: holders taken here, and waiters, each an
    ``acquire(wait=True)`` in a thread of its own on a connection of its own, queued in the
    order the test adds them. :meth:`close` releases the holders, so every waiter gets its
    locks (and gives them back at once)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.table = tasklocks.connect(url, namespace)
        self.leases: list[Lease] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def hold(self, *names: str, owner: str, **options: Any) -> Lease:
        """Take ``names`` now (``shared=``, ``limit=``, ``note=`` as ``acquire`` takes them)."""
        lease = self.table.acquire(*names, owner=owner, **options)
        self.leases.append(lease)
        return lease

    def release(self, lease: Lease) -> None:
        self.leases.remove(lease)
        lease.release()

    def wait(self, *names: str, owner: str, **options: Any) -> None:
        """Queue up for ``names`` in a thread; return once the waiter is in the queue."""

        def body() -> None:
            try:
                with tasklocks.connect(self.url, self.namespace) as table:
                    lease = table.acquire(
                        *names, owner=owner, wait=True, timeout=DEADLINE, **options
                    )
                    lease.release()
            except BaseException as exc:  # the test fails in close()
                self.errors.append(exc)

        thread = threading.Thread(target=body, name=f"waiter {owner}", daemon=True)
        thread.start()
        self.threads.append(thread)

        def queued() -> bool | None:
            assert not self.errors, self.errors  # the waiter's acquire failed
            return any(q.owner == owner for q in self.table.waiting()) or None

        poll(f"{owner} to queue up", queued)

    def create_task(self, state: TaskState, locks: list[Any], **fields: Any) -> int:
        """A task record of this process, as a supervisor would have written it (``locks`` as
        the column keeps them: a name, or ``{"name": ..., "limit": n or None}`` if shared)."""
        me = current_process()
        values: dict[str, Any] = {
            "kind": "queued",
            "target": '["true"]',
            "locks": json.dumps(locks),
            "namespace": self.namespace,
            "state": state.value,
            "created": time.time() - 1,
            "pid": me.pid,
            "host": me.host,
            "start_token": me.start,
            "boot": me.boot,
            "pidns": me.pidns,
            **fields,
        }
        if isinstance(values.get("waited_for"), list):
            values["waited_for"] = json.dumps(values["waited_for"])
        with Tasks(self.url, self.namespace) as tasks:
            return tasks.store.create_task(values)

    def close(self) -> None:
        for lease in reversed(self.leases):
            with contextlib.suppress(Exception):
                lease.release()
        for thread in self.threads:
            thread.join(DEADLINE)
        self.table.close()
        assert not [t for t in self.threads if t.is_alive()], "a waiter did not get its locks"
        assert not self.errors, self.errors


@pytest.fixture
def lock_scene() -> Iterator[Callable[[str, str], LockScene]]:
    """Make a :class:`LockScene` on a URL and namespace; it is closed with the test."""
    made: list[LockScene] = []

    def make(url: str, namespace: str) -> LockScene:
        scene = LockScene(url, namespace)
        made.append(scene)
        return scene

    yield make
    for scene in reversed(made):
        scene.close()


@pytest.fixture
def cli_factory(tmp_path: Path) -> Iterator[Callable[[str, str], Cli]]:
    """Make a :class:`Cli` for a URL and namespace; its servers and tasks end with the test."""
    made: list[Cli] = []

    def make(url: str, namespace: str) -> Cli:
        cli = Cli(url, namespace, tmp_path)
        made.append(cli)
        return cli

    yield make
    for cli in made:
        cli.close()


@pytest.fixture
def cli(db_url: str, namespace: str, cli_factory: Callable[[str, str], Cli]) -> Cli:
    """The command line on ``db_url`` and a fresh namespace."""
    return cli_factory(db_url, namespace)


@pytest.fixture
def sqlite_cli(tmp_path: Path, namespace: str, cli_factory: Callable[[str, str], Cli]) -> Cli:
    """The command line on an SQLite file of this test."""
    return cli_factory(f"sqlite:///{tmp_path}/locks.db", namespace)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: ``$TASKLOCKS_TEST_ARTIFACTS``, else ``build/test-artifacts/`` in the
    checkout (git ignores ``build/``), where a CI job can keep them after the run."""
    given = os.environ.get("TASKLOCKS_TEST_ARTIFACTS")
    path = Path(given) if given else ROOT / "build" / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the whole session (Debian's, never a downloaded one)."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is missing: pip install playwright")
    with sync_playwright() as playwright:
        # Playwright gives every launch a new, empty user data directory of its own.
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()
