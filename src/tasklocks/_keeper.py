"""A keeper: a small process that keeps a session alive for processes that outlive its owner.

``tasklocks run`` and a task's supervisor take locks for *other* processes (the command, the
task's process group) and renew the session that keeps them. If the owner is killed while those
processes run, nobody renews it, and the locks would expire under a running command. So the owner
forks a keeper first: it keeps nothing of its owner's open (descriptors point at /dev/null), idles
while the owner lives, and once the owner is gone renews the session for as long as the watched
processes run. If the session cannot be renewed before it may have expired (the owner told it the
deadline of each renewal), or the database says it expired, the watched processes no longer own
their locks: the keeper stops them (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable

from tasklocks._clock import clock, pause
from tasklocks._session import Session, margin
from tasklocks.errors import StoreError
from tasklocks.owner import group_is_empty, pid_is_gone, process_start_token
from tasklocks.store import open_store

__all__ = ["GRACE", "Keeper", "fork_keeper", "point_at_devnull"]

GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class Keeper:
    """The owner's end: tell the keeper which session to keep and how long it holds, or that
    it may go."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self._pipe = pipe

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError):  # the keeper is gone: nothing to tell
            os.write(self._pipe, line.encode() + b"\n")

    def keep(self, session: Session) -> None:
        """The session that keeps the watched processes' locks; its deadlines follow."""
        self._say(f"keep {session.id} {session.lifetime!r} {session.deadline!r}")
        session.on_renewed.append(self.renewed)

    def renewed(self, deadline: float) -> None:
        """The owner renewed the session: it holds until ``deadline``."""
        self._say(f"until {deadline!r}")

    def dismiss(self) -> None:
        """The owner is done with the locks: the keeper exits."""
        self._say("done")
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def point_at_devnull(keep: set[int]) -> None:
    """Point every descriptor of this (forked) process but ``keep`` at /dev/null: it must not
    keep its parent's connections, pipes or files open. Their numbers stay taken, so objects that
    still refer to them can never close a descriptor opened later."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep and fd != devnull:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd, inheritable=False)
    except OSError:
        pass  # no /proc: nothing to do but hope
    finally:
        os.close(devnull)


def fork_keeper(url: str, table: str, *, pid: int | None = None, pgid: int | None = None) -> Keeper:
    """Fork a keeper for process ``pid`` or process group ``pgid`` (call it while this process
    has no other thread: it is a fork)."""
    read_end, write_end = os.pipe()
    owner = os.getpid()
    start = None if pid is None else process_start_token(pid)
    child = os.fork()
    if child == 0:  # pragma: no cover - the keeper's own process; tests watch it from outside
        try:
            os.close(write_end)
            point_at_devnull(keep={read_end})
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the command
            if pid is not None:
                alive = (lambda: not pid_is_gone(pid, start)) if start else (lambda: False)
                watch = _Watched(alive, lambda sig: os.kill(pid, sig))
            else:
                assert pgid is not None
                watch = _Watched(lambda: not group_is_empty(pgid), lambda sig: os.killpg(pgid, sig))
            _keep(read_end, url, table, owner, watch)
        finally:
            os._exit(0)
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
    session, lifetime, deadline = "", 0.0, 0.0
    store = None
    pending = b""
    listening = True  # until the pipe's end: the owner died (or dismissed us)
    while True:
        period = min(lifetime / 4, max(0.0, deadline - clock())) if lifetime else None
        if select.select([pipe] if listening else [], [], [], period)[0]:
            data = os.read(pipe, 4096)
            listening = bool(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                word, *rest = line.decode().split()
                if word == "done":
                    return  # dismissed: the owner released the locks
                if word == "keep":
                    session, lifetime, deadline = rest[0], float(rest[1]), float(rest[2])
                elif word == "until":
                    deadline = float(rest[0])
            if listening:
                continue
        if not session or not watched.running():
            return  # nothing to keep (the owner died before it had locks), or no one to keep it for
        if os.getppid() == owner:
            continue  # the owner lives and renews
        try:
            store = store or open_store(url, table=table)
            sent = clock()
            kept = store.renew_session(session)
        except StoreError:
            kept = clock() < deadline  # not now: go on trying while the session may hold
        else:
            deadline = sent + lifetime - margin(lifetime) if kept else deadline
        if not kept:  # expired (or may have): the locks are no longer theirs
            watched.stop()
            return
