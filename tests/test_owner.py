"""Truth table of owner.holder_liveness, judged against real processes (fail closed)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tasklocks import owner
from tasklocks._core import Holder
from tasklocks.owner import (
    Liveness,
    boot_id,
    current_process,
    holder_liveness,
    owner_is_dead,
    pid_namespace,
    process_start_token,
)

pytestmark = pytest.mark.skipif(
    boot_id() is None or not os.path.isdir("/proc/self"), reason="needs Linux /proc and a boot id"
)

PATIENCE = 10.0  # seconds to wait for the kernel (or init) to change a process's state


def make_holder(pid: int | None, start: str | None, *, pgid: int | None = None) -> Holder:
    """A holder as this host, boot and pid namespace would record it."""
    return Holder(
        owner="task:1",
        pid=pid,
        start=start,
        boot=boot_id(),
        host=socket.gethostname(),
        pidns=pid_namespace(),
        pgid=pgid,
        since=time.time(),
        token=1,
        lease="lease-1",
        note=None,
    )


def state_of(pid: int) -> str | None:
    """The one-letter state of /proc/<pid>/stat, or None once the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (
        FileNotFoundError,
        ProcessLookupError,
    ):  # gone before the open, or between it and the read
        return None
    return text[text.rfind(")") + 2 :].split()[0]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {PATIENCE}s waiting until {what}")
        time.sleep(0.01)


class Spawner:
    """Starts child processes and always kills them (and their groups) afterwards."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.groups: list[int] = []

    def __call__(self, argv: list[str], *, new_session: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        self.procs.append(proc)
        if new_session:
            self.groups.append(proc.pid)
        return proc

    def cleanup(self) -> None:
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in self.procs:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()


def start_token(proc: subprocess.Popen[str]) -> str:
    token = process_start_token(proc.pid)
    assert token is not None
    return token


def test_owner_alive_when_it_is_this_process() -> None:
    me = current_process()
    assert holder_liveness(make_holder(me.pid, me.start)) is Liveness.ALIVE


def test_owner_alive_when_process_runs(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    holder = make_holder(proc.pid, start_token(proc))
    assert holder_liveness(holder) is Liveness.ALIVE
    assert owner_is_dead(holder) is False


def test_owner_alive_when_process_runs_and_start_unknown(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    assert holder_liveness(make_holder(proc.pid, None)) is Liveness.ALIVE


def test_owner_dead_when_process_gone(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    holder = make_holder(proc.pid, start_token(proc))
    proc.kill()
    proc.wait()
    assert state_of(proc.pid) is None
    assert holder_liveness(holder) is Liveness.DEAD
    assert owner_is_dead(holder) is True


def test_owner_dead_when_zombie(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    holder = make_holder(proc.pid, start_token(proc))
    proc.kill()  # and do not wait: the child stays a zombie until reaped
    wait_until(lambda: state_of(proc.pid) == "Z", "the child is a zombie")
    assert holder_liveness(holder) is Liveness.DEAD


def test_owner_dead_when_group_has_only_a_zombie(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"], new_session=True)
    holder = make_holder(proc.pid, start_token(proc), pgid=proc.pid)
    proc.kill()
    wait_until(lambda: state_of(proc.pid) == "Z", "the leader is a zombie")
    assert holder_liveness(holder) is Liveness.DEAD


def test_owner_dead_while_its_parent_reaps_it(
    spawn: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc says "X" (dead) for the milliseconds its parent takes to reap it: a killed task's
    supervisor, judged gone as a zombie, was judged alive then, and reconcile left its locks
    held (a flaky test under load caught it). Shown here by a live process read as "X"."""
    proc = spawn(["sleep", "30"], new_session=True)
    holder = make_holder(proc.pid, start_token(proc), pgid=proc.pid)
    assert holder_liveness(holder) is Liveness.ALIVE
    real = owner._stat_fields

    def being_reaped(pid: int) -> list[str] | None:
        fields = real(pid)
        return ["X", *fields[1:]] if fields is not None and pid == proc.pid else fields

    monkeypatch.setattr(owner, "_stat_fields", being_reaped)
    assert owner.pid_is_gone(proc.pid, start_token(proc))
    assert owner.group_is_empty(proc.pid)
    assert holder_liveness(holder) is Liveness.DEAD


