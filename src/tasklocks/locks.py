"""LockTable: the compare-and-swap loop, waiting and wake-ups; the only caller of a store."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from tasklocks import _core, _pid
from tasklocks._clock import clock, pause
from tasklocks._core import EXCLUSIVE, SHARED, Claimant, Holder, LockDoc, Waiter, Want
from tasklocks._session import DEFAULT_TTL, Session, check_ttl
from tasklocks._waiting import Listen, OnWait, Pause, Request, Steps, Wait, Watch
from tasklocks._wake import Waker
from tasklocks.errors import (
    Deadlock,
    LeaseLost,
    LockHeld,
    NotHeld,
    StoreUnavailable,
    StoreUnreachable,
    TasklocksError,
)
from tasklocks.names import (
    validate_name,
    validate_namespace,
    validate_note,
    validate_owner,
    validate_seconds,
)
from tasklocks.owner import (
    Liveness,
    ProcessIdentity,
    current_process,
    default_owner,
    holder_liveness,
    owner_is_dead,
)
from tasklocks.store import Engine, FastPaths, OutcomeUnknown, Snapshot, Store, open_store

__all__ = ["THIS_PROCESS", "HeldLock", "Lease", "LockTable", "QueuedWaiter", "connect"]

log = logging.getLogger("tasklocks")
T = TypeVar("T")


class _ThisProcess:
    def __repr__(self) -> str:
        return "THIS_PROCESS"


THIS_PROCESS: Final = _ThisProcess()
"""Default for ``process=``: lock entries name the calling process (reclaimable once it dies)."""

_LOST_REPLY_RETRIES = 8


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A held lock as :meth:`LockTable.held` reports it: ``expires_in`` is how many seconds its
    holder's session has left by the database's clock (None: the entry has no session)."""

    name: str
    holder: Holder
    liveness: Liveness
    expires_in: float | None = None

    @property
    def shared(self) -> bool:
        """Held shared (with ``limit`` holders at most, when that is not None)."""
        return self.holder.mode == SHARED

    @property
    def limit(self) -> int | None:
        return self.holder.limit


@dataclass(frozen=True, slots=True)
class QueuedWaiter:
    """A waiting acquisition as :meth:`LockTable.waiting` reports it: its place in the
    namespace's queue (1: first), what it wants and how, and who is in its way."""

    position: int
    waiter: Waiter
    liveness: Liveness
    expires_in: float | None
    holders: Mapping[str, tuple[Holder, ...]]  # per wanted name, the holders in its way
    ahead: tuple[Waiter, ...]  # the waiters before it that it waits for

    @property
    def names(self) -> tuple[str, ...]:
        return self.waiter.names

    @property
    def owner(self) -> str:
        return self.waiter.owner

    @property
    def since(self) -> float:
        return self.waiter.since

    @property
    def wants(self) -> tuple[Want, ...]:
        return self.waiter.wants


CLOSE_WAIT = 2.0  # seconds close() gives acquisitions waiting in other threads to give up
_NEVER_LOST = threading.Event()  # the lost event of entries without a session


class Lease:
    """Locks taken together by one :meth:`LockTable.acquire`; a context manager that releases them.

    ``token`` is the fencing token: the version of the write that granted it, so strictly
    increasing for each name (leases granted by one write share it). ``lost`` is set once the
    locks can no longer be trusted to be held: the session that keeps them could not be renewed
    before it expired (see :meth:`check`).
    """

    def __init__(
        self,
        table: LockTable,
        names: tuple[str, ...],
        owner: str,
        token: int,
        lease: str,
        session: Session | None = None,
        wants: tuple[Want, ...] | None = None,
    ):
        self.table = table
        self.names = names
        self._wants = wants  # (None: each name exclusive, made when first asked for)
        self.owner = owner
        self.token = token
        self.lease_id = lease
        self.session = session
        self.released = False
        if session is not None:
            session.hold(lease, owner, names)

    @property
    def wants(self) -> tuple[Want, ...]:
        """What was taken, name by name, and how (exclusive, shared, a limit)."""
        wants = self._wants
        if wants is None:
            wants = self._wants = tuple(Want(n) for n in self.names)
        return wants

    @property
    def lost(self) -> threading.Event:
        """Set (a :class:`threading.Event`) once the lease is lost; never for a lease without
        a session (``process=None``)."""
        return _NEVER_LOST if self.session is None else self.session.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is lost: call it before each step that relies
        on the locks (and pass :attr:`token` to what they protect, see the README).
        :raises TasklocksError: this process is a fork of the lease's (the locks are its)."""
        if self.session is not None and not self.session.alive():
            if self.session.pid != _pid._pid:
                raise self._fork_error()
            raise LeaseLost(self.names, self.owner, self.token, self.session.ttl)

    def _fork_error(self) -> TasklocksError:
        assert self.session is not None
        return TasklocksError(
            f"the lease on {', '.join(self.names)} belongs to process {self.session.pid}; "
            "a forked child can neither check nor release it (its parent does)"
        )

    def release(self) -> None:
        """Release every lock of this lease. :raises NotHeld: one is no longer ours.
        :raises LeaseLost: the lease was lost (what is left of it is given back first; another
        holder's lock is never touched)."""
        if self.released:
            raise NotHeld(self.names[0], self.owner, None, released=", ".join(self.names))
        session = self.session
        if session is not None and session.pid != _pid._pid:
            raise self._fork_error()
        if session is not None and not session.alive():
            self.released = True
            session.released(self.lease_id)
            self.table._give_back(self.lease_id)
            raise LeaseLost(self.names, self.owner, self.token, session.ttl)
        lacks: list[str] = []
        try:
            self.table._release(self.names, self.owner, self.lease_id, lacks)
        except StoreUnreachable:
            self.released = True  # given back as soon as the database answers again
            if session is not None:  # (it expires with the session meanwhile)
                session.released(self.lease_id)
            self.table._orphan(self.lease_id)
            raise
        except NotHeld:
            if session is not None:  # released by others (another process's release_all, say)
                session.released_entries((self.lease_id, n) for n in lacks)
            raise
        self.released = True
        if session is not None:
            session.released(self.lease_id)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "lost" if self.lost.is_set() else "held"
        return f"<Lease {', '.join(self.names)} owner={self.owner} token={self.token} {state}>"


