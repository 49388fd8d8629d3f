"""Time as tasklocks reads and spends it: durations on the boot clock, pauses by select().

Durations are measured on this host's boot clock (it runs on while a process is stopped or the
machine sleeps); the wall clock is never trusted for a decision. :func:`pause` sleeps through
``select()`` rather than ``time.sleep()``: a process whose clock is faked with libfaketime (the
tests do that to show that a host's clock does not matter) gets EINVAL from ``time.sleep()``,
whose absolute ``clock_nanosleep`` libfaketime mistranslates.
"""

from __future__ import annotations

import select
import time

__all__ = ["clock", "pause"]


def clock() -> float:
    """Seconds on this host's boot clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def pause(seconds: float) -> None:
    """Sleep for ``seconds`` (nothing if it is zero or less)."""
    if seconds > 0:
        select.select([], [], [], seconds)
