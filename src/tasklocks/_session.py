"""Sessions: what keeps a process's locks, renewed in the background, expiring by the database's
clock (etcd's session, ZooKeeper's; see docs/architecture.md).

A :class:`Session` is one row of ``<table>_sessions``, opened with the first lock a process takes
through a lock table. A thread renews it every ``ttl/3`` seconds: the database pushes its expiry to
``ttl + ttl/3`` seconds (its :attr:`Session.lifetime`) from *its* now, so that a holder that dies
at any moment keeps its locks for ``ttl`` at least and ``ttl + ttl/3`` at most; an expired session
is never renewed again. The lock entries name the session; anyone may take them once it has
expired (``Snapshot.sessions`` says so). A second thread, the watchdog, sets :attr:`Session.lost`
when ``lifetime`` seconds have passed since the last renewal that succeeded was *sent* (measured
on this host's boot clock, whose rate is all that matters): the database cannot have expired it
before then, so ``lost`` is set no later than the expiry, even if this process was paused, hung
or cut off from the database meanwhile.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Collection, Iterable
from time import CLOCK_BOOTTIME
from time import clock_gettime as _boot_clock

from tasklocks import _pid
from tasklocks._clock import clock
from tasklocks.errors import StoreError
from tasklocks.owner import ProcessIdentity
from tasklocks.store import Store

__all__ = ["DEFAULT_TTL", "MAX_TTL", "MIN_TTL", "Session", "check_ttl", "margin"]

DEFAULT_TTL = 30.0
MIN_TTL = 1.0
MAX_TTL = 86400.0  # a day: the expiry and the renewal thread's waits stay in range


def check_ttl(ttl: float) -> float:
    """``ttl`` if it is a session's ttl tasklocks accepts. :raises ValueError: it is not."""
    number = isinstance(ttl, int | float) and not isinstance(ttl, bool)
    if not number or not MIN_TTL <= ttl <= MAX_TTL:  # (NaN is out of the range too)
        raise ValueError(
            f"ttl must be {MIN_TTL:g} to {MAX_TTL:g} seconds, not {ttl!r}; locks that outlive "
            "every process need no session: acquire them with process=None"
        )
    return ttl


RETRY = 0.5  # seconds between renewals while the database does not answer


def margin(lifetime: float) -> float:
    """How much sooner than the database this process assumes its session expired: the
    database's clock may run a little fast (NTP slews by 500 ppm) or be read coarsely."""
    return max(0.05, lifetime / 100)


