"""MySQL / MariaDB adapter (PyMySQL): lock tables shared by several hosts.

* One autocommit connection per store, guarded by a lock; nothing is held between calls (no
  ``LOCK TABLES``, no ``GET_LOCK``). A change with a fresh ``hint`` is one round trip: an optimistic
  ``UPDATE ... WHERE version = <hint>``. Otherwise, or when that misses, it is a short pessimistic
  transaction in the same call, in two round trips (the connection allows multi-statements):
  ``START TRANSACTION; SELECT ... FOR UPDATE``, then ``UPDATE ...; COMMIT``; it cannot fail its
  compare-and-swap. Contention is judged by the hints themselves: after a miss, hinted calls stay
  pessimistic until a pessimistic call finds that its hint was still the row.
* The document is quoted into the SQL here with ``str.replace`` (PyMySQL's ``str.translate``
  escaping costs milliseconds for a large document), unless the session has
  ``NO_BACKSLASH_ESCAPES``, where the driver's own (fast) quoting is used. The MD5 the optimistic
  update compares is computed once per text client-side.
* Durable commits: the server's ``innodb_flush_log_at_trx_commit`` is left alone.
* Waiters poll ``SELECT version``: MySQL has no LISTEN/NOTIFY. From every 1 ms up to every 10 ms,
  then 5 % of the time waited so far (at most 100 ms), to keep many waiters cheap. Given a
  ``wake_fd`` (same-host releasers signal it), they poll far less often (from 5 ms up to every
  500 ms, for changes made on other hosts) and return as soon as the fd is readable.
* A connection lost before a change was sent is reopened and the call retried once; lost after it
  was sent, :class:`OutcomeUnknown` is raised (the caller re-reads). A forked child never touches
  its parent's socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    task_filter,
)

if TYPE_CHECKING:
    from pymysql.connections import Connection

__all__ = ["MySQLStore"]

_CONNECTION_CLASS: Any = None


def _connection_class(pymysql: Any) -> Any:
    """PyMySQL's Connection, sharing one TLS context between connections.

    Without TLS options PyMySQL 2 tries TLS when the server offers it ("preferred", no
    certificate check) and builds a new ``SSLContext`` for every connection, which loads the
    system's CA certificates: about 20 ms of a 22 ms connect here. That default context is the
    same every time, and an SSLContext may be shared, so it is built once per process. Any
    explicit TLS option goes through PyMySQL unchanged.
    """
    global _CONNECTION_CLASS
    if _CONNECTION_CLASS is None:
        base = pymysql.connections.Connection

        class Connection(base):  # type: ignore[misc, valid-type]
            _default_context: Any = None

            def _create_ssl_ctx(self, sslp: Any) -> Any:
                if isinstance(sslp, dict) and not sslp:
                    cls = type(self)
                    if cls._default_context is None:
                        cls._default_context = super()._create_ssl_ctx(sslp)
                    return cls._default_context
                return super()._create_ssl_ctx(sslp)

        _CONNECTION_CLASS = Connection
    return _CONNECTION_CLASS


def preload() -> None:
    """Import the driver and build the shared TLS context now (for a process that forks
    others, such as the task zygote)."""
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import pymysql

        conn_class = _connection_class(pymysql)
        conn_class.__new__(conn_class)._create_ssl_ctx({})  # builds and keeps the context


T = TypeVar("T")
DEFAULT_PORT = 3306
IDLE_PING = 1.0  # seconds idle after which a connection is pinged before a one-shot write
# wait_for_change polling (seconds): from 1 ms, x1.5 per poll, capped at 10 ms while the wait is
# young (quick hand-offs), then at 5 % of the time waited so far, at most 100 ms. Measured on
# MariaDB 10.11 (2 cores): a poll costs a waiting process ~0.2-0.3 ms of CPU once it wakes, so a
# fixed 10 ms cap costs ~2 % of a core per waiter (20 waiters: 40 %).
POLL_FIRST, POLL_GROWTH, POLL_CAP_FAST, POLL_SHARE, POLL_CAP = 0.001, 1.5, 0.010, 0.05, 0.100
# With a wake_fd, local releases arrive through it: poll only for other hosts' changes.
WAKE_POLL_FIRST, WAKE_POLL_CAP = 0.005, 0.500
DEADLOCK_RETRIES = 20

# All the SQL of this dialect, by name. ``{t}`` is the checked table name. ``key`` is a reserved
# word in MySQL (https://dev.mysql.com/doc/refman/8.0/en/keywords.html), hence the backquotes.
# ``namespace`` is VARCHAR(191): 191 * 4 bytes of utf8mb4 fit the 767-byte index prefix limit of old
# row formats (https://dev.mysql.com/doc/refman/8.0/en/innodb-limits.html); utf8mb4_bin makes
# namespaces case-sensitive, as on SQLite and PostgreSQL.
QUERIES = {
    "create_table": (
        "CREATE TABLE IF NOT EXISTS {t} (namespace VARCHAR(191) NOT NULL PRIMARY KEY, "
        "version BIGINT NOT NULL, data LONGTEXT NOT NULL) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ),
    "create_meta": (
        "CREATE TABLE IF NOT EXISTS {t}_meta (`key` VARCHAR(64) NOT NULL PRIMARY KEY, "
        "value VARCHAR(255) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ),
    # INSERT IGNORE also turns some errors into warnings; for these constant rows only a duplicate
    # key can happen (https://dev.mysql.com/doc/refman/8.0/en/insert.html#ignore-effect-on-execution).
    "insert_meta": "INSERT IGNORE INTO {t}_meta (`key`, value) VALUES ('schema_version', %s)",
    "schema_version": "SELECT value FROM {t}_meta WHERE `key` = 'schema_version'",
    "insert_row": "INSERT IGNORE INTO {t} (namespace, version, data) VALUES (%s, 0, %s)",
    "select": "SELECT version, data FROM {t} WHERE namespace = %s",
    # The pessimistic path: two round trips of two statements each (CLIENT.MULTI_STATEMENTS).
    "lock_row": (
        "START TRANSACTION; SELECT version, data FROM {t} WHERE namespace = %s FOR UPDATE"
    ),
    "select_version": "SELECT version FROM {t} WHERE namespace = %s",
    # Is the hint still the row? MD5 hashes the column's utf8mb4 bytes, which are the UTF-8 bytes
    # Python hashes (https://dev.mysql.com/doc/refman/8.0/en/encryption-functions.html#function_md5).
    "check": "SELECT version, MD5(data) FROM {t} WHERE namespace = %s",
    # The affected-row count is rows *changed*, not matched, unless CLIENT.FOUND_ROWS is set
    # (https://dev.mysql.com/doc/c-api/8.0/en/mysql-affected-rows.html); version always changes,
    # so 1 means the compare-and-swap succeeded either way.
    "update": (
        "UPDATE {t} SET data = %s, version = version + 1 WHERE namespace = %s AND version = %s"
    ),
    # The optimistic swap also compares the data, so a hand edit that kept the version is noticed.
    "update_if": (
        "UPDATE {t} SET data = %s, version = version + 1 "
        "WHERE namespace = %s AND version = %s AND MD5(data) = %s"
    ),
    "namespaces": "SELECT namespace FROM {t}",
    # One-statement changes, done by the server's JSON functions under the row lock of the UPDATE
    # alone (autocommit: held only for the statement and its commit). {{...}} are filled in per
    # call (one path per name, or per name a path and its value); {{compact}} is JSON_COMPACT on
    # MariaDB, whose JSON_SET output has spaces (MySQL has no JSON_COMPACT). SET assignments are
    # evaluated left to right, later ones seeing earlier new values, unless MariaDB's
    # SIMULTANEOUS_ASSIGNMENT is set (https://mariadb.com/kb/en/update/): data comes first, so
    # ``version + 1`` in it is the new version in both modes. LAST_INSERT_ID(expr) hands that
    # version back in the OK packet (``cursor.lastrowid``), so no second statement is needed
    # (https://dev.mysql.com/doc/refman/8.0/en/information-functions.html#function_last-insert-id).
    # JSON_VALID comes first: MariaDB's other JSON functions scan lazily and may answer before
    # they reach trailing garbage. {{entries}} checks every entry's fields as _core.decode does,
    # so that a hand-edited bad entry stops the fast path as it stops the full one. The entry
    # must be a JSON object (JSON_EXTRACT(x, '$') makes it a JSON value, not a string): a NULL
    # must never reach the NOT NULL data column.
    "fast_acquire": (
        "UPDATE {t} SET data = {{compact}}(JSON_SET(data{{sets}})), "
        "version = LAST_INSERT_ID(version + 1) "
        "WHERE namespace = %s AND LENGTH(data) <= {fast_max} AND JSON_VALID(data) "
        "AND JSON_TYPE(JSON_EXTRACT(data, '$.format')) = 'INTEGER' "
        "AND JSON_EXTRACT(data, '$.format') = 1 "
        "AND JSON_TYPE(JSON_EXTRACT(data, '$.locks')) = 'OBJECT' "
        "AND JSON_CONTAINS_PATH(data, 'one'{{paths}}) = 0 AND {{entries}} "
        "AND JSON_TYPE(JSON_EXTRACT(%s, '$')) = 'OBJECT'"
    ),
    # Leases compare as bytes: the column's utf8mb4_bin collation would ignore trailing spaces.
    "fast_release": (
        "UPDATE {t} SET data = {{compact}}(JSON_REMOVE(data{{paths}})), "
        "version = LAST_INSERT_ID(version + 1) "
        "WHERE namespace = %s AND LENGTH(data) <= {fast_max} AND JSON_VALID(data) "
        "AND JSON_TYPE(JSON_EXTRACT(data, '$.format')) = 'INTEGER' "
        "AND JSON_EXTRACT(data, '$.format') = 1 "
        "AND JSON_TYPE(JSON_EXTRACT(data, '$.locks')) = 'OBJECT'{{leases}} AND {{entries}}"
    ),
    # Task records. Column names are backquoted: SIGNAL is a reserved word. AUTO_INCREMENT ids are
    # not reused while no row is deleted (tasks never are), even across restarts
    # (https://dev.mysql.com/doc/refman/8.0/en/innodb-auto-increment-handling.html).
    "create_tasks": (
        "CREATE TABLE IF NOT EXISTS {t}_tasks (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
        "version BIGINT NOT NULL, {task_columns}, INDEX {t}_tasks_state (state)) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ),
    "get_task": "SELECT * FROM {t}_tasks WHERE id = %s",
    # {{...}} are filled in per call, with the columns a call names.
    "insert_task": "INSERT INTO {t}_tasks (version{{columns}}) VALUES (0{{values}})",
    "update_task": (
        "UPDATE {t}_tasks SET version = version + 1{{sets}} WHERE id = %s AND version = %s"
    ),
    "list_tasks": "SELECT * FROM {t}_tasks{{where}} ORDER BY id DESC{{limit}}",
}
_TASK_TYPES = {
    "text": "LONGTEXT",
    "json": "LONGTEXT",
    "state": "VARCHAR(32)",
    "float": "DOUBLE",
    "int": "BIGINT",
}
_TASK_COLUMNS_SQL = ", ".join(f"`{name}` {_TASK_TYPES[kind]}" for name, kind in TASK_COLUMNS)
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


def _entries_check() -> str:
    """A condition true when every entry of "locks" is an object with well-typed fields.

    JSON_TABLE's JSON columns hold each value's JSON text (NULL when absent), so its first
    character tells strings from numbers (https://mariadb.com/kb/en/json_table/).
    """
    test = {
        "str": "LEFT({c}, 1) = '\"'",
        "int": "{c} REGEXP '^-?[0-9]+$'",
        "num": "{c} REGEXP '^-?[0-9]'",
    }
    columns = ["e JSON PATH '$'"]
    tests = ["LEFT(e, 1) = '{'"]
    for name, kind in ENTRY_FIELDS:
        column = f"f_{name}"
        columns.append(f"{column} JSON PATH '$.{name}'")
        check = test[kind.rstrip("?")].format(c=column)
        if kind.endswith("?"):
            check = f"({column} IS NULL OR CAST({column} AS CHAR) = 'null' OR {check})"
        tests.append(check)
    return (
        "NOT EXISTS (SELECT 1 FROM JSON_TABLE(data, '$.locks.*' COLUMNS ("
        + ", ".join(columns)
        + ")) AS j WHERE NOT COALESCE("
        + " AND ".join(tests)
        + ", FALSE))"
    )


_ENTRIES_CHECK = _entries_check()
_FAST_SET = ", %s, JSON_SET(JSON_EXTRACT(%s, '$'), '$.token', version + 1)"
_FAST_LEASE = " AND CAST(JSON_UNQUOTE(JSON_EXTRACT(data, %s)) AS BINARY) = CAST(%s AS BINARY)"

# Error codes (https://mariadb.com/kb/en/mariadb-error-code-reference/): the client's own
# (2000-2999) mean the connection is gone, as do these server codes.
ER_ACCESS_DENIED = 1045
ER_DBACCESS_DENIED = 1044
ER_BAD_DB = 1049
ER_NO_SUCH_TABLE = 1146
ER_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
_CONNECTION_GONE = {
    1040,  # ER_CON_COUNT_ERROR: too many connections
    1053,  # ER_SERVER_SHUTDOWN
    1927,  # ER_CONNECTION_KILLED (MariaDB)
    4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+: idle connection closed)
}


class _Lost(StoreUnavailable):
    """The connection broke before a change was sent: safe to reconnect and retry once."""


class _Deadlock(StoreError):
    """InnoDB rolled the transaction back to break a deadlock: safe to retry."""


# Quoting for a session without NO_BACKSLASH_ESCAPES: the characters PyMySQL escapes (and
# mysql_real_escape_string), except '"', which needs none inside '...'. str.replace is a C loop
# per character, far faster than PyMySQL's str.translate on a large document.
_ESCAPES = (
    ("\\", "\\\\"),
    ("'", "\\'"),
    ("\0", "\\0"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\x1a", "\\Z"),
)


class _Call:
    """Per-attempt bookkeeping: has a change that may be applied been sent?"""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


def _digest(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _quote(conn: Connection[Any], text: str) -> str:
    """``text`` as an SQL string literal for this session."""
    status: int = getattr(conn, "server_status", 0)  # updated by every OK packet
    if status & NO_BACKSLASH_ESCAPES:
        return conn.escape(text)  # only doubles quotes: already fast
    for char, escaped in _ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return "'" + text + "'"


def _fast_names(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each checked: they become JSON path members ``"<name>"``."""
    unique = list(dict.fromkeys(validate_name(name) for name in names))
    if not unique:
        raise ValueError("no lock names given")
    return unique


def _lock_path(name: str) -> str:
    return '$.locks."' + name + '"'


def _code(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


NO_BACKSLASH_ESCAPES = 512  # pymysql.constants.SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
MULTI_STATEMENTS = 1 << 16  # pymysql.constants.CLIENT.MULTI_STATEMENTS


class MySQLStore:
    """A lock table in a MySQL or MariaDB database."""

    def __init__(self, parsed: ParsedURL, *, table: str) -> None:
        try:
            import pymysql
        except ImportError as exc:
            raise StoreUnavailable(
                "the mysql backend needs PyMySQL: pip install 'tasklocks[mysql]'"
            ) from exc
        self._pymysql = pymysql
        self.table = check_table_name(table)
        self.url = parsed.display()
        self._parsed = parsed
        self._where = f"{parsed.host}:{parsed.port or DEFAULT_PORT}"
        self._sql = {
            name: text.format(t=self.table, task_columns=_TASK_COLUMNS_SQL, fast_max=FAST_MAX_BYTES)
            for name, text in QUERIES.items()
        }
        self._tasks_ready = False
        self._lock = threading.Lock()
        self._conn: Connection[Any] | None = None
        self._pid = 0
        self._used = 0.0  # monotonic time the connection last answered
        self._schema_checked = False
        self._known: set[str] = set()  # namespaces whose row exists
        # namespace -> (version, start, last poll, delay) of a wait that timed out
        self._backoff: dict[str, tuple[int, float, float, float]] = {}
        self._optimistic_ok = True  # was the last hint we could judge still the row?
        self._hashed: tuple[str, str] | None = None  # (text, its MD5): the last one hashed
        self._mariadb = True  # set from the server's version string on connecting
        try:
            with self._lock:
                self._run(lambda conn, call: None)  # connect and check the schema now
        except BaseException:
            self.close()
            raise

    # --- connection and errors ----------------------------------------------------------------

    def _connect(self) -> Connection[Any]:
        p = self._parsed
        try:
            conn: Connection[Any] = _connection_class(self._pymysql)(
                host=p.host,
                port=p.port or DEFAULT_PORT,
                user=p.user or "root",
                password=p.password or "",
                database=p.database,
                charset="utf8mb4",
                autocommit=True,
                client_flag=MULTI_STATEMENTS,
                connect_timeout=float(p.query.get("connect_timeout", 10)),
            )
        except self._pymysql.MySQLError as exc:
            raise self._connect_error(exc) from exc
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(
                f"cannot connect to MySQL at {self._where} ({exc}); check the URL"
            ) from exc
        self._mariadb = "mariadb" in str(getattr(conn, "server_version", "")).lower()
        return conn

    def _connect_error(self, exc: BaseException) -> StoreUnavailable:
        code, user, db = _code(exc), self._parsed.user or "root", self._parsed.database
        if code in (ER_ACCESS_DENIED, ER_DBACCESS_DENIED):
            return StoreUnavailable(
                f"MySQL at {self._where} refused user {user!r} access to database {db!r}; "
                "check the user and password in the URL and the user's grants"
            )
        if code == ER_BAD_DB:
            return StoreUnavailable(
                f"MySQL at {self._where} has no database {db!r}; "
                "create it or fix the database name in the URL"
            )
        reason = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        reason = " ".join(reason.split()).rstrip(".")
        return StoreUnavailable(
            f"cannot connect to MySQL at {self._where} ({reason}); "
            "check that the server is running and the host and port in the URL"
        )

    def _connection(self) -> Connection[Any]:
        if self._conn is not None and self._pid != os.getpid():
            # A forked child: drop the parent's connection without a QUIT packet. PyMySQL's
            # Connection.__del__ is _force_close, which only closes this process's file descriptor.
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
            with contextlib.suppress(Exception):  # already broken: close() only cleans up
                conn.close()

    @contextmanager
    def _errors(self, call: _Call) -> Iterator[None]:
        """Turn driver errors into tasklocks errors (the original kept as ``__cause__``)."""
        try:
            yield
        except self._pymysql.MySQLError as exc:
            code = _code(exc)
            if self._gone(exc):
                self._drop()
                if call.sent:
                    raise OutcomeUnknown(
                        f"lost the connection to MySQL at {self._where} after sending a change, "
                        "which may or may not have been applied; re-read before retrying"
                    ) from exc
                raise _Lost(
                    f"lost the connection to MySQL at {self._where} ({exc}); "
                    "check that the server is running"
                ) from exc
            if code == ER_DEADLOCK:
                raise _Deadlock(str(exc)) from exc
            if code == ER_LOCK_WAIT_TIMEOUT:
                raise StoreUnavailable(
                    f"a row of {self.table} at {self._where} stayed locked past "
                    "innodb_lock_wait_timeout; is some session holding a long transaction on it?"
                ) from exc
            raise StoreError(f"MySQL at {self._where} failed: {exc}") from exc

    def _gone(self, exc: BaseException) -> bool:
        """Does this driver error mean the connection is lost?"""
        code = _code(exc)
        return isinstance(exc, self._pymysql.InterfaceError) or (
            isinstance(exc, self._pymysql.OperationalError)
            and (2000 <= code < 3000 or code in _CONNECTION_GONE)
        )

    def _run(self, body: Callable[[Connection[Any], _Call], T]) -> T:
        """Run ``body`` (lock held); reconnect and retry once if the connection was lost first."""
        retried = deadlocks = 0
        while True:
            call = _Call()
            try:
                conn = self._connection()
                with self._errors(call):
                    if time.monotonic() - self._used > IDLE_PING:
                        conn.ping(reconnect=False)  # find a dead idle connection before writing
                    if not self._schema_checked:
                        self._check_schema(conn)
                    result = body(conn, call)
                self._used = time.monotonic()
                return result
            except _Lost:
                if retried:
                    raise
                retried += 1
            except _Deadlock as exc:
                deadlocks += 1
                if deadlocks > DEADLOCK_RETRIES:
                    raise StoreUnavailable(
                        f"MySQL at {self._where} kept reporting deadlocks on {self.table}: {exc}"
                    ) from exc
                time.sleep(random.uniform(0, 0.001 * deadlocks))

    def _check_schema(self, conn: Connection[Any]) -> None:
        with conn.cursor() as cur:
            try:
                cur.execute(self._sql["schema_version"])
                row = cur.fetchone()
            except self._pymysql.ProgrammingError as exc:
                if _code(exc) != ER_NO_SUCH_TABLE:
                    raise
                row = None
            if row is None:
                # Concurrent CREATE TABLE IF NOT EXISTS are serialized by metadata locks
                # (https://dev.mysql.com/doc/refman/8.0/en/metadata-locking.html).
                cur.execute(self._sql["create_table"])
                cur.execute(self._sql["create_meta"])
                cur.execute(self._sql["insert_meta"], (str(SCHEMA_VERSION),))
                cur.execute(self._sql["schema_version"])
                row = cur.fetchone()
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
        self._schema_checked = True

    # --- the Store protocol -------------------------------------------------------------------

    def read(self, namespace: str) -> Snapshot:
        def body(conn: Connection[Any], call: _Call) -> Snapshot:
            with conn.cursor() as cur:
                cur.execute(self._sql["select"], (namespace,))
                row = cur.fetchone()
                if row is None:
                    cur.execute(self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
                    cur.execute(self._sql["select"], (namespace,))
                    row = cur.fetchone()
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
        sql = self._sql["update_if"] % (
            _quote(conn, change[0]),
            conn.escape(namespace),
            int(hint.version),
            conn.escape(self._digest(hint.data)),
        )
        with conn.cursor() as cur:
            call.sent = True
            n = cur.execute(sql)
            call.sent = False  # the reply came: the outcome is known
        return Snapshot(hint.version + 1, change[0]) if n == 1 else None

    def _is_current(self, conn: Connection[Any], namespace: str, hint: Snapshot) -> bool:
        with conn.cursor() as cur:
            cur.execute(self._sql["check"], (namespace,))
            row = cur.fetchone()
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
        with conn.cursor() as cur:
            if namespace not in self._known:
                # Outside the transaction: an INSERT IGNORE that finds the row takes a shared
                # lock on it, and two such transactions upgrading to FOR UPDATE deadlock
                # (https://dev.mysql.com/doc/refman/8.0/en/innodb-locks-set.html).
                cur.execute(self._sql["insert_row"], (namespace, EMPTY_DOCUMENT))
                self._known.add(namespace)
            try:
                # One round trip: START TRANSACTION's result, then the SELECT's.
                cur.execute(self._sql["lock_row"], (namespace,))
                cur.nextset()
                row = cur.fetchone()
                if row is None:
                    self._known.discard(namespace)
                    raise StoreError(f"the row of namespace {namespace!r} vanished; retry")
                snap = Snapshot(int(row[0]), str(row[1]))
                if hint is not None and hint.version == snap.version and hint.data == snap.data:
                    snap = hint
                    self._optimistic_ok = True  # nobody else wrote: try the short path again
                change = compute(snap)
                if change is None:
                    conn.commit()
                else:
                    # One round trip: the UPDATE's result, then COMMIT's. The row is locked,
                    # so the compare-and-swap cannot miss.
                    sql = self._sql["update"] % (
                        _quote(conn, change[0]),
                        conn.escape(namespace),
                        int(snap.version),
                    )
                    call.sent = True
                    cur.execute(sql + "; COMMIT")
                    cur.nextset()
                    snap = Snapshot(snap.version + 1, change[0])
            except BaseException as exc:
                # A server error in UPDATE or COMMIT stops the statements there: the transaction
                # is still open and nothing was committed. A lost connection is OutcomeUnknown.
                server_error = isinstance(exc, self._pymysql.MySQLError) and not self._gone(exc)
                if not call.sent or server_error:
                    call.sent = False
                    self._rollback(conn)
                raise
        return snap

    def _rollback(self, conn: Connection[Any]) -> None:
        try:
            conn.rollback()
        except self._pymysql.MySQLError:
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
        wake waiters (none wait for an acquisition)."""
        unique = _fast_names(names)
        sql = self._sql["fast_acquire"].format(
            compact=self._compact(),
            sets=_FAST_SET * len(unique),
            paths=", %s" * len(unique),
            entries=_ENTRIES_CHECK,
        )
        paths = [_lock_path(name) for name in unique]
        params = [
            *(v for path in paths for v in (path, entry)),
            namespace,
            *paths,
            entry,
        ]
        return self._fast(sql, params)

    def fast_release(self, namespace: str, names: Sequence[str], lease: str) -> int | None:
        """In one statement: if every one of ``names`` is in "locks" with "lease" equal to
        ``lease`` (and the format is 1), remove them all and bump the version. Return the new
        version, or None if the condition did not hold (nothing written). Raises
        :class:`OutcomeUnknown` as :meth:`fast_acquire` does. Waiters poll the version here."""
        unique = _fast_names(names)
        sql = self._sql["fast_release"].format(
            compact=self._compact(),
            paths=", %s" * len(unique),
            leases=_FAST_LEASE * len(unique),
            entries=_ENTRIES_CHECK,
        )
        paths = [_lock_path(name) for name in unique]
        params = [
            *paths,
            namespace,
            *(v for path in paths for v in (path + ".lease", lease)),
        ]
        return self._fast(sql, params)

    def _compact(self) -> str:
        return "JSON_COMPACT" if self._mariadb else ""

    def _fast(self, sql: str, params: Sequence[str]) -> int | None:
        """Run a one-statement change; the new version, or None if its condition did not hold."""

        def body(conn: Connection[Any], call: _Call) -> int | None:
            with conn.cursor() as cur:
                call.sent = True
                n = cur.execute(sql, params)
                call.sent = False  # the reply came: the outcome is known
                # Only a changed row counts (no CLIENT.FOUND_ROWS), and the version always
                # changes: 1 means written, and lastrowid is the LAST_INSERT_ID(version + 1).
                return int(cur.lastrowid) if n == 1 else None

        with self._lock:
            return self._run(body)

    def _version(self, namespace: str) -> int:
        def body(conn: Connection[Any], call: _Call) -> int:
            with conn.cursor() as cur:
                cur.execute(self._sql["select_version"], (namespace,))
                row = cur.fetchone()
            return int(row[0]) if row is not None else 0

        with self._lock:
            return self._run(body)

    def wait_for_change(
        self, namespace: str, version: int, timeout: float, wake_fd: int | None = None
    ) -> bool:
        # MySQL has no LISTEN/NOTIFY: poll the version, quickly at first, then more slowly.
        # A caller that waits in slices (to look for dead holders in between) calls again with
        # the same version: the backoff goes on where it stopped instead of starting over.
        now = time.monotonic()
        deadline = now + timeout
        previous = self._backoff.pop(namespace, None)
        if previous is not None and previous[0] == version:
            _, start, last_poll, delay = previous
        else:
            if self._version(namespace) != version:
                return True
            start, last_poll = now, now
            delay = POLL_FIRST if wake_fd is None else WAKE_POLL_FIRST
        while True:
            now = time.monotonic()
            if now >= deadline:
                self._backoff[namespace] = (version, start, last_poll, delay)
                return False
            next_poll = last_poll + delay
            pause = max(0.0, min(next_poll, deadline) - now)
            if wake_fd is None:
                time.sleep(pause)
            elif select.select([wake_fd], [], [], pause)[0]:
                # Local releases wake us through wake_fd (drained by the caller, not here).
                return True
            if time.monotonic() < next_poll:
                continue
            if self._version(namespace) != version:
                return True
            last_poll = time.monotonic()
            if wake_fd is None:
                cap = min(POLL_CAP, max(POLL_CAP_FAST, POLL_SHARE * (last_poll - start)))
            else:
                cap = WAKE_POLL_CAP
            delay = min(delay * POLL_GROWTH, cap)

    def namespaces(self) -> list[str]:
        def body(conn: Connection[Any], call: _Call) -> list[str]:
            with conn.cursor() as cur:
                cur.execute(self._sql["namespaces"])
                return sorted(str(r[0]) for r in cur.fetchall())

        with self._lock:
            return self._run(body)

    # --- task records ---------------------------------------------------------------------------

    def _tasks(self, body: Callable[[Any], T]) -> T:
        """Run ``body(cursor)`` once the tasks table exists."""

        def run(conn: Connection[Any], call: _Call) -> T:
            with conn.cursor() as cur:
                if not self._tasks_ready:
                    cur.execute(self._sql["create_tasks"])
                    self._tasks_ready = True
                return body(cur)

        with self._lock:
            return self._run(run)

    @staticmethod
    def _task_row(cur: Any, row: Sequence[TaskValue]) -> TaskRow:
        return {d[0]: value for d, value in zip(cur.description, row, strict=True)}

    def create_task(self, fields: Mapping[str, TaskValue]) -> int:
        names = [n for n in TASK_FIELDS if n in fields]
        sql = self._sql["insert_task"].format(
            columns="".join(f", `{n}`" for n in names), values=", %s" * len(names)
        )

        def body(cur: Any) -> int:
            cur.execute(sql, [fields[n] for n in names])
            return int(cur.lastrowid)

        return self._tasks(body)

    def get_task(self, task_id: int) -> TaskRow | None:
        def body(cur: Any) -> TaskRow | None:
            cur.execute(self._sql["get_task"], (task_id,))
            row = cur.fetchone()
            return None if row is None else self._task_row(cur, row)

        return self._tasks(body)

    def update_task(self, task_id: int, version: int, fields: Mapping[str, TaskValue]) -> bool:
        names = [n for n in TASK_FIELDS if n in fields]
        sql = self._sql["update_task"].format(sets="".join(f", `{n}` = %s" for n in names))

        def body(cur: Any) -> bool:
            return int(cur.execute(sql, [*(fields[n] for n in names), task_id, version])) == 1

        return self._tasks(body)

    def list_tasks(
        self,
        states: Sequence[str] | None = None,
        limit: int | None = None,
        namespace: str | None = None,
    ) -> list[TaskRow]:
        where, tail, params = task_filter(
            states, namespace, limit, mark="%s", namespace_column="`namespace`"
        )
        sql = self._sql["list_tasks"].format(where=where, limit=tail)

        def body(cur: Any) -> list[TaskRow]:
            cur.execute(sql, params)
            return [self._task_row(cur, row) for row in cur.fetchall()]

        return self._tasks(body)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._drop()
            self._conn = None
