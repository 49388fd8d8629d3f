"""The local wake-up channel (tasklocks._wake)."""

from __future__ import annotations

import os
import select
import uuid
from pathlib import Path

from tasklocks._wake import Waker


def test_notify_wakes_a_watcher_and_drain_consumes_it() -> None:
    key = f"test-{uuid.uuid4().hex}"
    watcher = Waker(key)
    fd = watcher.fileno()
    try:
        assert fd is not None
        assert select.select([fd], [], [], 0.01)[0] == []  # nothing yet
        Waker(key).notify()
        assert select.select([fd], [], [], 1.0)[0] == [fd]
        assert watcher.drain() is True
        assert watcher.drain() is False
        Waker(f"{key}-other").notify()  # another lock table does not wake us
        assert select.select([fd], [], [], 0.05)[0] == []
    finally:
        watcher.close()
        if watcher.path:
            os.unlink(watcher.path)


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    os.utime(victim, (1_000_000, 1_000_000))
    waker = Waker(f"test-{uuid.uuid4().hex}")
    assert waker.path is not None
    os.symlink(victim, waker.path)
    try:
        assert waker.fileno() is None  # no watch through a link
        waker.notify()  # touches the link at most, never its target
        info = victim.stat()
        assert info.st_mode & 0o777 == 0o600
        assert info.st_mtime == 1_000_000
    finally:
        os.unlink(waker.path)
