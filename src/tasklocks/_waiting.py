"""Waiting for locks that others hold: one :class:`Wait` per waiting ``acquire``.

A waiter has its place in the namespace's queue (see :mod:`tasklocks._core`). It sleeps until the
namespace's document changes (the store watches the database), a release on this host wakes it
(:mod:`tasklocks._wake`), or one in its way (a holder, a waiter ahead) is proven dead: a process
that dies does not announce it, so that is checked, without any query, every
:data:`DEATH_CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import TypeVar

from tasklocks._core import Blocked, Holder, Waiter
from tasklocks._wake import Waker
from tasklocks.errors import LockTimeout, StoreUnavailable, describe_way, ordinal

__all__ = [
    "DEATH_CHECK_INTERVAL",
    "Listen",
    "OnWait",
    "Pause",
    "Request",
    "Steps",
    "Wait",
    "WaitStatus",
    "Watch",
]

DEATH_CHECK_INTERVAL = 1.0
WATCH_INTERVAL = 0.25  # a watch callback hears from a wait at least this often (seconds)
OUTAGE_PAUSE = 0.2  # seconds between tries while the database does not answer
EXPIRY_SLACK = 0.02  # seconds past a session's expected expiry before reading it again
OnWait = Callable[[Mapping[str, Holder]], None]


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """Where a waiting ``acquire`` stands: its place in line (1: only holders are in its way),
    the holders in its way per name, and the waiters ahead of it."""

    names: tuple[str, ...]
    position: int
    holders: Mapping[str, tuple[Holder, ...]]
    ahead: tuple[Waiter, ...]
    since: float  # when it began waiting (epoch seconds)

    def describe(self) -> str:
        """``waiting for app_task:blog, 2nd in line; app_task:blog is held by task:12 (pid 4711
        on web-1) since 10:02:11; 1 waiter is ahead in the queue: ...``"""
        text = f"waiting for {', '.join(self.names)}, {ordinal(self.position)} in line"
        way = describe_way(self.holders, self.ahead)
        return f"{text}; {way}" if way else text


Watch = Callable[[WaitStatus], None]


@dataclass(frozen=True, slots=True)
class Pause:
    """A waiting ``acquire`` asks its driver to sleep ``seconds`` (the database did not answer)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Listen:
    """A waiting ``acquire`` asks its driver to wait up to ``timeout`` seconds for the namespace
    to move on from ``version`` (see ``Store.wait_for_change``) or for a local wake-up on
    ``wake_fd``; the driver answers True if one came (it drains ``wake_fd`` itself)."""

    version: int
    timeout: float
    wake_fd: int | None
    pace: bool


Request = Pause | Listen
# An acquisition as a generator: it runs its database steps itself and yields where it would
# sleep, so that one driver blocks (LockTable) and another awaits (tasklocks.aio).
T = TypeVar("T")
Steps = Generator[Request, bool, T]


class Wait:
    """The waiting of one ``acquire(wait=True)``: its deadline, its ``on_wait`` callback (called
    once, when it starts waiting), its ``watch`` callback (called when it starts waiting, when its
    place or who is in its way changes, and at least every :data:`WATCH_INTERVAL` seconds; what it
    raises ends the wait), and its sleeps: it yields a :class:`Listen` or :class:`Pause` where it
    would sleep, and its driver sleeps (see ``LockTable._run``)."""

    def __init__(
        self,
        waker: Waker,
        is_dead: Callable[[Holder | Waiter], bool],
        timeout: float | None,
        on_wait: OnWait | None,
        names: tuple[str, ...] = (),
        watch: Watch | None = None,
    ) -> None:
        self.waker, self.is_dead = waker, is_dead
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_wait = on_wait
        self.names = names
        self.watch = watch
        self.way = Blocked({}, ())
        self.began: float | None = None
        self._told: tuple[object, ...] | None = None
        self._moved = True  # the holders in the way changed since the last sleep
        self._told_at = 0.0

    def begin(self, way: Blocked) -> None:
        """The acquisition is queued: tell ``on_wait`` who holds the locks (once), ``watch``
        where it stands."""
        if self.began is None:
            self.began = time.time()
        if self.on_wait is not None:
            on_wait, self.on_wait = self.on_wait, None
            on_wait(way.blockers)
        self.update(way)

    def update(self, way: Blocked) -> None:
        """What is in the way now; ``watch`` hears of it if it changed."""
        self.way = way
        key = (
            way.position,
            tuple((n, tuple(h.lease for h in hs)) for n, hs in sorted(way.holders.items())),
            tuple(w.lease for w in way.ahead),
        )
        if self._told is None or key[1] != self._told[1]:
            self._moved = True  # new holders in the way: poll (where polled) fast again
        if key != self._told:
            self._told = key
            self._tell()

    def status(self) -> WaitStatus:
        way = self.way
        return WaitStatus(self.names, way.position, way.holders, way.ahead, self.began or 0.0)

    def _tell(self) -> None:
        self._told_at = time.monotonic()
        if self.watch is not None:
            self.watch(self.status())

    def _tick(self) -> None:
        if self.watch is not None and time.monotonic() - self._told_at >= WATCH_INTERVAL:
            self._tell()

    def outage(self, exc: StoreUnavailable) -> Generator[Request, bool, None]:
        """The database did not answer: pause, then let the caller try again; raise ``exc``
        once the deadline has passed (the database was down longer than the wait's timeout)."""
        seconds = OUTAGE_PAUSE
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - time.monotonic())
            if seconds <= 0:
                raise exc
        yield Pause(seconds)
        self._tick()

    def timed_out(self) -> LockTimeout:
        way = self.way
        return LockTimeout(self.timeout or 0.0, way.blockers, holders=way.holders, queue=way.ahead)

    def sleep(self, version: int, expiry: float) -> Generator[Request, bool, None]:
        """Return when the document may have moved on from ``version``, one in the way is
        proven dead, or the first session in the way is due to expire (in ``expiry`` seconds, by
        the database's clock when last read: the caller reads again, and the database decides).
        :raises LockTimeout: the deadline passed."""
        wake_fd = self.waker.fileno()  # before wait_for_change checks the version: no lost wake
        expires_at = time.monotonic() + max(0.0, expiry) + EXPIRY_SLACK
        in_way: list[Holder | Waiter] = [
            *chain.from_iterable(self.way.holders.values()),
            *self.way.ahead,
        ]
        while True:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                raise self.timed_out()
            if now >= expires_at:
                return
            chunk = min(DEATH_CHECK_INTERVAL, expires_at - now)
            if self.watch is not None:
                chunk = min(chunk, WATCH_INTERVAL)
            if self.deadline is not None:
                chunk = min(chunk, self.deadline - now)
            happened = yield Listen(version, chunk, wake_fd, not self._moved)
            self._moved = False
            if happened:
                return
            self._tick()
            if any(self.is_dead(e) for e in in_way):
                return
