"""MySQL / MariaDB adapter (PyMySQL): the driver calls; statements in ``sql/mysql.sql``.

* The connection allows multi-statements: a change through the document takes two round trips,
  ``START TRANSACTION; SELECT ... FOR UPDATE`` (the document, then the rows of the names it names,
  made where missing, then the sessions), then ``UPDATE ...; COMMIT``; three if it brings in a
  name it did not name (a waiter it grants).
* The document is quoted into the SQL here with ``str.replace`` (PyMySQL's ``str.translate``
  escaping costs milliseconds for a large document), unless the session has
  ``NO_BACKSLASH_ESCAPES``, where the driver's own (fast) quoting is used.
* MySQL has no LISTEN/NOTIFY: waiters poll the version, quickly at first, then more slowly.
* A name's row release by a process that releases often (again within ``HOT_GAP``), for a lease
  whose session it renews, writes nothing durable: the connection takes a user-level lock named
  after the lease (its marker), which every reader and taker reads as the lease released
  (``name_release_marked``, ``freed`` in ``sql/mysql.sql``). The rows are written free in a batch
  that lets the markers go (``flush_releases``, the file's ``free_marked``): at ``MARKED_MAX``
  marked releases, at each session renewal, at ``close`` and at the interpreter's exit. A marker
  lives as long as its server session: once the connection is lost, the next one writes the
  rows in a batch on a thread of its own (the old session may hold the markers for hours after
  a cut), and the leases are said by ``lost_releases`` for the lock table to give back too
  (design.md, "MariaDB: a release marked by a user lock").
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from tasklocks._url import MYSQL_TLS
from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.names import is_name
from tasklocks.store._base import Call, Change, OutcomeUnknown, fill
from tasklocks.store._names import stored
from tasklocks.store._rows import fast_names, text_of
from tasklocks.store._sql_server import (
    CONNECT_TIMEOUT,
    POLLED,
    ServerStore,
    by_position,
)

__all__ = ["MySQLStore", "preload"]

_CONNECTION_CLASS: Any = None
# Marked releases (see the module docstring): a process's release is marked when it comes within
# HOT_GAP seconds of its store's last release (so a process that releases once in a while writes
# each one, as before); a connection writes its marked rows free once it holds MARKED_MAX markers.
# A lease is marked only if shorter than MARKED_LEASE (the marker's name stays within MySQL's 64
# characters; tasklocks' own leases have 16).
HOT_GAP = 1.0
MARKED_MAX = 64
MARKED_LEASE = 48
MARKER_WAIT = 1.0  # seconds close() and the interpreter's exit wait to let a store's markers go
T = TypeVar("T")
_PRELUDE = struct.Struct("<iB").pack  # a command packet's length, sequence 0 and command byte
_HEADER = struct.Struct("<HBB").unpack  # a reply packet's length (low 16, high 8 bits), sequence
COM_QUERY = 3
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_CLOSE = 0x19
# COM_STMT_EXECUTE's head: statement id, flags (no cursor), iteration count (always 1)
_EXECUTE = struct.Struct("<IBI").pack
_PREPARE_OK = struct.Struct("<IHH").unpack_from  # statement id, columns, parameters
DEPRECATE_EOF = 1 << 24  # CLIENT.DEPRECATE_EOF: no EOF packet after a list of definitions
ER_UNKNOWN_STMT_HANDLER = 1243  # a prepared statement this session no longer has
MAX_PACKET = 2**24 - 1
MORE_RESULTS = 8  # SERVER_STATUS.SERVER_MORE_RESULTS_EXISTS


def _connection_class(pymysql: Any) -> Any:
    """PyMySQL's Connection, sharing one TLS context between connections. Without TLS options
    PyMySQL 2 tries TLS when the server offers it ("preferred", no certificate check) and builds
    a new ``SSLContext`` for every connection, which loads the system's CA certificates: about
    20 ms of a 22 ms connect here. That context is the same every time and may be shared, so it
    is built once per process. Any explicit TLS option goes through PyMySQL unchanged. The class
    also sends the row statements and reads their replies itself (``ok_query``)."""
    global _CONNECTION_CLASS
    if _CONNECTION_CLASS is None:
        base = pymysql.connections.Connection

        class Connection(base):  # type: ignore[misc, valid-type]
            _default_context: Any = None
            _result: Any  # PyMySQL's, typed for ok_query
            _current_timeout: Any
            # This session's prepared row statements: text -> id (0: used once; -1: refused).
            _row_statements: dict[str, int] | None = None

            def _create_ssl_ctx(self, sslp: Any) -> Any:
                if isinstance(sslp, dict) and not sslp:
                    cls = type(self)
                    if cls._default_context is None:
                        cls._default_context = super()._create_ssl_ctx(sslp)
                    return cls._default_context
                return super()._create_ssl_ctx(sslp)

            def ok_query(self, sql: str) -> tuple[int, int]:
                """One statement whose reply is an OK packet (an ``UPDATE``): its affected rows
                and insert id. ``query`` then ``insert_id`` without PyMySQL's result object,
                whose making and reading of the packet were half of the Python a row pair spends
                in the driver (so ``insert_id()`` says 0 afterwards: nothing reads it). An error
                packet raises as ``query`` raises it; any other reply, which these statements
                cannot get, closes the connection and raises a lost connection's error (the
                statement may have run)."""
                if self._half_read():
                    return super().query(sql), super().insert_id()  # PyMySQL finishes that first
                data = sql.encode(self.encoding)
                if not self._sock or len(data) + 1 >= MAX_PACKET:
                    return super().query(sql), super().insert_id()
                self._result = None
                return self._exchange(_PRELUDE(len(data) + 1, COM_QUERY) + data, self._ok_reply)

            def _half_read(self) -> bool:
                """A result of PyMySQL's left unread (unbuffered, or more to come)."""
                result = self._result
                return result is not None and bool(result.unbuffered_active or result.has_next)

            def _exchange(self, packet: bytes, read: Callable[[], T]) -> T:
                """Send a command and ``read`` its reply. Anything but the server's error (the
                session in step) or PyMySQL's own for a lost connection (closed already) that
                stops it between the two, or within either (a KeyboardInterrupt), closes the
                connection: its reply, left unread, would be read as the next command's."""
                try:
                    self._write_bytes(packet)
                    return read()
                except pymysql.err.MySQLError:
                    raise
                except BaseException:
                    self._force_close()
                    raise

            def _reply(self) -> tuple[int, bytes]:
                """The next reply packet to a command sent here: its sequence number and body."""
                if self._current_timeout != self._read_timeout:
                    self._sock.settimeout(self._read_timeout)
                    self._current_timeout = self._read_timeout
                low, high, seq = _HEADER(self._read_bytes(4))
                return seq, self._read_bytes(low + (high << 16))

            def _ok_reply(self) -> tuple[int, int]:
                """The OK packet that answers a row statement (``ok_query``, ``ok_execute``): its
                affected rows and insert id; an error packet raises as PyMySQL raises it."""
                seq, reply = self._reply()
                self._next_seq_id = 2
                first = reply[0] if seq == 1 and reply else -1
                if first == 0:  # OK: affected rows, insert id (length-encoded), status
                    with contextlib.suppress(IndexError, KeyError):  # (a short packet: below)
                        rows, at = (reply[1], 2) if reply[1] < 0xFB else _lenenc(reply, 1)
                        token, at = (reply[at], at + 1) if reply[at] < 0xFB else _lenenc(reply, at)
                        status = reply[at] | reply[at + 1] << 8
                        if not status & MORE_RESULTS:
                            self.server_status = status
                            self._affected_rows = rows
                            return rows, token
                elif first == 0xFF:
                    pymysql.err.raise_mysql_exception(reply)
                # The statement may have run: a lost connection's error (OutcomeUnknown).
                self._unexpected(seq, reply, "a row statement")

            def _unexpected(self, seq: int, reply: bytes, to: str) -> NoReturn:
                """Close the connection on a reply that cannot be, and raise a lost
                connection's error (a sequence 0: MariaDB's error packet as it shuts down)."""
                self._force_close()
                if seq == 0:
                    raise pymysql.err.OperationalError(
                        CR_SERVER_LOST, "Lost connection to MySQL server during query"
                    )
                raise pymysql.err.OperationalError(
                    CR_COMMANDS_OUT_OF_SYNC,
                    f"unexpected reply to {to} (sequence {seq}, {len(reply)} bytes, first byte "
                    f"{reply[:1]!r}); the connection was closed",
                )

            def ok_execute(self, statement: _Positional, values: Any) -> tuple[int, int] | None:
                """``ok_query`` of a row statement prepared on this session: its affected rows
                and insert id, or None where the caller sends it as text instead (its first use
                on this session, since a short-lived process would prepare for nothing; a
                statement the server would not prepare; a value that is not text; a half-read
                result). The second use prepares it (``COM_STMT_PREPARE``); every use after
                sends only its id and values (``COM_STMT_EXECUTE``), which the server does not
                parse again: about a tenth of a pair's server CPU (design.md)."""
                prepared = self._row_statements
                if prepared is None:
                    prepared = self._row_statements = {}
                handle = prepared.get(statement.sql)
                if handle is None or handle < 0:  # first use: text; or never prepared here
                    prepared[statement.sql] = 0 if handle is None else handle
                    return None
                if not self._sock or self._half_read():
                    return None  # ok_query: PyMySQL finishes that first
                if handle == 0:
                    handle = prepared[statement.sql] = self._prepare(statement)
                    if handle < 0:
                        return None
                try:
                    given = [v.encode(self.encoding) for v in values]
                except AttributeError:  # (not text)
                    return None
                body = b"".join(
                    [
                        _EXECUTE(handle, 0, 1),
                        statement.head,
                        *[_lenenc_bytes(v) for v in given],
                    ]
                )
                if len(body) + 1 >= MAX_PACKET:
                    return None
                self._result = None
                packet = _PRELUDE(len(body) + 1, COM_STMT_EXECUTE) + body
                try:
                    return self._exchange(packet, self._ok_reply)
                except pymysql.err.MySQLError as exc:
                    if exc.args[0] != ER_UNKNOWN_STMT_HANDLER:
                        raise
                prepared[statement.sql] = 0  # (gone from the session: nothing ran) again
                return None

            def _prepare(self, statement: _Positional) -> int:
                """Prepare ``statement`` on this session: its statement id, or -1 if the server
                refused it (too many prepared statements on the server, a proxy that does not
                prepare...) or counts other parameters than it has; it then runs as text on
                this session, where a real error shows as it would."""
                data = statement.sql.encode(self.encoding)
                self._result = None
                packet = _PRELUDE(len(data) + 1, COM_STMT_PREPARE) + data
                handle, params = self._exchange(packet, self._prepared)
                if handle >= 0 and params != statement.count:
                    self._write_bytes(_PRELUDE(5, COM_STMT_CLOSE) + handle.to_bytes(4, "little"))
                    return -1  # (COM_STMT_CLOSE has no reply)
                return int(handle)

            def _prepared(self) -> tuple[int, int]:
                """The reply to ``COM_STMT_PREPARE``: the statement's id and its parameters'
                count, read with their definitions; (-1, 0) for an error packet."""
                seq, reply = self._reply()
                self._next_seq_id = seq + 1
                if seq == 1 and reply[:1] == b"\xff":
                    return -1, 0
                if seq != 1 or reply[:1] != b"\x00" or len(reply) < 9:
                    self._unexpected(seq, reply, "a row statement's preparation")
                handle, columns, params = _PREPARE_OK(reply, 1)
                eof = not self.client_flag & self.server_capabilities & DEPRECATE_EOF
                for count in (params, columns):  # their definitions, each list then an EOF
                    for _ in range(count + (1 if count and eof else 0)):
                        self._reply()
                return int(handle), int(params)

        _CONNECTION_CLASS = Connection
    return _CONNECTION_CLASS