class LockTable:
    """The locks of one namespace in one store.

    Every change reads the namespace's document, computes the new one in pure code
    (:mod:`tasklocks._core`) and writes it only if the row's version is still the one read.
    """

    def __init__(
        self,
        store: Store,
        namespace: str = "default",
        *,
        owns_store: bool = False,
        ttl: float = DEFAULT_TTL,
    ):
        check_ttl(ttl)
        self.store = store
        self.namespace = validate_namespace(namespace)
        self.ttl = ttl
        self._session: Session | None = None
        self._closed = False  # close() was called: no new session
        self._seen: Mapping[str, float] | None = None  # the sessions as last read,
        self._seen_at = 0.0  # when (the boot clock)
        self._unsure: set[str] = set()  # acquisitions in progress whose write may be applied
        self._orphans: set[str] = set()  # leases of failed acquisitions, to give back
        self._queued: set[str] = set()  # leases of acquisitions waiting in the queue now
        # The steps' acquisitions going on now: lease -> the thread that runs them.
        self._running: dict[str, int] = {}
        # Leases taken in their name's own row (FastPaths), each with whether a session of this
        # process renews it (its release may then skip the flush: FastPaths.fast_release).
        self._in_rows: dict[str, bool] = {}
        self._owns_store = owns_store
        self._snap: Snapshot | None = None
        self._doc: LockDoc = _core.EMPTY
        self._encoder = _core.Encoder(compact=True)
        # The one-statement changes in a name's own row (see store/_names.py): taking a free
        # name, and releasing it, without the full path's transaction over the document.
        self._fast: FastPaths | None = store if isinstance(store, FastPaths) else None
        self.local_db = store.local  # a local database (SQLite) proves more: see owner.py
        self._waker = Waker(f"{store.url}|{store.table}|{self.namespace}")

    # --- plumbing -----------------------------------------------------------------------------

    def _is_dead(self, holder: Holder | Waiter) -> bool:
        """Is the holder gone: its session expired by the database's clock, or its process
        provably dead? A session missing from those read expired long ago, except this table's
        own (opened after them, maybe)."""
        return self._expired(holder) or owner_is_dead(holder, local_db=self.local_db)

    def _expired(self, holder: Holder | Waiter) -> bool:
        return self._left(holder) <= 0.0

    def _left(self, holder: Holder | Waiter) -> float:
        """Seconds left to the holder's session (infinite: no session, or none read)."""
        session = self._session
        if holder.session is None or self._seen is None:
            return float("inf")
        if session is not None and holder.session == session.id and session.pid == _pid.pid():
            return session.left if session.alive() else 0.0
        # As the database said when it was read (a session renewed since is not judged by this
        # host's clock: only an expiry the database has seen frees an entry).
        return self._seen.get(holder.session, 0.0)

    def _closed_error(self) -> StoreUnavailable:
        return StoreUnavailable(f"the lock table at {self.store.url} was closed; open it again")

    def _live_session(self) -> Session:
        """This process's session, opened now on first use (or after one was lost)."""
        session = self._session
        if session is None or not session.alive():
            if self._closed:  # (its store may be open: nothing would close a new session)
                raise self._closed_error()
            if session is not None:
                session.close()
            me = current_process()
            session = Session(self.store, self.ttl, default_owner(me), me)
            if self._fast is not None:
                session.on_renewed.append(functools.partial(self._after_renewal, session))
            self._session = session
        return session

    def _after_renewal(self, session: Session, deadline: float) -> None:
        self._regive(session)

    def _regive(self, session: Session, check: bool = False) -> bool:
        """Row releases that a crash of the server undid (``FastPaths.lost_releases``, which a
        renewal or a reconnection finds; ``check``: look now) are given back again, as failed
        acquisitions' leases are: by the session, after this renewal and later ones until the
        database answers, and by this table's next call for its own namespace. Whether there
        were any. (Called from the session's thread after each renewal, and by ``_settle``.)"""
        assert self._fast is not None
        lost = self._fast.lost_releases(check)
        for namespace, lease in lost:
            if namespace == self.namespace:
                self._orphan(lease)
            else:
                session.orphans[namespace, lease] = functools.partial(
                    give_back, self.store, namespace
                )
        return bool(lost)

    def _decode(self, snap: Snapshot) -> LockDoc:
        if snap.sessions is not None:
            self._seen, self._seen_at = snap.sessions, snap.read_at
        cached = self._snap
        if cached is not None and (
            cached is snap or (cached.version == snap.version and cached.data == snap.data)
        ):
            if snap.sessions is not None:
                self._snap = snap  # the same document, its sessions read later
            return self._doc
        doc = _core.decode(snap.data, self.namespace, self._doc)
        self._snap, self._doc = snap, doc
        return doc

    def _change(
        self,
        step: Callable[[LockDoc, int, bool], tuple[LockDoc | None, bool, T]],
        *,
        after_lost_reply: bool = False,
        unsure: str | None = None,
        promote: bool = True,
        names: tuple[str, ...] | None = None,
    ) -> T:
        """Run one transition through the store. ``step(doc, version, retrying)`` returns
        (new document or None for no change, wake waiters?, result). A changed document is
        promoted (waiters that can be granted now are) unless ``promote`` is False (the step did
        it). ``unsure``: the lease id of an acquisition, noted in ``_unsure`` when the reply to
        its write is lost. ``names``: the only names the step concerns beside those the document
        keeps (the store then locks only their rows: ``Store.transact``); None: any."""
        retrying = [after_lost_reply]
        box: list[tuple[LockDoc | None, str | None, bool, T]] = []

        def compute(snap: Snapshot) -> tuple[str, bool] | None:
            box.clear()
            new, wake, result = step(self._decode(snap), snap.version, retrying[0])
            if new is not None and promote and new.queue:
                new, granted, _ = _core.promote(
                    new, version=snap.version, now=time.time(), is_dead=self._is_dead
                )
                wake = wake or bool(granted)
            text = None if new is None else self._encoder.encode(new)
            box.append((new, text, wake, result))
            return None if text is None else (text, wake)

        for attempt in range(_LOST_REPLY_RETRIES + 1):
            if unsure is not None:
                self._unsure.add(unsure)  # until the outcome is known
            try:
                snap = self.store.transact(self.namespace, compute, self._snap, names)
            except OutcomeUnknown:
                if attempt == _LOST_REPLY_RETRIES:
                    raise
                # The write may have been applied: the next attempt re-reads and the step
                # recognises its own work (acquisitions are idempotent by lease id).
                retrying[0] = True
                self._snap = None
                pause(min(0.05 * 2**attempt, 1.0) * (0.5 + secrets.randbelow(100) / 100))
                continue
            if unsure is not None:
                self._unsure.discard(unsure)  # known now: a lost write of it would be seen here
            new, text, wake, result = box[-1]
            if new is not None and snap.data is text:
                self._snap, self._doc = snap, new
            if text is not None and wake:
                self._waker.notify()
            return result
        raise StoreUnavailable("unreachable")  # pragma: no cover - the loop returns or raises

    def _settle(self) -> None:
        """Give back what acquisitions that failed may have left (see ``_give_back``), and
        releases that a crash of the server undid (``_regive``)."""
        if self._fast is not None and self._session is not None:
            self._regive(self._session)
        for lease in list(self._orphans):
            self._give_back(lease)
            if lease in self._orphans:
                return  # the database does not answer: the others wait too

    def _claimant(
        self,
        owner: str | None,
        note: str | None,
        process: ProcessIdentity | _ThisProcess | None,
        session: str = "",
    ) -> Claimant:
        """Who asks: with a process, its ``session`` ("" until an attempt names the live one:
        see ``_acquire``)."""
        me = current_process()
        proc = me if isinstance(process, _ThisProcess) else process
        if proc is not None and not isinstance(proc, ProcessIdentity):
            raise TypeError(
                "process= is THIS_PROCESS, a ProcessIdentity (tasklocks.owner.process_identity) "
                f"or None, not {process!r}"
            )
        if owner is None:
            if proc is None:
                raise ValueError("an entry without a process needs an explicit owner")
            owner = default_owner(proc)
        owner = validate_owner(owner)
        if note is not None:
            validate_note(note)
        lease = os.urandom(8).hex()  # (secrets.token_hex(8), without its three calls)
        if proc is None:  # kept until released: no session
            return Claimant(owner, None, None, None, me.host, None, None, lease, note)
        p = proc
        return Claimant(
            owner, p.pid, p.start, p.boot, p.host, p.pidns, p.pgid, lease, note, session
        )

    # --- acquiring ----------------------------------------------------------------------------

    def _try_acquire(
        self, wanted: tuple[Want, ...], claimant: Claimant, queue: bool
    ) -> _core.Granted | _core.Refused | _core.Queued | _core.Deadlocked:
        names = tuple(w.name for w in wanted)
        ended: list[tuple[str, Holder]] = []  # every attempt's gone holders (gone for good)

        def step(
            doc: LockDoc, version: int, retrying: bool
        ) -> tuple[
            LockDoc | None, bool, _core.Granted | _core.Refused | _core.Queued | _core.Deadlocked
        ]:
            _core.check_not_already_held(
                doc, names, claimant.owner, lease=claimant.lease, is_dead=self._is_dead
            )
            outcome = _core.acquire(
                doc,
                wanted,
                claimant,
                version=version,
                now=time.time(),
                is_dead=self._is_dead,
                queue=queue,
            )
            ended.extend(outcome.reaped)
            wake = bool(outcome.reaped or outcome.dropped) or (  # others may be granted too
                isinstance(outcome, _core.Granted) and outcome.changed and bool(doc.queue)
            )
            return (outcome.doc if outcome.changed else None), wake, outcome

        outcome = self._change(step, unsure=claimant.lease, promote=False, names=names)
        if ended:
            self._ended(ended)
        for name, holder in outcome.reaped:
            log.warning(
                "tasklocks: reclaimed %s in namespace %s from gone holder %s (pid %s on %s)",
                name,
                self.namespace,
                holder.owner,
                holder.pid,
                holder.host,
            )
        for waiter in outcome.dropped:
            log.info(
                "tasklocks: dropped gone waiter %s (pid %s on %s) from the queue of namespace %s",
                waiter.owner,
                waiter.pid,
                waiter.host,
                self.namespace,
            )
        return outcome

    def acquire(
        self,
        *names: str,
        owner: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
        note: str | None = None,
        on_wait: OnWait | None = None,
        process: ProcessIdentity | _ThisProcess | None = THIS_PROCESS,
        shared: bool | Iterable[str] = False,
        limit: int | Mapping[str, int] | None = None,
        watch: Watch | None = None,
    ) -> Lease:
        """Take every one of ``names``, or none of them, atomically.

        Waiting is first come, first served: the call joins the namespace's queue and gets the
        names when no holder and no earlier waiter that wants one of them is in its way.

        :param owner: who holds the locks (default: ``task:<id>`` inside a task, else
            ``pid:<host>:<pid>`` of ``process``).
        :param wait: queue up until all are free; otherwise raise :class:`LockHeld` at once (a
            try never overtakes waiters: free names that others wait for are refused too).
        :param timeout: with ``wait``, give up after this many seconds (:class:`LockTimeout`).
        :param note: free text stored with the locks, shown to those who wait (no lone
            surrogate and no NUL, which PostgreSQL cannot store: a ``ValueError``).
        :param on_wait: called once, with ``{name: holder}``, when the call starts waiting.
        :param process: the process the entries belong to: this process by default, another
            local process (:func:`tasklocks.owner.process_identity`), or ``None`` for entries
            that no process death can release (they need an explicit ``owner``; while it waits,
            its place in the queue belongs to this process).
        :param shared: take all names (True) or these names shared: any number of shared
            holders at once, or one exclusive holder. A waiting exclusive acquisition stops
            later shared ones from overtaking it.
        :param limit: take all names (an int) or these names (``{name: n}``) shared by at most
            ``n`` holders at once (a counted semaphore). Everyone who shares a name must use the
            same limit (:class:`LimitMismatch`).
        :param watch: with ``wait``, called with a :class:`WaitStatus` (place in line, who is in
            the way) when the wait begins, when that changes, and about 4 times a second; an
            exception it raises ends the wait (the place in the queue is given up).
        :raises LockHeld: a lock is held, or others wait for it first (also when ``owner``
            already holds it: not re-entrant).
        :raises LockTimeout: waiting took longer than ``timeout``.
        :raises Deadlock: waiting would never end: the owners it waits for wait for it.
        :raises BadLockName: a name, or the owner, is not allowed.
        """
        timeout = validate_seconds("timeout", timeout)
        tried: Claimant | None = None
        if (
            len(names) == 1
            and shared is False
            and limit is None
            and process is THIS_PROCESS
            and self._fast is not None
        ):
            quick = self._quick_acquire(names[0], owner, note, wait)
            if isinstance(quick, Lease):
                return quick
            tried = quick
        return self._run(
            self._acquiring(
                names, owner, wait, timeout, note, on_wait, process, shared, limit, watch, tried
            )
        )

    def _quick_acquire(
        self, name: str, owner: str | None, note: str | None, wait: bool
    ) -> Lease | Claimant | None:
        """The common call, one exclusive name for this process, taken in the name's row
        without the steps' machinery (``_acquiring``): as cheap as the statement allows, which
        counts when many processes share a machine's cores. A Claimant: its try in the row did
        not take the name (refused, or the reply was lost), and the steps go on with it without
        trying the row again. None: the steps do it all."""
        fast = self._fast
        if self._orphans or not self._doc.plain or fast is None or fast.has_lost():
            return None  # (the steps give back the orphans, and lost releases, first)
        name = validate_name(name)
        session = self._live_session()
        claimant = self._claimant(owner, note, THIS_PROCESS, session.id)
        try:
            token = self._fast_acquire((name,), claimant)  # (a lost reply: None, kept unsure)
        except StoreUnreachable:
            self._unsure.discard(claimant.lease)  # not sent: nothing written
            if wait:
                return claimant  # the steps wait through the outage
            raise
        except BaseException:
            self._undo(claimant.lease)
            self._unsure.discard(claimant.lease)
            raise
        if token is None:
            return claimant  # refused, or unknown: the steps find out (the full path re-reads)
        if not session.alive() or self._closed:  # lost meanwhile, or closed by another thread
            self._give_back(claimant.lease)
            if self._closed:
                raise self._closed_error()
            return None
        return Lease(self, (name,), claimant.owner, token, claimant.lease, session)

    def _run(self, steps: Steps[T]) -> T:
        """Drive an acquisition's steps, sleeping where it asks to (``tasklocks.aio`` awaits
        instead); what the sleep raises is raised inside the steps, which clean up."""
        send: Callable[[Any], Request] = steps.send
        reply: Any = None
        while True:
            try:
                request = send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            send = steps.send
            try:
                if isinstance(request, Pause):
                    pause(request.seconds)
                    reply = False
                else:
                    reply = self._listen(request)
                if self._closed:  # by another thread: the wait gives up its place
                    raise self._closed_error()
            except BaseException as exc:
                if self._closed and isinstance(exc, OSError):  # (its waker's descriptor)
                    exc = self._closed_error()
                send, reply = steps.throw, exc

    def _listen(self, request: Listen) -> bool:
        happened = self.store.wait_for_change(
            self.namespace, request.version, request.timeout, request.wake_fd, pace=request.pace
        )
        return self._waker.drain() or happened

    def _acquiring(
        self,
        names: tuple[str, ...],
        owner: str | None,
        wait: bool,
        timeout: float | None,
        note: str | None,
        on_wait: OnWait | None,
        process: ProcessIdentity | _ThisProcess | None,
        shared: bool | Iterable[str],
        limit: int | Mapping[str, int] | None,
        watch: Watch | None,
        tried: Claimant | None = None,
    ) -> Steps[Lease]:
        """``acquire`` as steps (see ``_run``); ``tried``: the claimant whose try in the row
        ``_quick_acquire`` made (not tried again)."""
        if not names:
            raise ValueError("acquire() needs at least one lock name")
        timeout = validate_seconds("timeout", timeout)  # (tasklocks.aio comes here first)
        wanted = _wants(names, shared, limit)
        claimant = self._claimant(owner, note, process) if tried is None else tried
        waiting = None
        if wait:
            waiting = Wait(
                self._waker,
                self._is_dead,
                timeout,
                on_wait,
                tuple(w.name for w in wanted),
                watch,
            )
        self._settle()
        self._running[claimant.lease] = threading.get_ident()
        try:
            try:
                token, session = yield from self._acquire(wanted, claimant, waiting, tried is None)
            except LockHeld as exc:
                # In the way, a lease of this owner: perhaps its release in the name's row, undone
                # by a crash of the server that no renewal has found yet. Look now; given back,
                # the name may be free.
                mine = any(h.owner == claimant.owner for hs in exc.holders.values() for h in hs)
                session = self._session
                if not mine or self._fast is None or session is None:
                    raise
                if not self._regive(session, check=True) and not self._orphans:
                    raise
                self._settle()
                token, session = yield from self._acquire(wanted, claimant, waiting, False)
            names_ = tuple(w.name for w in wanted)
            return Lease(self, names_, claimant.owner, token, claimant.lease, session, wanted)
        except BaseException:
            self._undo(claimant.lease)
            raise
        finally:
            self._unsure.discard(claimant.lease)
            self._queued.discard(claimant.lease)
            self._running.pop(claimant.lease, None)

    def _undo(self, lease: str) -> None:
        """An acquisition that raised: give back what a write of it may have left."""
        if lease in self._unsure or lease in self._queued:
            with contextlib.suppress(TasklocksError):
                self._give_back(lease)

    def _acquire(
        self,
        wanted: tuple[Want, ...],
        claimant: Claimant,
        waiting: Wait | None,
        try_row: bool = True,
    ) -> Steps[tuple[int, Session | None]]:
        """The token of the acquisition and the session that keeps it; with ``waiting``, queue
        up and wait, and go on waiting while the database does not answer. Each attempt names
        the session alive then: a wait may outlast one (paused, cut off)."""
        session: Session | None = None
        fast = all(w.mode == EXCLUSIVE for w in wanted)
        while True:
            if self._closed:  # by another thread
                raise self._closed_error()
            try:
                if claimant.lease in self._orphans:
                    # Its give-back below (a session lost meanwhile) got no answer: taken again
                    # under this lease, a later give-back would free what the caller holds.
                    self._give_back(claimant.lease)
                    if claimant.lease in self._orphans:
                        raise StoreUnreachable(
                            f"{self.store.url} did not answer the give-back of an acquisition "
                            "whose session was lost"
                        )
                if claimant.session is not None:
                    session = self._live_session()
                    claimant = claimant._replace(session=session.id)
                elif waiting is not None:  # kept without a process, but waits as this one
                    me, live = current_process(), self._live_session()
                    claimant = claimant._replace(
                        waiter_as=Claimant(
                            owner=claimant.owner,
                            pid=me.pid,
                            start=me.start,
                            boot=me.boot,
                            host=me.host,
                            pidns=me.pidns,
                            pgid=None,
                            lease=claimant.lease,
                            note=claimant.note,
                            session=live.id,
                        ),
                    )
                token = None
                if try_row and fast and self._doc.plain and claimant.lease not in self._queued:
                    token = self._fast_acquire(tuple(w.name for w in wanted), claimant)
                try_row = True
                if token is None:
                    token = yield from self._queue_up(wanted, claimant, waiting)
                if token is not None:
                    if self._closed:  # by another thread meanwhile (the caller gives it back)
                        self._queued.add(claimant.lease)
                        raise self._closed_error()
                    if session is None or session.alive():
                        return token, session
                    self._give_back(claimant.lease)  # written under a session lost meanwhile
                    self._queued.discard(claimant.lease)
            except StoreUnreachable as exc:
                if waiting is None or isinstance(exc, OutcomeUnknown):
                    raise
                yield from waiting.outage(exc)  # raises LockTimeout (or this) once time is up

    def _queue_up(
        self, wanted: tuple[Want, ...], claimant: Claimant, waiting: Wait | None
    ) -> Steps[int | None]:
        """One full-path attempt: the token, or None if the caller must try again."""
        outcome = self._try_acquire(wanted, claimant, queue=waiting is not None)
        if isinstance(outcome, _core.Granted):
            return outcome.token
        if isinstance(outcome, _core.Deadlocked):
            raise Deadlock(outcome.cycle, outcome.owners)
        way = outcome.blocked
        if isinstance(outcome, _core.Refused) or waiting is None:
            raise LockHeld(way.blockers, holders=way.holders, queue=way.ahead)
        self._queued.add(claimant.lease)
        waiting.begin(way)
        return (yield from self._wait_in_line(tuple(w.name for w in wanted), claimant, waiting))

    def _wait_in_line(
        self, names: tuple[str, ...], claimant: Claimant, waiting: Wait
    ) -> Steps[int | None]:
        """Sleep until the queued acquisition is granted (by whichever write promoted it): its
        token. None: the full path must run again (one in its way is gone, or its place in the
        queue was lost)."""
        while True:
            way = waiting.way
            in_way: list[Holder | Waiter] = [
                *(h for hs in way.holders.values() for h in hs),
                *way.ahead,
            ]
            elapsed = clock() - self._seen_at  # (a guess of when to read again, nothing more)
            expiry = min((self._left(e) for e in in_way), default=float("inf")) - elapsed
            yield from waiting.sleep(self._snap.version if self._snap is not None else 0, expiry)
            doc = self._decode(self.store.read(self.namespace))
            token = _core.held_token(doc, names, claimant.lease)
            if token is not None:
                return token
            if doc.waiter(claimant.lease) is None:
                self._queued.discard(claimant.lease)
                return None  # dropped from the queue (its session lost, an administrator)
            way = _core.blocked(doc, claimant.lease)
            if not way.holders and not way.ahead:
                return None
            if any(self._is_dead(h) for hs in way.holders.values() for h in hs) or any(
                self._is_dead(w) for w in way.ahead
            ):
                return None  # the full path drops them
            waiting.update(way)

    def _fast_acquire(self, names: tuple[str, ...], claimant: Claimant) -> int | None:
        if self._fast is None:
            return None
        self._unsure.add(claimant.lease)  # until the outcome is known (a reply, a refusal)
        record = _core.claim_record(claimant, time.time())
        try:  # all of them if all are free: the token; None: the full path decides
            token = self._fast.fast_acquire(self.namespace, names, claimant.lease, record)
        except OutcomeUnknown:  # the full path re-reads and recognises the entry if written
            return None
        self._unsure.discard(claimant.lease)
        if token is not None:
            self._snap = None  # written by the database: our copy is old
            self._in_rows[claimant.lease] = claimant.session is not None
        return token

    @contextmanager
    def hold(
        self,
        *names: str,
        timeout: float | None = None,
        owner: str | None = None,
        note: str | None = None,
        on_wait: OnWait | None = None,
        shared: bool | Iterable[str] = False,
        limit: int | Mapping[str, int] | None = None,
        watch: Watch | None = None,
    ) -> Iterator[Lease]:
        """Wait for ``names`` (up to ``timeout``), hold them in the ``with`` block, then release
        (``shared``, ``limit`` and ``watch`` as for :meth:`acquire`)."""
        lease = self.acquire(
            *names,
            owner=owner,
            wait=True,
            timeout=timeout,
            note=note,
            on_wait=on_wait,
            shared=shared,
            limit=limit,
            watch=watch,
        )
        with lease:
            yield lease

    # --- releasing ----------------------------------------------------------------------------

    def _release(
        self, names: tuple[str, ...], owner: str, lease: str | None, lacks: list[str] | None = None
    ) -> None:
        """Release ``names`` of ``owner`` (of ``lease`` only, when given). :raises NotHeld: one
        is not held so (``lacks`` is then set to those ``lease`` holds no more)."""
        if self._orphans:
            self._settle()
        fast: bool | None = False  # None: the reply to the one-statement release was lost
        if self._fast is not None and lease in self._in_rows:
            # Only a lease taken in its row tries its row first: one the document granted is
            # the document's (a try would cost a round trip to miss).
            renewed = self._in_rows.pop(lease)
            try:  # False: the document keeps them (the full path releases them)
                fast = self._fast.fast_release(self.namespace, names, lease, renewed) is not None
            except OutcomeUnknown:
                fast = None
        if fast:
            # Released in the name's own row: no waiter wants it (queuing for a name moves it
            # into the document, and its row release then misses), so there is no one to wake.
            self._snap = None  # written by the database: our copy is old
            return

        def step(doc: LockDoc, version: int, retrying: bool) -> tuple[LockDoc, bool, None]:
            if retrying:  # a lost reply may have released them already
                gone = [
                    n
                    for n in names
                    if not any(
                        h.owner == owner and (lease is None or h.lease == lease)
                        for h in doc.holders(n)
                    )
                ]
                if len(gone) == len(names):
                    return doc, False, None
            try:
                return _core.release(doc, names, owner, lease=lease), True, None
            except NotHeld:
                if lacks is not None:
                    lacks[:] = [n for n in names if all(h.lease != lease for h in doc.holders(n))]
                raise

        self._change(
            lambda doc, v, r: _none_if_same(step(doc, v, r), doc),
            after_lost_reply=fast is None,
            names=names,
        )

    def _give_back(self, lease: str) -> None:
        """Remove every entry of ``lease`` (a lost lease, or an acquisition that raised after
        its write may have been applied). If the database does not answer, it is kept in
        ``_orphans`` and given back on the next contact, by this table or its session's
        renewals; meanwhile it expires with its session."""

        self._in_rows.pop(lease, None)

        def step(doc: LockDoc, version: int, retrying: bool) -> tuple[LockDoc | None, bool, None]:
            new, freed = _core.release_lease(doc, lease)  # a waiter leaving wakes no one, but
            return (None if new is doc else new), bool(freed), None  # whom it lets in (promote)

        try:
            self._change(step)
        except StoreUnavailable:
            self._orphan(lease)
            return
        self._orphans.discard(lease)
        if self._session is not None:  # (given back: the session's renewals need not)
            self._session.orphans.pop((self.namespace, lease), None)

    def _orphan(self, lease: str) -> None:
        """Give ``lease`` back on the next contact with the database (this table's next call,
        or its session's next renewal)."""
        self._orphans.add(lease)
        if self._session is not None:
            self._session.orphans[self.namespace, lease] = self._give_back_later

    def _give_back_later(self, lease: str) -> None:
        """From the session's thread, once the database answers again (no cache touched)."""
        give_back(self.store, self.namespace, lease)
        self._orphans.discard(lease)

    def release(self, *names: str, owner: str | None = None) -> None:
        """Release ``names`` held by ``owner`` (default: this process); all or none.

        :raises NotHeld: a name is not held by ``owner`` (the message names who holds it).
        """
        if not names:
            raise ValueError("release() needs at least one lock name")
        wanted = tuple(dict.fromkeys(validate_name(n) for n in names))
        if owner is None:
            owner = default_owner(current_process())
        owner = validate_owner(owner)
        self._release(wanted, owner, None)
        if self._session is not None:
            self._session.released_names(owner, wanted)

    def _ended(self, entries: Iterable[tuple[str, Holder]]) -> None:
        """``entries`` were released otherwise than through their leases or by owner: the
        session's live leases among them hold their names no more."""
        if self._session is not None:
            self._session.released_entries((holder.lease, name) for name, holder in entries)

    def release_owner(self, owner: str) -> list[str]:
        """Release everything ``owner`` holds and take its waiters out of the queue; return the
        names released."""
        owner = validate_owner(owner)
        self._settle()

        def step(
            doc: LockDoc, version: int, retrying: bool
        ) -> tuple[LockDoc | None, bool, list[str]]:
            new, freed = _core.release_owner(doc, owner)
            return (None if new is doc else new), True, freed

        freed = self._change(step)
        if self._session is not None:
            self._session.released_names(owner)
        return freed

    def release_all(self) -> list[str]:
        """Release every lock in the namespace and empty its queue (for administrators); return
        the names released. A lease it releases is not lost: its ``release()`` raises
        :class:`NotHeld`."""
        ended: list[tuple[str, Holder]] = []  # every attempt's: gone from the document now

        def step(
            doc: LockDoc, version: int, retrying: bool
        ) -> tuple[LockDoc | None, bool, list[str]]:
            new, freed = _core.release_all(doc)
            ended.extend(doc.entries())
            return (new if freed or doc.queue else None), True, freed

        freed = self._change(step)
        self._ended(ended)
        return freed

    def reap(self, *, owner: str | None = None) -> list[tuple[str, Holder]]:
        """Release every lock whose holder is provably dead, and drop such waiters from the queue
        (of ``owner`` only, when given, and of the owners it heads, such as ``task:7:aio-1`` of
        ``task:7``: a task's cleanup); return the (name, holder) pairs released."""
        self._settle()
        family = None if owner is None else owner + ":"

        def is_dead(entry: Holder | Waiter) -> bool:
            ours = family is None or entry.owner == owner or entry.owner.startswith(family)
            return ours and self._is_dead(entry)

        ended: list[tuple[str, Holder]] = []  # every attempt's: the dead stay dead

        def step(
            doc: LockDoc, version: int, retrying: bool
        ) -> tuple[LockDoc | None, bool, list[tuple[str, Holder]]]:
            new, reaped = _core.reap(doc, is_dead)
            ended.extend(reaped)
            return (None if new is doc else new), True, list(reaped)

        reaped = self._change(step)
        self._ended(ended)
        level = logging.WARNING if owner is None else logging.INFO
        for name, holder in reaped:
            log.log(
                level,
                "tasklocks: reaped %s in namespace %s from dead holder %s (pid %s on %s)",
                name,
                self.namespace,
                holder.owner,
                holder.pid,
                holder.host,
            )
        return reaped

    # --- looking ------------------------------------------------------------------------------

    def _liveness(
        self, entry: Holder | Waiter, me: ProcessIdentity
    ) -> tuple[Liveness, float | None]:
        liveness = holder_liveness(entry, me, local_db=self.local_db)
        left = self._left(entry)
        if liveness is not Liveness.DEAD and left <= 0.0:
            liveness = Liveness.EXPIRED
        return liveness, None if left == float("inf") else max(0.0, left)

    def held(self) -> list[HeldLock]:
        """Every held lock (a shared name once per holder), with its holder and whether that
        holder is ``alive``, ``dead``, ``unknown`` (on another host, or no process: an explicit
        owner's) or ``expired`` (its session, by the database's clock), and how long its session
        has left."""
        self._settle()
        doc = self._decode(self.store.read(self.namespace))
        me = current_process()
        found = []
        for name, holder in sorted(doc.entries(), key=lambda e: (e[0], e[1].since)):
            liveness, expires_in = self._liveness(holder, me)
            found.append(HeldLock(name, holder, liveness, expires_in))
        return found

    def waiting(self) -> list[QueuedWaiter]:
        """The namespace's queue in order: each waiting acquisition with what it wants, its
        liveness (as :meth:`held` judges holders), and who is in its way."""
        self._settle()
        doc = self._decode(self.store.read(self.namespace))
        me = current_process()
        found = []
        for i, waiter in enumerate(doc.queue):
            liveness, expires_in = self._liveness(waiter, me)
            way = _core.blocked(doc, waiter.lease)
            found.append(QueuedWaiter(i + 1, waiter, liveness, expires_in, way.holders, way.ahead))
        return found

    def raw(self) -> Snapshot:
        """The namespace's row as stored (version and document text), even if corrupt."""
        return self.store.read(self.namespace)

    def repair(self) -> Snapshot:
        """Reset the namespace's document to empty, whatever it held; return the old row
        (read in the same atomic change, so nothing taken in between is dropped unseen)."""
        seen: list[Snapshot] = []
        # Every lease live under the session now was granted before the reset, which removes
        # it (whether the document can be read or not).
        session = self._session
        live = () if session is None else tuple(session.live)

        def reset(snap: Snapshot) -> tuple[str, bool]:
            seen[:] = [snap]
            return self._encoder.encode(_core.EMPTY), True

        self.store.transact(self.namespace, reset, None)
        self._snap = None
        self._waker.notify()
        if session is not None:
            for lease in live:
                session.released(lease)
        return seen[0]

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop renewing this table's session (locks it still holds are kept until it expires,
        ``ttl`` to ``ttl + ttl/3`` seconds after its last renewal) and close the store if this
        table opened it. Acquisitions going on in other threads give up (see the README)."""
        self._closed = True
        me = threading.get_ident()  # (an on_wait callback may call close(): not waited for)
        if any(t != me for t in self._running.values()):  # woken, they see _closed, give up
            self._waker.notify()
            deadline = clock() + CLOSE_WAIT
            while any(t != me for t in list(self._running.values())) and clock() < deadline:
                pause(0.01)
        for lease in list(self._queued):  # (still waiting: give their places back for them,
            with contextlib.suppress(TasklocksError):  # while the store is open)
                self._give_back(lease)
        session = self._session
        if self._fast is not None and session is not None:
            # Releases not written yet (MariaDB's marked ones) are written, and those a lost
            # connection undid given back (other namespaces' too), while the store is open:
            # the session that would give them back stops here.
            try:
                self._fast.flush_releases()
                self._settle()
                for key, give_back_ in list(session.orphans.items()):
                    give_back_(key[1])
                    session.orphans.pop(key, None)
            except TasklocksError:
                pass  # the database does not answer: the session's expiry frees them
        if session is not None:
            session.close()
            self._session = None
        self._waker.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> LockTable:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _wants(
    names: tuple[str, ...],
    shared: bool | Iterable[str],
    limit: int | Mapping[str, int] | None,
) -> tuple[Want, ...]:
    """What ``acquire(*names, shared=..., limit=...)`` asks for, one :class:`Want` per name."""
    wanted = tuple(dict.fromkeys(validate_name(n) for n in names))
    if isinstance(shared, bool):
        shared_names = set(wanted) if shared else set()
    elif isinstance(shared, str):
        shared_names = {validate_name(shared)}
    elif isinstance(shared, Iterable):
        shared_names = {validate_name(n) for n in shared}
    else:
        raise TypeError(f"shared= is True, False or lock names, not {shared!r}")
    if limit is None:
        limits: dict[str, int] = {}
    elif isinstance(limit, Mapping):
        limits = {validate_name(n): v for n, v in limit.items()}
    else:
        limits = dict.fromkeys(wanted, limit)
    for value in limits.values():
        if type(value) is not int or value < 1:
            raise ValueError(f"a limit must be a whole number of at least 1, not {value!r}")
    stray = sorted((shared_names | set(limits)) - set(wanted))
    if stray:
        raise ValueError(
            f"shared= or limit= names {', '.join(stray)}, which is not among the lock names; "
            "add it to the names"
        )
    return tuple(
        Want(n, SHARED, limits.get(n)) if n in shared_names or n in limits else Want(n)
        for n in wanted
    )


def give_back(store: Store, namespace: str, lease: str) -> None:
    """Remove every entry of ``lease`` from a namespace (pure, no cache: any thread)."""

    def compute(snap: Snapshot) -> tuple[str, bool] | None:
        doc = _core.decode(snap.data, namespace)
        new, _ = _core.release_lease(doc, lease)
        if new is doc:
            return None
        new, _, _ = _core.promote(new, version=snap.version, now=time.time())
        return _core.encode(new, compact=True), True

    store.transact(namespace, compute, None)


def _none_if_same(
    result: tuple[LockDoc, bool, None], doc: LockDoc
) -> tuple[LockDoc | None, bool, None]:
    new, wake, value = result
    return (None if new is doc else new), wake, value


def connect(
    url: str | Engine | None = None,
    namespace: str = "default",
    *,
    ttl: float = DEFAULT_TTL,
    reconnect_timeout: float = 5.0,
) -> LockTable:
    """Open the lock table at ``url`` (default ``$TASKLOCKS_DB``, else the per-user SQLite file),
    or in the database of a SQLAlchemy ``Engine``, whose pool then lends tasklocks a connection
    for each call (PostgreSQL through psycopg 3, MariaDB/MySQL through PyMySQL; see the README).

    :param ttl: seconds a process's locks outlive its last renewal at least (they are renewed
        every ``ttl/3``, and expire ``ttl + ttl/3`` seconds after the last renewal): about how
        long a dead, hung or cut-off host keeps them; 1 s to a day.
    :param reconnect_timeout: seconds each call keeps trying to reach a database server that
        does not answer before it raises :class:`StoreUnavailable` (a waiting ``acquire`` goes on
        waiting through an outage, until its own ``timeout``).
    :raises BadURL: the URL is malformed.
    :raises StoreUnavailable: the database cannot be reached or its driver is missing.
    :raises ValueError: ``ttl`` is out of range.
    """
    store = open_store(url, reconnect_timeout=reconnect_timeout)
    try:
        return LockTable(store, namespace, owns_store=True, ttl=ttl)
    except BaseException:
        store.close()
        raise
