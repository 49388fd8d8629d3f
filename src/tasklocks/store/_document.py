"""The document alone (SQLite's layout): a namespace is one row, ``(namespace, version, data)``.

A change with a fresh ``hint`` is one statement, an optimistic ``UPDATE ... WHERE version =
<hint> AND data = <hint>``; else, or when that misses, a pessimistic ``BEGIN; SELECT ... FOR
UPDATE`` (on SQLite ``BEGIN IMMEDIATE``) then ``UPDATE; COMMIT``, which cannot miss. After a miss,
hinted calls stay pessimistic until one finds its hint was still the row. (The SQL servers keep a
row per name beside the document: ``_sql_server.py``.)
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from tasklocks._clock import clock
from tasklocks.errors import StoreError
from tasklocks.store._base import (
    EMPTY_DOCUMENT,
    Call,
    Change,
    Compute,
    Snapshot,
    SQLStore,
    _times,
)

__all__ = ["DocumentStore"]


class DocumentStore(SQLStore):
    """An adapter whose namespaces are one row each; a dialect supplies the methods marked
    abstract."""

    _optimistic_ok = True  # was the last hint we could judge still the row?

    @abstractmethod
    def _digest(self, text: str) -> str:
        """What ``check`` and ``update_if`` compare a document by."""

    @abstractmethod
    def _swap(self, conn: Any, ns: str, version: int, change: Change, digest: str) -> bool:
        """The optimistic compare-and-swap (see ``update_if``); True if it happened."""

    @abstractmethod
    def _lock_row(self, conn: Any, namespace: str) -> tuple[Any, Any]:
        """Begin a transaction, lock the namespace's row, then read ``sessions`` (in one round
        trip); the row and the sessions' rows."""

    def _read_row(self, conn: Any, namespace: str) -> tuple[Any, Any]:
        """The namespace's row, then the ``sessions`` rows (in one round trip where it can)."""
        row = self._execute(conn, self._sql["select"], (namespace,)).fetchone()
        return row, self._execute(conn, self._sql["sessions"]).fetchall()

    @abstractmethod
    def _write_and_commit(self, conn: Any, namespace: str, version: int, change: Change) -> None:
        """Write the change to the locked row and commit (in one round trip)."""

    def read(self, namespace: str) -> Snapshot:
        """The current row (created empty, version 0, on first use)."""

        def body(conn: Any, call: Call) -> Snapshot:
            row, times = self._read_row(conn, namespace)
            if row is None:
                self._execute(conn, self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
                row, times = self._read_row(conn, namespace)
            if row is None:
                raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
            self._known.add(namespace)
            return Snapshot(int(row[0]), str(row[1]), _times(times), clock())

        return self._locked(body)

    def transact(self, namespace: str, compute: Compute, hint: Snapshot | None) -> Snapshot:
        """See ``Store.transact``."""

        def body(conn: Any, call: Call) -> Snapshot:
            if hint is not None and self._optimistic_ok and namespace in self._known:
                done = self._optimistic(conn, call, namespace, compute, hint)
                if done is not None:
                    return done
                self._optimistic_ok = False  # contention: stay pessimistic for a while
            return self._pessimistic(conn, call, namespace, compute, hint)

        return self._changing(body)

    def _optimistic(
        self, conn: Any, call: Call, namespace: str, compute: Compute, hint: Snapshot
    ) -> Snapshot | None:
        """Compute on ``hint`` and write in one statement; None if the row had moved on.
        A refusal (compute raising) or "no change" stands only if the hint is still the row."""
        try:
            change = compute(hint)
        except Exception:
            if self._is_current(conn, namespace, hint):
                raise
            return None
        if change is None:
            return hint if self._is_current(conn, namespace, hint) else None
        digest = self._digest(hint.data)
        call.sent = True
        done = self._swap(conn, namespace, hint.version, change, digest)
        call.sent = False  # the reply came: the outcome is known
        return Snapshot(hint.version + 1, change[0], hint.sessions, hint.read_at) if done else None

    def _is_current(self, conn: Any, namespace: str, hint: Snapshot) -> bool:
        row = self._execute(conn, self._sql["check"], (namespace,)).fetchone()
        return row is not None and (int(row[0]), row[1]) == (hint.version, self._digest(hint.data))

    def _pessimistic(
        self, conn: Any, call: Call, namespace: str, compute: Compute, hint: Snapshot | None
    ) -> Snapshot:
        if namespace not in self._known:
            # Outside the transaction, so that it holds nothing but the one row lock (on MySQL
            # an INSERT IGNORE that finds the row takes a shared lock on it, and two such
            # transactions upgrading to FOR UPDATE deadlock:
            # https://dev.mysql.com/doc/refman/8.0/en/innodb-locks-set.html).
            self._execute(conn, self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
            self._known.add(namespace)
        try:
            row, times = self._lock_row(conn, namespace)
            if row is None:
                self._known.discard(namespace)
                raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
            snap = Snapshot(int(row[0]), str(row[1]), _times(times), clock())
            if hint is not None and hint.version == snap.version and hint.data == snap.data:
                self._optimistic_ok = True  # nobody else wrote: try the short path again
            change = compute(snap)
            if change is None:
                self._commit(conn)
            else:
                call.sent = True  # the row is locked: the compare-and-swap cannot miss
                self._write_and_commit(conn, namespace, snap.version, change)
                snap = Snapshot(snap.version + 1, change[0], snap.sessions, snap.read_at)
        except BaseException as exc:
            if not call.sent or self._outcome_known(exc):
                call.sent = False
                self._rollback(conn)
            else:  # interrupted after sending: the connection's state is unknown
                self._abandon_connection()
            raise
        return snap
