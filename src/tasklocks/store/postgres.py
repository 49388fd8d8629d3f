"""PostgreSQL adapter (psycopg 3): the driver calls; statements in ``sql/postgres.sql``.

* A change through the document takes two round trips (``BEGIN`` + ``SELECT ... FOR UPDATE`` of
  the document and of the rows of the names it names, made where missing + the sessions; the
  rows, the ``UPDATE`` and ``COMMIT``), three if it brings in a name it did not name (a waiter
  it grants), each one query of several statements (``_batch``: quoted by
  psycopg's ``ClientCursor``, results read with ``nextset``; psycopg's pipeline mode cost more
  CPU than the statements). A change that should wake waiters notifies in the same statement
  (``pg_notify`` in a CTE over the ``UPDATE``), delivered at commit.
* One more connection per store and process LISTENs on the table's channel, read by a daemon
  thread that hands each notification to the waiters of its namespace (through a pipe each, which
  a waiter watches beside its ``wake_fd``). Waiters re-read the version every second anyway, in
  case a notification was missed (or the change did not ask to wake anyone).
* ``?pool=transaction`` in the URL: the server is reached through a transaction-pooling proxy
  (PgBouncer's ``pool_mode = transaction``), where consecutive statements of one connection may
  run on different server connections. Every statement is pool-safe already (nothing is kept
  between transactions), so two things change: no server-side prepared statements (psycopg
  prepares a query run often, on one server connection, and the next run may land on another:
  "prepared statement _pg3_0 does not exist"), and no LISTEN (its server connection goes back
  to the pool): waiters poll, at MariaDB's pace.
* A name's row release, for a lease whose session renews it, commits without waiting for the
  WAL's flush (``name_release_unflushed``): a crash can undo only a release that nobody built on.
  The store remembers such releases until the server's WAL flush has passed them, and learns of
  a crash from an unlogged table's row that crash recovery empties (``release_epoch``, read at
  each session renewal, each reconnection, and when an acquisition meets its own process's
  lease); what a crash may have undone goes to ``lost_releases``, and the lock table gives it
  back. Where the epoch cannot be read, releases wait for the flush.
* A name's row statements, the common change, skip psycopg's cursor and go through libpq on the
  same connection (``_run_name_statement``), prepared at their second run on a connection under
  a name of their own: a third less CPU a pair, which 32 processes on a small host queue for.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from tasklocks._clock import pause
from tasklocks._url import PG_TLS
from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.store._base import Change, Pace
from tasklocks.store._names import stored
from tasklocks.store._sql_server import (
    CONNECT_TIMEOUT,
    IO_TIMEOUT,
    POLLED,
    ServerStore,
    by_position,
)

__all__ = ["PostgresStore"]

LISTEN_WAIT = 2.0  # seconds a first waiter waits for the LISTEN connection before polling


_STORES: weakref.WeakSet[PostgresStore] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: the parent's releases are the parent's to give back, and a lock its
    threads held at the fork would stay held."""
    for store in list(_STORES):
        store._epoch_lock, store._checking = threading.Lock(), threading.Lock()
        store._released, store._older, store._lost = {}, [], []


os.register_at_fork(after_in_child=_after_fork)


class _Numbered:
    """A statement with named parameters (``%(ns)s``) as libpq takes it (``$1``), and the name
    it is prepared under on a connection (one per text: the table name is in it)."""

    __slots__ = ("name", "sql", "values")

    def __init__(self, sql: str) -> None:
        text, self.values, _ = by_position(sql, numbered=True)
        self.sql = text.encode()
        self.name = b"tasklocks_" + hashlib.sha1(self.sql).hexdigest()[:16].encode()


@contextmanager
def _pipeline(conn: Any) -> Iterator[None]:
    """``conn.pipeline()``, except that when the block fails, a failure to end the pipeline is
    not logged to stderr ("error ignored terminating ... [BAD]"): the block's error tells."""
    pipeline = conn.pipeline()
    pipeline.__enter__()
    try:
        yield
    except BaseException:
        with suppress(Exception):
            pipeline.__exit__(None, None, None)
        raise
    pipeline.__exit__(None, None, None)