class _Positional:
    """A row statement with named parameters (``%(ns)s``) as the server prepares it (``?``),
    the order of its values (a name may come twice), and the head of its parameters in
    ``COM_STMT_EXECUTE``: no NULL, types given, each a string (``MYSQL_TYPE_STRING``), which the
    server reads in the session's character set, as it reads a quoted literal."""

    __slots__ = ("count", "head", "sql", "values")

    def __init__(self, sql: str) -> None:
        self.sql, self.values, n = by_position(sql, numbered=False)
        self.count = n  # (a statement without parameters sends none of what follows)
        self.head = bytes((n + 7) // 8) + b"\x01" + b"\xfe\x00" * n if n else b""


_STORES: weakref.WeakSet[MySQLStore] = weakref.WeakSet()


def _let_all_markers_go() -> None:
    for store in list(_STORES):
        store._let_markers_go()


def _forget_the_parents_markers() -> None:
    """In a forked child: the parent's marked releases are the parent's to write, and a lock
    of theirs a parent's thread held at the fork would stay held."""
    for store in list(_STORES):
        store._marked, store._markers, store._lost = {}, [], []
        store._lost_lock, store._flushing = threading.Lock(), threading.Lock()
        store._flush_wanted = False


atexit.register(_let_all_markers_go)
os.register_at_fork(after_in_child=_forget_the_parents_markers)

_POSITIONAL: dict[str, _Positional] = {}  # a row statement's text -> its prepared form


def _lenenc_bytes(value: bytes) -> bytes:
    """``value`` as the protocol's length-encoded string."""
    size = len(value)
    if size < 0xFB:
        return bytes((size,)) + value
    if size < 1 << 16:
        return b"\xfc" + size.to_bytes(2, "little") + value
    if size < 1 << 24:
        return b"\xfd" + size.to_bytes(3, "little") + value
    return b"\xfe" + size.to_bytes(8, "little") + value


def _lenenc(data: bytes, at: int) -> tuple[int, int]:
    """The length-encoded integer at ``at`` of a reply, and where the next field starts."""
    first = data[at]
    if first < 0xFB:
        return first, at + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size


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
ER_ACCESS_DENIED_NO_PASSWORD = 1698  # e.g. a user that signs in through unix_socket only
ER_BAD_DB = 1049
CR_SSL_CONNECTION_ERROR = 2026
CR_SERVER_LOST = 2013
CR_COMMANDS_OUT_OF_SYNC = 2014
ER_NO_SUCH_TABLE = 1146
ER_BAD_FIELD = 1054  # no such column
ER_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
# A server that refuses the marker: ER_NOT_SUPPORTED_YET (a Galera node's GET_LOCK, MDEV-30473),
# ER_SP_DOES_NOT_EXIST (a server without the function).
_NO_MARKERS = {1235, 1305}
# ER_CON_COUNT_ERROR (too many connections), ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED (MariaDB),
# ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+: an idle connection closed)
_CONNECTION_GONE = {1040, 1053, 1927, 4031}
NO_BACKSLASH_ESCAPES = 512  # pymysql.constants.SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
MULTI_STATEMENTS = 1 << 16  # pymysql.constants.CLIENT.MULTI_STATEMENTS

# Quoting for a session without NO_BACKSLASH_ESCAPES: the characters PyMySQL escapes (and
# mysql_real_escape_string), except '"', which needs none inside '...'. str.replace is a C loop
# per character, far faster than PyMySQL's str.translate on a large document.
_ESCAPES = tuple(zip("\\'\0\n\r\x1a", ("\\\\", "\\'", "\\0", "\\n", "\\r", "\\Z"), strict=True))
# Text with none of those characters (nor the quote) is the same literal in either mode.
_PLAIN = re.compile(r"[^\\'\x00\n\r\x1a]*").fullmatch


def _code(exc: BaseException | None) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _tls(query: Mapping[str, str]) -> dict[str, Any]:
    """PyMySQL's arguments for the TLS parameters of the URL's query (checked by open_store)."""
    paths, flags = MYSQL_TLS[:3], MYSQL_TLS[3:]
    out: dict[str, Any] = {key: query[key] for key in paths if key in query}
    out.update({key: query[key].lower() in ("true", "1") for key in flags if key in query})
    return out


def _quote(conn: Any, text: str) -> str:
    """``text`` as an SQL string literal for this session."""
    if _PLAIN(text):  # names, leases, most records: nothing to escape in either mode
        return "'" + text + "'"
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
    GUARDED = True  # its own connections' sockets block without a timeout: see _open
    ROW_RECORD_MAX = 65535 // 4  # a TEXT of utf8mb4, 4 bytes a character at worst
    QUOTE = "`"
    PIECES = ("freed", "marker")  # (in this order: freed names the marker)
    _mariadb = True  # set from the server's version string on connecting

    # --- the driver -----------------------------------------------------------------------------

    def _setup(self) -> None:
        # Marked releases (see the module docstring): the last lease marked of each name,
        # (namespace, name) -> lease, whose rows flush_releases writes (those of a lost
        # connection too); the leases whose markers this store's connection holds, which it lets
        # go. Changed under the store's lock only. _lost: leases to give back (lost_releases).
        self._marked: dict[tuple[str, str], str] = {}
        self._markers: list[str] = []
        self._lost: list[tuple[str, str]] = []
        self._lost_lock = threading.Lock()
        self._flushing = threading.Lock()  # a batch on a thread of its own (_flush_soon)
        self._flush_wanted = False
        _STORES.add(self)
        self._marking = True  # False once the server refused a marker
        self._released_at = -math.inf  # (time.monotonic) this store's last row release

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
        timeout = float(p.query.get("connect_timeout", CONNECT_TIMEOUT))
        conn = _connection_class(self._pymysql)(
            host=p.host,
            port=p.port or self.DEFAULT_PORT,
            user=self._user,
            password=p.password or "",
            database=p.database,
            charset="utf8mb4",
            autocommit=True,
            client_flag=MULTI_STATEMENTS,
            connect_timeout=timeout,
            **_tls(p.query),
            # PyMySQL's connect_timeout bounds the TCP connect only: the handshake (greeting,
            # TLS, authentication, SET NAMES) waits read_timeout, so a server that accepts and
            # never answers held every try for IO_TIMEOUT. The whole connect gets the timeout.
            read_timeout=timeout,
            write_timeout=timeout,
        )
        # Then the socket blocks, without a timeout: a socket with one costs a poll() before
        # each send and each receive, two more system calls a statement (about 5 of a pair's
        # 80-90 us of client CPU, uncontended: design.md, "MariaDB: a blocking socket"). A
        # connection that went silent (a dropped link, a frozen server) is shut down by the
        # guard thread after IO_TIMEOUT instead (GUARDED, as libpq's). (PyMySQL sets the
        # socket's timeout from these before each read and write: None keeps it blocking.)
        conn._read_timeout = conn._write_timeout = None
        conn._sock.settimeout(None)
        conn._current_timeout = None
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
        problems = {
            ER_ACCESS_DENIED: "user",
            ER_ACCESS_DENIED_NO_PASSWORD: "user",
            ER_DBACCESS_DENIED: "user",
            ER_BAD_DB: "database",
            CR_SSL_CONNECTION_ERROR: "tls",  # TLS required, the server has none
        }
        if "CERTIFICATE_VERIFY_FAILED" in reason:  # (PyMySQL reports it as error 2003)
            return reason, "tls"
        return reason, problems.get(_code(exc), "")

    def _drop(self) -> None:
        conn = self._conn
        if conn is not None and self._engine is None and type(conn) is _CONNECTION_CLASS:
            # PyMySQL's close() writes QUIT, outside any call the guard watches, on a socket that
            # blocks (_open): give that write a limit. (A full send buffer, a silent server.)
            conn._write_timeout = CONNECT_TIMEOUT
        super()._drop()

    # A forked child drops the parent's connection without a QUIT packet (the default _abandon):
    # PyMySQL's Connection.__del__ is _force_close, which only closes this process's descriptor.

    def _driver_closed(self, conn: Any) -> bool:
        return not conn.open

    def _socket(self, conn: Any) -> int | None:
        sock = getattr(conn, "_sock", None)  # (an engine's too; not an AsyncEngine's facade)
        if not isinstance(sock, socket.socket):
            return None
        return sock.fileno()  # (-1 once closed)

    def _gone(self, exc: BaseException) -> bool:
        # An error PyMySQL ended the connection for is its end too, whatever its class: a packet
        # out of sequence is an InternalError of PyMySQL's own (no server code), raised once it
        # closed the connection, which (as postgres.py's _gone sees libpq's) must not be used
        # again. Known by the error itself, since the store may have dropped the connection
        # before asking (a change's rollback, its unknown outcome), and by the connection
        # when it is still the store's.
        code = _code(exc)
        if isinstance(exc, self._pymysql.InternalError) and not code:
            return True
        if self._conn is not None and self._driver_closed(self._conn):
            return True
        return isinstance(exc, self._pymysql.InterfaceError) or (
            isinstance(exc, self._pymysql.OperationalError)
            and (2000 <= code < 3000 or code in _CONNECTION_GONE)
        )

    def _retryable(self, exc: BaseException) -> bool:
        return _code(exc) == ER_DEADLOCK  # InnoDB rolled the transaction back to break it

    def _missing_table(self, exc: BaseException) -> bool:
        return _code(exc) == ER_NO_SUCH_TABLE

    def _missing_column(self, exc: BaseException) -> bool:
        return _code(exc) == ER_BAD_FIELD

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

    def _schema_extras(self, conn: Any) -> None:
        self._execute(conn, self._sql["create_sessions"])
        self._execute(conn, self._sql["create_names"])
        if self._mariadb:  # (MySQL gets the index with new tables only)
            self._execute(conn, self._sql["index_sessions"])

    def _read_kept(self, conn: Any, namespace: str) -> tuple[list[Any], Any]:
        cur = self._execute(conn, self._sql["select_kept"], (namespace, namespace))
        rows = list(cur.fetchall())
        cur.nextset()
        return rows, cur.fetchall()

    def _lock_kept(
        self, conn: Any, namespace: str, names: list[str] | None
    ) -> tuple[Any, list[Any], Any]:
        only = ""
        if names is not None:
            only = (
                f" AND name IN ({', '.join(conn.escape(n) for n in names)})" if names else " AND 0"
            )
        sql = fill(self._sql["lock_kept"], only=only)
        cur = self._execute(conn, sql, (namespace, namespace))
        cur.nextset()  # SET TRANSACTION's and START TRANSACTION's results, then the row,
        cur.nextset()  # the names, the sessions
        row = cur.fetchone()
        cur.nextset()
        held = list(cur.fetchall())
        cur.nextset()
        return row, held, cur.fetchall()

    def _lock_and_claim(
        self, conn: Any, namespace: str, names: list[str]
    ) -> tuple[Any, list[Any], Any] | None:
        cur = self._execute(conn, self._claiming(conn, "lock_and_claim", namespace, names),
                            (namespace, namespace))  # fmt: skip
        cur.nextset()  # SET TRANSACTION's and START TRANSACTION's results, then the row,
        cur.nextset()  # the INSERT's, the names' rows, the sessions
        row = cur.fetchone()
        cur.nextset()
        cur.nextset()
        claimed = self._claimed(cur.fetchall())
        cur.nextset()
        return row, claimed, cur.fetchall()

    def _claim_names(self, conn: Any, namespace: str, names: list[str]) -> list[Any]:
        cur = self._execute(conn, self._claiming(conn, "claim_names", namespace, names),
                            (namespace,))  # fmt: skip
        cur.nextset()
        return self._claimed(cur.fetchall())

    def _claiming(self, conn: Any, statement: str, namespace: str, names: list[str]) -> str:
        """``statement`` with its rows to make and its names quoted."""
        ns = conn.escape(namespace)
        rows = ", ".join(f"({ns}, {conn.escape(n)}, 0, 0)" for n in names)
        quoted = ", ".join(conn.escape(n) for n in names)
        return fill(self._sql[statement], rows=rows, names=quoted)

    @staticmethod
    def _claimed(rows: Any) -> list[Any]:
        return [(text_of(n), v, None if lease is None else text_of(lease), record, mark)
                for n, v, lease, record, mark in rows]  # fmt: skip

    def _write_kept(
        self,
        conn: Any,
        namespace: str,
        version: int,
        new_version: int,
        change: Change,
        marks: Mapping[str, bool],
    ) -> None:
        ns = conn.escape(namespace)
        quoted = (_quote(conn, stored(change[0])), int(new_version), ns, int(version))
        if marks:
            rows = ", ".join(
                f"({ns}, {conn.escape(n)}, {int(new_version)}, {int(marks[n])})"
                for n in sorted(marks)
            )
            sql = fill(self._sql["set_names_commit"], rows=rows) % quoted
        else:
            sql = self._sql["update_to_commit"] % quoted
        cur = self._execute(conn, sql)
        while cur.nextset():
            pass

    # --- marked releases (see the module docstring) -------------------------------------------

    def fast_release(
        self, namespace: str, names: Sequence[str], lease: str, renewed: bool = False
    ) -> int | None:
        now = time.monotonic()
        hot, self._released_at = now - self._released_at < HOT_GAP, now
        if not (
            hot
            and renewed
            and self._marking
            and self._engine is None  # (a pool may reset a connection, and its user locks)
            and type(self._conn) is _CONNECTION_CLASS  # (ok_execute reads its insert id)
            and len(names) == 1
            and len(lease) < MARKED_LEASE
            and is_name(lease)
        ):
            return super().fast_release(namespace, names, lease, renewed)
        name = fast_names(names)[0]
        params = {"ns": namespace, "name": name, "lease": lease}
        try:
            version = self._fast(False, (self._sql["name_release_marked"], params))
        except OutcomeUnknown:
            # It may have run, its marker held by a connection gone or going: the row is
            # written free by the next batch whatever happened (the lock table releases the
            # lease through the document meanwhile).
            with self._mutex():
                self._marked[namespace, name] = lease
            raise
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable) or _code(exc.__cause__) not in _NO_MARKERS:
                raise
            # The server refuses the marker: this store releases as it did before marking.
            self._marking = False
            return super().fast_release(namespace, names, lease, renewed)
        if version is not None and len(self._markers) >= MARKED_MAX:
            with contextlib.suppress(StoreError):  # released all the same: a later batch writes it
                self.flush_releases()
        return version

    def _mark(self, params: Mapping[str, str]) -> None:
        """A marked release went well on this store's own connection (under the store's lock)."""
        self._marked[params["ns"], params["name"]] = params["lease"]
        self._markers.append(params["lease"])

    def flush_releases(self) -> None:
        """Write the rows of this process's marked releases free, and let the markers its
        connection holds go, in one round trip. The leases of rows a document took over meanwhile
        (a waiter of an earlier tasklocks queued for a name it read as held) are said by
        ``lost_releases``, for the lock table to give back."""
        if self._marked or self._markers:
            self._locked(self._free_marked)

    def _free_marked(self, conn: Any, call: Call) -> None:
        marked, markers = self._marked, self._markers
        if not marked and not markers:
            return
        esc = conn.escape
        keys = [f"(namespace = {esc(ns)} AND name = {esc(name)}" for ns, name in marked]
        rows = " OR ".join(f"{key} AND lease = {esc(lease)})" for key, lease in
                           zip(keys, marked.values(), strict=True))  # fmt: skip
        taken = " OR ".join(f"{key})" for key in keys)
        leases = " UNION ALL ".join(f"SELECT {esc(lease)} AS lease" for lease in markers)
        sql = fill(
            self._sql["free_marked"],
            leases=leases or "SELECT NULL AS lease",
            taken=taken or "0",
            rows=rows or "0",
        )
        cur = self._execute(conn, sql)
        cur.nextset()  # the UPDATE's, then the rows a document took (mark = 1), then the markers
        moved = {(text_of(ns), text_of(name)) for ns, name in cur.fetchall()}
        while cur.nextset():
            pass
        self._marked, self._markers = {}, []
        lost = sorted({(ns, lease) for (ns, name), lease in marked.items() if (ns, name) in moved})
        if lost:
            with self._lost_lock:
                self._lost.extend(lost)

    def _connected(self) -> None:
        # A new connection: the markers of the last one went with it (or go when its server
        # thread ends: after a cut, perhaps hours later), and their leases are held in their rows
        # again. The rows are written free by a batch now, on a thread of its own (this call
        # holds the store's lock), and their leases given back through the document too (a
        # change there may have taken one over meanwhile).
        self._markers = []
        if self._marked:
            lost = sorted({(ns, lease) for (ns, _), lease in self._marked.items()})
            with self._lost_lock:
                self._lost.extend(lost)
            self._flush_soon()

    def _flush_soon(self) -> None:
        """``flush_releases`` on a thread of its own (one at a time, which runs again if asked
        meanwhile): a session's renewal and a reconnection never wait for it. Where no thread
        can start (at the interpreter's exit), the next renewal or ``close`` writes them."""
        self._flush_wanted = True
        if self._flushing.acquire(blocking=False):
            flush = threading.Thread(target=self._flush_quietly, name="tasklocks-flush")
            flush.daemon = True
            try:
                flush.start()
            except RuntimeError:
                self._flushing.release()

    def _flush_quietly(self) -> None:
        while True:
            try:
                self._flush_wanted = False
                with contextlib.suppress(StoreError):  # (the next renewal tries again)
                    self.flush_releases()
            finally:
                self._flushing.release()
            if not self._flush_wanted or not self._flushing.acquire(blocking=False):
                return

    def lost_releases(self, check: bool = False) -> list[tuple[str, str]]:
        with self._lost_lock:
            lost, self._lost = self._lost, []
        return lost

    def has_lost(self) -> bool:
        return bool(self._lost)

    def renew_session(self, session: str) -> bool:
        kept = super().renew_session(session)
        if self._marked or self._markers:
            self._flush_soon()
        return kept

    def close(self) -> None:
        self._let_markers_go()
        super().close()

    def _let_markers_go(self) -> None:
        """``flush_releases`` at ``close`` and at the interpreter's exit: on the connection as it
        is (a lost one took its markers with it, and ``LockTable.close`` has run a batch that
        reconnects already), waiting ``MARKER_WAIT`` at most for the store's lock and for each
        read and write."""
        if not (self._marked or self._markers) or self._pid != os.getpid():
            return
        lock = self._mutex()
        if not lock.acquire(timeout=MARKER_WAIT):
            return
        try:
            conn = self._conn
            if conn is None or type(conn) is not _CONNECTION_CLASS or self._driver_closed(conn):
                return
            was = conn._read_timeout, conn._write_timeout
            conn._read_timeout = conn._write_timeout = MARKER_WAIT
            try:
                with contextlib.suppress(*self._driver_errors, OSError):
                    self._free_marked(conn, Call())
            finally:
                conn._read_timeout, conn._write_timeout = was
        finally:
            lock.release()

    def _name_version(self, cursor: Any, acquire: bool) -> int | None:
        # The token is in the OK packet (LAST_INSERT_ID(expr)), and only when the row changed.
        if acquire:
            return int(cursor.lastrowid) or None
        return int(cursor.lastrowid) if cursor.rowcount == 1 else None

    def _run_name_statement(
        self, conn: Any, acquire: bool, statement: tuple[str, Any]
    ) -> int | None:
        """The row statements, the common change, without PyMySQL's cursor on this store's own
        connections: its values quoted as the cursor quotes text (``_quote``), the statement
        sent and its OK packet read by ``Connection.ok_query``, whose insert id and affected rows
        are read as ``_name_version`` reads them from a cursor. The cursor's own steps (its
        making, mogrify, escapes, result bookkeeping) were a fifth of a pair's Python on 32
        processes that share two cores. An engine's connections take the cursor."""
        if type(conn) is not _CONNECTION_CLASS:
            return super()._run_name_statement(conn, acquire, statement)
        sql, params = statement
        positional = _POSITIONAL.get(sql)
        if positional is None:
            positional = _POSITIONAL[sql] = _Positional(sql)
        reply = conn.ok_execute(positional, positional.values(params))
        if reply is None:  # as text
            reply = conn.ok_query(sql % {key: _quote(conn, val) for key, val in params.items()})
        rows, token = reply
        if acquire:
            return token or None
        if sql is self._sql["name_release_marked"]:  # (its rows are 0: it changes nothing)
            if not token:
                return None
            self._mark(params)
            return int(token)
        return token if rows == 1 else None
