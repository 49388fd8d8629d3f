"""MySQL / MariaDB adapter (PyMySQL): the driver calls; statements in ``sql/mysql.sql``.

* The connection allows multi-statements: the pessimistic path's two round trips are
  ``START TRANSACTION; SELECT ... FOR UPDATE``, then ``UPDATE ...; COMMIT``.
* The document is quoted into the SQL here with ``str.replace`` (PyMySQL's ``str.translate``
  escaping costs milliseconds for a large document), unless the session has
  ``NO_BACKSLASH_ESCAPES``, where the driver's own (fast) quoting is used.
* MySQL has no LISTEN/NOTIFY: waiters poll the version, quickly at first, then more slowly.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.store._base import Change, fill
from tasklocks.store._sql_server import CONNECT_TIMEOUT, IO_TIMEOUT, POLLED, ServerStore

__all__ = ["MySQLStore", "preload"]

_CONNECTION_CLASS: Any = None


def _connection_class(pymysql: Any) -> Any:
    """PyMySQL's Connection, sharing one TLS context between connections. Without TLS options
    PyMySQL 2 tries TLS when the server offers it ("preferred", no certificate check) and builds
    a new ``SSLContext`` for every connection, which loads the system's CA certificates: about
    20 ms of a 22 ms connect here. That context is the same every time and may be shared, so it
    is built once per process. Any explicit TLS option goes through PyMySQL unchanged."""
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


# Error codes (https://mariadb.com/kb/en/mariadb-error-code-reference/): the client's own
# (2000-2999) mean the connection is gone, as do these server codes.
ER_ACCESS_DENIED = 1045
ER_DBACCESS_DENIED = 1044
ER_BAD_DB = 1049
ER_NO_SUCH_TABLE = 1146
ER_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
# ER_CON_COUNT_ERROR (too many connections), ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED (MariaDB),
# ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+: an idle connection closed)
_CONNECTION_GONE = {1040, 1053, 1927, 4031}
NO_BACKSLASH_ESCAPES = 512  # pymysql.constants.SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
MULTI_STATEMENTS = 1 << 16  # pymysql.constants.CLIENT.MULTI_STATEMENTS

# Quoting for a session without NO_BACKSLASH_ESCAPES: the characters PyMySQL escapes (and
# mysql_real_escape_string), except '"', which needs none inside '...'. str.replace is a C loop
# per character, far faster than PyMySQL's str.translate on a large document.
_ESCAPES = tuple(zip("\\'\0\n\r\x1a", ("\\\\", "\\'", "\\0", "\\n", "\\r", "\\Z"), strict=True))


def _code(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _quote(conn: Any, text: str) -> str:
    """``text`` as an SQL string literal for this session."""
    status: int = getattr(conn, "server_status", 0)  # updated by every OK packet
    if status & NO_BACKSLASH_ESCAPES:
        return str(conn.escape(text))  # only doubles quotes: already fast
    for char, escaped in _ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return "'" + text + "'"


class MySQLStore(ServerStore):
    """A lock table in a MySQL or MariaDB database."""

    LABEL = "MySQL"
    DIALECT = "mysql"
    DEFAULT_PORT = 3306
    DEFAULT_USER = "root"
    POLL = POLLED  # no notifications: waiters poll
    QUOTE = "`"
    _mariadb = True  # set from the server's version string on connecting

    # --- the driver -----------------------------------------------------------------------------

    def _import_driver(self) -> None:
        try:
            import pymysql
        except ImportError as exc:
            raise StoreUnavailable(
                "the mysql backend needs PyMySQL: pip install 'tasklocks[mysql]'"
            ) from exc
        self._pymysql = pymysql
        self._driver_errors = (pymysql.MySQLError,)

    def _open(self, **options: Any) -> Any:
        p = self._parsed
        conn = _connection_class(self._pymysql)(
            host=p.host,
            port=p.port or self.DEFAULT_PORT,
            user=self._user,
            password=p.password or "",
            database=p.database,
            charset="utf8mb4",
            autocommit=True,
            client_flag=MULTI_STATEMENTS,
            connect_timeout=float(p.query.get("connect_timeout", CONNECT_TIMEOUT)),
            # A connection that went silent (a dropped link, a frozen server) fails a call in
            # half a minute instead of a quarter of an hour; no statement of ours runs longer.
            read_timeout=IO_TIMEOUT,
            write_timeout=IO_TIMEOUT,
        )
        self._mariadb = "mariadb" in str(getattr(conn, "server_version", "")).lower()
        return conn

    def _lend(self, conn: Any) -> Any:
        fix = "create the engine with connect_args={'client_flag': CLIENT.MULTI_STATEMENTS}"
        if not getattr(conn, "client_flag", 0) & MULTI_STATEMENTS:
            raise StoreUnavailable(
                "the engine's PyMySQL connections cannot send several statements in one query, "
                f"which tasklocks does; {fix} (pymysql.constants.CLIENT)"
            )
        if not str(getattr(conn, "charset", "")).startswith("utf8mb4"):
            raise StoreUnavailable(
                f"the engine's PyMySQL connections use charset {conn.charset!r}; tasklocks needs "
                "utf8mb4 (?charset=utf8mb4 in the engine's URL)"
            )
        self._mariadb = "mariadb" in str(getattr(conn, "server_version", "")).lower()
        was = conn.get_autocommit()
        conn.autocommit(True)
        return was

    def _unlend(self, conn: Any, was: Any) -> None:
        conn.autocommit(was)

    def _why(self, exc: BaseException) -> tuple[str, str]:
        reason = " ".join(str(exc.args[1] if len(exc.args) > 1 else exc).split()).rstrip(".")
        problems = {ER_ACCESS_DENIED: "user", ER_DBACCESS_DENIED: "user", ER_BAD_DB: "database"}
        return reason, problems.get(_code(exc), "")

    # A forked child drops the parent's connection without a QUIT packet (the default _abandon):
    # PyMySQL's Connection.__del__ is _force_close, which only closes this process's descriptor.

    def _gone(self, exc: BaseException) -> bool:
        code = _code(exc)
        return isinstance(exc, self._pymysql.InterfaceError) or (
            isinstance(exc, self._pymysql.OperationalError)
            and (2000 <= code < 3000 or code in _CONNECTION_GONE)
        )

    def _retryable(self, exc: BaseException) -> bool:
        return _code(exc) == ER_DEADLOCK  # InnoDB rolled the transaction back to break it

    def _missing_table(self, exc: BaseException) -> bool:
        return _code(exc) == ER_NO_SUCH_TABLE

    def _failure(self, exc: BaseException) -> StoreError:
        if _code(exc) == ER_LOCK_WAIT_TIMEOUT:
            return StoreUnavailable(
                f"a row of {self.table} at {self._where} stayed locked past "
                "innodb_lock_wait_timeout; is some session holding a long transaction on it?"
            )
        return super()._failure(exc)

    def _execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        cur = conn.cursor()  # buffered: the rows are read with the reply
        cur.execute(sql, params)
        return cur

    def _ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def _commit(self, conn: Any) -> None:
        conn.commit()

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except self._pymysql.MySQLError:
            self._drop()  # the server rolls back when the connection ends

    # --- changes --------------------------------------------------------------------------------

    def _swap(self, conn: Any, namespace: str, version: int, change: Change, digest: str) -> bool:
        quoted = (_quote(conn, change[0]), conn.escape(namespace), int(version))
        sql = self._sql["update_if"] % (*quoted, conn.escape(digest))
        return bool(self._execute(conn, sql).rowcount == 1)

    def _lock_row(self, conn: Any, namespace: str) -> tuple[Any, Any]:
        cur = self._execute(conn, self._sql["lock_row"], (namespace,))
        cur.nextset()  # START TRANSACTION's result, then the SELECT's, then the sessions'
        return self._two_results(cur)

    def _read_row(self, conn: Any, namespace: str) -> tuple[Any, Any]:
        return self._two_results(self._execute(conn, self._sql["read_row"], (namespace,)))

    @staticmethod
    def _two_results(cur: Any) -> tuple[Any, Any]:
        row = cur.fetchone()
        cur.nextset()
        return row, cur.fetchall()

    def _write_and_commit(self, conn: Any, namespace: str, version: int, change: Change) -> None:
        quoted = (_quote(conn, change[0]), conn.escape(namespace), int(version))
        self._execute(conn, self._sql["update_commit"] % quoted).nextset()

    def _fast_statement(
        self, acquire: bool, namespace: str, names: list[str], lease: str, record: str = ""
    ) -> Any:
        # Names and the lease are checked (plain names): no quotes in a path.
        paths = ['$.locks."' + name + '"' for name in names]
        proc = '$.procs."' + lease + '"'
        compact = "JSON_COMPACT" if self._mariadb else ""  # MariaDB's JSON_SET adds spaces
        fills = {"compact": compact, "paths": ", %s" * len(names)}
        if acquire:
            sql = fill(self._sql["fast_acquire"], sets=self._sql["fast_set"] * len(names), **fills)
            sets = (v for path in paths for v in (path, lease))
            return sql, [proc, record, *sets, namespace, *paths, record]
        sql = fill(self._sql["fast_release"], leases=self._sql["fast_lease"] * len(names), **fills)
        tests = (v for path in paths for v in (path + "[0]", lease))
        return sql, [*paths, lease, *paths, *paths, proc, namespace, *tests]

    def _schema_extras(self, conn: Any) -> None:
        self._execute(conn, self._sql["create_sessions"])
        if self._mariadb:  # (MySQL gets the index with new tables only)
            self._execute(conn, self._sql["index_sessions"])

    def _fast_then_read(
        self, conn: Any, statement: tuple[str, Any], namespace: str
    ) -> tuple[int | None, Any, Any]:
        sql, params = statement  # CLIENT.MULTI_STATEMENTS: the change, then read_row's two
        cur = self._execute(
            conn, f"{sql.rstrip().rstrip(';')};\n{self._sql['read_row']}", [*params, namespace]
        )
        version = self._fast_version(cur)  # the UPDATE's result, before moving on
        cur.nextset()
        row, times = self._two_results(cur)
        return version, row, times

    def _fast_version(self, cursor: Any) -> int | None:
        # Only a changed row counts (no CLIENT.FOUND_ROWS), and the version always changes:
        # 1 means written, and lastrowid is the LAST_INSERT_ID(version + 1).
        return int(cursor.lastrowid) if cursor.rowcount == 1 else None
