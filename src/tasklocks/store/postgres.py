"""PostgreSQL adapter (psycopg 3): lock tables shared by several hosts, with LISTEN/NOTIFY wake-ups.

* One autocommit connection per store, guarded by a lock; nothing is held between calls (no
  ``LOCK TABLE``, no advisory locks). A change with a fresh ``hint`` is one round trip: an
  optimistic ``UPDATE ... WHERE version = <hint>``. Otherwise, or when that misses, it is a short
  pessimistic transaction in the same call, in two round trips (pipeline mode): ``BEGIN; SELECT
  ... FOR UPDATE``, then ``UPDATE; COMMIT``; it cannot fail its compare-and-swap. Contention is
  judged by the hints themselves: after a miss, hinted calls stay pessimistic until a pessimistic
  call finds that its hint was still the row.
* The MD5 the optimistic update compares is computed once per text client-side.
* A change that should wake waiters notifies in the same statement (``pg_notify`` in a CTE over the
  ``UPDATE``); PostgreSQL delivers it at commit, never for a rolled-back change.
* Waiters share one more autocommit connection per store that LISTENs on the table's channel; one
  thread at a time reads it and hands what it heard to the others. The version is re-read at least
  every second in case a notification was missed (or the change did not ask to wake anyone).
  A waiter may pass a ``wake_fd`` (same-host releasers signal it): the reading thread selects on
  the LISTEN socket and on every waiter's fd, and a pipe wakes it when a new fd must be watched.
* Durable commits: ``synchronous_commit`` is left alone.
* A connection lost before a change was sent is reopened and the call retried once; lost after it
  was sent, :class:`OutcomeUnknown` is raised (the caller re-reads). A forked child never touches
  its parent's socket.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.names import validate_name
from tasklocks.store import (
    EMPTY_DOCUMENT,
    FAST_MAX_BYTES,
    SCHEMA_VERSION,
    TASK_COLUMNS,
    TASK_FIELDS,
    Compute,
    OutcomeUnknown,
    ParsedURL,
    Snapshot,
    TaskRow,
    TaskValue,
    check_table_name,
)

if TYPE_CHECKING:
    from psycopg import Connection

__all__ = ["PostgresStore"]

T = TypeVar("T")
DEFAULT_PORT = 5432
IDLE_PING = 1.0  # seconds idle after which a connection is checked before a one-shot write
RECHECK = 1.0  # seconds between version checks while waiting for a notification
RETRIES = 20  # deadlocks, or concurrent schema creation, retried this many times

# All the SQL of this dialect, by name. ``{t}`` is the checked table name, unquoted, so PostgreSQL
# folds it to lower case everywhere alike.
QUERIES = {
    "create_table": (
        "CREATE TABLE IF NOT EXISTS {t} (namespace TEXT PRIMARY KEY, "
        "version BIGINT NOT NULL, data TEXT NOT NULL)"
    ),
    "create_meta": (
        "CREATE TABLE IF NOT EXISTS {t}_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    ),
    "insert_meta": (
        "INSERT INTO {t}_meta (key, value) VALUES ('schema_version', %s) ON CONFLICT DO NOTHING"
    ),
    "schema_version": "SELECT value FROM {t}_meta WHERE key = 'schema_version'",
    "insert_row": (
        "INSERT INTO {t} (namespace, version, data) VALUES (%s, 0, %s) ON CONFLICT DO NOTHING"
    ),
    "select": "SELECT version, data FROM {t} WHERE namespace = %s",
    "select_for_update": "SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE",
    "select_version": "SELECT version FROM {t} WHERE namespace = %s",
    # Is the hint still the row? convert_to hashes UTF-8 bytes whatever the database encoding,
    # as Python does (https://www.postgresql.org/docs/current/functions-binarystring.html).
    "check": "SELECT version, md5(convert_to(data, 'UTF8')) FROM {t} WHERE namespace = %s",
    "update": (
        "UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s AND version = %s"
    ),
    # Returns one row if the swap happened; pg_notify runs once per updated row and the
    # notification is sent at commit (https://www.postgresql.org/docs/current/sql-notify.html).
    "update_notify": (
        "WITH u AS (UPDATE {t} SET data = %s, version = version + 1 "
        "WHERE namespace = %s AND version = %s RETURNING version) "
        "SELECT version, pg_notify(%s, %s) FROM u"
    ),
    # The optimistic swaps also compare the data, so a hand edit that kept the version is noticed.
    "update_if": (
        "UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s AND version = %s "
        "AND md5(convert_to(data, 'UTF8')) = %s"
    ),
    "update_if_notify": (
        "WITH u AS (UPDATE {t} SET data = %s, version = version + 1 "
        "WHERE namespace = %s AND version = %s AND md5(convert_to(data, 'UTF8')) = %s "
        "RETURNING version) SELECT version, pg_notify(%s, %s) FROM u"
    ),
    "namespaces": "SELECT namespace FROM {t}",
    # One-statement changes, done by the server under the row lock of this statement alone
    # (autocommit: held only for the statement and its commit). The CTE parses the text once and
    # locks the row, following it to its newest version
    # (https://www.postgresql.org/docs/current/transaction-iso.html#XACT-READ-COMMITTED). The
    # UPDATE's own scan may still see an older version (the statement's snapshot); updating it,
    # it follows to the newest, which it holds already, and rechecks its conditions there (with
    # the CTE's row, parsed from that newest version). So no condition may compare the scanned
    # ``t`` with ``s`` before that: a join filter like ``t.version = s.version`` would drop the
    # row. SET expressions see the row as it was, so ``t.version + 1`` is the new version.
    # A lease is compared as jsonb: a missing name gives NULL, which NOT EXISTS counts as a
    # mismatch (bool_and would skip it). The entry must be an object: jsonb || would otherwise
    # build an array. {valid} (format 1, a "locks" object) guards the rest in a CASE, as
    # jsonb_each fails on a non-object; {entries} checks every entry's fields as _core.decode
    # does, so that a hand-edited bad entry stops the fast path as it stops the full one.
    "fast_acquire": (
        "WITH s AS (SELECT version, data::jsonb AS d FROM {t} WHERE namespace = %(ns)s "
        "AND octet_length(data) <= {fast_max} FOR NO KEY UPDATE) "
        "UPDATE {t} AS t SET version = t.version + 1, data = jsonb_set(s.d, '{{locks}}', "
        "(s.d->'locks') || (SELECT jsonb_object_agg(n, %(entry)s::jsonb "
        "|| jsonb_build_object('token', t.version + 1)) "
        "FROM unnest(%(names)s::text[]) AS n))::text "
        "FROM s WHERE t.namespace = %(ns)s AND CASE WHEN {valid} "
        "THEN NOT (s.d->'locks' ?| %(names)s::text[]) AND {entries} ELSE false END "
        "AND jsonb_typeof(%(entry)s::jsonb) = 'object' RETURNING t.version"
    ),
    "fast_release": (
        "WITH s AS (SELECT version, data::jsonb AS d FROM {t} WHERE namespace = %(ns)s "
        "AND octet_length(data) <= {fast_max} FOR NO KEY UPDATE), "
        "u AS (UPDATE {t} AS t SET version = t.version + 1, "
        "data = jsonb_set(s.d, '{{locks}}', (s.d->'locks') - %(names)s::text[])::text "
        "FROM s WHERE t.namespace = %(ns)s AND CASE WHEN {valid} "
        "THEN NOT EXISTS (SELECT FROM unnest(%(names)s::text[]) AS n "
        "WHERE (s.d->'locks'->n->'lease') IS DISTINCT FROM to_jsonb(%(lease)s::text)) "
        "AND {entries} ELSE false END RETURNING t.version) "
        "SELECT version, pg_notify(%(channel)s, %(ns)s) FROM u"
    ),
    # LZ4 for the documents (https://www.postgresql.org/docs/current/sql-altertable.html
    # #SQL-ALTERTABLE-DESC-SET-COMPRESSION): 'l' is lz4, 'p' pglz, '' the default (pglz).
    "compression": (
        "SELECT attcompression FROM pg_attribute WHERE attrelid = '{t}'::regclass "
        "AND attname = 'data'"
    ),
    "lock_timeout": "SET LOCAL lock_timeout = '100ms'",
    "set_lz4": "ALTER TABLE {t} ALTER COLUMN data SET COMPRESSION lz4",
    "begin": "BEGIN",
    "commit": "COMMIT",
    "rollback": "ROLLBACK",
    "ping": "SELECT 1",
    # Task records; column names are quoted (they are lower case, so quoting changes nothing else).
    "create_tasks": (
        "CREATE TABLE IF NOT EXISTS {t}_tasks (id BIGINT GENERATED BY DEFAULT AS IDENTITY "
        "PRIMARY KEY, version BIGINT NOT NULL, {task_columns})"
    ),
    "create_tasks_index": "CREATE INDEX IF NOT EXISTS {t}_tasks_state ON {t}_tasks (state)",
    "get_task": "SELECT * FROM {t}_tasks WHERE id = %s",
    # {{...}} are filled in per call, with the columns a call names.
    "insert_task": "INSERT INTO {t}_tasks (version{{columns}}) VALUES (0{{values}}) RETURNING id",
    "update_task": (
        "UPDATE {t}_tasks SET version = version + 1{{sets}} WHERE id = %s AND version = %s"
    ),
    "list_tasks": "SELECT * FROM {t}_tasks{{where}} ORDER BY id DESC{{limit}}",
}
# The fields of a stored entry and their JSON types, as _core.decode checks them (an absent
# nullable field reads as null there too).
ENTRY_FIELDS = (
    ("owner", "str"),
    ("pid", "int?"),
    ("start", "str?"),
    ("boot", "str?"),
    ("host", "str"),
    ("pidns", "str?"),
    ("pgid", "int?"),
    ("since", "num"),
    ("token", "int"),
    ("lease", "str"),
    ("note", "str?"),
)
_VALID_DOCUMENT = "(s.d->'format')::text = '1' AND jsonb_typeof(s.d->'locks') = 'object'"


def _entries_check() -> str:
    """A condition true when every entry of "locks" is an object with well-typed fields."""
    test = {
        "str": "jsonb_typeof(e.v->'{f}') = 'string'",
        "int": "jsonb_typeof(e.v->'{f}') = 'number' AND (e.v->'{f}')::text ~ '^-?[0-9]+$'",
        "num": "jsonb_typeof(e.v->'{f}') = 'number'",
    }
    tests = ["jsonb_typeof(e.v) = 'object'"]
    for name, kind in ENTRY_FIELDS:
        check = test[kind.rstrip("?")].format(f=name)
        if kind.endswith("?"):
            check = f"(coalesce(jsonb_typeof(e.v->'{name}'), 'null') = 'null' OR {check})"
        tests.append(check)
    return (
        "NOT EXISTS (SELECT FROM jsonb_each(s.d->'locks') AS e(k, v) WHERE NOT coalesce("
        + " AND ".join(tests)
        + ", false))"
    )


_TASK_TYPES = {
    "text": "TEXT",
    "json": "TEXT",
    "state": "TEXT",
    "float": "DOUBLE PRECISION",
    "int": "BIGINT",
}
_TASK_COLUMNS_SQL = ", ".join(f'"{name}" {_TASK_TYPES[kind]}' for name, kind in TASK_COLUMNS)


class _Lost(StoreUnavailable):
    """The connection broke before a change was sent: safe to reconnect and retry once."""


class _Retry(StoreError):
    """A deadlock, or a race creating the schema: safe to run the call again."""


class _Waiter:
    """A wait_for_change call with a wake fd: has the fd become readable?"""

    __slots__ = ("fd", "woken")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.woken = False


class _Call:
    """Per-attempt bookkeeping: has a change that may be applied been sent?"""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


def _digest(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _fast_names(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each checked (as on MySQL, where they become JSON paths)."""
    unique = list(dict.fromkeys(validate_name(name) for name in names))
    if not unique:
        raise ValueError("no lock names given")
    return unique


