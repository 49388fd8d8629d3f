"""A namespace in rows: its document, and a row per lock name beside it (see ``_names.py``).

Every adapter keeps this layout; a dialect supplies the round trips marked abstract (with its
driver's batching: PostgreSQL pipelines, MariaDB multi-statement queries, SQLite's one file).

* ``read``: the document and the names held in their rows, in one statement (one snapshot).
* ``transact``: lock the document's row, then the names held in their rows, and read the sessions
  (one round trip); compute on the document with those holders written into it; claim the names
  the change brings into the document that were in no row it locked (a round trip, only then:
  lock their rows and read their versions; the compute runs again if one handed out a token past
  the version it computed at, so that a name's tokens only grow); set the rows of every name it
  changed (marked while the document keeps it, else free, their version raised to the new
  document version), write the document, commit (one round trip).
  The caller's ``hint`` is not used: a one-statement swap of the document could not lock the
  names' rows.
* ``fast_acquire``/``fast_release`` (``FastPaths``): one name, one statement on its row.
"""

from __future__ import annotations

import sys
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from tasklocks._clock import clock
from tasklocks.errors import StoreError
from tasklocks.names import is_name, validate_name
from tasklocks.store._base import (
    EMPTY_DOCUMENT,
    SCHEMA_VERSION,
    Call,
    Change,
    Compute,
    Snapshot,
    SQLStore,
    _times,
)
from tasklocks.store._names import (
    LAYOUT,
    HeldRow,
    absorb,
    changes,
    is_kept,
    kept,
    shown,
    stored,
)

__all__ = ["RowsStore", "fast_names", "text_of"]


def text_of(value: Any) -> str:
    """A column's text (MySQL returns a VARBINARY column as bytes)."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _held(name: Any, version: Any, lease: Any, record: Any) -> HeldRow:
    return text_of(name), int(version), text_of(lease), text_of(record)


def _taken(claimed: Sequence[Any]) -> list[HeldRow]:
    """The claimed rows (as ``_claim_names`` returns them) held in their row: a lease, no mark."""
    return [_held(*r[:4]) for r in claimed if r[2] is not None and not r[4]]


ROWS_SEEN = 10_000


def fast_names(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each checked."""
    if len(names) == 1:  # the common call
        return [validate_name(names[0])]
    unique = list(dict.fromkeys(validate_name(name) for name in names))
    if not unique:
        raise ValueError("no lock names given")
    return unique


