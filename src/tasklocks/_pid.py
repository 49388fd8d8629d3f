"""This process's id, kept rather than asked for: ``os.getpid()`` is a system call each time, and
the hot paths ask whether they still run in the process that opened a session or a connection
several times a change. ``os.register_at_fork`` renews it in a child of ``os.fork()`` (and of
``multiprocessing``'s fork start method), before any of our code runs there. The hottest paths
(a session's ``alive``, a server store's call) read ``_pid._pid`` itself: one call fewer."""

from __future__ import annotations

import os

__all__ = ["pid"]

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """``os.getpid()``, without the system call."""
    return _pid
