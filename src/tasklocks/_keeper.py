"""A keeper: a small process that keeps a session alive for processes that outlive its owner.

``tasklocks run`` and a task's supervisor take locks for *other* processes (the command, the
task's process group) and renew the session that keeps them. If the owner is killed while those
processes run, nobody renews it, and the locks would expire under a running command. So the owner
forks a keeper first (before it has threads or connections): it idles while the owner lives, and
once the owner is gone it renews the session for as long as the watched processes run. If the
session cannot be renewed in time (it expired by the database's clock), the watched processes no
longer own their locks: the keeper stops them (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
import traceback
from collections.abc import Callable

from tasklocks._clock import pause
from tasklocks.errors import StoreError
from tasklocks.owner import group_is_empty, pid_is_gone, process_start_token
from tasklocks.store import open_store

__all__ = ["Keeper", "fork_keeper"]

GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class Keeper:
    """The owner's end: tell the keeper which session to keep, or that it may go."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self._pipe = pipe

    def keep(self, session: str, ttl: float) -> None:
        """The session that keeps the watched processes' locks (after each new one)."""
        with contextlib.suppress(OSError):
            os.write(self._pipe, f"{session} {ttl!r}\n".encode())

    def dismiss(self) -> None:
        """The owner is done with the locks: the keeper exits."""
        with contextlib.suppress(OSError):
            os.write(self._pipe, b"done\n")
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def fork_keeper(url: str, table: str, *, pid: int | None = None, pgid: int | None = None) -> Keeper:
    """Fork a keeper for process ``pid`` or process group ``pgid`` (call it before this process
    has threads or database connections: it is a fork)."""
    read_end, write_end = os.pipe()
    owner = os.getpid()
    start = None if pid is None else process_start_token(pid)
    child = os.fork()
    if child == 0:  # pragma: no cover - the keeper's own process; tests watch it from outside
        code = 0
        try:
            os.close(write_end)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the command
            if pid is not None:
                alive = (lambda: not pid_is_gone(pid, start)) if start else (lambda: False)
                watch = _Watched(alive, lambda sig: os.kill(pid, sig))
            else:
                assert pgid is not None
                watch = _Watched(lambda: not group_is_empty(pgid), lambda sig: os.killpg(pgid, sig))
            _keep(read_end, url, table, owner, watch)
        except BaseException:
            traceback.print_exc()  # to the owner's stderr (a task's log)
            code = 70
        finally:
            os._exit(code)
    os.close(read_end)
    return Keeper(child, write_end)


class _Watched:
    """The processes a keeper keeps locks for: are they still there, and how to stop them."""

    def __init__(self, running: Callable[[], bool], kill: Callable[[int], None]) -> None:
        self.running = running
        self._kill = kill

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self._kill(sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`GRACE` seconds, until they are gone."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while self.running():
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
            pause(0.05)


def _keep(pipe: int, url: str, table: str, owner: int, watched: _Watched) -> None:
    session, ttl = "", 0.0
    store = None
    pending = b""
    listening = True  # until the pipe's end: the owner died (or dismissed us)
    while True:
        period = ttl / 3 if ttl else None
        if select.select([pipe] if listening else [], [], [], period)[0]:
            data = os.read(pipe, 4096)
            listening = bool(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line == b"done":
                    return  # dismissed: the owner released the locks
                session, ttl_text = line.decode().split()
                ttl = float(ttl_text)
            if listening or not session:
                continue
        if not watched.running() or not session:
            return
        if os.getppid() == owner:
            continue  # the owner lives and renews
        try:
            store = store or open_store(url, table=table)
            kept = store.renew_session(session)
        except StoreError:
            continue  # not now: the next period, or the session's expiry, decides
        if not kept:  # expired by the database's clock: the locks are no longer theirs
            watched.stop()
            return
