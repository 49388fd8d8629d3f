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
import stat
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


def _safe_dir(path: str, *, shared: bool) -> bool:
    """A directory we may create wake files in: a real directory (not a link), owned by root
    or by us; a shared one must be sticky (like /tmp), a private one ours alone."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, os.getuid()):
        return False
    if shared:
        return bool(info.st_mode & stat.S_ISVTX) and os.access(path, os.W_OK | os.X_OK)
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def _wake_dir() -> str | None:
    # One directory shared by every user of the host, so that a root task wakes a user's
    # waiter; if someone else made it unsafe, a private one (wake-ups then stay per user).
    for base in ("/dev/shm", tempfile.gettempdir()):
        path = os.path.join(base, "tasklocks-wake")
        with contextlib.suppress(OSError):
            os.mkdir(path, 0o1777)
            os.chmod(path, 0o1777)  # the umask narrowed mkdir
        if _safe_dir(path, shared=True):
            return path
        private = f"{path}-{os.getuid()}"
        with contextlib.suppress(OSError):
            os.mkdir(private, 0o700)
        if _safe_dir(private, shared=False):
            return private
    return None


class Waker:
    """The wake-up channel of one lock table (database + namespace) on this host."""

    def __init__(self, key: str) -> None:
        directory = _wake_dir()
        # (surrogateescape: a path given on the command line may hold bytes that are not UTF-8.)
        name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = None if directory is None else os.path.join(directory, name)
        self._fd: int | None = None
        self._pid = 0

    def notify(self) -> None:
        """Wake every process on this host that waits on this lock table (cheap: one syscall)."""
        if self.path is not None:
            with contextlib.suppress(OSError):  # no file: nobody has ever waited here
                os.utime(self.path, follow_symlinks=False)

    def fileno(self) -> int | None:
        """A descriptor that becomes readable after the next :meth:`notify` on this host, or
        None where there is no such channel. Create it *before* checking the database, so that a
        release between the check and the wait is not missed."""
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        self._fd = None
        if _inotify_init1 is None or self.path is None:
            return None
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
                created = False
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                if created:  # every user of the lock table may touch it; umask narrowed it
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
