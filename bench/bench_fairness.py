"""Fairness (issue 9): a waiter for {a, b} while two rivals take a and b in turn.

Two rival processes take "a" and "b" in turn (hold 50 ms each, the second starting 25 ms after the
first, no pause), so one of the two names is always held; a third process repeatedly waits for
both at once and records each wait. Before the fair queue, tasklocks let the rivals starve it.

Every process of a scenario is an interpreter of its own (``python bench_fairness.py ROLE SPEC``),
not a worker of the crew: the crew's workers import the current tasklocks (spawn re-imports
run.py), and the tasklocks from before the queue must run from another source tree
(``PYTHONPATH``). So the current code, the old code and the peers are all started alike.

The peers take their locks one at a time in a fixed order (a, then b), as their users would:
``pg_advisory_lock`` (PostgreSQL), ``GET_LOCK`` (MariaDB) and a blocking ``fcntl.flock`` per name
(local, next to SQLite).

Protocol, one JSON line each way: a child says ``{"ready": ...}`` once connected and warmed up;
the parent sends ``{"start": T}`` (wall clock): the rivals begin at T (+ their offset), the pair at
T + STRIDE. The pair answers ``{"waits": [...], "timeouts": n}`` and exits; then the parent sends
``"stop"`` to the rivals, which answer ``{"turns": n}`` and exit.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

HERE = os.path.dirname(os.path.abspath(__file__))
HOLD = 0.050  # a rival holds its name this long
OFFSET = 0.025  # rival b starts this long after rival a
STRIDE = 0.3  # the pair starts this long after the rivals
PAIR_PAUSE = 0.1  # the pair's pause between rounds
PAIR_HOLD = 0.010  # the pair holds {a, b} this long once it has them
WAIT_TIMEOUT = 5.0  # a wait of the pair that takes longer is cut short and counted as such
RIVAL_TIMEOUT = 60.0  # a rival waiting this long for its one name is an error
BEFORE_QUEUE = "d22e37c"  # the last tasklocks measured without the fair queue (issue 9)


# --- the children ---------------------------------------------------------------------------------


class Locker(Protocol):
    def take(self, names: list[str], timeout: float) -> bool:
        """Take all ``names``; False if that took longer than ``timeout`` (nothing is held)."""
        ...

    def give(self) -> None: ...

    def close(self) -> None: ...


class TasklocksLocker:
    """One ``acquire(*names, wait=True)``: the current tree or an older one on PYTHONPATH."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import tasklocks

        self.tasklocks = tasklocks
        if "table" in spec:  # a lock table of its own (an older tree refuses a newer schema)
            from tasklocks.store import open_store

            store = open_store(spec["url"], table=spec["table"])
            self.table = tasklocks.LockTable(store, spec["namespace"], owns_store=True)
        else:
            self.table = tasklocks.connect(spec["url"], spec["namespace"])
        self.lease: Any = None

    def take(self, names: list[str], timeout: float) -> bool:
        try:
            self.lease = self.table.acquire(*names, wait=True, timeout=timeout)
        except self.tasklocks.LockTimeout:
            return False
        return True

    def give(self) -> None:
        self.lease.release()

    def close(self) -> None:
        self.table.close()


