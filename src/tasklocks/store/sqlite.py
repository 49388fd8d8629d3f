"""SQLite adapter (standard library): the embedded default, safe for many processes on one host.

* WAL mode, so readers never block the writer and waiters can watch ``PRAGMA data_version``
  (https://www.sqlite.org/pragma.html#pragma_data_version: it changes when *another* connection
  commits), a read of shared memory rather than of the table.
* ``synchronous=NORMAL``: in WAL mode a commit then survives a crash of any process, and a
  power loss cannot corrupt the database
  (https://www.sqlite.org/pragma.html#pragma_synchronous); a power loss may only forget the last
  commits. Every holder of an SQLite lock table lives on this host and dies with it; after the
  reboot its entries carry an old boot id, which proves them dead, so a forgotten acquire or
  release costs nothing. FULL would add an fsync to every change.
* Every change is ``BEGIN IMMEDIATE; SELECT; UPDATE ... WHERE version = ?; COMMIT`` in one call. The
  write lock is taken up front, so a change never fails its compare-and-swap, and nothing is held
  between calls. SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries; we retry
  ourselves with short jittered sleeps instead, which keeps hand-offs in the sub-millisecond range.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.store import (
    EMPTY_DOCUMENT,
    SCHEMA_VERSION,
    TASK_COLUMNS,
    TASK_FIELDS,
    Compute,
    ParsedURL,
    Snapshot,
    TaskRow,
    TaskValue,
    check_table_name,
    task_filter,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
BUSY_DEADLINE = 60.0  # seconds a change may wait for SQLite's write lock before giving up


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class SQLiteStore:
    """A lock table in one SQLite file."""

    local = True  # every holder runs on this machine (see owner.process_liveness)

    def __init__(self, parsed: ParsedURL, *, table: str) -> None:
        self.table = check_table_name(table)
        self.path = parsed.path
        self.url = "sqlite:///" + os.path.realpath(parsed.path)  # one name per file (wake-ups)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._known: set[str] = set()
        self._tasks_ready = False
        self._optimistic_ok = True
        self._gate_fd: int | None = None
        self._gate_pid = 0
        with self._lock:
            self._connect()

    # --- connection ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        path = Path(self.path)
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(
                str(path), timeout=0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(
                f"cannot open the SQLite lock table {self.path!r}: {exc}; "
                "check the path and its permissions"
            ) from exc
        self._conn = conn
        self._pid = os.getpid()
        self._gate_fd = self._open_gate()
        self._known = set()
        self._tasks_ready = False
        try:
            mode = self._retry(lambda c: c.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"SQLite refused WAL mode for {self.path!r} (got {mode}); "
                    "put the lock table on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            version = self._retry(self._create_schema)
        except BaseException:
            self._conn = None
            conn.close()
            raise
        if version > SCHEMA_VERSION:
            self._conn = None
            conn.close()
            raise StoreError(
                f"the lock table {self.path!r} has schema version {version}, newer than this "
                f"tasklocks understands ({SCHEMA_VERSION}); upgrade tasklocks"
            )
        return conn

    def _open_gate(self) -> int | None:
        """The writers' queue: an flock(2) on ``<db>-lock`` around each change.

        SQLite's own answer to a busy write lock is to retry; with many processes that is a
        storm of sleeps and retries. A kernel lock queues the writers instead and wakes the
        next at once. It is held only inside one call and dies with its process. Without the
        file (no permission), changes still work, by retrying.
        """
        if self._gate_fd is not None and self._gate_pid == os.getpid():
            return self._gate_fd
        try:  # never reuse a descriptor inherited over fork: it would share the parent's lock
            fd = os.open(self.path + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        self._gate_pid = os.getpid()
        return fd

    def _create_schema(self, conn: sqlite3.Connection) -> int:
        t = self.table
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (f"{t}_meta",)
        ).fetchone()
        if row is None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {t} (namespace TEXT PRIMARY KEY, "
                    "version INTEGER NOT NULL, data TEXT NOT NULL)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {t}_meta "
                    "(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                conn.execute(
                    f"INSERT OR IGNORE INTO {t}_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        value = conn.execute(f"SELECT value FROM {t}_meta WHERE key = 'schema_version'").fetchone()
        return int(value[0])

    def _retry(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on the connection, again while SQLite says the database is locked."""
        deadline = time.monotonic() + BUSY_DEADLINE
        delay = 0.00005
        while True:
            conn = self._connect()
            try:
                return body(conn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise self._error(exc) from exc
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.002)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            return StoreUnavailable(
                f"the SQLite lock table {self.path!r} stayed locked for {BUSY_DEADLINE:g}s; "
                "is some process holding a long transaction on it?"
            )
        return StoreError(f"SQLite failed on {self.path!r}: {exc}")

    # --- the Store protocol -------------------------------------------------------------------

    def read(self, namespace: str) -> Snapshot:
        def body(conn: sqlite3.Connection) -> tuple[int, str] | None:
            return conn.execute(  # type: ignore[no-any-return]
                f"SELECT version, data FROM {self.table} WHERE namespace = ?", (namespace,)
            ).fetchone()

        with self._lock:
            row = self._retry(body)
            if row is None:
                return self.transact(namespace, lambda snap: None, None)
            return Snapshot(int(row[0]), str(row[1]))

    def transact(self, namespace: str, compute: Compute, hint: Snapshot | None) -> Snapshot:
        t = self.table

        def body(conn: sqlite3.Connection) -> Snapshot:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if namespace not in self._known:
                    conn.execute(
                        f"INSERT OR IGNORE INTO {t} (namespace, version, data) VALUES (?, 0, ?)",
                        (namespace, EMPTY_DOCUMENT),
                    )
                row = conn.execute(
                    f"SELECT version, data FROM {t} WHERE namespace = ?", (namespace,)
                ).fetchone()
                snap = Snapshot(int(row[0]), str(row[1]))
                if hint is not None and hint.version == snap.version and hint.data == snap.data:
                    snap = hint
                    self._optimistic_ok = True  # the caller's snapshots are fresh again
                change = compute(snap)
                if change is not None:
                    conn.execute(
                        f"UPDATE {t} SET data = ?, version = version + 1 "
                        "WHERE namespace = ? AND version = ?",
                        (change[0], namespace, snap.version),
                    )
                    snap = Snapshot(snap.version + 1, change[0])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._known.add(namespace)
            return snap

        def optimistic(conn: sqlite3.Connection) -> Snapshot | None:
            # The caller's last snapshot is usually still the row (one process, or a quiet
            # table): compute on it and write in one statement, if the row is still exactly
            # that. Anything else (no change, a refusal, another version) is decided on the row
            # as read under the write lock, in `body`.
            assert hint is not None
            try:
                change = compute(hint)
            except Exception:
                return None
            if change is None:
                return None
            cur = conn.execute(
                f"UPDATE {t} SET data = ?, version = version + 1 "
                "WHERE namespace = ? AND version = ? AND data = ?",
                (change[0], namespace, hint.version, hint.data),
            )
            if cur.rowcount == 1:
                return Snapshot(hint.version + 1, change[0])
            self._optimistic_ok = False  # others write too: read first until hints are fresh
            return None

        def either(conn: sqlite3.Connection) -> Snapshot:
            if hint is not None and namespace in self._known and self._optimistic_ok:
                done = optimistic(conn)
                if done is not None:
                    return done
            return body(conn)

        return self._gated(either)

    def _gated(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._connect()
            gate = self._gate_fd
            if gate is None:
                return self._retry(body)
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                return self._retry(body)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)

    def reset(self, namespace: str, data: str) -> Snapshot:
        return self.transact(namespace, lambda snap: (data, True), None)

    def _data_version(self) -> int:
        with self._lock:
            return int(self._retry(lambda c: c.execute("PRAGMA data_version").fetchone()[0]))

    def wait_for_change(
        self, namespace: str, version: int, timeout: float, wake_fd: int | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        mark = self._data_version()
        if self.read(namespace).version != version:
            return True
        # With a local wake-up channel every release on this host wakes us at once, and
        # data_version is only a fallback; without one it is the signal, polled briskly.
        delay, cap = (0.2, 0.2) if wake_fd is not None else (0.0005, 0.004)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if wake_fd is None:
                time.sleep(min(delay, left))
            elif select.select([wake_fd], [], [], min(delay, left))[0]:
                return True
            delay = min(delay * 1.5, cap)
            if self._data_version() != mark:
                return True

    def namespaces(self) -> list[str]:
        def body(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(f"SELECT namespace FROM {self.table} ORDER BY namespace")
            return [str(r[0]) for r in rows.fetchall()]

        with self._lock:
            return self._retry(body)

    # --- task records ---------------------------------------------------------------------------

    def _ensure_tasks(self, conn: sqlite3.Connection) -> None:
        if self._tasks_ready:
            return
        types = {"text": "TEXT", "json": "TEXT", "state": "TEXT", "float": "REAL", "int": "INTEGER"}
        columns = ", ".join(f"{name} {types[kind]}" for name, kind in TASK_COLUMNS)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table}_tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            f"version INTEGER NOT NULL, {columns})"
        )
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {self.table}_tasks_state ON {self.table}_tasks (state)"
        )
        self._tasks_ready = True

    def _row(self, cursor: sqlite3.Cursor, row: tuple[TaskValue, ...]) -> TaskRow:
        return {d[0]: value for d, value in zip(cursor.description, row, strict=True)}

    def create_task(self, fields: Mapping[str, TaskValue]) -> int:
        names = [n for n in TASK_FIELDS if n in fields]

        def body(conn: sqlite3.Connection) -> int:
            self._ensure_tasks(conn)
            cur = conn.execute(
                f"INSERT INTO {self.table}_tasks (version, {', '.join(names)}) "
                f"VALUES (0, {', '.join('?' for _ in names)})",
                [fields[n] for n in names],
            )
            return int(cur.lastrowid or 0)

        with self._lock:
            return self._retry(body)

    def get_task(self, task_id: int) -> TaskRow | None:
        def body(conn: sqlite3.Connection) -> TaskRow | None:
            self._ensure_tasks(conn)
            cur = conn.execute(f"SELECT * FROM {self.table}_tasks WHERE id = ?", (task_id,))
            row = cur.fetchone()
            return None if row is None else self._row(cur, row)

        with self._lock:
            return self._retry(body)

    def update_task(self, task_id: int, version: int, fields: Mapping[str, TaskValue]) -> bool:
        names = [n for n in TASK_FIELDS if n in fields]
        sets = "".join(f", {n} = ?" for n in names)

        def body(conn: sqlite3.Connection) -> bool:
            self._ensure_tasks(conn)
            cur = conn.execute(
                f"UPDATE {self.table}_tasks SET version = version + 1{sets} "
                "WHERE id = ? AND version = ?",
                [*(fields[n] for n in names), task_id, version],
            )
            return cur.rowcount == 1

        with self._lock:
            return self._retry(body)

    def list_tasks(
        self,
        states: Sequence[str] | None = None,
        limit: int | None = None,
        namespace: str | None = None,
    ) -> list[TaskRow]:
        where, tail, params = task_filter(states, namespace, limit, mark="?")

        def body(conn: sqlite3.Connection) -> list[TaskRow]:
            self._ensure_tasks(conn)
            cur = conn.execute(
                f"SELECT * FROM {self.table}_tasks{where} ORDER BY id DESC{tail}", params
            )
            return [self._row(cur, row) for row in cur.fetchall()]

        with self._lock:
            return self._retry(body)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            if self._gate_fd is not None and self._gate_pid == os.getpid():
                os.close(self._gate_fd)
            self._conn = None
            self._gate_fd = None
