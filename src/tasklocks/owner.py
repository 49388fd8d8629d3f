"""Who am I, and is a lock's holder provably dead?

Fail closed, like filelock's ``_identity``: a holder is *dead* only with proof, on this host,
in this pid namespace: its boot is over (the machine rebooted since), or its pid is gone, a zombie,
or reused by another process (the start token differs). A holder on another host or in
another pid namespace is never judged by pid: its liveness is *unknown* and it is never reclaimed.
An entry without a pid (taken by the command line for an explicit owner) is never reclaimed either.

When a holder names a process group (``pgid``), the holder is alive while any process of that group
runs: a task's children keep its locks even after the task's own process is gone.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasklocks import _pid
from tasklocks._clock import pause

if TYPE_CHECKING:
    from tasklocks._doc import Holder, Waiter

__all__ = [
    "Liveness",
    "ProcessIdentity",
    "boot_id",
    "current_process",
    "default_owner",
    "env_number",
    "group_is_empty",
    "holder_liveness",
    "owner_is_dead",
    "pid_is_gone",
    "pid_namespace",
    "process_identity",
    "process_liveness",
    "process_start_token",
    "task_process_group",
]


ZOMBIE_THREADS_GRACE = 0.1  # seconds a zombie's other threads may take to end
# proc(5)'s "X" (dead, "x" on Linux 2.6.33 to 3.13): its parent is reaping it at this moment. For
# those milliseconds a process judged gone (a zombie with no other thread) looked alive again.
_REAPED = ("X", "x")
_ENDED = ("Z", *_REAPED)


class Liveness(enum.StrEnum):
    """What we can prove about a holder."""

    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"
    EXPIRED = "expired"  # its session expired by the database's clock (see LockTable.held)


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """Everything needed to recognise a process later, even after its pid is reused."""

    pid: int
    start: str | None
    boot: str | None
    host: str
    pidns: str | None
    pgid: int | None = None


def process_identity(pid: int, *, pgid: int | None = None) -> ProcessIdentity:
    """The identity of another process on this host (for example a child that will hold locks)."""
    me = current_process()
    return ProcessIdentity(pid, process_start_token(pid), me.boot, me.host, me.pidns, pgid)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    return text[text.rfind(")") + 2 :].split()


def process_start_token(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (proc(5) field 22), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


_boot_id: str | None = None


def boot_id() -> str | None:
    """This boot's random id (/proc/sys/kernel/random/boot_id), or None where there is none."""
    global _boot_id
    if _boot_id is None:
        text = _read("/proc/sys/kernel/random/boot_id")
        _boot_id = text.strip() if text else ""
    return _boot_id or None


def pid_namespace() -> str | None:
    """An id of this process's pid namespace: pids only mean something inside one namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


_current: ProcessIdentity | None = None


def current_process() -> ProcessIdentity:
    """This process's identity (recomputed after a fork)."""
    global _current
    pid = _pid._pid
    if _current is None or _current.pid != pid:
        _current = ProcessIdentity(
            pid=pid,
            start=process_start_token(pid),
            boot=boot_id(),
            host=socket.gethostname(),
            pidns=pid_namespace(),
            pgid=task_process_group(),
        )
    return _current


def env_number(name: str) -> int | None:
    """The environment variable ``name`` as a whole number, if it is ASCII digits alone
    (``str.isdigit`` also takes "²" and other scripts' digits), else None."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


def task_process_group() -> int | None:
    """Inside a task, the task's process group: locks then stay held while any of its processes
    runs. Outside a task (or in a process that left the task's group), None."""
    pgid = env_number("TASKLOCKS_TASK_PGID")
    return pgid if pgid is not None and pgid == os.getpgrp() else None


def default_owner(identity: ProcessIdentity) -> str:
    """``task:<id>`` inside a task, else ``pid:<host>:<pid>``."""
    task = env_number("TASKLOCKS_TASK_ID")
    if task is not None:
        return f"task:{task}"
    return f"pid:{identity.host}:{identity.pid}"


def pid_is_gone(pid: int, start: str | None) -> bool:
    """Is process ``pid`` (started at ``start``, if known) provably gone?"""
    fields = _stat_fields(pid)
    if fields is None:
        # No /proc entry we can read. /proc may hide other users' processes (hidepid), so
        # only the kernel's answer to a signal 0 proves the pid is gone.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    if fields[0] in _REAPED:
        return True  # being reaped right now: every thread gone (a look that saw it "Z" said so)
    if fields[0] == "Z":
        # A zombie runs no code and holds nothing, unless it is a thread-group leader whose
        # other threads still run (its main thread exited, the process did not). Right after a
        # SIGKILL the leader is a zombie while its other threads are still on their way out
        # (milliseconds): give them a moment.
        deadline = time.monotonic() + ZOMBIE_THREADS_GRACE
        while True:
            try:
                if len(os.listdir(f"/proc/{pid}/task")) <= 1:
                    return True
            except OSError:
                return True
            if time.monotonic() > deadline:
                return False
            pause(0.002)
    return start is not None and len(fields) > 19 and fields[19] != start


def group_is_empty(pgid: int) -> bool:
    """True when no process that can still run is left in process group ``pgid``.

    ``killpg(pgid, 0)`` answers first (cheap, and final when the group is gone); when it says
    the group exists, /proc decides whether any member is more than a zombie.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is the state (proc(5) field 3), fields[2] the process group (field 5).
        # (A zombie, or one its parent is reaping, runs nothing.)
        if (
            fields is not None
            and len(fields) > 2
            and fields[2] == str(pgid)
            and fields[0] not in _ENDED
        ):
            return False
    return True


def process_liveness(
    pid: int | None,
    start: str | None,
    boot: str | None,
    host: str | None,
    pidns: str | None,
    pgid: int | None,
    me: ProcessIdentity | None = None,
    *,
    local_db: bool = False,
) -> Liveness:
    """Judge a recorded process (and its process group) from this process's point of view.

    ``local_db``: the records live in a file on this machine (SQLite), so a holder with this
    host name ran on this machine, and a different boot id proves that it died in a reboot. On
    a database server a different boot id may as well be another machine with the same name:
    unknown.
    """
    me = me or current_process()
    if pid is None or host != me.host or pidns != me.pidns:
        return Liveness.UNKNOWN
    if boot is None or me.boot is None:
        return Liveness.UNKNOWN
    if boot != me.boot:
        return Liveness.DEAD if local_db else Liveness.UNKNOWN
    if pid == me.pid and start == me.start:
        return Liveness.ALIVE
    if not pid_is_gone(pid, start):
        return Liveness.ALIVE
    if pgid is not None and not group_is_empty(pgid):
        return Liveness.ALIVE
    return Liveness.DEAD


def holder_liveness(
    holder: Holder | Waiter, me: ProcessIdentity | None = None, *, local_db: bool = False
) -> Liveness:
    """Judge a lock holder (or a waiter) from this process's point of view (fail closed)."""
    return process_liveness(
        holder.pid,
        holder.start,
        holder.boot,
        holder.host,
        holder.pidns,
        holder.pgid,
        me,
        local_db=local_db,
    )


def owner_is_dead(holder: Holder | Waiter, *, local_db: bool = False) -> bool:
    """True only with proof that the holder's process (and process group) is gone."""
    return holder_liveness(holder, local_db=local_db) is Liveness.DEAD
