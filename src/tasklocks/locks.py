"""LockTable: the compare-and-swap loop, waiting and wake-ups; the only caller of a store."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, TypeVar

from tasklocks import _core
from tasklocks._core import Claimant, Document, Holder
from tasklocks._fastpath import FastPath
from tasklocks._waiting import OnWait, Wait
from tasklocks._wake import Waker
from tasklocks.errors import LockHeld, NotHeld, StoreUnavailable
from tasklocks.names import validate_name, validate_namespace, validate_owner
from tasklocks.owner import (
    Liveness,
    ProcessIdentity,
    current_process,
    default_owner,
    holder_liveness,
    owner_is_dead,
)
from tasklocks.store import FastPaths, OutcomeUnknown, Snapshot, Store, open_store

__all__ = ["THIS_PROCESS", "HeldLock", "Lease", "LockTable", "connect"]

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
    """A held lock as :meth:`LockTable.held` reports it."""

    name: str
    holder: Holder
    liveness: Liveness


class Lease:
    """Locks taken together by one :meth:`LockTable.acquire`; a context manager that releases them.

    ``token`` is the fencing token: strictly increasing across all acquisitions in the namespace.
    """

    def __init__(
        self, table: LockTable, names: tuple[str, ...], owner: str, token: int, lease: str
    ):
        self.table = table
        self.names = names
        self.owner = owner
        self.token = token
        self.lease_id = lease
        self.released = False

    def release(self) -> None:
        """Release every lock of this lease; raises :class:`NotHeld` if one is no longer ours."""
        if self.released:
            raise NotHeld(self.names[0], self.owner, None)
        self.table._release(self.names, self.owner, self.lease_id)
        self.released = True

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
        state = "released" if self.released else "held"
        return f"<Lease {', '.join(self.names)} owner={self.owner} token={self.token} {state}>"


class LockTable:
    """The locks of one namespace in one store.

    Every change reads the namespace's document, computes the new one in pure code
    (:mod:`tasklocks._core`) and writes it only if the row's version is still the one read.
    """

    def __init__(self, store: Store, namespace: str = "default", *, owns_store: bool = False):
        self.store = store
        self.namespace = validate_namespace(namespace)
        self._owns_store = owns_store
        self._snap: Snapshot | None = None
        self._doc: Document = _core.EMPTY
        self._encoder = _core.Encoder()
        self._fast = FastPath(store, self.namespace) if isinstance(store, FastPaths) else None
        self.local_db = store.local  # a local database (SQLite) proves more: see owner.py
        self._waker = Waker(f"{store.url}|{store.table}|{self.namespace}")

    # --- plumbing -----------------------------------------------------------------------------

    def _is_dead(self, holder: Holder) -> bool:
        return owner_is_dead(holder, local_db=self.local_db)

    def _decode(self, snap: Snapshot) -> Document:
        cached = self._snap
        if cached is not None and (
            cached is snap or (cached.version == snap.version and cached.data == snap.data)
        ):
            return self._doc
        doc = _core.decode(snap.data, self.namespace, self._doc)
        self._snap, self._doc = snap, doc
        return doc

    def _change(
        self,
        step: Callable[[Document, int, bool], tuple[Document | None, bool, T]],
        *,
        after_lost_reply: bool = False,
    ) -> T:
        """Run one transition through the store. ``step(doc, version, retrying)`` returns
        (new document or None for no change, wake waiters?, result)."""
        retrying = [after_lost_reply]
        box: list[tuple[Document | None, str | None, bool, T]] = []

        def compute(snap: Snapshot) -> tuple[str, bool] | None:
            box.clear()
            new, wake, result = step(self._decode(snap), snap.version, retrying[0])
            text = None if new is None else self._encoder.encode(new)
            box.append((new, text, wake, result))
            return None if text is None else (text, wake)

        for attempt in range(_LOST_REPLY_RETRIES + 1):
            try:
                snap = self.store.transact(self.namespace, compute, self._snap)
            except OutcomeUnknown:
                if attempt == _LOST_REPLY_RETRIES:
                    raise
                # The write may have been applied: the next attempt re-reads and the step
                # recognises its own work (acquisitions are idempotent by lease id).
                retrying[0] = True
                self._snap = None
                time.sleep(min(0.05 * 2**attempt, 1.0) * (0.5 + secrets.randbelow(100) / 100))
                continue
            new, text, wake, result = box[-1]
            if new is not None and snap.data is text:
                self._snap, self._doc = snap, new
            if text is not None and wake:
                self._waker.notify()
            return result
        raise StoreUnavailable("unreachable")  # pragma: no cover - the loop returns or raises

    def _claimant(
        self, owner: str | None, note: str | None, process: ProcessIdentity | _ThisProcess | None
    ) -> Claimant:
        me = current_process()
        proc = me if isinstance(process, _ThisProcess) else process
        if owner is None:
            if proc is None:
                raise ValueError("an entry without a process needs an explicit owner")
            owner = default_owner(proc)
        owner = validate_owner(owner)
        lease = secrets.token_hex(8)
        if proc is None:
            return Claimant(owner, None, None, None, me.host, None, None, lease, note)
        return Claimant(
            owner, proc.pid, proc.start, proc.boot, proc.host, proc.pidns, proc.pgid, lease, note
        )

    # --- acquiring ----------------------------------------------------------------------------

    def _try_acquire(
        self, names: tuple[str, ...], claimant: Claimant
    ) -> _core.Granted | _core.Refused:
        def step(
            doc: Document, version: int, retrying: bool
        ) -> tuple[Document | None, bool, _core.Granted | _core.Refused]:
            _core.check_not_already_held(doc, names, claimant.owner, lease=claimant.lease)
            outcome = _core.acquire(
                doc, names, claimant, version=version, now=time.time(), is_dead=self._is_dead
            )
            return (outcome.doc if outcome.changed else None), bool(outcome.reaped), outcome

        outcome = self._change(step)
        for name, holder in outcome.reaped.items():
            log.warning(
                "tasklocks: reclaimed %s in namespace %s from dead holder %s (pid %s on %s)",
                name,
                self.namespace,
                holder.owner,
                holder.pid,
                holder.host,
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
    ) -> Lease:
        """Take every one of ``names``, or none of them, atomically.

        :param owner: who holds the locks (default: ``task:<id>`` inside a task, else
            ``pid:<host>:<pid>`` of ``process``).
        :param wait: block until all are free; otherwise raise :class:`LockHeld` at once.
        :param timeout: with ``wait``, give up after this many seconds (:class:`LockTimeout`).
        :param note: free text stored with the locks, shown to those who wait.
        :param on_wait: called once, with ``{name: holder}``, when the call starts waiting.
        :param process: the process the entries belong to: this process by default, another
            local process (:func:`tasklocks.owner.process_identity`), or ``None`` for entries
            that no process death can release (they need an explicit ``owner``).
        :raises LockHeld: a lock is held (also when ``owner`` already holds it: not re-entrant).
        :raises LockTimeout: waiting took longer than ``timeout``.
        :raises BadLockName: a name, or the owner, is not allowed.
        """
        if not names:
            raise ValueError("acquire() needs at least one lock name")
        wanted = tuple(dict.fromkeys(validate_name(n) for n in names))
        claimant = self._claimant(owner, note, process)
        waiting = Wait(self.store, self.namespace, self._waker, self._is_dead, timeout, on_wait)
        while True:
            token = self._fast_acquire(wanted, claimant)
            if token is not None:
                return Lease(self, wanted, claimant.owner, token, claimant.lease)
            outcome = self._try_acquire(wanted, claimant)
            if isinstance(outcome, _core.Granted):
                return Lease(self, wanted, claimant.owner, outcome.token, claimant.lease)
            if not wait:
                raise LockHeld(outcome.blockers)
            waiting.begin(outcome.blockers)
            blockers: Mapping[str, Holder] = outcome.blockers
            while blockers:
                waiting.sleep(self._snap.version if self._snap is not None else 0, blockers)
                token = self._fast_acquire(wanted, claimant)  # one statement, where it can
                if token is not None:
                    return Lease(self, wanted, claimant.owner, token, claimant.lease)
                # Look before the full path: with many waiters, each release wakes them all,
                # and only a write (which queues for the write lock) could tell them no.
                doc = self._decode(self.store.read(self.namespace))
                blockers = {
                    n: doc[n]
                    for n in wanted
                    if n in doc and doc[n].lease != claimant.lease and not self._is_dead(doc[n])
                }

    def _fast_acquire(self, names: tuple[str, ...], claimant: Claimant) -> int | None:
        token = None if self._fast is None else self._fast.acquire(names, claimant, self._snap)
        if token is not None:
            self._snap = None  # written by the database: our copy is old
        return token

    @contextmanager
    def hold(
        self,
        *names: str,
        timeout: float | None = None,
        owner: str | None = None,
        note: str | None = None,
        on_wait: OnWait | None = None,
    ) -> Iterator[Lease]:
        """Wait for ``names`` (up to ``timeout``), hold them in the ``with`` block, then release."""
        lease = self.acquire(
            *names, owner=owner, wait=True, timeout=timeout, note=note, on_wait=on_wait
        )
        with lease:
            yield lease

    # --- releasing ----------------------------------------------------------------------------

    def _release(self, names: tuple[str, ...], owner: str, lease: str | None) -> None:
        fast: bool | None = False  # None: the reply to the one-statement release was lost
        if self._fast is not None and lease is not None:
            fast = self._fast.release(names, lease, self._snap)
        if fast:
            self._snap = None  # written by the database: our copy is old
            self._waker.notify()
            return

        def step(doc: Document, version: int, retrying: bool) -> tuple[Document, bool, None]:
            if retrying:  # a lost reply may have released them already
                gone = [
                    n
                    for n in names
                    if n not in doc
                    or doc[n].owner != owner
                    or (lease is not None and doc[n].lease != lease)
                ]
                if len(gone) == len(names):
                    return doc, False, None
            return _core.release(doc, names, owner, lease=lease), True, None

        self._change(
            lambda doc, v, r: _none_if_same(step(doc, v, r), doc), after_lost_reply=fast is None
        )

    def release(self, *names: str, owner: str | None = None) -> None:
        """Release ``names`` held by ``owner`` (default: this process); all or none.

        :raises NotHeld: a name is not held by ``owner`` (the message names who holds it).
        """
        if not names:
            raise ValueError("release() needs at least one lock name")
        wanted = tuple(dict.fromkeys(validate_name(n) for n in names))
        if owner is None:
            owner = default_owner(current_process())
        self._release(wanted, validate_owner(owner), None)

    def release_owner(self, owner: str) -> list[str]:
        """Release everything ``owner`` holds; return the names released."""
        owner = validate_owner(owner)

        def step(
            doc: Document, version: int, retrying: bool
        ) -> tuple[Document | None, bool, list[str]]:
            new, freed = _core.release_owner(doc, owner)
            return (new if freed else None), True, freed

        return self._change(step)

    def release_all(self) -> list[str]:
        """Release every lock in the namespace (for administrators); return the names."""

        def step(
            doc: Document, version: int, retrying: bool
        ) -> tuple[Document | None, bool, list[str]]:
            new, freed = _core.release_all(doc)
            return (new if freed else None), True, freed

        return self._change(step)

    def reap(self, *, owner: str | None = None) -> dict[str, Holder]:
        """Release every lock whose holder is provably dead (of ``owner`` only, when given:
        a task's cleanup); return what was released."""

        def is_dead(holder: Holder) -> bool:
            return (owner is None or holder.owner == owner) and self._is_dead(holder)

        def step(
            doc: Document, version: int, retrying: bool
        ) -> tuple[Document | None, bool, dict[str, Holder]]:
            new, reaped = _core.reap(doc, is_dead)
            return (new if reaped else None), True, reaped

        reaped = self._change(step)
        level = logging.WARNING if owner is None else logging.INFO
        for name, holder in reaped.items():
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

    def held(self) -> list[HeldLock]:
        """Every held lock, with its holder and whether that holder is alive, dead or unknown."""
        doc = self._decode(self.store.read(self.namespace))
        me = current_process()
        return [
            HeldLock(n, h, holder_liveness(h, me, local_db=self.local_db))
            for n, h in sorted(doc.items())
        ]

    def raw(self) -> Snapshot:
        """The namespace's row as stored (version and document text), even if corrupt."""
        return self.store.read(self.namespace)

    def repair(self) -> Snapshot:
        """Reset the namespace's document to empty, whatever it held; return the old row
        (read in the same atomic change, so nothing taken in between is dropped unseen)."""
        seen: list[Snapshot] = []

        def reset(snap: Snapshot) -> tuple[str, bool]:
            seen[:] = [snap]
            return _core.encode(_core.EMPTY), True

        self.store.transact(self.namespace, reset, None)
        self._snap = None
        self._waker.notify()
        return seen[0]

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store if this table opened it."""
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


def _none_if_same(
    result: tuple[Document, bool, None], doc: Document
) -> tuple[Document | None, bool, None]:
    new, wake, value = result
    return (None if new is doc else new), wake, value


def connect(url: str | None = None, namespace: str = "default") -> LockTable:
    """Open the lock table at ``url`` (default ``$TASKLOCKS_DB``, else the per-user SQLite file).

    :raises BadURL: the URL is malformed.
    :raises StoreUnavailable: the database cannot be reached or its driver is missing.
    """
    return LockTable(open_store(url), namespace, owns_store=True)
