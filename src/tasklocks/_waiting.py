"""Waiting for locks that others hold: one :class:`Wait` per waiting ``acquire``.

A waiter sleeps until the namespace's document changes (the store watches the database), a
release on this host wakes it (:mod:`tasklocks._wake`), or a holder it waits for is proven dead:
a process that dies does not announce it, so that is checked, without any query, every
:data:`DEATH_CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from tasklocks._clock import pause
from tasklocks._core import Holder
from tasklocks._wake import Waker
from tasklocks.errors import LockTimeout, StoreUnavailable
from tasklocks.store import Store

__all__ = ["DEATH_CHECK_INTERVAL", "OnWait", "Wait"]

DEATH_CHECK_INTERVAL = 1.0
OUTAGE_PAUSE = 0.2  # seconds between tries while the database does not answer
EXPIRY_SLACK = 0.02  # seconds past a session's expected expiry before reading it again
OnWait = Callable[[Mapping[str, Holder]], None]


class Wait:
    """The waiting of one ``acquire(wait=True)``: its deadline, its ``on_wait`` callback (called
    once, when it starts waiting), and its sleeps."""

    def __init__(
        self,
        store: Store,
        namespace: str,
        waker: Waker,
        is_dead: Callable[[Holder], bool],
        timeout: float | None,
        on_wait: OnWait | None,
    ) -> None:
        self.store, self.namespace, self.waker, self.is_dead = store, namespace, waker, is_dead
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_wait = on_wait

    def begin(self, blockers: Mapping[str, Holder]) -> None:
        """The first refusal: tell ``on_wait`` who holds the locks (once)."""
        if self.on_wait is not None:
            on_wait, self.on_wait = self.on_wait, None
            on_wait(blockers)

    def outage(self, exc: StoreUnavailable) -> None:
        """The database did not answer: pause, then let the caller try again; raise ``exc``
        once the deadline has passed (the database was down longer than the wait's timeout)."""
        seconds = OUTAGE_PAUSE
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - time.monotonic())
            if seconds <= 0:
                raise exc
        pause(seconds)

    def sleep(self, version: int, blockers: Mapping[str, Holder], expiry: float) -> None:
        """Return when the document may have moved on from ``version``, a blocker is proven
        dead, or the first blocker's session is due to expire (in ``expiry`` seconds, by the
        database's clock when last read: the caller reads again, and the database decides).
        :raises LockTimeout: the deadline passed."""
        wake_fd = self.waker.fileno()  # before wait_for_change checks the version: no lost wake
        expires_at = time.monotonic() + max(0.0, expiry) + EXPIRY_SLACK
        while True:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                raise LockTimeout(self.timeout or 0.0, blockers)
            if now >= expires_at:
                return
            chunk = min(DEATH_CHECK_INTERVAL, expires_at - now)
            if self.deadline is not None:
                chunk = min(chunk, self.deadline - now)
            happened = self.store.wait_for_change(self.namespace, version, chunk, wake_fd)
            if self.waker.drain() or happened:
                return
            if any(self.is_dead(h) for h in blockers.values()):
                return
