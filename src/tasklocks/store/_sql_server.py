"""What the SQL servers (MariaDB/MySQL and PostgreSQL) share; a dialect supplies driver calls.

One autocommit connection per store and lock; nothing is held between calls (no ``LOCK TABLE``,
no advisory locks). A connection lost before a change was sent is reopened and the call retried
once; lost after, :class:`OutcomeUnknown` is raised (the caller re-reads). Deadlocks and schema
races are retried. A forked child never touches its parent's connection. A statement whose
server stays silent for ``IO_TIMEOUT`` seconds (a server or proxy that hangs while the kernel
still acknowledges what is sent, so that no TCP timeout fires) has its connection shut down by
the process's guard thread (``_guard``), where the driver has no timeout of its own (libpq).
"""

from __future__ import annotations

import operator
import os
import random
import re
import socket
import threading
import time
import weakref
from abc import abstractmethod
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any, ClassVar, NoReturn, TypeVar

from tasklocks import _pid
from tasklocks._clock import pause
from tasklocks._url import ParsedURL
from tasklocks.errors import StoreError, StoreUnavailable, StoreUnreachable
from tasklocks.store._base import Call, OutcomeUnknown, Retry, SidesDiffer, SQLStore
from tasklocks.store._rows import RowsStore

__all__ = ["ServerStore"]

T = TypeVar("T")
RETRIES = 20  # deadlocks, or concurrent schema creation, retried this many times
RECONNECT_TIMEOUT = 5.0  # seconds a call keeps trying to reach the server
CONNECT_TIMEOUT = 5  # seconds one connection attempt may take (the URL's connect_timeout=)
IO_TIMEOUT = 30.0  # seconds a connection may stay silent while a statement runs
GUARD_TICK = 1.0  # seconds between two looks of the guard thread (_guard)
# How a server store polls when nothing notifies its waiters (MariaDB; PostgreSQL behind a
# transaction pool), see SQLStore._poll. Measured on MariaDB 10.11 (2 cores): a poll costs a
# waiting process ~0.2-0.3 ms of CPU once it wakes, so a fixed 10 ms cap would cost ~2 % of a
# core per waiter.
POLLED = (0.001, 0.010, 0.05, 0.100, 0.005, 0.500)
_SENT = Call()
_SENT.sent = True  # (the warm road's every call: its statement is sent, see ServerStore._fast)


class Lost(StoreUnreachable):
    """No connection (it broke before a change was sent, or cannot be had): safe to retry."""


def _where(parsed: ParsedURL, default_port: int) -> str:
    """The server, for messages: ``host:port``; for a PostgreSQL URL without a host, the one
    libpq picks then ($PGHOST, else its Unix socket; $PGPORT, else the default port)."""
    if parsed.host:
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # (IPv6)
        return f"{host}:{parsed.port or default_port}"
    pghost = os.environ.get("PGHOST")
    port = parsed.port or os.environ.get("PGPORT") or default_port
    host = f"$PGHOST {pghost}" if pghost else "its Unix socket"
    return f"libpq's default host ({host}), port {port}"


_PARAM = re.compile(r"%\((\w+)\)s")


def by_position(
    sql: str, numbered: bool
) -> tuple[str, Callable[[Mapping[str, Any]], tuple[Any, ...]], int]:
    """A statement with named parameters (``%(ns)s``) as a server takes them by position:
    ``$n`` (``numbered``: a name used twice is one parameter, as libpq numbers them) or ``?``
    (each use its own, as MariaDB prepares them); the getter of their values in that order
    from the statement's mapping (itemgetter of several keys, a tuple without a Python call:
    the row statements have three to five); and how many values it gives."""
    keys: list[str] = []

    def mark(match: re.Match[str]) -> str:
        key = match.group(1)
        if not numbered:
            keys.append(key)
            return "?"
        if key not in keys:
            keys.append(key)
        return f"${keys.index(key) + 1}"

    text = _PARAM.sub(mark, sql).replace("%%", "%")  # (as sql % params reads it)
    values: Callable[[Mapping[str, Any]], tuple[Any, ...]] = (
        operator.itemgetter(*keys) if len(keys) > 1 else lambda p: tuple(p[k] for k in keys)
    )
    return text, values, len(keys)


_guarded: weakref.WeakSet[ServerStore] = weakref.WeakSet()
_guarded_lock = threading.Lock()
_guard_runs = False  # this process's guard thread was started


