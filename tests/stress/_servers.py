"""Restart the local database servers (root only), and always bring them back.

The same commands ``.ci/run`` uses to start them; each waits until the server answers again.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UP_TIMEOUT = 60.0
MARIADBD = "/usr/sbin/mariadbd"
_PG_CTL = ["pg_ctlcluster", "--skip-systemctl-redirect"]


def _ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def answers(backend: str) -> bool:
    if backend == "mysql":
        return _ok(["mysqladmin", "--host=127.0.0.1", "--user=root", "--connect-timeout=2", "ping"])
    return _ok(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q", "-t", "2"])


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[0]


def stop(backend: str) -> None:
    if backend == "mysql":
        _ok(["mysqladmin", "--host=127.0.0.1", "--user=root", "shutdown"])
    else:
        _ok(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                _pg_version(),
                "main",
                "stop",
                "-m",
                "fast",
            ]
        )
    deadline = time.monotonic() + UP_TIMEOUT
    while answers(backend):
        assert time.monotonic() < deadline, f"{backend} would not stop"
        time.sleep(0.1)


def start(backend: str) -> float:
    """Start the server; the time.time() at which it answered again."""
    if backend == "mysql":
        _ok(
            [
                "start-stop-daemon",
                "--start",
                "--oknodo",
                "--background",
                "--exec",
                "/usr/sbin/mariadbd",
            ]
        )
    else:
        _ok([*_PG_CTL, _pg_version(), "main", "start"])
    deadline = time.monotonic() + UP_TIMEOUT
    while not answers(backend):
        assert time.monotonic() < deadline, f"{backend} did not come back"
        time.sleep(0.05)
    return time.time()


def can_restart(backend: str, url: str) -> str | None:
    """Why this test cannot restart ``backend`` (None: it can)."""
    if os.geteuid() != 0:
        return "restarting the database server needs root"
    if "127.0.0.1" not in url and "localhost" not in url:
        return f"{url} is not the local server"
    tool = MARIADBD if backend == "mysql" else "/usr/bin/pg_ctlcluster"
    if not Path(tool).exists():
        return f"no {tool} to restart {backend} with"
    return None


@contextmanager
def restartable(backend: str) -> Iterator[None]:
    """Whatever happens in the block, the server answers again afterwards."""
    try:
        yield
    finally:
        if not answers(backend):
            start(backend)
