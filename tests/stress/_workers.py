"""Worker processes for the stress tests: ``python _workers.py MODE CONFIG_JSON``.

Every worker connects, prints ``ready``, waits for ``go`` on stdin (so that all start together),
then runs its mode and reports on stdout, one JSON object per line. Only the standard library and
tasklocks are used, so the test's own process state (pytest, fixtures) plays no part.

Occupancy markers are files ``<dir>/<name>.held`` created with ``O_CREAT | O_EXCL`` and holding
``"<pid> <start token>"`` of their creator: a second holder of the same name cannot create it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tasklocks


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (the state) on, or None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_token(pid: int) -> str:
    """The process's start time since boot (proc(5) field 22); "" if it is gone."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None else ""


def process_is_dead(pid: int, start: str) -> bool:
    """Gone, a zombie, or the pid now belongs to another process: written independently of
    tasklocks.owner, so the stress test does not trust the code it checks."""
    fields = _proc_stat(pid)
    return fields is None or fields[0] == "Z" or fields[19] != start


def marker_path(directory: str, name: str) -> str:
    return os.path.join(directory, name.replace("/", "_") + ".held")


def counter_path(directory: str, name: str) -> str:
    return os.path.join(directory, name.replace("/", "_") + ".count")


def create_marker(directory: str, name: str) -> bool:
    """Create the occupancy marker of ``name``; False if it exists already."""
    try:
        fd = os.open(marker_path(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        pid = os.getpid()
        os.write(fd, f"{pid} {start_token(pid)}".encode())
    finally:
        os.close(fd)
    return True


def read_counter(directory: str, name: str) -> tuple[int, int]:
    """(count, token of the last writer) of ``name``'s counter file; (0, 0) before the first."""
    try:
        text = Path(counter_path(directory, name)).read_text()
    except FileNotFoundError:
        return 0, 0
    count, token = text.split()
    return int(count), int(token)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _start(cfg: dict[str, Any]) -> tasklocks.LockTable:
    table = tasklocks.connect(cfg["url"], namespace=cfg["namespace"])
    table.held()  # connect and create the schema before the start line
    _emit({"ready": os.getpid()})
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
    return table


def occupancy(cfg: dict[str, Any]) -> None:
    """Take random overlapping sets of names; while holding them, check each name's marker and
    increment each name's counter by read, pause, write."""
    table = _start(cfg)
    rng = random.Random(cfg["seed"])
    names: list[str] = cfg["names"]
    directory: str = cfg["dir"]
    counts = dict.fromkeys(names, 0)
    violations: list[str] = []
    acquisitions: list[tuple[int, list[str]]] = []
    for i in range(cfg["iterations"]):
        wanted = rng.sample(names, rng.randint(1, 3))
        lease = table.acquire(*wanted, wait=True, timeout=30)
        mine = []
        for name in wanted:
            if create_marker(directory, name):
                mine.append(name)
            else:
                violations.append(f"iteration {i}: marker of {name} exists while we hold it")
        for name in wanted:
            try:
                count, last = read_counter(directory, name)
            except ValueError as exc:  # half-written by a concurrent holder
                violations.append(f"iteration {i}: counter of {name} unreadable: {exc}")
                continue
            if last >= lease.token:
                violations.append(
                    f"iteration {i}: {name} last written with token {last} >= ours {lease.token}"
                )
            time.sleep(cfg["pause"])  # widen the read-modify-write window
            Path(counter_path(directory, name)).write_text(f"{count + 1} {lease.token}")
            counts[name] += 1
        for name in mine:
            os.unlink(marker_path(directory, name))
        lease.release()
        acquisitions.append((lease.token, sorted(wanted)))
    _emit({"counts": counts, "violations": violations, "acquisitions": acquisitions})


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def killable(cfg: dict[str, Any]) -> None:
    """Rounds of: wait for ``k0`` plus maybe one more name, mark them, report ``holding``, and
    keep them until the test says ``release`` (or kills us)."""
    table = _start(cfg)
    collect = _Collect()
    logging.getLogger("tasklocks").addHandler(collect)
    rng = random.Random(cfg["seed"])
    directory: str = cfg["dir"]
    for _ in range(cfg["rounds"]):
        wanted = ["k0", *rng.sample(["k1", "k2"], rng.randint(0, 1))]
        collect.messages.clear()
        lease = table.acquire(*wanted, wait=True, timeout=30)
        violations: list[str] = []
        stale: list[str] = []
        mine: list[str] = []
        for name in wanted:
            while not create_marker(directory, name):
                path = marker_path(directory, name)
                try:
                    pid_text, start = Path(path).read_text().split()
                except FileNotFoundError:
                    continue  # removed meanwhile: try again
                except ValueError:
                    violations.append(f"marker of {name} is being written by someone else")
                    break
                if not process_is_dead(int(pid_text), start):
                    violations.append(f"marker of {name} belongs to live pid {pid_text}")
                    break
                os.unlink(path)  # its holder died: a stale marker
                stale.append(name)
            else:
                mine.append(name)
        _emit(
            {
                "holding": wanted,
                "pid": os.getpid(),
                "token": lease.token,
                "violations": violations,
                "stale": stale,
                "warnings": collect.messages[:],
            }
        )
        if sys.stdin.readline().strip() != "release":
            sys.exit(3)
        for name in mine:
            os.unlink(marker_path(directory, name))
        lease.release()
    _emit({"done": os.getpid()})


def outage(cfg: dict[str, Any]) -> None:
    """Like ``occupancy``, for ``seconds``, while the test restarts the server or cuts the
    connections: every error is counted and the work goes on. Reports the time of every success,
    every error (type and message), and whether a lease was ever lost."""
    table = _start(cfg)
    rng = random.Random(cfg["seed"])
    names: list[str] = cfg["names"]
    directory: str = cfg["dir"]
    me = tasklocks.current_process()
    mine_prefix = f"pid:{me.host}:{me.pid}"
    counts = dict.fromkeys(names, 0)
    violations: list[str] = []
    errors: list[tuple[float, str, str]] = []
    successes: list[float] = []
    lost = 0
    stop_at = time.monotonic() + cfg["seconds"]
    while time.monotonic() < stop_at:
        wanted = rng.sample(names, rng.randint(1, 2))
        try:
            lease = table.acquire(*wanted, wait=True, timeout=cfg["timeout"])
        except tasklocks.LockHeld as exc:  # only a wait that timed out, or a bug
            if any(h.owner == mine_prefix for h in exc.held.values()):
                violations.append(f"LockHeld names this process itself: {exc}")
            errors.append((time.time(), type(exc).__name__, str(exc)))
            continue
        except (tasklocks.StoreUnavailable, tasklocks.LockTimeout) as exc:
            errors.append((time.time(), type(exc).__name__, str(exc)))
            time.sleep(0.05)
            continue
        successes.append(time.time())
        mine = [name for name in wanted if create_marker(directory, name)]
        violations += [f"marker of {n} exists while we hold it" for n in wanted if n not in mine]
        for name in wanted:
            count, last = read_counter(directory, name)
            if last >= lease.token:
                violations.append(f"{name} last written with token {last} >= ours {lease.token}")
            time.sleep(cfg["pause"])
            Path(counter_path(directory, name)).write_text(f"{count + 1} {lease.token}")
            counts[name] += 1
        for name in mine:
            os.unlink(marker_path(directory, name))
        while True:  # a release that fails is tried again: the lock is ours until then
            try:
                lease.release()
                break
            except tasklocks.LeaseLost as exc:
                lost += 1
                errors.append((time.time(), type(exc).__name__, str(exc)))
                break
            except tasklocks.StoreUnavailable as exc:
                errors.append((time.time(), type(exc).__name__, str(exc)))
                time.sleep(0.05)
        lost += lease.lost.is_set()
    table.close()
    _emit(
        {
            "counts": counts,
            "violations": violations,
            "errors": errors,
            "successes": successes,
            "lost": lost,
        }
    )


def _stop_on_stdin() -> threading.Event:
    """An event set once the test writes ``stop`` (or closes our stdin)."""
    stop = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=read, daemon=True).start()
    return stop


def turns(cfg: dict[str, Any]) -> None:
    """Take ``name`` again and again (hold it ``hold`` seconds, then pause ``gap``) until the
    test says ``stop``: a rival of the pair in the starvation test."""
    table = _start(cfg)
    stop = _stop_on_stdin()
    time.sleep(cfg["offset"])
    n = 0
    while not stop.is_set():
        with table.hold(cfg["name"], timeout=60):
            time.sleep(cfg["hold"])
        n += 1
        time.sleep(cfg["gap"])
    _emit({"turns": n})


def pair(cfg: dict[str, Any]) -> None:
    """``rounds`` times: pause, wait for all of ``names`` at once, hold them ``hold`` seconds.
    Reports how long each wait took."""
    table = _start(cfg)
    waits = []
    for _ in range(cfg["rounds"]):
        time.sleep(cfg["pause"])
        started = time.monotonic()
        lease = table.acquire(*cfg["names"], wait=True, timeout=60)
        waits.append(time.monotonic() - started)
        time.sleep(cfg["hold"])
        lease.release()
    _emit({"waits": waits})


def occupant(cfg: dict[str, Any]) -> None:
    """``rounds`` times: take ``name`` as a ``slot`` (``limit``), a ``reader`` (shared) or a
    ``writer`` (exclusive); while holding it, keep a marker file ``<kind>-<pid>`` in ``dir`` and
    look at the others' markers. A marker is made after the lock is granted and removed before it
    is released, so the markers present are a subset of the holders at every instant."""
    table = _start(cfg)
    kind: str = cfg["kind"]
    directory: str = cfg["dir"]
    marker = os.path.join(directory, f"{kind}-{os.getpid()}")
    violations: list[str] = []
    waits: list[float] = []
    most = 0
    for i in range(cfg["rounds"]):
        started = time.monotonic()
        lease = table.acquire(
            cfg["name"],
            wait=True,
            timeout=60,
            shared=kind == "reader",
            limit=cfg.get("limit") if kind == "slot" else None,
        )
        waits.append(time.monotonic() - started)
        with open(marker, "w"):
            pass
        present = sorted(os.listdir(directory))
        same = [m for m in present if m.startswith(kind + "-")]
        most = max(most, len(same))
        if kind == "slot" and len(same) > cfg["limit"]:
            violations.append(f"round {i}: {len(same)} slots taken at once: {present}")
        if kind == "reader" and any(m.startswith("writer-") for m in present):
            violations.append(f"round {i}: a reader next to a writer: {present}")
        if kind == "writer" and present != [os.path.basename(marker)]:
            violations.append(f"round {i}: a writer next to others: {present}")
        time.sleep(cfg["hold"])
        os.unlink(marker)
        lease.release()
        time.sleep(cfg["gap"])
    _emit({"most": most, "violations": violations, "waits": waits})


def scripted(cfg: dict[str, Any]) -> None:
    """Do what the test says, one JSON command per line on stdin: ``acquire`` (names, owner,
    wait, timeout, shared, limit; the lease is kept under ``key``), ``release`` (key). Reports
    each outcome: ``granted`` (token, waited), ``error`` (type, message) or ``released``."""
    table = tasklocks.connect(cfg["url"], namespace=cfg["namespace"])
    table.held()
    _emit({"ready": os.getpid()})
    leases: dict[str, tasklocks.Lease] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "acquire":
            started = time.monotonic()
            try:
                lease = table.acquire(
                    *cmd["names"],
                    owner=cmd.get("owner"),
                    wait=cmd.get("wait", False),
                    timeout=cmd.get("timeout"),
                    shared=cmd.get("shared", False),
                    limit=cmd.get("limit"),
                )
            except tasklocks.TasklocksError as exc:
                _emit({"error": type(exc).__name__, "message": str(exc)})
                continue
            leases[cmd["key"]] = lease
            _emit({"granted": lease.token, "waited": time.monotonic() - started})
        elif cmd["op"] == "release":
            leases.pop(cmd["key"]).release()
            _emit({"released": cmd["key"]})
    table.close()


def main(argv: list[str]) -> None:
    mode, config = argv
    modes = {
        "occupancy": occupancy,
        "killable": killable,
        "outage": outage,
        "turns": turns,
        "pair": pair,
        "occupant": occupant,
        "scripted": scripted,
    }
    modes[mode](json.loads(config))


if __name__ == "__main__":
    main(sys.argv[1:])
