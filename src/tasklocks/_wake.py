"""Local wake-ups: a process that frees locks wakes the waiters on its host at once.

A waiter watches a small file with inotify(7); a releaser touches it (``utime``), which the kernel
turns into an event on every watcher's descriptor. The file is named after the database and the
namespace and lives in a shared directory (``/dev/shm/tasklocks-wake``, else the temp dir), so
every process on the host that uses the same lock table meets at the same file. This is only a
hint that saves polling: a missed wake-up (another host, no inotify, no permission) costs latency,
never correctness, because waiters still watch the database itself, more slowly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import tempfile
from typing import Any

__all__ = ["Waker"]

_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000

_inotify_init1: Any = None
_inotify_add_watch: Any = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _inotify_init1 = _libc.inotify_init1
    _inotify_add_watch = _libc.inotify_add_watch
    _inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
except (OSError, AttributeError):  # not Linux: waiters fall back to watching the database
    _inotify_init1 = None


def _wake_dir() -> str | None:
    for base in ("/dev/shm", tempfile.gettempdir()):
        path = os.path.join(base, "tasklocks-wake")
        try:
            os.mkdir(path, 0o1777)
            os.chmod(path, 0o1777)  # shared by every user, like /tmp (the umask narrowed mkdir)
        except FileExistsError:
            pass
        except OSError:
            continue
        if os.access(path, os.W_OK | os.X_OK):
            return path
    return None


class Waker:
    """The wake-up channel of one lock table (database + namespace) on this host."""

    def __init__(self, key: str) -> None:
        directory = _wake_dir()
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        self.path = None if directory is None else os.path.join(directory, name)
        self._fd: int | None = None
        self._pid = 0

    def notify(self) -> None:
        """Wake every process on this host that waits on this lock table (cheap: one syscall)."""
        if self.path is not None:
            with contextlib.suppress(OSError):  # no file: nobody has ever waited here
                os.utime(self.path)

    def fileno(self) -> int | None:
        """A descriptor that becomes readable after the next :meth:`notify` on this host, or
        None where there is no such channel. Create it *before* checking the database, so that a
        release between the check and the wait is not missed."""
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        self._fd = None
        if _inotify_init1 is None or self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o666)
            try:  # every user of the lock table may touch it (the umask narrowed the mode)
                info = os.fstat(fd)
                if info.st_uid == os.getuid() and info.st_mode & 0o777 != 0o666:
                    os.fchmod(fd, 0o666)
            finally:
                os.close(fd)
        except OSError:
            return None
        ino = int(_inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if ino < 0:
            return None
        if _inotify_add_watch(ino, os.fsencode(self.path), _IN_ATTRIB | _IN_MODIFY) < 0:
            os.close(ino)
            return None
        self._fd, self._pid = ino, os.getpid()
        return ino

    def drain(self) -> bool:
        """Consume pending events; True if there were any."""
        if self._fd is None or self._pid != os.getpid():
            return False
        woke = False
        while True:
            try:
                data = os.read(self._fd, 4096)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return woke
                raise
            if not data:
                return woke
            woke = True

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