class PostgresStore(ServerStore):
    """A lock table in a PostgreSQL database."""

    LABEL = "PostgreSQL"
    GUARDED = True  # libpq has no timeout for a server that stops answering
    DIALECT = "postgres"
    DEFAULT_PORT = 5432
    DEFAULT_USER = "(default)"
    QUOTE = '"'
    POLL = (1.0, 1.0, 0.0, 1.0, 1.0, 1.0)  # a notification may be missed: re-read every second

    # --- the driver -----------------------------------------------------------------------------

    def _import_driver(self) -> None:
        try:
            import psycopg
            import psycopg.errors
            import psycopg.generators
            import psycopg.pq
            import psycopg.sql
        except ImportError as exc:
            raise StoreUnavailable(
                "the postgresql backend needs psycopg 3: pip install 'tasklocks[postgres]'"
            ) from exc
        self._psycopg = psycopg
        errors = psycopg.errors
        self._driver_errors = (psycopg.Error,)
        # Concurrent CREATE TABLE IF NOT EXISTS can collide on the catalog's unique index instead
        # of skipping: the other creator won; retry (https://github.com/psycopg/psycopg2/issues/1036).
        retry = "DeadlockDetected SerializationFailure UniqueViolation DuplicateTable "
        retry += "DuplicateObject"
        self._retry_errors = tuple(getattr(errors, name) for name in retry.split())

    def _setup(self) -> None:
        self._pooled = self._parsed.query.get("pool") == "transaction"  # (checked: open_store)
        self._channel = f"{self.table}_changed"
        self._listeners: dict[str, set[int]] = {}  # namespace -> waiters' pipes
        # tasklocks.aio's listeners on a sync Engine's connections: (heard, ready) callbacks
        self._hearers: list[tuple[Callable[[str | None], None], Callable[[bool], None]]] = []
        self._listeners_lock = threading.Lock()
        self._listeners_pid = os.getpid()  # the process these listeners (and lock) belong to
        self._listening = threading.Event()  # the reader's connection LISTENs
        self._reader_pid = 0
        self._closed = False
        # Row releases not yet known flushed, (namespace, name) -> lease: those since the last
        # look at the server's epoch, and older ones by the WAL position they end before; what a
        # crash undid, for lost_releases (see _check_epoch). _unflushed: the last look worked.
        self._released: dict[tuple[str, str], str] = {}
        self._older: list[tuple[int, dict[tuple[str, str], str]]] = []
        self._epoch: str | None = None
        self._unflushed = False
        self._crashes = 0  # crashes found: a release that straddles one is said lost at once
        self._lost: list[tuple[str, str]] = []
        self._epoch_lock = threading.Lock()  # the above (renewals, releases, reconnections)
        self._checking = threading.Lock()  # one look at the epoch at a time
        _STORES.add(self)
        # The row statements through libpq (_run_name_statement): each as libpq takes it, and
        # per connection, the ones run on it and whether each is prepared there.
        self._numbered: dict[str, _Numbered] = {}
        self._prepared: weakref.WeakKeyDictionary[Any, dict[bytes, bool]] = (
            weakref.WeakKeyDictionary()
        )
        # The connection of the last one (this store's own), its libpq connection, encoding and
        # _prepared entry.
        self._last_conn: Any = None
        self._last_known: tuple[Any, str, dict[bytes, bool]] = (None, "", {})
        pq = self._psycopg.pq
        self._ok = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)  # a statement went well
        # (libpq's PQTRANS_IDLE and PQ_PIPELINE_OFF are 0: a connection whose two are false is
        # idle, outside a pipeline.)
        assert pq.TransactionStatus.IDLE == 0 and pq.PipelineStatus.OFF == 0
        # Connection.wait and psycopg.generators are psycopg's own machinery (3.0 to 3.3 at
        # least), not its documented API: without them, the cursor.
        self._libpq_rows = callable(getattr(self._psycopg.Connection, "wait", None)) and callable(
            getattr(self._psycopg.generators, "execute", None)
        )

    def _lend(self, conn: Any) -> Any:
        was = conn.autocommit
        conn.autocommit = True  # (the pool rolled it back when it was returned: it is idle)
        return was

    def _unlend(self, conn: Any, was: Any) -> None:
        conn.autocommit = was

    def pace(self) -> Pace:
        return POLLED if self._pooled else self.POLL

    def _open(self, **options: Any) -> Any:
        return self._psycopg.connect(**self._connect_args(**options))

    def _connect_args(self, **options: Any) -> dict[str, Any]:
        p = self._parsed
        return dict(
            # No host (postgresql:///db): none is passed, and libpq decides, as psql does:
            # $PGHOST, else its Unix-socket directory; and the port, $PGPORT, else 5432.
            # (psycopg leaves a None out of the connection string.)
            host=p.host or None,
            port=p.port or (self.DEFAULT_PORT if p.host else None),
            user=p.user,
            password=p.password,
            dbname=p.database,
            autocommit=True,
            # (libpq takes whole seconds, and 0 for none: 0.5 is 1.)
            connect_timeout=math.ceil(float(p.query.get("connect_timeout", CONNECT_TIMEOUT))),
            # TLS, as the URL asks (an AsyncEngine's URL too: its own connections come from it).
            **{key: p.query[key] for key in PG_TLS if key in p.query},
            # A connection that went silent (a dropped link, a frozen server) fails within
            # seconds, not after the kernel's quarter of an hour.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=int(IO_TIMEOUT * 1000),
            application_name=options.get("application_name", "tasklocks"),
            prepare_threshold=None if self._pooled else 5,  # 5: psycopg's default
        )

    def _why(self, exc: BaseException) -> tuple[str, str]:
        # libpq reports connection failures as text only (no SQLSTATE): 'connection failed:
        # connection to server at "h", port p failed: FATAL:  database "x" does not exist'.
        text = " ".join(str(exc).split())
        reason = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL: ").strip().rstrip(".")
        reason = reason.split("Is the server running")[0].strip()
        if "database" in reason and "does not exist" in reason:
            return reason, "database"
        refusals = ("authentication failed", "role", "pg_hba.conf", "password", "permission")
        if any(s in reason for s in refusals):
            return reason, "user"
        tls = ("does not support SSL", "certificate")  # (not a cut: "SSL SYSCALL error")
        return reason, "tls" if any(s in reason for s in tls) else ""

    def _abandon(self, conn: Any) -> None:
        # libpq's PQfinish sends a Terminate message, which would end the *parent's* session
        # (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PQFINISH): point this
        # process's copy of the descriptor at /dev/null first.
        with suppress(Exception):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, conn.fileno())
            os.close(null)
            conn.close()

    def _driver_closed(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def _gone(self, exc: BaseException) -> bool:
        if self._conn is None or self._driver_closed(self._conn):  # libpq lost the connection
            return True
        # Connection exceptions (08), a server shutting down or starting up (57P01-57P03), and
        # client-side failures (no SQLSTATE: a pipeline left busy, a failed send) end it too.
        state = getattr(exc, "sqlstate", None)
        return isinstance(exc, self._psycopg.OperationalError) and (
            state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
        )

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self._retry_errors)

    def _missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UndefinedTable)

    def _missing_column(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UndefinedColumn)

    def _execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        return conn.execute(sql, params)

    def _schema_extras(self, conn: Any) -> None:
        # One round trip instead of three (each store open: a task's start opens stores). The
        # last one prefers LZ4 for large documents rather than pglz where the server can
        # (PostgreSQL 14+ with LZ4): pglz costs ~2 ms per write of a 200 KB document, LZ4 a
        # tenth; it gives up quietly where it cannot (no LZ4, not the owner, a busy table).
        with _pipeline(conn):
            names = ("create_sessions", "index_sessions", "prefer_lz4", "create_names")
            for name in (*names, "create_epoch"):
                conn.execute(self._sql[name])

    # --- changes --------------------------------------------------------------------------------

    def _batch(self, conn: Any, *statements: tuple[str, Any]) -> list[list[Any]]:
        """Run ``statements`` (name, parameters) in one round trip; the rows of each.

        On a psycopg connection, one simple query of them all, its parameters quoted by psycopg
        (``ClientCursor.mogrify``: libpq's escaping), its results read in turn (``nextset``).
        psycopg's pipeline mode, the other way to one round trip, cost about 0.3 ms of CPU a
        round trip in its own machinery, more than the statements. An async engine's facade
        takes the pipeline."""
        if type(conn) is self._psycopg.Connection:
            with self._psycopg.ClientCursor(conn) as cursor:
                text = ";\n".join(cursor.mogrify(self._sql[name], p) for name, p in statements)
                cursor.execute(text)
                out: list[list[Any]] = []
                while True:
                    out.append(cursor.fetchall() if cursor.description else [])
                    if not cursor.nextset():
                        return out
        with _pipeline(conn):
            cursors = [conn.execute(self._sql[name], p) for name, p in statements]
        return [c.fetchall() if c.description else [] for c in cursors]

    def _read_kept(self, conn: Any, namespace: str) -> tuple[list[Any], Any]:
        rows, times = self._batch(conn, ("select_kept", {"ns": namespace}), ("sessions", None))
        return rows, times

    def _lock_kept(
        self, conn: Any, namespace: str, names: list[str] | None
    ) -> tuple[Any, list[Any], Any]:
        held: tuple[str, Any] = (
            ("lock_held_names", (namespace,))
            if names is None
            else ("lock_held_names_of", (namespace, names))
        )
        _, row, held_rows, times = self._batch(
            conn,
            ("begin", None),
            ("select_for_update", (namespace,)),
            held,
            ("sessions", None),  # after the rows: none is missed
        )
        return (row[0] if row else None), held_rows, times

    def _lock_and_claim(
        self, conn: Any, namespace: str, names: list[str]
    ) -> tuple[Any, list[Any], Any] | None:
        params = {"ns": namespace, "names": names}
        _, row, _, claimed, times = self._batch(
            conn,
            ("begin", None),
            ("select_for_update", (namespace,)),
            ("claim_names", params),
            ("claimed_names", params),
            ("sessions", None),  # after the rows: none is missed
        )
        return (row[0] if row else None), claimed, times

    def _claim_names(self, conn: Any, namespace: str, names: list[str]) -> list[Any]:
        params = {"ns": namespace, "names": names}
        return self._batch(conn, ("claim_names", params), ("claimed_names", params))[1]

    def _write_kept(
        self,
        conn: Any,
        namespace: str,
        version: int,
        new_version: int,
        change: Change,
        marks: Mapping[str, bool],
    ) -> None:
        text, wake = change
        params: tuple[Any, ...] = (stored(text), new_version, namespace, version)
        statements: list[tuple[str, Any]] = []
        if marks:
            names = sorted(marks)
            marked = [marks[n] for n in names]
            rows = {"ns": namespace, "version": new_version, "names": names, "marks": marked}
            statements.append(("set_names", rows))
        if wake:
            statements.append(("update_to_notify", (*params, self._channel, namespace)))
        else:
            statements.append(("update_to", params))
        statements.append(("commit", None))
        self._batch(conn, *statements)

    # --- row releases without the flush, and the crashes that may undo them ------------------

    def fast_release(
        self, namespace: str, names: Sequence[str], lease: str, renewed: bool = False
    ) -> int | None:
        # Read once here: should a failed look turn it off meanwhile, the release below takes
        # the flush and is remembered all the same (harmless).
        unflushed = renewed and self._unflushed
        crashes = self._crashes
        version = super().fast_release(namespace, names, lease, unflushed)
        if unflushed and version is not None:  # one name, names[0], released without the flush
            with self._epoch_lock:
                if self._crashes == crashes:
                    self._released[namespace, names[0]] = lease
                else:  # a crash found while it was on its way: it may be undone
                    self._lost.append((namespace, lease))
        return version

    def open_session(
        self, session: str, owner: str, host: str, pid: int | None, ttl: float
    ) -> None:
        super().open_session(session, owner, host, pid, ttl)
        if self._epoch is None:  # the epoch this process's releases are made in
            self._check_epoch()

    def renew_session(self, session: str) -> bool:
        kept = super().renew_session(session)
        self._check_epoch()
        return kept

    def _connected(self) -> None:
        # A new connection after others: the server may have crashed since the last look,
        # undoing releases that this process is about to build on (take the name again).
        if self._epoch is not None and self._side is not self:
            self._check_epoch()

    def lost_releases(self, check: bool = False) -> list[tuple[str, str]]:
        if check and (self._released or self._older):
            self._check_epoch()
        with self._epoch_lock:
            lost, self._lost = self._lost, []
        return lost

    def has_lost(self) -> bool:
        return bool(self._lost)

    def _check_epoch(self) -> None:
        """Look at the server's epoch. The same as before: forget the releases that the WAL's
        flush has passed. Another (a crash took its row), or the first look with releases
        already made: every release not known flushed may be undone, and is said by
        ``lost_releases``. A look that fails keeps them, and makes releases wait for the flush
        until one works."""
        with self._checking:
            with self._epoch_lock:  # these were committed before the look: its WAL position
                looked, self._released = self._released, {}
            try:
                side, sql = self._sessions_store(), self._sql["release_epoch"]
                rows: list[Any] = []
                for _ in range(3):  # no row: a concurrent statement was making it
                    rows = side._locked(lambda c, _: side._execute(c, sql).fetchall())
                    if rows:
                        break
                epoch, inserted, flushed = str(rows[0][0]), int(rows[0][1]), int(rows[0][2])
            except (StoreError, IndexError, TypeError, ValueError):
                with self._epoch_lock:
                    looked.update(self._released)
                    self._released, self._unflushed = looked, False
                return
            with self._epoch_lock:
                if epoch != self._epoch and (self._epoch is not None or looked or self._older):
                    undone = {(k[0], v) for _, gen in self._older for k, v in gen.items()}
                    for gen in (looked, self._released):  # (the latter: made while looking)
                        undone.update((k[0], v) for k, v in gen.items())
                    self._lost.extend(sorted(undone))
                    self._released, self._older = {}, []
                    self._crashes += 1
                else:
                    self._older = [(end, gen) for end, gen in self._older if end > flushed]
                    if looked and inserted > flushed:
                        self._older.append((inserted, looked))
                self._epoch, self._unflushed = epoch, True

    def _name_version(self, cursor: Any, acquire: bool) -> int | None:
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def _run_name_statement(
        self, conn: Any, acquire: bool, statement: tuple[str, Any]
    ) -> int | None:
        """The row statements, the common change, through libpq itself: psycopg's cursor (its
        adapters, its prepared-statement cache, its result rows) cost about 90 us of CPU a pair,
        and CPU is what 32 processes on a small host wait for. The connection's own ``wait`` still
        runs the round trip (a Ctrl-C cancels it; a lost connection raises OperationalError).
        Anything but a plain idle connection of this driver (a transaction, a pipeline, an async
        engine's facade) takes the cursor. A statement's first run on a connection is unnamed;
        the second prepares it (again after a ``DEALLOCATE``), unless a transaction-pooling
        proxy is in between."""
        sql, params = statement
        if conn is self._last_conn:  # this store's own connection, as the last call found it
            pgconn, encoding, uses = self._last_known
        else:
            pgconn = getattr(conn, "pgconn", None)
            if not self._libpq_rows or type(conn) is not self._psycopg.Connection or pgconn is None:
                return super()._run_name_statement(conn, acquire, statement)
            encoding = conn.info.encoding
            uses = self._prepared.setdefault(conn, {})
            if self._engine is None:  # ours: nothing else sets its client_encoding
                self._last_conn, self._last_known = conn, (pgconn, encoding, uses)
        if pgconn.transaction_status or pgconn.pipeline_status:  # not idle, or a pipeline
            return super()._run_name_statement(conn, acquire, statement)
        numbered = self._numbered.get(sql)
        if numbered is None:
            numbered = self._numbered[sql] = _Numbered(sql)
        given = numbered.values(params)
        values: list[bytes] | None
        try:  # text in UTF-8, the common case, encoded without a Python call
            values = list(map(str.encode, given)) if encoding == "utf-8" else None
        except TypeError:  # a value that is not text
            values = None
        if values is None:
            values = [str(v).encode(encoding) for v in given]
        prepared = uses.get(numbered.name)
        result = None
        if prepared is not None and not self._pooled:  # its second use on this connection
            if not prepared:
                pgconn.send_prepare(numbered.name, numbered.sql)
                self._result(conn, missing="42P05")  # 42P05: this session has it already
                uses[numbered.name] = True
            pgconn.send_query_prepared(numbered.name, values)
            result = conn.wait(self._psycopg.generators.execute(pgconn))[-1]
            if result.status not in self._ok:  # (_result, without its call when it went well)
                result = self._failed(conn, result, missing="26000")  # 26000: deallocated
        if result is None:  # first use (a short-lived process prepares nothing), or pooled
            uses[numbered.name] = False
            pgconn.send_query_params(numbered.sql, values)
            result = self._result(conn)
        assert result is not None
        return int(result.get_value(0, 0)) if result.ntuples else None

    def _result(self, conn: Any, missing: str = "") -> Any:
        """The last result of what was sent on ``conn``'s libpq connection, the server's error
        as psycopg raises it, or None for the error whose SQLSTATE is ``missing``."""
        result = conn.wait(self._psycopg.generators.execute(conn.pgconn))[-1]
        return result if result.status in self._ok else self._failed(conn, result, missing)

    def _failed(self, conn: Any, result: Any, missing: str) -> Any:
        """The server's error of ``result`` as psycopg raises it, or None if its SQLSTATE is
        ``missing``."""
        error = self._psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        if missing and error.sqlstate == missing:
            return None
        raise error

    def _inserted_id(self, cursor: Any) -> int:
        return int(cursor.fetchone()[0])  # INSERT ... RETURNING id

    # --- waiting ------------------------------------------------------------------------------

    def wait_for_change(
        self,
        namespace: str,
        version: int,
        timeout: float,
        wake_fd: int | None = None,
        *,
        pace: bool = False,
    ) -> bool:
        if self._pooled:  # no LISTEN through the pool: poll
            return super().wait_for_change(namespace, version, timeout, wake_fd, pace=pace)
        del pace  # notified, and re-read at a flat pace: nothing to keep
        heard, tell = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._register(namespace, tell, True)
        try:  # listen first, then read: a change after the read is heard
            self._listening.wait(min(timeout, LISTEN_WAIT))
            return self._poll(namespace, version, timeout, wake_fd, heard)
        finally:
            self._register(namespace, tell, False)
            os.close(heard)
            os.close(tell)

    def _register(self, namespace: str, fd: int, add: bool) -> None:
        """Tell ``fd`` of the namespace's notifications (or stop); start the reader if needed."""
        if add:
            self._forget_a_parents_listeners()
        with self._listeners_lock:
            fds = self._listeners.setdefault(namespace, set())
            if not add:
                fds.discard(fd)
                return
            fds.add(fd)
            self._start_reader()

    def _forget_a_parents_listeners(self) -> None:
        """In a forked child: its parent's listeners are not ours (and its lock may have been
        held by a thread the fork left behind). Only there: in the process that made them, two
        first registrations at once must not wipe each other's."""
        if self._listeners_pid != os.getpid():
            self._listeners_lock, self._listeners, self._hearers = threading.Lock(), {}, []
            self._listeners_pid = os.getpid()

    def _start_reader(self) -> None:
        """(Under ``_listeners_lock``.) Start this process's reader if it has none yet."""
        if self._reader_pid != os.getpid():  # none yet, or the parent's before a fork
            self._reader_pid = os.getpid()
            self._listening.clear()
            threading.Thread(target=self._read, name="tasklocks-listen", daemon=True).start()

    def _tell(self, namespace: str | None) -> None:
        """Wake the waiters of ``namespace`` (of every namespace: None)."""
        with self._listeners_lock:
            for ns, fds in self._listeners.items():
                for fd in fds if namespace in (None, ns) else ():
                    with suppress(BlockingIOError):  # full: it will wake anyway
                        os.write(fd, b"\0")
            for heard, _ in self._hearers:
                heard(namespace)

    def _socket(self, conn: Any) -> int | None:
        fileno = getattr(conn, "fileno", None)  # (not an AsyncEngine's facade: it has a timeout)
        try:
            return None if fileno is None else int(fileno())
        except Exception:  # closed meanwhile
            return None

    def _listen_statement(self) -> Any:
        """``listen``, its channel quoted (a ``psycopg.sql.Composed``)."""
        sql = self._psycopg.sql
        return sql.SQL(self._sql["listen"]).format(channel=sql.Identifier(self._channel))

    def _set_listening(self, listening: bool) -> None:
        """The reader's connection LISTENs now (or no longer): the blocking waiters' event, and
        tasklocks.aio's listeners on a sync Engine."""
        (self._listening.set if listening else self._listening.clear)()
        with self._listeners_lock:
            for _, ready in self._hearers:
                ready(listening)

    def _read(self) -> None:
        """The LISTEN connection's reader, a daemon thread per store and process: it hands every
        notification to the waiters of its namespace and reconnects when the connection breaks
        (waiters re-read the version every second meanwhile)."""
        pid, lost = os.getpid(), False
        conn: Any = None
        while self._reader_pid == pid and not self._closed:
            try:
                if conn is None:
                    conn = self._connect(application_name="tasklocks-listen")
                    conn.execute(self._listen_statement())
                    self._set_listening(True)
                    if lost:  # what happened while there was no connection went unheard
                        self._tell(None)
                for notify in conn.notifies(timeout=1.0):
                    self._tell(notify.payload)
            except (StoreUnavailable, self._psycopg.Error):
                self._set_listening(False)
                with suppress(Exception):
                    conn.close()
                conn, lost = None, True
                pause(1.0)
        if conn is not None:
            conn.close()

    def listens(self) -> bool:
        return not self._pooled

    async def listen_async(
        self, heard: Callable[[str | None], None], ready: Callable[[bool], None]
    ) -> None:
        """``_read`` for an asyncio loop (``tasklocks.aio``), on a psycopg ``AsyncConnection``
        of its own, until cancelled. With a sync Engine's connections (its ``creator``,
        ``connect_args``), which no ``AsyncConnection`` can copy: ``_read``'s thread, which the
        Engine's connection serves, told to the loop."""
        if self._maker is not None:
            await self._hear_through_the_reader(heard, ready)
            return
        lost = False
        while True:
            conn: Any = None
            try:
                args = self._connect_args(application_name="tasklocks-listen")
                conn = await self._psycopg.AsyncConnection.connect(**args)
                await conn.execute(self._listen_statement())
                ready(True)
                if lost:  # what happened while there was no connection went unheard
                    heard(None)
                async for notify in conn.notifies():
                    heard(notify.payload)
            except (OSError, self._psycopg.Error):
                ready(False)
                lost = True
                await asyncio.sleep(1.0)
            finally:
                if conn is not None:
                    with suppress(Exception):
                        await conn.close()

    async def _hear_through_the_reader(
        self, heard: Callable[[str | None], None], ready: Callable[[bool], None]
    ) -> None:
        loop = asyncio.get_running_loop()

        def told(callback: Callable[[Any], None]) -> Callable[[Any], None]:
            def on_loop(value: Any) -> None:
                with suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(callback, value)

            return on_loop

        hearer = (told(heard), told(ready))
        self._forget_a_parents_listeners()
        with self._listeners_lock:
            self._hearers.append(hearer)
            self._start_reader()
            if self._listening.is_set():
                ready(True)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            with self._listeners_lock, suppress(ValueError):  # (a fork's child forgot it)
                self._hearers.remove(hearer)

    def _close_more(self) -> None:
        self._closed = True