def _abandon(conn: Connection[Any]) -> None:
    """Forget a connection inherited over fork() without a word to the server.

    libpq's PQfinish sends a Terminate message, which would end the *parent's* session
    (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PQFINISH): point this
    process's copy of the descriptor at /dev/null first.
    """
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, conn.fileno())
        finally:
            os.close(null)
        conn.close()
    except Exception:
        pass


class PostgresStore:
    """A lock table in a PostgreSQL database."""

    def __init__(self, parsed: ParsedURL, *, table: str) -> None:
        try:
            import psycopg
            import psycopg.errors
            import psycopg.sql
        except ImportError as exc:
            raise StoreUnavailable(
                "the postgresql backend needs psycopg 3: pip install 'tasklocks[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.table = check_table_name(table)
        self.url = parsed.display()
        self._parsed = parsed
        self._where = f"{parsed.host}:{parsed.port or DEFAULT_PORT}"
        self._sql = {
            name: text.format(
                t=self.table,
                task_columns=_TASK_COLUMNS_SQL,
                valid=_VALID_DOCUMENT,
                entries=_entries_check(),
                fast_max=FAST_MAX_BYTES,
            )
            for name, text in QUERIES.items()
        }
        self._tasks_ready = False
        self._channel = f"{self.table}_changed"
        self._lock = threading.Lock()
        self._conn: Connection[Any] | None = None
        self._pid = 0
        self._used = 0.0  # monotonic time the connection last answered
        self._schema_checked = False
        self._known: set[str] = set()  # namespaces whose row exists
        self._optimistic_ok = True  # was the last hint we could judge still the row?
        self._hashed: tuple[str, str] | None = None  # (text, its MD5): the last one hashed
        # Waiting: the LISTEN connection, and what its reader heard, per namespace.
        self._cond = threading.Condition(threading.Lock())
        self._listen: Connection[Any] | None = None
        self._listen_pid = 0
        self._reading = False
        self._heard: dict[str, int] = {}
        self._waiters: set[_Waiter] = set()  # calls with a wake fd, watched by the reader
        self._pipe: tuple[int, int] | None = None  # wakes the reader to watch a new fd
        self._pipe_pid = 0
        try:
            with self._lock:
                self._run(lambda conn, call: None)  # connect and check the schema now
        except BaseException:
            self.close()
            raise

    # --- connection and errors ----------------------------------------------------------------

    def _connect(self, *, application_name: str = "tasklocks") -> Connection[Any]:
        p = self._parsed
        try:
            return self._psycopg.connect(
                host=p.host,
                port=p.port or DEFAULT_PORT,
                user=p.user,
                password=p.password,
                dbname=p.database,
                autocommit=True,
                connect_timeout=int(float(p.query.get("connect_timeout", 10))),
                application_name=application_name,
            )
        except self._psycopg.Error as exc:
            raise self._connect_error(exc) from exc
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {self._where} ({exc}); check the URL"
            ) from exc

    def _connect_error(self, exc: BaseException) -> StoreUnavailable:
        # libpq reports connection failures as text only (no SQLSTATE): 'connection failed:
        # connection to server at "h", port p failed: FATAL:  database "x" does not exist'.
        text = " ".join(str(exc).split())
        reason = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL: ").strip().rstrip(".")
        reason = reason.split("Is the server running")[0].strip()
        user, db = self._parsed.user or "(default)", self._parsed.database
        if "database" in reason and "does not exist" in reason:
            return StoreUnavailable(
                f"PostgreSQL at {self._where} has no database {db!r}; "
                "create it or fix the database name in the URL"
            )
        if any(
            s in reason
            for s in ("authentication failed", "role", "pg_hba.conf", "password", "permission")
        ):
            return StoreUnavailable(
                f"PostgreSQL at {self._where} refused user {user!r} ({reason}); "
                "check the user and password in the URL and pg_hba.conf"
            )
        return StoreUnavailable(
            f"cannot connect to PostgreSQL at {self._where} ({reason}); "
            "check that the server is running and the host and port in the URL"
        )

    def _connection(self) -> Connection[Any]:
        if self._conn is not None and self._pid != os.getpid():
            _abandon(self._conn)
            self._conn = None
            self._known = set()
        if self._conn is None:
            self._conn = self._connect()
            self._pid = os.getpid()
            self._used = time.monotonic()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            conn.close()

    @contextmanager
    def _errors(self, call: _Call) -> Iterator[None]:
        """Turn driver errors into tasklocks errors (the original kept as ``__cause__``)."""
        errors = self._psycopg.errors
        try:
            yield
        except self._psycopg.Error as exc:
            if self._conn is None or self._conn.closed:  # libpq lost the connection
                self._drop()
                if call.sent:
                    raise OutcomeUnknown(
                        f"lost the connection to PostgreSQL at {self._where} after sending a "
                        "change, which may or may not have been applied; re-read before retrying"
                    ) from exc
                raise _Lost(
                    f"lost the connection to PostgreSQL at {self._where} "
                    f"({' '.join(str(exc).split())}); check that the server is running"
                ) from exc
            if isinstance(exc, errors.DeadlockDetected | errors.SerializationFailure):
                raise _Retry(str(exc)) from exc
            raise StoreError(f"PostgreSQL at {self._where} failed: {exc}") from exc

    def _run(self, body: Callable[[Connection[Any], _Call], T]) -> T:
        """Run ``body`` (lock held); reconnect and retry once if the connection was lost first."""
        lost = retries = 0
        while True:
            call = _Call()
            try:
                conn = self._connection()
                with self._errors(call):
                    if time.monotonic() - self._used > IDLE_PING:
                        conn.execute(self._sql["ping"])  # find a dead idle connection first
                    if not self._schema_checked:
                        self._check_schema(conn)
                    result = body(conn, call)
                self._used = time.monotonic()
                return result
            except _Lost:
                if lost:
                    raise
                lost += 1
            except _Retry as exc:
                retries += 1
                if retries > RETRIES:
                    raise StoreUnavailable(
                        f"PostgreSQL at {self._where} kept failing on {self.table}: {exc}"
                    ) from exc
                time.sleep(random.uniform(0, 0.001 * retries))

    def _check_schema(self, conn: Connection[Any]) -> None:
        errors = self._psycopg.errors
        try:
            row = conn.execute(self._sql["schema_version"]).fetchone()
        except errors.UndefinedTable:
            row = None
        if row is None:
            try:
                conn.execute(self._sql["create_table"])
                conn.execute(self._sql["create_meta"])
                conn.execute(self._sql["insert_meta"], (str(SCHEMA_VERSION),))
            except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject) as exc:
                # Concurrent CREATE TABLE IF NOT EXISTS can collide on the catalog's unique index
                # (pg_type_typname_nsp_index) instead of skipping: the other creator won; retry.
                # (https://github.com/psycopg/psycopg2/issues/1036,
                # https://www.postgresql.org/message-id/CA%2BTgmoZAdYVtwBfp1FL2sMZbiHCWT4UPrzRLNnX1Nb30Ku3-gg%40mail.gmail.com)
                raise _Retry(str(exc)) from exc
            row = conn.execute(self._sql["schema_version"]).fetchone()
        try:
            version = int(row[0]) if row is not None else -1
        except ValueError:
            version = -1
        if version < 0:
            raise StoreError(
                f"the lock table {self.table} at {self._where} has a bad schema version "
                f"{row!r} in {self.table}_meta; fix or drop that table"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the lock table {self.table} at {self._where} has schema version {version}, "
                f"newer than this tasklocks understands ({SCHEMA_VERSION}); upgrade tasklocks"
            )
        self._prefer_lz4(conn)
        self._schema_checked = True

    def _prefer_lz4(self, conn: Connection[Any]) -> None:
        """Compress large documents with LZ4 rather than pglz where the server can (PostgreSQL
        14+ built with LZ4): pglz costs ~2 ms per write of a 200 KB document, LZ4 a tenth.

        Only new values are affected; a catalog-only change, done once, skipped on any error
        (older server, no LZ4, not the table's owner, a lock not granted within 100 ms).
        """
        errors = self._psycopg.errors
        try:
            row = conn.execute(self._sql["compression"]).fetchone()
        except (errors.UndefinedColumn, errors.UndefinedTable):
            return  # before PostgreSQL 14
        if row is None or row[0] == "l":
            return
        try:
            conn.execute(self._sql["begin"])
            conn.execute(self._sql["lock_timeout"])
            conn.execute(self._sql["set_lz4"])
            conn.execute(self._sql["commit"])
        except self._psycopg.Error:
            if conn.closed:
                raise
            conn.execute(self._sql["rollback"])

    # --- the Store protocol -------------------------------------------------------------------

    def read(self, namespace: str) -> Snapshot:
        def body(conn: Connection[Any], call: _Call) -> Snapshot:
            row = conn.execute(self._sql["select"], (namespace,)).fetchone()
            if row is None:
                conn.execute(self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
                row = conn.execute(self._sql["select"], (namespace,)).fetchone()
            if row is None:
                raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
            self._known.add(namespace)
            return Snapshot(int(row[0]), str(row[1]))

        with self._lock:
            return self._run(body)

    def transact(self, namespace: str, compute: Compute, hint: Snapshot | None) -> Snapshot:
        def body(conn: Connection[Any], call: _Call) -> Snapshot:
            if hint is not None and self._optimistic_ok:
                done = self._optimistic(conn, call, namespace, compute, hint)
                if done is not None:
                    return done
                self._optimistic_ok = False  # contention: stay pessimistic for a while
            return self._pessimistic(conn, call, namespace, compute, hint)

        with self._lock:
            return self._run(body)

    def _digest(self, text: str) -> str:
        """MD5 of ``text``, computed once per text (the caller hands the same one back)."""
        hashed = self._hashed
        if hashed is not None and hashed[0] == text:
            return hashed[1]
        digest = _digest(text)
        self._hashed = (text, digest)
        return digest

    def _update(
        self,
        conn: Connection[Any],
        namespace: str,
        version: int,
        change: tuple[str, bool],
        digest: str | None = None,
    ) -> bool:
        """The compare-and-swap (of the data's ``digest`` too if given), notifying waiters if
        asked; True if it happened."""
        return self._swapped(self._send_update(conn, namespace, version, change, digest), change)

    def _send_update(
        self,
        conn: Connection[Any],
        namespace: str,
        version: int,
        change: tuple[str, bool],
        digest: str | None = None,
    ) -> Any:
        """Execute (or, in a pipeline, queue) the compare-and-swap; its cursor."""
        text, wake = change
        if digest is None:
            where: tuple[Any, ...] = (text, namespace, version)
            name = "update"
        else:
            where = (text, namespace, version, digest)
            name = "update_if"
        if wake:
            return conn.execute(self._sql[name + "_notify"], (*where, self._channel, namespace))
        return conn.execute(self._sql[name], where)

    @staticmethod
    def _swapped(cur: Any, change: tuple[str, bool]) -> bool:
        if change[1]:
            return cur.fetchone() is not None
        return bool(cur.rowcount == 1)

    def _optimistic(
        self, conn: Connection[Any], call: _Call, namespace: str, compute: Compute, hint: Snapshot
    ) -> Snapshot | None:
        """Compute on ``hint`` and write in one round trip; None if the row had moved on.

        A refusal (compute raising) or "no change" stands only if the hint is still the row.
        """
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
        done = self._update(conn, namespace, hint.version, change, digest)
        call.sent = False  # the reply came: the outcome is known
        return Snapshot(hint.version + 1, change[0]) if done else None

    def _is_current(self, conn: Connection[Any], namespace: str, hint: Snapshot) -> bool:
        row = conn.execute(self._sql["check"], (namespace,)).fetchone()
        return row is not None and (int(row[0]), row[1]) == (
            hint.version,
            self._digest(hint.data),
        )

    def _pessimistic(
        self,
        conn: Connection[Any],
        call: _Call,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
    ) -> Snapshot:
        if namespace not in self._known:
            # Before the transaction, so that it holds nothing but the one row lock.
            conn.execute(self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
            self._known.add(namespace)
        # BEGIN/COMMIT by hand on an autocommit connection, so we know when COMMIT was sent; in
        # pipeline mode, so that BEGIN + SELECT go in one round trip and UPDATE + COMMIT in one.
        try:
            with conn.pipeline() as pipe:
                conn.execute(self._sql["begin"])
                cur = conn.execute(self._sql["select_for_update"], (namespace,))
                pipe.sync()
                row = cur.fetchone()
                if row is None:
                    self._known.discard(namespace)
                    raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
                snap = Snapshot(int(row[0]), str(row[1]))
                if hint is not None and hint.version == snap.version and hint.data == snap.data:
                    snap = hint
                    self._optimistic_ok = True  # nobody else wrote: try the short path again
                change = compute(snap)
                if change is not None:
                    # The row is locked: the compare-and-swap cannot miss.
                    self._send_update(conn, namespace, snap.version, change)
                    snap = Snapshot(snap.version + 1, change[0])
                    call.sent = True
                conn.execute(self._sql["commit"])
                pipe.sync()
        except BaseException as exc:
            # A server error in UPDATE or COMMIT aborts the pipeline there: nothing was
            # committed. A lost connection is OutcomeUnknown (see _errors).
            server_error = isinstance(exc, self._psycopg.Error) and not (
                self._conn is None or self._conn.closed
            )
            if not call.sent or server_error:
                call.sent = False
                self._rollback(conn)
            raise
        return snap

    def _rollback(self, conn: Connection[Any]) -> None:
        try:
            conn.execute(self._sql["rollback"])
        except self._psycopg.Error:
            self._drop()  # the server rolls back when the connection ends

    def reset(self, namespace: str, data: str) -> Snapshot:
        return self.transact(namespace, lambda snap: (data, True), None)

    def fast_acquire(self, namespace: str, names: Sequence[str], entry: str) -> int | None:
        """In one statement: if the row exists, its document has "format" 1 and a "locks" object,
        and none of ``names`` is a key of "locks", add ``entry`` (a JSON object text without a
        "token" key) under every name with "token" set to the new version, and bump the version.
        Return the new version, or None if the condition did not hold (nothing written); None
        too if the stored text is not valid JSON (the full path then reports it). Raises
        :class:`OutcomeUnknown` if the connection failed after the statement was sent. Does not
        wake waiters (none wait for an acquisition). The document is written back as jsonb
        prints it (spaces, keys reordered)."""
        params = {"ns": namespace, "names": _fast_names(names), "entry": entry}
        return self._fast(self._sql["fast_acquire"], params)

    def fast_release(self, namespace: str, names: Sequence[str], lease: str) -> int | None:
        """In one statement: if every one of ``names`` is in "locks" with "lease" equal to
        ``lease`` (and the format is 1), remove them all, bump the version and wake waiters
        (``pg_notify`` in the same statement, delivered at its commit). Return the new version,
        or None if the condition did not hold (nothing written). Raises :class:`OutcomeUnknown`
        as :meth:`fast_acquire` does."""
        params = {
            "ns": namespace,
            "names": _fast_names(names),
            "lease": lease,
            "channel": self._channel,
        }
        return self._fast(self._sql["fast_release"], params)

    def _fast(self, sql: str, params: Mapping[str, Any]) -> int | None:
        """Run a one-statement change; the new version, or None if its condition did not hold."""
        bad_json = self._psycopg.errors.InvalidTextRepresentation

        def body(conn: Connection[Any], call: _Call) -> int | None:
            call.sent = True
            try:
                row = conn.execute(sql, params).fetchone()
            except bad_json:
                # The stored text (or the entry) is not JSON: the statement failed and, in
                # autocommit, rolled back; the full path reports a bad document.
                call.sent = False
                return None
            call.sent = False  # the reply came: the outcome is known
            return None if row is None else int(row[0])

        with self._lock:
            return self._run(body)

    def namespaces(self) -> list[str]:
        def body(conn: Connection[Any], call: _Call) -> list[str]:
            rows = conn.execute(self._sql["namespaces"]).fetchall()
            return sorted(str(r[0]) for r in rows)

        with self._lock:
            return self._run(body)

    # --- waiting ------------------------------------------------------------------------------

    def _version(self, namespace: str) -> int:
        def body(conn: Connection[Any], call: _Call) -> int:
            row = conn.execute(self._sql["select_version"], (namespace,)).fetchone()
            return int(row[0]) if row is not None else 0

        with self._lock:
            return self._run(body)

    def _listening(self) -> Connection[Any]:
        """The LISTEN connection (call with ``self._cond`` held or as the one reader)."""
        if self._listen is not None and self._listen_pid != os.getpid():
            _abandon(self._listen)
            self._listen = None
        if self._listen is None:
            conn = self._connect(application_name="tasklocks-listen")
            try:
                # Quoted: an unquoted LISTEN folds the channel to lower case, pg_notify does not
                # (https://www.postgresql.org/docs/current/sql-listen.html).
                sql = self._psycopg.sql
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            except self._psycopg.Error as exc:
                conn.close()
                raise StoreUnavailable(
                    f"cannot LISTEN on PostgreSQL at {self._where} ({exc}); "
                    "check that the server is running"
                ) from exc
            self._listen, self._listen_pid = conn, os.getpid()
        return self._listen

    def wait_for_change(
        self, namespace: str, version: int, timeout: float, wake_fd: int | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        me = None if wake_fd is None else _Waiter(wake_fd)
        with self._cond:
            self._listening()  # listen first, then read: a change after the read is heard
            mark = self._heard.get(namespace, 0)
            if me is not None:
                self._waiters.add(me)
                if self._reading:
                    self._poke()  # the reader must watch our fd too
        try:
            if self._version(namespace) != version:
                return True
            recheck = time.monotonic() + RECHECK
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= recheck:
                    if self._version(namespace) != version:
                        return True
                    recheck = time.monotonic() + RECHECK
                until = min(deadline, recheck)
                with self._cond:
                    if self._heard.get(namespace, 0) != mark or (me is not None and me.woken):
                        return True
                    if self._reading:  # another thread reads the socket; it will tell us
                        self._cond.wait(until - now)
                        continue
                    self._reading = True
                    fds = {w.fd for w in self._waiters if not w.woken}
                try:
                    if not self._read_notifies(until - now, fds):
                        recheck = now  # the connection was reopened: notifications may be lost
                finally:
                    with self._cond:
                        self._reading = False
                        self._cond.notify_all()
        finally:
            if me is not None:
                with self._cond:
                    self._waiters.discard(me)

    def _wake_pipe(self) -> tuple[int, int]:
        """This process's pipe that interrupts the reader's select (``self._cond`` held)."""
        if self._pipe is None or self._pipe_pid != os.getpid():
            self._pipe, self._pipe_pid = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC), os.getpid()
        return self._pipe

    def _poke(self) -> None:
        with suppress(BlockingIOError):  # full: the reader will wake anyway
            os.write(self._wake_pipe()[1], b"\0")

    def _read_notifies(self, timeout: float, fds: set[int]) -> bool:
        """Wait up to ``timeout`` for notifications or for one of the waiters' ``fds`` to become
        readable, and record what happened; False if the connection was reopened."""
        with self._cond:
            conn = self._listening()
            pipe = self._wake_pipe()[0]
        sock = conn.fileno()
        try:
            ready = set(select.select([sock, pipe, *fds], [], [], max(timeout, 0.0))[0])
        except (OSError, ValueError):  # a waiter's fd was closed: let every fd waiter return
            ready = set(fds)
        if pipe in ready:
            with suppress(BlockingIOError):
                os.read(pipe, 4096)
        if ready & fds:
            with self._cond:
                for waiter in self._waiters:
                    if waiter.fd in ready:
                        waiter.woken = True
                self._cond.notify_all()
        if sock not in ready:
            return True
        try:
            for notify in conn.notifies(timeout=0.0):
                with self._cond:
                    self._heard[notify.payload] = self._heard.get(notify.payload, 0) + 1
                    self._cond.notify_all()
        except self._psycopg.Error:
            with self._cond:
                if self._listen is conn:
                    self._listen = None
                conn.close()
                self._listening()  # raises StoreUnavailable if the server is gone
            return False
        return True

    # --- task records ---------------------------------------------------------------------------

    def _tasks(self, body: Callable[[Connection[Any]], T]) -> T:
        """Run ``body(connection)`` once the tasks table exists."""
        errors = self._psycopg.errors

        def run(conn: Connection[Any], call: _Call) -> T:
            if not self._tasks_ready:
                try:
                    conn.execute(self._sql["create_tasks"])
                    conn.execute(self._sql["create_tasks_index"])
                except (
                    errors.UniqueViolation,
                    errors.DuplicateTable,
                    errors.DuplicateObject,
                ) as exc:
                    raise _Retry(str(exc)) from exc  # a concurrent creator won (see above)
                self._tasks_ready = True
            return body(conn)

        with self._lock:
            return self._run(run)

    @staticmethod
    def _task_row(cur: Any, row: Sequence[TaskValue]) -> TaskRow:
        return {d.name: value for d, value in zip(cur.description, row, strict=True)}

    def create_task(self, fields: Mapping[str, TaskValue]) -> int:
        names = [n for n in TASK_FIELDS if n in fields]
        sql = self._sql["insert_task"].format(
            columns="".join(f', "{n}"' for n in names), values=", %s" * len(names)
        )

        def body(conn: Connection[Any]) -> int:
            row = conn.execute(sql, [fields[n] for n in names]).fetchone()
            assert row is not None
            return int(row[0])

        return self._tasks(body)

    def get_task(self, task_id: int) -> TaskRow | None:
        def body(conn: Connection[Any]) -> TaskRow | None:
            cur = conn.execute(self._sql["get_task"], (task_id,))
            row = cur.fetchone()
            return None if row is None else self._task_row(cur, row)

        return self._tasks(body)

    def update_task(self, task_id: int, version: int, fields: Mapping[str, TaskValue]) -> bool:
        names = [n for n in TASK_FIELDS if n in fields]
        sql = self._sql["update_task"].format(sets="".join(f', "{n}" = %s' for n in names))

        def body(conn: Connection[Any]) -> bool:
            args = [*(fields[n] for n in names), task_id, version]
            return conn.execute(sql, args).rowcount == 1

        return self._tasks(body)

    def list_tasks(
        self,
        states: Sequence[str] | None = None,
        limit: int | None = None,
        namespace: str | None = None,
    ) -> list[TaskRow]:
        conditions: list[str] = []
        params: list[Any] = []
        if states is not None:
            conditions.append("state = ANY(%s)")
            params.append(list(states))
        if namespace is not None:
            conditions.append('"namespace" = %s')
            params.append(namespace)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        tail = "" if limit is None else f" LIMIT {int(limit)}"
        sql = self._sql["list_tasks"].format(where=where, limit=tail)

        def body(conn: Connection[Any]) -> list[TaskRow]:
            cur = conn.execute(sql, params)
            return [self._task_row(cur, row) for row in cur.fetchall()]

        return self._tasks(body)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._drop()
            self._conn = None
        with self._cond:
            if self._listen is not None and self._listen_pid == os.getpid():
                self._listen.close()
            self._listen = None
            if self._pipe is not None and self._pipe_pid == os.getpid():
                for fd in self._pipe:
                    os.close(fd)
            self._pipe = None