def test_owner_dead_when_pid_reused(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    token = start_token(proc)
    # The pid runs, but it is another process than the one that took the lock.
    holder = make_holder(proc.pid, str(int(token) - 1))
    assert holder_liveness(holder) is Liveness.DEAD


def test_owner_dead_when_boot_differs_same_host_local_db(spawn: Spawner) -> None:
    # A local database file (SQLite) was written on this machine: another boot is a reboot.
    proc = spawn(["sleep", "30"])
    holder = replace(make_holder(proc.pid, start_token(proc)), boot="an-earlier-boot")
    assert holder_liveness(holder, local_db=True) is Liveness.DEAD
    me = current_process()
    mine = replace(make_holder(me.pid, me.start), boot="an-earlier-boot")
    assert holder_liveness(mine, local_db=True) is Liveness.DEAD


def test_owner_unknown_when_boot_differs_on_a_database_server(spawn: Spawner) -> None:
    # On a shared server, another boot id with our host name may be another machine that has
    # the same name (cloned VMs, containers): never reclaimed.
    proc = spawn(["sleep", "30"])
    holder = replace(make_holder(proc.pid, start_token(proc)), boot="an-earlier-boot")
    assert holder_liveness(holder) is Liveness.UNKNOWN
    assert owner_is_dead(holder) is False


def test_owner_alive_when_zombie_leader_has_running_threads(tmp_path: Path) -> None:
    # The main thread exits (pthread_exit-like), another thread keeps the process running.
    script = tmp_path / "leader.py"
    marker = tmp_path / "ready"
    script.write_text(
        "import ctypes, threading, time, pathlib\n"
        "def work():\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=work).start()\n"
        "time.sleep(0.2)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], text=True)
    try:
        wait_until(marker.exists, "the worker thread runs")
        wait_until(lambda: state_of(proc.pid) == "Z", "the leader thread exited")
        holder = make_holder(proc.pid, start_token(proc))
        assert holder_liveness(holder) is Liveness.ALIVE
    finally:
        proc.kill()
        proc.wait()
    assert holder_liveness(holder) is Liveness.DEAD


def test_owner_unknown_on_other_host(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    proc.kill()
    proc.wait()  # even a pid that is provably gone here says nothing about another host
    holder = replace(make_holder(proc.pid, "1"), host=socket.gethostname() + "-elsewhere")
    assert holder_liveness(holder) is Liveness.UNKNOWN
    assert owner_is_dead(holder) is False
    other_boot = replace(holder, boot="another-boot")
    assert holder_liveness(other_boot) is Liveness.UNKNOWN


def test_owner_unknown_in_other_pid_namespace(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    proc.kill()
    proc.wait()
    holder = replace(make_holder(proc.pid, "1"), pidns="4026530000-not-ours")
    assert holder_liveness(holder) is Liveness.UNKNOWN


def test_owner_unknown_without_pid() -> None:
    holder = make_holder(None, None, pgid=None)
    assert holder_liveness(holder) is Liveness.UNKNOWN
    assert holder_liveness(replace(holder, boot="another-boot")) is Liveness.UNKNOWN
    assert owner_is_dead(holder) is False


def test_owner_unknown_without_boot_id(spawn: Spawner) -> None:
    proc = spawn(["sleep", "30"])
    proc.kill()
    proc.wait()
    holder = replace(make_holder(proc.pid, "1"), boot=None)
    assert holder_liveness(holder) is Liveness.UNKNOWN
    # Nor when this machine has no boot id to compare with.
    me = replace(current_process(), boot=None)
    assert holder_liveness(make_holder(proc.pid, "1"), me) is Liveness.UNKNOWN


def test_owner_alive_while_process_group_has_members(spawn: Spawner) -> None:
    # The leader starts a child in its (new) group, reports the child's pid, then exits on cue.
    leader = spawn(
        ["sh", "-c", "sleep 30 >/dev/null 2>&1 </dev/null & echo $!; read _; exit 0"],
        new_session=True,
    )
    assert leader.stdout is not None and leader.stdin is not None
    child = int(leader.stdout.readline())
    assert os.getpgid(child) == leader.pid
    holder = make_holder(leader.pid, start_token(leader), pgid=leader.pid)
    assert holder_liveness(holder) is Liveness.ALIVE

    leader.stdin.close()
    assert leader.wait() == 0
    assert state_of(leader.pid) is None
    assert state_of(child) not in (None, "Z")
    # The leader is gone, but its child still runs in the group: the locks stay held.
    assert holder_liveness(holder) is Liveness.ALIVE
    # Without the group, the same holder would be dead: the group is what keeps it.
    assert holder_liveness(replace(holder, pgid=None)) is Liveness.DEAD

    os.killpg(leader.pid, signal.SIGKILL)
    # The orphaned child is reaped by init (or a subreaper), not by us.
    wait_until(lambda: state_of(child) is None, "the orphaned child is reaped")
    assert holder_liveness(holder) is Liveness.DEAD