class AdvisoryLocker:
    """``pg_advisory_lock`` per name, in the order given; ``lock_timeout`` bounds the wait."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import psycopg

        self.errors = psycopg.errors
        self.conn = psycopg.connect(spec["conninfo"], autocommit=True)
        self.keys: dict[str, int] = spec["keys"]
        self.timeout = 0.0

    def take(self, names: list[str], timeout: float) -> bool:
        if timeout != self.timeout:  # once per process (a rival's timeout, or the pair's)
            self.conn.execute(f"SET lock_timeout = {int(timeout * 1000)}")
            self.timeout = timeout
        try:
            for name in names:
                self.conn.execute("SELECT pg_advisory_lock(%s)", (self.keys[name],))
        except self.errors.LockNotAvailable:
            self.conn.execute("SELECT pg_advisory_unlock_all()")
            return False
        return True

    def give(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock_all()")

    def close(self) -> None:
        self.conn.close()


class GetLockLocker:
    """``GET_LOCK`` per name, in the order given (MariaDB keeps several per connection)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from bench_common import mysql_connect

        self.conn = mysql_connect(spec["url"])
        self.prefix: str = spec["prefix"]
        self.held: list[str] = []

    def take(self, names: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.conn.cursor() as cur:
            for name in names:
                left = max(0.0, deadline - time.monotonic())
                cur.execute("SELECT GET_LOCK(%s, %s)", (self.prefix + name, left))
                row = cur.fetchone()
                if row is None or row[0] != 1:
                    self.give()
                    if row is not None and row[0] == 0:
                        return False
                    raise RuntimeError(f"GET_LOCK({self.prefix + name}) returned {row}")
                self.held.append(self.prefix + name)
        return True

    def give(self) -> None:
        with self.conn.cursor() as cur:
            for lock in reversed(self.held):
                cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
                cur.fetchone()
        self.held.clear()

    def close(self) -> None:
        self.conn.close()


class _Alarm(Exception):
    pass


class FlockLocker:
    """A blocking ``fcntl.flock`` on one file per name, in the order given (ITIMER_REAL bounds
    the wait: its handler raises, which interrupts the blocked ``flock``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import signal

        self.signal = signal
        self.fds = {
            name: os.open(f"{spec['path']}.{name}", os.O_RDWR | os.O_CREAT, 0o600)
            for name in ("a", "b")
        }
        self.held: list[int] = []

        def ring(signum: int, frame: object) -> None:
            raise _Alarm

        signal.signal(signal.SIGALRM, ring)

    def take(self, names: list[str], timeout: float) -> bool:
        import fcntl

        self.signal.setitimer(self.signal.ITIMER_REAL, timeout)
        try:
            for name in names:
                fcntl.flock(self.fds[name], fcntl.LOCK_EX)
                self.held.append(self.fds[name])
        except _Alarm:
            self.give()
            return False
        finally:
            self.signal.setitimer(self.signal.ITIMER_REAL, 0)
        return True

    def give(self) -> None:
        import fcntl

        for fd in reversed(self.held):
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.held.clear()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


LOCKERS: dict[str, Callable[[dict[str, Any]], Locker]] = {
    "tasklocks": TasklocksLocker,
    "advisory": AdvisoryLocker,
    "getlock": GetLockLocker,
    "flock": FlockLocker,
}


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _hear() -> Any:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the bench went away")
    return json.loads(line)


def _on_stop(stop: threading.Event) -> None:
    """Set ``stop`` at the next line from the bench, or when it goes away."""
    sys.stdin.readline()
    stop.set()


def _until(moment: float) -> None:
    left = moment - time.time()
    if left > 0:
        time.sleep(left)


def child(role: str, spec: dict[str, Any]) -> None:
    """A rival (``role`` "a" or "b": take that name in turn until told to stop) or the pair."""
    locker = LOCKERS[spec["kind"]](spec)
    try:
        # Warm up (connect, create the row, prepare, set the timeout) on a name nobody else uses.
        limit = WAIT_TIMEOUT if role == "pair" else RIVAL_TIMEOUT
        if not locker.take([f"warm-{role}"] if spec["kind"] == "tasklocks" else [], limit):
            raise RuntimeError("the warm-up timed out")
        locker.give()
        tree = sys.modules["tasklocks"].__file__ if spec["kind"] == "tasklocks" else None
        _say({"ready": tree})
        start = float(_hear()["start"])
        if role == "pair":
            _pair(locker, spec, start)
        else:
            _rival(locker, role, start)
    finally:
        locker.close()


def _rival(locker: Locker, name: str, start: float) -> None:
    stop = threading.Event()
    threading.Thread(target=_on_stop, args=(stop,), daemon=True).start()
    _until(start + (OFFSET if name == "b" else 0.0))
    turns = 0
    while not stop.is_set():
        if not locker.take([name], RIVAL_TIMEOUT):
            raise RuntimeError(f"rival {name} waited {RIVAL_TIMEOUT:g} s")
        time.sleep(HOLD)
        locker.give()
        turns += 1
    _say({"turns": turns})


def _pair(locker: Locker, spec: dict[str, Any], start: float) -> None:
    _until(start + STRIDE)
    end = time.monotonic() + spec["budget"]
    waits: list[float] = []
    timeouts = 0
    while len(waits) < spec["rounds"] and time.monotonic() < end:
        time.sleep(PAIR_PAUSE)
        t0 = time.monotonic()
        got = locker.take(["a", "b"], WAIT_TIMEOUT)
        waits.append(time.monotonic() - t0)
        if got:
            time.sleep(PAIR_HOLD)
            locker.give()
        else:
            timeouts += 1
    _say({"waits": waits, "timeouts": timeouts})


# --- the parent -----------------------------------------------------------------------------------


@dataclass
class Fairness:
    waits: list[float]  # seconds per wait of the pair; a timed-out one counts as WAIT_TIMEOUT+
    timeouts: int
    turns: list[int]  # turns each rival took meanwhile
    tree: str  # where the children's tasklocks came from (tasklocks kinds)


class _Child:
    def __init__(
        self,
        role: str,
        spec: dict[str, Any],
        env: dict[str, str],
        log: str,
        lines: queue.Queue[Any],
    ) -> None:
        self.role = role
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), role, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout, lines), daemon=True).start()

    def _read(self, out: IO[str], lines: queue.Queue[Any]) -> None:
        for line in out:
            lines.put((self.role, json.loads(line)))
        lines.put((self.role, None))

    def tell(self, message: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def error(self) -> str:
        with open(self.log_path) as f:
            # The exception's first line: the last one that is not indented (a traceback's
            # frames and a message's continuation lines are).
            lines = [line for line in f.read().splitlines() if line.strip() and line[0] > " "]
        return lines[-1] if lines else f"exit status {self.proc.poll()}"

    def end(self, kill: bool) -> None:
        """Wait for the child to exit (10 s at most), or kill it at once with ``kill``."""
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.log.close()


def run_scenario(
    specs: dict[str, dict[str, Any]],
    rounds: int,
    budget: float,
    logdir: str,
    pythonpath: str | None = None,
) -> Fairness | str:
    """Run rivals "a" and "b" and the pair with ``specs[role]``; the result or why it failed.

    The pair stops after ``rounds`` waits or ``budget`` seconds, whichever comes first.
    ``pythonpath`` goes first on the children's path (another tasklocks tree).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pythonpath, HERE, env.get("PYTHONPATH")) if p is not None
    )
    lines: queue.Queue[tuple[str, Any]] = queue.Queue()
    children: dict[str, _Child] = {}

    answered: set[str] = set()  # children whose last answer came: their end of output is normal

    def hear(what: str, deadline: float) -> tuple[str, Any]:
        while True:
            try:
                role, message = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {what} in time") from None
            if message is not None:
                return role, message
            if role not in answered:
                children[role].proc.wait(timeout=10)
                raise RuntimeError(f"{role}: {children[role].error()}")

    ok = False
    try:
        for role in ("a", "b", "pair"):
            spec = {**specs[role], "rounds": rounds, "budget": budget}
            log = os.path.join(logdir, f"fairness-{time.monotonic_ns()}-{role}.err")
            children[role] = _Child(role, spec, env, log, lines)
        deadline = time.monotonic() + 60
        trees = {hear("ready", deadline)[1]["ready"] for _ in children}
        strays = [t for t in trees if t and pythonpath and not t.startswith(pythonpath + os.sep)]
        if strays:
            raise RuntimeError(f"tasklocks came from {strays[0]}, not from {pythonpath}")
        start = time.time() + 0.05
        for c in children.values():
            c.tell({"start": start})
        role, result = hear("result of the pair", time.monotonic() + budget + WAIT_TIMEOUT + 60)
        if role != "pair":
            raise RuntimeError(f"rival {role} answered before the pair: {result}")
        answered.add("pair")
        for r in ("a", "b"):
            children[r].tell("stop")
        deadline = time.monotonic() + 60
        turns = []
        for _ in range(2):
            role, message = hear("turns", deadline)
            turns.append(int(message["turns"]))
            answered.add(role)
        ok = True
        return Fairness(
            result["waits"], result["timeouts"], turns, ", ".join(sorted(t for t in trees if t))
        )
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    finally:
        for c in children.values():
            c.end(kill=not ok)


def extract_before(repo: str, dest: str, commit: str = BEFORE_QUEUE) -> str:
    """``src/`` of ``commit`` (``git archive``, read-only for the repository) under ``dest``."""
    out = subprocess.run(
        ["git", "-C", repo, "archive", commit, "src"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout

    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        tar.extractall(dest, filter="data")
    return os.path.join(dest, "src")


if __name__ == "__main__":
    child(sys.argv[1], json.loads(sys.argv[2]))