def _guard(store: ServerStore) -> None:
    """Watch ``store``'s calls (from now on, in this process) for a server gone silent."""
    global _guard_runs
    with _guarded_lock:
        _guarded.add(store)
        if not _guard_runs:
            _guard_runs = True
            thread = threading.Thread(target=_watch_calls, name="tasklocks-io-guard", daemon=True)
            thread.start()


def _forget_the_parents_guard() -> None:
    """In a forked child: no guard thread runs, and the parent's stores are not this process's
    to watch (their connections are the parent's); a store the child uses registers again."""
    global _guarded, _guarded_lock, _guard_runs
    _guarded, _guarded_lock, _guard_runs = weakref.WeakSet(), threading.Lock(), False


os.register_at_fork(after_in_child=_forget_the_parents_guard)


def _watch_calls() -> None:
    while True:
        time.sleep(GUARD_TICK)
        _look_at_calls()


def _look_at_calls() -> None:
    with _guarded_lock:
        stores = list(_guarded)
    now = time.monotonic()
    for store in stores:
        since = store._busy
        if since and now - since > IO_TIMEOUT:
            store._silenced(since)


class ServerStore(RowsStore):
    """A lock table on an SQL server; a subclass is a dialect and supplies the methods marked
    abstract (the driver calls)."""

    LABEL: ClassVar[str]  # for messages: "MySQL", "PostgreSQL"
    DEFAULT_PORT: ClassVar[int]
    DEFAULT_USER: ClassVar[str]
    local = False
    _driver_errors: tuple[type[BaseException], ...]  # every error the driver raises
    GUARDED = False  # its driver has no timeout for a silent server: _guard watches its calls

    def __init__(
        self,
        parsed: ParsedURL,
        *,
        table: str,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        engine: Any = None,
        maker: Any = None,
        checked: bool = False,
    ) -> None:
        self._import_driver()
        self._engine = engine  # a SQLAlchemy Engine that lends its connections (see _engine.py)
        # The engine that makes this store's own connections (its URL, connect_args, creator):
        # the engine's, or the one whose sessions' store this is.
        # (An engine whose connections live on an event loop says so: see _loop_engine.py.)
        self._maker = engine if maker is None else maker
        if not getattr(self._maker, "makes_own_connections", True):
            self._maker = None
        self._lent: tuple[Any, Any] | None = None  # (the pool's connection, how it was)
        self.reconnect_timeout = reconnect_timeout
        self.url = parsed.display()
        self._parsed = parsed
        self._user = parsed.user or self.DEFAULT_USER
        self._where = _where(parsed, self.DEFAULT_PORT)
        self._load_sql(table)
        self._conn: Any = None
        self._pid = 0
        self._used = 0.0  # monotonic time the connection last answered
        self._busy = 0.0  # monotonic time the call going on began (0: none), for _guard
        self._cut = False  # the guard shut the connection down: its server was silent
        self._schema_checked = checked  # by the store whose sessions' store this is
        self._setup()
        if self.GUARDED:
            _guard(self)
        try:
            self._locked(lambda conn, call: None)  # connect and check the schema now
        except BaseException:
            self.close()
            raise

    # --- the dialect's driver calls -------------------------------------------------------------

    @abstractmethod
    def _import_driver(self) -> None:
        """Import the driver and set ``_driver_errors``; StoreUnavailable without it."""

    def _setup(self) -> None:
        """The dialect's own state, before the first connection."""

    @abstractmethod
    def _open(self, **options: Any) -> Any:
        """A new autocommit connection (driver errors pass through)."""

    @abstractmethod
    def _why(self, exc: BaseException) -> tuple[str, str]:
        """Why a connection failed: (the reason in a few words, "database" if there is no such
        database, "user" if the server refused the user, "tls" if the TLS the URL asks for
        cannot be had, else "": a failure that may pass, tried again)."""

    def _abandon(self, conn: Any) -> None:
        """Forget a connection inherited over fork() without a word to the server."""

    @abstractmethod
    def _gone(self, exc: BaseException) -> bool:
        """Does this driver error mean the connection is lost?"""

    @abstractmethod
    def _retryable(self, exc: BaseException) -> bool:
        """Is it a deadlock or a schema-creation race (the call may run again)?"""

    def _failure(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.LABEL} at {self._where} failed: {exc}")

    def _ping(self, conn: Any) -> None:
        self._execute(conn, self._sql["ping"])

    def _rollback(self, conn: Any) -> None:
        try:
            self._execute(conn, self._sql["rollback"])
        except self._driver_errors:
            self._drop()  # the server rolls back when the connection ends

    def _close_more(self) -> None:
        """Release the dialect's own resources (idempotent)."""

    def _socket(self, conn: Any) -> int | None:
        """The descriptor of a connection's socket (GUARDED dialects)."""
        return None

    def _silenced(self, since: float) -> None:
        """The call that began at ``since`` has waited for the server for ``IO_TIMEOUT``: shut
        its connection down (from the guard's thread), so that the driver raises, as for a
        connection lost, and the call fails or is retried."""
        conn = self._conn
        mine = self._pid == os.getpid()  # (never a parent's connection)
        fd = None if conn is None or self._busy != since or not mine else self._socket(conn)
        if fd is None or fd < 0:
            return
        self._cut = True
        with suppress(OSError):
            cut = socket.socket(fileno=os.dup(fd))  # (the dup is closed, the socket shut down)
            try:
                cut.shutdown(socket.SHUT_RDWR)
            finally:
                cut.close()

    def _lend(self, conn: Any) -> Any:
        """Make a driver connection lent by an engine's pool fit for tasklocks (autocommit);
        return what :meth:`_unlend` needs to give it back as it was. :raises StoreUnavailable:
        the engine's connections cannot serve (say how to configure them)."""
        raise NotImplementedError

    def _unlend(self, conn: Any, was: Any) -> None:
        """Give a lent connection back its settings."""

    # --- connection and errors ----------------------------------------------------------------

    def _connect(self, **options: Any) -> Any:
        """A new connection; StoreUnavailable, saying why and what to check, if there is none."""
        where = f"{self.LABEL} at {self._where}"
        if self._maker is not None:
            return self._made_by_engine(where)
        try:
            return self._open(**options)
        except self._driver_errors as exc:
            reason, problem = self._why(exc)
            if problem == "database":
                fix = f"has no database {self._parsed.database!r}; create it or fix the URL"
                raise StoreUnavailable(f"{where} {fix}") from exc
            if problem == "user":
                fix = "check the user and password in the URL and the user's rights"
                message = f"{where} refused user {self._user!r} ({reason}); {fix}"
                raise StoreUnavailable(message) from exc
            if problem == "tls":
                fix = "check the URL's TLS parameters and the server's TLS setup"
                raise StoreUnavailable(f"{where} refused TLS ({reason}); {fix}") from exc
            fix = "check that the server is running and the host and port in the URL"
            if not self._parsed.host:  # (postgresql:///db: libpq's default host)
                fix = "check that the server is running and $PGHOST, or give the URL a host"
            raise Lost(f"cannot connect to {where} ({reason}); {fix}") from exc
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(f"cannot connect to {where} ({exc}); check the URL") from exc

    def _side_options(self) -> dict[str, Any]:
        # An engine's sessions' store makes its connections as the engine makes them; the
        # schema was checked when this store opened (a task's start saves the round trips).
        return {"maker": self._maker, "checked": self._schema_checked}

    def _check_side(self, side: SQLStore) -> None:
        """An engine's store reads the sessions through the engine's pool, and its sessions'
        store (tasklocks' own connection) writes them: if the two see different tables (an
        AsyncEngine's ``connect_args`` or URL options that choose another database, schema or
        host, which its URL alone does not carry), every lease looks expired to everyone else
        and its locks are taken while held. So a probe session (expired as it is written) is
        written there, read here by its id, and deleted.

        :raises StoreUnavailable: the engine's connections do not see it."""
        if self._engine is None:
            return
        probe = (f"probe-{os.urandom(12).hex()}",)
        written = (*probe, "tasklocks: a check of the engine", "", None, 0, 0)  # (ttl 0)
        side._changing(lambda c, _: side._execute(c, side._sql["open_session"], written))
        try:
            seen = self._locked(
                lambda c, _: self._execute(c, self._sql["session_seen"], probe).fetchone()
            )
        finally:
            with suppress(StoreError):  # (else forgotten within the hour: it expired)
                side._changing(lambda c, _: side._execute(c, side._sql["forget_session"], probe))
        if seen:
            return
        where, why = f"{self.LABEL} at {self._where}", "another database, schema or host"
        if self._maker is None:  # (an AsyncEngine: see _loop_engine.py)
            raise SidesDiffer(
                f"{where}: the engine's connections see other {self.table} tables than "
                f"tasklocks' own, opened from the engine's URL alone ({why}, chosen by its "
                "connect_args or by URL parameters such as options=), so other processes would "
                "take the locks held here for expired; name the database in the URL, not in "
                "connect_args, and set a PostgreSQL schema for the user (ALTER ROLE ... SET "
                "search_path), not per connection, or pass tasklocks the database's URL"
            )
        raise SidesDiffer(
            f"{where}: the engine's connections see different {self.table} tables from one "
            f"connection to the next ({why}), so other processes would take the locks held "
            "here for expired; make every connection the engine makes reach the same database "
            "and schema, or pass tasklocks the database's URL"
        )

    def _made_by_engine(self, where: str) -> Any:
        """A connection of tasklocks' own (the sessions', PostgreSQL's LISTEN) made by the
        application's engine, as the engine makes them, then detached from its pool: it is
        never lent to anyone else, and closing it closes it."""
        try:
            pooled = self._maker.raw_connection()
        except Exception as exc:  # the pool's error: no connection to be had
            raise Lost(f"{where}: the engine made no connection ({exc})") from exc
        try:
            conn = pooled.driver_connection  # (before detach(), which forgets it)
            pooled.detach()
            self._lend(conn)  # autocommit on, for good
        except self._driver_errors as exc:
            pooled.close()
            raise Lost(f"{where}: the engine made a broken connection ({exc})") from exc
        except BaseException:
            pooled.close()
            raise
        return conn

    def _connection(self) -> Any:
        self._refuse_closed()
        if self._engine is not None:  # one of the engine's, for this call
            try:
                pooled = self._engine.raw_connection()
            except Exception as exc:  # the pool's error: no connection to be had
                raise Lost(f"{self.LABEL} at {self._where} lent no connection ({exc})") from exc
            conn = pooled.driver_connection
            try:
                self._lent = (pooled, self._lend(conn))
            except self._driver_errors as exc:  # the server ended it while it sat in the pool
                pooled.invalidate()
                pooled.close()
                raise Lost(
                    f"{self.LABEL} at {self._where} lent a broken connection ({exc})"
                ) from exc
            except BaseException:
                pooled.close()
                raise
            self._conn = conn
            return conn
        if self._conn is not None and self._pid != _pid.pid():
            self._abandon(self._conn)
            self._conn = None
            self._known = set()
            self._busy = 0.0  # (a call of the parent's, going on at the fork)
            if self.GUARDED:
                _guard(self)  # (a forked child has no guard thread yet)
        if self._conn is None:
            self._cut = False
            self._conn = self._connect()
            self._pid = os.getpid()
            self._used = time.monotonic()
            self._connected()
        return self._conn

    def _connected(self) -> None:
        """This store's own connection was (re)opened (a dialect may look at the server)."""

    def _give_back(self, broken: bool = False) -> None:
        """The end of a call: a lent connection goes back to the engine's pool, as it was; a
        broken one is invalidated, so that the pool never lends it again."""
        lent, self._lent = self._lent, None
        if lent is None:
            return
        self._conn = None
        pooled, was = lent
        if not broken:
            try:
                self._unlend(pooled.driver_connection, was)
            except Exception:  # broken meanwhile
                broken = True
        if broken:
            pooled.invalidate()
        pooled.close()

    def _drop(self) -> None:
        if self._engine is not None:
            self._give_back(broken=True)
            return
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with suppress(Exception):  # already broken: close() only cleans up
                conn.close()

    def _raise_for(self, exc: BaseException, call: Call) -> NoReturn:
        """Raise the tasklocks error for driver error ``exc``, the original kept as
        ``__cause__``: ``Lost`` (or ``OutcomeUnknown`` once a change was sent) for a connection
        gone, ``Retry`` for a deadlock, else the dialect's failure."""
        where = f"{self.LABEL} at {self._where}"
        if self._gone(exc):
            self._drop()
            if call.sent:
                raise OutcomeUnknown(
                    f"lost the connection to {where} after sending a change, which may or "
                    "may not have been applied; re-read before retrying"
                ) from exc
            reason = " ".join(str(exc).split())
            if self._cut:
                self._cut = False
                reason = f"it did not answer a statement for {IO_TIMEOUT:g}s"
            raise Lost(
                f"lost the connection to {where} ({reason}); check that the server is running"
            ) from exc
        if self._retryable(exc):
            raise Retry(str(exc)) from exc
        raise self._failure(exc) from exc

    def _locked(self, body: Callable[[Any, Call], T]) -> T:
        """Run ``body`` under the lock. A connection lost before anything was sent, or not to be
        had, is reopened and the call run again, for ``reconnect_timeout`` seconds at most;
        deadlocks are retried."""
        began = time.monotonic()
        deadline = began + self.reconnect_timeout
        attempt = retries = 0
        with self._lock if self._lock_pid == _pid._pid else self._mutex():
            while True:
                call = Call()
                try:
                    try:
                        conn = self._conn
                        if conn is not None and self._engine is None and self._driver_closed(conn):
                            self._drop()  # closed by its driver: nothing to send on it
                            conn = None
                        if conn is None or self._engine is not None or self._pid != _pid._pid:
                            conn = self._connection()
                        try:
                            self._busy = time.monotonic()
                            if self._busy - self._used > self._idle_ping:
                                self._ping(conn)  # find a dead idle connection before writing
                            if not self._schema_checked:
                                self._check_schema(conn)
                                self._schema_checked = True
                            result = body(conn, call)
                        except self._driver_errors as exc:
                            self._raise_for(exc, call)
                    finally:
                        self._busy = 0.0
                        if self._lent is not None:
                            self._give_back()
                    self._used = time.monotonic()
                    return result
                except Lost as exc:
                    attempt += 1
                    wait = min(0.5, 0.02 * 2**attempt) * random.uniform(0.5, 1.0)
                    if time.monotonic() + wait > deadline:
                        # (An engine's pool may have held the first try for its pool_timeout.)
                        spent = max(self.reconnect_timeout, time.monotonic() - began)
                        raise StoreUnreachable(
                            f"{self.url} did not answer for {round(spent, 1):g}s ({exc})"
                        ) from exc
                    pause(wait)
                except Retry as exc:
                    retries += 1
                    if retries > RETRIES:
                        raise StoreUnavailable(
                            f"{self.LABEL} at {self._where} kept failing on {self.table}: {exc}"
                        ) from exc
                    pause(random.uniform(0, 0.001 * retries))

    _changing = _locked  # (SQLStore._changing, without its call)

    def _fast(self, acquire: bool, statement: tuple[str, Any]) -> int | None:
        """A row statement on a warm connection (this process's own, used within the idle
        ping, its schema checked) runs under the lock without ``_locked``'s loop: the common
        change of 32 processes that share two cores. It fails as in ``_locked`` (sent:
        OutcomeUnknown once the connection is gone); a deadlock, and any connection that is not
        warm, take ``_locked``, which retries and reconnects."""
        conn = self._conn
        if (
            conn is not None
            and self._engine is None
            and self._pid == _pid._pid
            and self._lock_pid == _pid._pid
            and self._schema_checked
        ):
            with self._lock:
                now = time.monotonic()
                if (
                    conn is self._conn
                    and now - self._used <= self._idle_ping
                    and not self._driver_closed(conn)
                ):
                    self._busy = now
                    try:
                        version = self._run_name_statement(conn, acquire, statement)
                    except self._driver_errors as exc:
                        with suppress(Retry):  # rolled back by the server: _locked runs it again
                            self._raise_for(exc, _SENT)
                    else:
                        self._used = time.monotonic()
                        return version
                    finally:
                        self._busy = 0.0
        return super()._fast(acquire, statement)

    def _driver_closed(self, conn: Any) -> bool:
        """Whether the driver closed this store's own ``conn`` (on an error it raised, or an
        interruption): ``_locked`` then opens another, and the warm road leaves it to
        ``_locked`` (a statement sent on it failed as a reply lost, an unknown outcome, though
        nothing was sent)."""
        return False

    def _abandon_connection(self) -> None:
        self._drop()

    def _outcome_known(self, exc: BaseException) -> bool:
        # A server error in UPDATE or COMMIT stops there: nothing was committed. A lost
        # connection is OutcomeUnknown (see _errors).
        return isinstance(exc, self._driver_errors) and not self._gone(exc)

    def _disconnect(self) -> None:
        with self._mutex():
            if self._pid == os.getpid():
                self._drop()
            self._conn = None
        self._close_more()