class RowsStore(SQLStore):
    """An adapter of this layout (see the module docstring)."""

    # (namespace, name) of the rows this process took a name in: taken again by their UPDATE
    # alone (name_retake), at most ROWS_SEEN of them remembered (forgotten all at once).
    _rows_seen: set[tuple[str, str]] | None = None
    # Whether a renewed lease's row release may skip the WAL's flush now (PostgreSQL's, while it
    # can tell a crash: see there; every other store's release commits durably).
    _unflushed = False
    # The longest record (in characters) a name's row holds: a longer one (a long note) is
    # kept by the document, through the full path (MySQL's record is a TEXT, 64 KiB).
    ROW_RECORD_MAX = sys.maxsize

    # --- the full path ------------------------------------------------------------------------

    def read(self, namespace: str) -> Snapshot:
        """The document with the names held in their rows written into it, read in one
        statement; its version is the document's (what waiters compare)."""

        def body(conn: Any, call: Call) -> Snapshot:
            rows, times = self._read_kept(conn, namespace)
            if not rows or int(rows[0][0]) != 0:
                self._execute(conn, self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
                rows, times = self._read_kept(conn, namespace)
            if not rows or int(rows[0][0]) != 0:
                raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
            self._known.add(namespace)
            held = [_held(r[2], r[1], r[3], r[4]) for r in rows[1:]]
            text = absorb(shown(text_of(rows[0][2])), held)
            return Snapshot(int(rows[0][1]), text, _times(times), clock())

        return self._locked(body)

    def transact(
        self,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
        names: Sequence[str] | None = None,
    ) -> Snapshot:
        """See ``Store.transact``. Always the locking path (``hint`` is not used): a change
        through the document must lock the names held in their rows, which it may take over.
        With ``names``, only theirs (a name the compute brings in beside them is locked and
        taken over when it claims it)."""
        return self._changing(
            lambda conn, call: self._change_kept(conn, call, namespace, compute, names)
        )

    def _change_kept(
        self,
        conn: Any,
        call: Call,
        namespace: str,
        compute: Compute,
        names: Sequence[str] | None,
    ) -> Snapshot:
        if namespace not in self._known:  # outside the transaction (see _base._pessimistic)
            self._execute(conn, self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
            self._known.add(namespace)
        try:
            only = None if names is None else sorted(set(names))
            locked = self._lock_and_claim(conn, namespace, only) if only else None
            if locked is None:
                row, held_rows, times = self._lock_kept(conn, namespace, only)
                held = [_held(*r) for r in held_rows]
                claimed_rows: Sequence[Any] = []
            else:
                row, claimed_rows, times = locked
                held = _taken(claimed_rows)
            if row is None:
                self._known.discard(namespace)
                raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
            version, data = int(row[0]), str(row[1])
            text = shown(data)
            moved = is_kept(data)
            before = kept(text) if moved else {}  # format 3: none marked yet
            # The grants' token must exceed it, and the last token of every claimed name.
            floor = max([version, *(int(r[1]) for r in claimed_rows)])
            claimed: set[str] = set(only or ()) if locked is not None else set()
            while True:
                merged = absorb(text, held)
                absorbed = {h[0] for h in held}
                top = max([floor, *(h[1] for h in held)])  # a token of theirs is to be exceeded
                unshown = tuple(held) if held and merged is text else ()  # (a corrupt document)
                snap = Snapshot(top, merged, _times(times), clock(), unshown)
                change = compute(snap)
                if change is None:
                    self._commit(conn)
                    return Snapshot(version, merged, snap.sessions, snap.read_at)
                marks = changes(before, kept(change[0]), absorbed)
                new = sorted(set(marks) - before.keys() - absorbed - claimed)
                if is_kept(stored(change[0])) != moved:  # moves (or, repaired, back)
                    marks[LAYOUT] = not moved
                if not new:
                    break
                rows = self._claim_names(conn, namespace, new)
                claimed.update(new)
                # Compute again, on the claimed rows now locked, if one is held in its row (the
                # change did not lock it first, or it was taken since), or if one handed out a
                # token past ``top`` (it left the document and was taken in its row since).
                taken = _taken(rows)
                floor = max([floor, *(int(r[1]) for r in rows)])
                if not taken and floor <= top:
                    break
                held = [*held, *taken]
                if taken:  # their sessions may be younger than those read: read them again
                    times = self._execute(conn, self._sql["sessions"]).fetchall()
            call.sent = True  # the rows are locked: nothing can miss
            self._write_kept(conn, namespace, version, top + 1, change, marks)
            return Snapshot(top + 1, change[0], snap.sessions, snap.read_at)
        except BaseException as exc:
            if not call.sent or self._outcome_known(exc):
                call.sent = False
                self._rollback(conn)
            else:  # interrupted after sending: the connection's state is unknown
                self._abandon_connection()
            raise

    def _upgrade(self, conn: Any, version: int) -> None:
        """Schema 1 (documents alone) to 2 (a row per name beside them): the names table is
        made by ``_schema_extras``; a document moves at its first change (see ``_names``)."""
        self._execute(conn, self._sql["upgrade_meta"], (str(SCHEMA_VERSION), str(version)))

    @abstractmethod
    def _read_kept(self, conn: Any, namespace: str) -> tuple[list[Any], Any]:
        """``select_kept``'s rows (the document's first, if there is one), then the sessions."""

    @abstractmethod
    def _lock_kept(
        self, conn: Any, namespace: str, names: list[str] | None
    ) -> tuple[Any, list[Any], Any]:
        """Begin, lock the document's row, then the names held in their rows (of ``names`` only,
        unless None), then read the sessions (one round trip): the row, the names' rows (name,
        version, lease, record), the sessions' rows."""

    def _lock_and_claim(
        self, conn: Any, namespace: str, names: list[str]
    ) -> tuple[Any, list[Any], Any] | None:
        """Begin, lock the document's row, then claim the rows of ``names`` (as
        ``_claim_names``), then read the sessions, where a dialect can do it in one round trip:
        the row, the claimed rows, the sessions' rows. None: it cannot (two round trips would
        cost a change that claims no name one more)."""
        return None

    @abstractmethod
    def _claim_names(self, conn: Any, namespace: str, names: list[str]) -> list[Any]:
        """Lock the rows of ``names`` (made free where missing): each one's name, version (the
        last token it handed out), lease, record and mark."""

    @abstractmethod
    def _write_kept(
        self,
        conn: Any,
        namespace: str,
        version: int,
        new_version: int,
        change: Change,
        marks: Mapping[str, bool],
    ) -> None:
        """Set the rows of ``marks``, write the document at ``new_version`` and commit (one
        round trip)."""

    # --- FastPaths: a free name taken, and released, in its row -------------------------------

    def fast_acquire(
        self, namespace: str, names: Sequence[str], lease: str, record: str
    ) -> int | None:
        unique = fast_names(names)
        if len(unique) != 1 or not is_name(lease) or len(record) > self.ROW_RECORD_MAX:
            return None  # several names (or a record past the row's size): the full path
        seen, key = self._rows_seen, (namespace, unique[0])
        if seen is None:
            seen = self._rows_seen = set()
        retake = key in seen
        statement = self._name_statement(True, namespace, unique[0], lease, record, retake)
        token = self._fast(True, statement)
        if token is not None and not retake:  # its row exists now, and rows are never deleted
            if len(seen) >= ROWS_SEEN:
                seen.clear()
            seen.add(key)
        return token

    def fast_release(
        self, namespace: str, names: Sequence[str], lease: str, renewed: bool = False
    ) -> int | None:
        unique = fast_names(names)
        if len(unique) != 1 or not is_name(lease):
            return None
        unflushed = renewed and self._unflushed
        statement = self._name_statement(False, namespace, unique[0], lease, unflushed=unflushed)
        return self._fast(False, statement)

    def lost_releases(self, check: bool = False) -> list[tuple[str, str]]:
        """None here: every release is written durably (PostgreSQL's and MariaDB's may not be:
        see there)."""
        return []

    def has_lost(self) -> bool:
        return False

    def flush_releases(self) -> None:
        """Nothing here: every release is written (MariaDB's may be marked: see there)."""

    def _name_statement(
        self,
        acquire: bool,
        namespace: str,
        name: str,
        lease: str,
        record: str = "",
        retake: bool = False,
        unflushed: bool = False,
    ) -> tuple[str, Any]:
        """The statement and (named) parameters of ``name_acquire`` (``name_retake`` for a name
        whose row was seen) or ``name_release`` (``name_release_unflushed``: see ``_unflushed``)."""
        params = {"ns": namespace, "name": name, "lease": lease}
        if acquire:
            sql = self._sql["name_retake" if retake else "name_acquire"]
            return sql, {**params, "record": record}
        return self._sql["name_release_unflushed" if unflushed else "name_release"], params

    @abstractmethod
    def _name_version(self, cursor: Any, acquire: bool) -> int | None:
        """The version (the token) a row statement reports, or None if it changed nothing."""

    def _fast(self, acquire: bool, statement: tuple[str, Any]) -> int | None:
        """Run a one-statement change of a name's row: its version, or None if not applied."""

        def body(conn: Any, call: Call) -> int | None:
            call.sent = True
            version = self._run_name_statement(conn, acquire, statement)
            call.sent = False  # the reply came: the outcome is known
            return version

        return self._changing(body)

    def _run_name_statement(
        self, conn: Any, acquire: bool, statement: tuple[str, Any]
    ) -> int | None:
        """Send a row statement and read its version (a dialect may take a shorter road)."""
        return self._name_version(self._execute(conn, *statement), acquire)
