"""A zygote: a small per-user server that starts task supervisors by fork, not by exec.

Starting a Python interpreter and importing tasklocks and a database driver takes tens of
milliseconds; a fork of a process that has done so already takes one. :meth:`Tasks.start` asks
the zygote for the user and this installation (the socket's name hashes the interpreter and
tasklocks' files) to fork a supervisor. The zygote is single-threaded, holds no database
connection and no descriptor but its socket, so a fork of it is clean. It is started on the first
``start()`` that finds none (that start uses the plain exec path), and exits after
:data:`IDLE_SECONDS` without requests. ``TASKLOCKS_ZYGOTE=0`` turns it off.

A forked supervisor gets the caller's environment, working directory and import path (the path a
fresh ``python -m`` would have for that environment), so a task behaves as if it had been exec'd.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["IDLE_SECONDS", "fork_supervisor", "socket_path"]

IDLE_SECONDS = 600.0
_CONNECT_TIMEOUT = 2.0


# Environment variables a Python process reads once, at start-up or on first use: a zygote
# started with other values would give its supervisors and tasks the wrong ones.
_STARTUP_VARIABLES = ("PYTHON", "LC_", "LANG", "TZ")


@functools.cache
def _code_stamp() -> str:
    """The interpreter and tasklocks' files (name, size, mtime), as this process loaded them:
    looked at once per process, not at every start()."""
    root = Path(__file__).resolve().parent.parent
    parts = [sys.executable, sys.version, str(root)]
    for path in sorted(root.rglob("*.py")):
        info = path.stat()
        parts.append(f"{path.relative_to(root)}:{info.st_size}:{info.st_mtime_ns}")
    return "\n".join(parts)


def _package_stamp() -> str:
    """What a zygote must share with its caller to be a stand-in for exec: the interpreter,
    tasklocks' files (name, size, mtime), and the process context a fork inherits and an exec
    would have taken from the caller (credentials, umask, cgroup, limits, priority, and the
    environment variables Python reads at start-up)."""
    parts = [_code_stamp()]
    mask = os.umask(0o022)
    os.umask(mask)
    parts.append(f"ids {os.getuid()} {os.getgid()} {sorted(os.getgroups())} umask {mask}")
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/self/cgroup").read_text())
    parts.append(f"nice {os.nice(0)}")
    for limit in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_STACK"):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            parts.append(f"{limit} {resource.getrlimit(getattr(resource, limit))}")
    parts.extend(  # PYTHONPATH is not one of them: a supervisor takes the caller's path
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith(_STARTUP_VARIABLES) and k != "PYTHONPATH"
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _private_dir() -> Path | None:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"tasklocks-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # not ours alone: never talk to a socket someone else could have put there
    return path


def socket_path() -> Path | None:
    """The zygote's socket for this user and installation, or None where there can be none."""
    directory = _private_dir()
    return None if directory is None else directory / f"zygote-{_package_stamp()}.sock"


def fork_supervisor(argv: list[str], log_fd: int, env: dict[str, str]) -> int | None:
    """Ask the zygote to fork a supervisor for ``argv``; return its pid, or None (then the
    caller starts the supervisor itself, and a zygote is started for next time)."""
    if os.environ.get("TASKLOCKS_ZYGOTE", "1") == "0":
        return None
    path = socket_path()
    if path is None:
        return None
    request = {
        "argv": argv,
        "env": env,
        "cwd": os.getcwd(),
    }
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(_CONNECT_TIMEOUT)
            conn.connect(str(path))
            if _peer_uid(conn) != os.getuid():
                return None  # not our zygote: never hand our environment to someone else
            data = json.dumps(request).encode() + b"\n"
            socket.send_fds(conn, [data], [log_fd])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        pid = json.loads(reply)["pid"]
        return int(pid)
    except (OSError, ValueError, KeyError, TypeError):
        _spawn_zygote(path)
        return None


def _zygote_alive(path: Path) -> bool:
    """A zygote holds the lock next to its socket for as long as it lives (booting included)."""
    try:
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return True  # cannot tell: do not start one
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our flock, if we got it
    return False


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _spawn_zygote(path: Path) -> None:
    """Start a zygote in the background, unless one is alive (it may still be booting)."""
    if _zygote_alive(path):
        return
    # The zygote must import this very tasklocks, whatever the caller's import path was.
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    with contextlib.suppress(OSError):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasklocks.tasks._zygote", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env=env,
        )
        import threading

        threading.Thread(target=proc.wait, daemon=True).start()


# --- the zygote itself ------------------------------------------------------------------------


def _our_path_entries() -> set[str]:
    """The PYTHONPATH entries the zygote was started with (they are not the callers')."""
    return {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}


def _serve(path: Path) -> int:
    lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another zygote serves this path
    # Preload what supervisors need, so that a fork finds it imported; only then listen, so
    # that no caller waits for a zygote that is still booting (it starts its task itself).
    import tasklocks.tasks._supervisor  # noqa: F401
    from tasklocks import store

    store.preload()
    base_path = [p for p in sys.path[1:] if p not in _our_path_entries()]
    _zygote_roots.update(_our_path_entries())
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a zygote that died
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    idle = float(os.environ.get("TASKLOCKS_ZYGOTE_IDLE", IDLE_SECONDS))
    server.settimeout(idle)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return 0
            with conn:
                _handle(conn, server, lock_fd, base_path)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        server.close()


def _handle(conn: socket.socket, server: socket.socket, lock_fd: int, base_path: list[str]) -> None:
    conn.settimeout(_CONNECT_TIMEOUT)
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 1)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                break
            data += more
        request: dict[str, Any] = json.loads(data)
    except (OSError, ValueError):
        return
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return
    log_fd = fds[0]
    if _peer_uid(conn) != os.getuid():
        os.close(log_fd)
        return
    pid = os.fork()
    if pid == 0:
        try:
            server.close()
            os.close(lock_fd)
            _become_supervisor(request, log_fd, conn, base_path)
        except BaseException:
            traceback.print_exc()  # to the task's log, once the descriptors are in place
            sys.stderr.flush()
        finally:
            os._exit(70)
    os.close(log_fd)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


_zygote_roots: set[str] = set()


def _become_supervisor(
    request: dict[str, Any], log_fd: int, conn: socket.socket, base_path: list[str]
) -> None:
    os.close(conn.detach())  # the zygote answers on it; this process lets go of its copy
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    env: dict[str, str] = request["env"]
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    cwd: str = request["cwd"]
    os.chdir(cwd)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    # tasklocks itself stays importable from where the zygote found it.
    sys.path[:] = [cwd, *extra, *base_path, *sorted(_zygote_roots)]
    from tasklocks.tasks._supervisor import main

    code = main(list(request["argv"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(_serve(Path(sys.argv[1])))