class Session:
    """One session of this process in one store (see the module docstring)."""

    def __init__(self, store: Store, ttl: float, owner: str, me: ProcessIdentity) -> None:
        self.store = store
        self.ttl = ttl
        self.lifetime = ttl + ttl / 3  # from one renewal to the expiry
        self.id = secrets.token_hex(8)
        self.pid = me.pid
        self.lost = threading.Event()
        self._lost = False  # lost.is_set(), read without a call: only _lose sets either
        sent = clock()
        store.open_session(self.id, owner, me.host, me.pid, self.lifetime)
        # The database cannot expire it before sent + lifetime: give up a little sooner.
        self.deadline = sent + self.lifetime - margin(self.lifetime)
        self._closed = threading.Event()
        self.closing = False  # _closed.is_set(), read without a call
        self._renewed = threading.Event()  # wakes the watchdog (a later deadline, or closed)
        # The leases taken under this session and not released: id -> (owner, names still
        # held). Once it is closed and none is left, nothing can be lost and the watchdog ends.
        self.live: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._losing = threading.Lock()
        self.on_lost: list[Callable[[], None]] = []  # called once, from a thread of the session
        self.on_renewed: list[Callable[[float], None]] = []  # with the new deadline
        # (namespace, lease) -> give it back: what failed acquisitions may have left
        self.orphans: dict[tuple[str, str], Callable[[str], None]] = {}
        self._settling = threading.Lock()
        self._watching = True  # a watchdog runs (changed under _losing once closing)
        self.threads = tuple(
            threading.Thread(target=target, name=f"tasklocks-{name}", daemon=True)
            for target, name in ((self._renew, "renew"), (self._watch, "watch"))
        )
        for thread in self.threads:
            thread.start()

    @property
    def left(self) -> float:
        """Seconds until the deadline (zero or less: lost)."""
        return self.deadline - clock()

    def alive(self) -> bool:
        """Whether the session still holds (False: lost, or this process is a fork of its
        owner). The session's own threads set :attr:`lost`; a deadline found passed here wakes
        its watchdog at once."""
        if self.deadline - _boot_clock(CLOCK_BOOTTIME) <= 0:  # (clock(), without its call)
            self._renewed.set()
            return False
        return not self._lost and self.pid == _pid._pid

    def _lose(self) -> None:
        with self._losing:
            if self.lost.is_set():
                return
            self._lost = True
            self.lost.set()
        for callback in self.on_lost:
            callback()

    def _renew(self) -> None:
        due = clock() + self.ttl / 3
        while not self._closed.wait(max(0.0, due - clock())):
            if self.lost.is_set():
                return
            sent = clock()
            try:
                kept = self.store.renew_session(self.id)
            except StoreError:  # unreachable for now: try again soon, the watchdog keeps time
                due = clock() + RETRY
                continue
            if not kept:  # expired by the database's clock: it never comes back
                self._lose()
                return
            self.deadline = sent + self.lifetime - margin(self.lifetime)
            self._renewed.set()
            for callback in self.on_renewed:
                callback(self.deadline)
            due = sent + self.ttl / 3
            if self.orphans and not self._settling.locked():  # never keeps renewals waiting
                threading.Thread(target=self._settle, name="tasklocks-settle", daemon=True).start()

    def _settle(self) -> None:
        """The database answers: give back what failed acquisitions may have left."""
        with self._settling:
            for key, give_back in list(self.orphans.items()):
                try:
                    give_back(key[1])
                except StoreError:
                    return  # next time
                self.orphans.pop(key, None)

    def _watch(self) -> None:
        while True:
            if self.closing and not self.live:
                with self._losing:
                    if not self.live:  # (hold() starts another if one comes after all)
                        self._watching = False
                        return
            if self.left <= 0:
                self._lose()
                return
            self._renewed.wait(self.left)
            self._renewed.clear()

    def hold(self, lease: str, owner: str, names: tuple[str, ...]) -> None:
        """``lease`` (``owner``'s, of ``names``) is held under this session now (an acquisition
        that ended after :meth:`close` too: a watchdog sets :attr:`lost` at its expiry)."""
        self.live[lease] = (owner, names)
        if self.closing:
            with self._losing:
                if not self._watching:
                    self._watching = True
                    thread = threading.Thread(target=self._watch, name="tasklocks-watch")
                    thread.daemon = True
                    self.threads = (self.threads[0], thread)
                    thread.start()

    def released(self, lease: str) -> None:
        """``lease`` is no longer held under this session (a closed one's watchdog may end)."""
        self.live.pop(lease, None)
        if self.closing:
            self._renewed.set()

    def released_names(self, owner: str, names: tuple[str, ...] | None = None) -> None:
        """``owner``'s ``names`` (None: all of them) were released by name, not through their
        leases: a lease none of whose names is left is released too."""
        for lease, (holder, held) in list(self.live.items()):
            if holder == owner:
                self._drop(lease, held if names is None else names)

    def released_entries(self, entries: Iterable[tuple[str, str]]) -> None:
        """These ``(lease, name)`` entries were released neither through their leases nor by
        their owner (``release_all``, ``reap``, an acquisition that took a name over from a
        gone holder): a lease none of whose names is left is released too. Entries of leases
        not live under this session are ignored."""
        for lease, name in entries:
            self._drop(lease, (name,))

    def _drop(self, lease: str, names: Collection[str]) -> None:
        entry = self.live.get(lease)
        if entry is None:
            return
        left = tuple(n for n in entry[1] if n not in names)
        if left:
            self.live[lease] = (entry[0], left)
        else:
            self.released(lease)

    def close(self) -> None:
        """Stop renewing. What the session still keeps (its :attr:`live` leases) stays kept
        until it expires, and the watchdog still sets :attr:`lost` then; once nothing is left
        (at once, if nothing was), the watchdog ends too, and no thread of the session is left
        (a process that opens a table per request does not collect them)."""
        self.closing = True
        self._closed.set()
        self._renewed.set()
