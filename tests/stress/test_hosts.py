"""A holder on "another host", on every backend: a process in a UTS and pid namespace of its own
(``unshare --uts --pid --fork --mount-proc``, with its own host name), its clock skewed by an
hour either way or not (libfaketime). Nothing here can prove it dead: while it renews its session
its lock is kept (several ttl), and once it is SIGKILLed the lock is free after the ttl, not
before, and no more than ttl + 2 s later. Its clock plays no part: the database's does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tasklocks
from tasklocks import Liveness, LockHeld

pytestmark = pytest.mark.stress

TTL = 1.0
HOLD_FOR = 3 * TTL  # seconds the renewing holder must keep its lock
SIM_HOST = "sim-host"
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
SRC = str(Path(__file__).resolve().parents[2] / "src")

_HOLDER = r"""
import sys, time
import tasklocks
url, namespace, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
table = tasklocks.connect(url, namespace, ttl=ttl)
lease = table.acquire("h")
print(f"{lease.token} {time.time():.0f}", flush=True)
lease.lost.wait()  # not time.sleep(): libfaketime breaks it (see tasklocks._clock)
print("lost", flush=True)
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "unshare needs root"
    if shutil.which("unshare") is None:
        return "no unshare"
    return None


@contextmanager
def far_holder(url: str, namespace: str, skew: str) -> Iterator[tuple[int, int, float]]:
    """A holder of ``h`` on a simulated host; yields (its pid as seen here, its token, the time
    it believes it is). Killed (its whole pid namespace) on exit."""
    env = dict(os.environ, PYTHONPATH=SRC)
    if skew:
        if not Path(FAKETIME).exists():
            if os.environ.get("CI") == "true":
                pytest.fail(f"libfaketime is missing ({FAKETIME}): apt-get install faketime")
            pytest.skip(f"libfaketime is missing ({FAKETIME})")
        # A host's wall clock off by an hour; its monotonic clocks count seconds since boot as
        # everywhere (a skewed wall clock does not move them; faked, they would also break the
        # C library's timed waits, which libfaketime does not translate).
        env.update(
            LD_PRELOAD=FAKETIME,
            FAKETIME=skew,
            FAKETIME_NO_CACHE="1",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
        )
    script = f'hostname {SIM_HOST} && exec "$0" -c "$1" "$2" "$3" "$4"'
    argv = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", script]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [*argv, sys.executable, _HOLDER, url, namespace, str(TTL)],
            stdout=subprocess.PIPE,
            stderr=errors,  # unshare may complain of its killed child ("sigprocmask ...")
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if len(line) != 2:
                errors.seek(0)
                pytest.fail(f"the far holder did not take h: {line}\n{errors.read()}")
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            yield int(children[0]), int(line[0]), float(line[1])
        finally:
            children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            if children_file.exists():
                for child in children_file.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(child), signal.SIGKILL)
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.parametrize("skew", ["", "+1h", "-1h"], ids=["same-clock", "1h-ahead", "1h-behind"])
def test_a_far_holder_keeps_its_lock_while_it_renews_and_loses_it_a_ttl_after_death(
    db_url: str, namespace: str, skew: str
) -> None:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    with tasklocks.connect(db_url, namespace=namespace, ttl=TTL) as table:
        with far_holder(db_url, namespace, skew) as (pid, token, its_time):
            if skew:
                offset = its_time - time.time()
                assert abs(abs(offset) - 3600) < 60 and (offset > 0) == (skew[0] == "+")
            [lock] = table.held()
            assert (lock.holder.host, lock.liveness) == (SIM_HOST, Liveness.UNKNOWN)
            started = time.monotonic()
            while time.monotonic() - started < HOLD_FOR:  # it renews: refused all along
                with pytest.raises(LockHeld):
                    table.acquire("h", owner="task:next")
                [lock] = table.held()
                assert lock.liveness is Liveness.UNKNOWN, "a renewing holder never expires"
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)  # the "host" dies: nothing here can prove it
            killed = time.monotonic()
            lease = table.acquire("h", owner="task:next", wait=True, timeout=10 * TTL)
            freed_after = time.monotonic() - killed
        assert lease.token > token
        assert TTL - 0.05 <= freed_after <= TTL + 2.0, f"freed {freed_after:.2f}s after death"
        print(f"skew {skew or 'none'}: freed {freed_after:.2f}s after the holder died")
