"""What every adapter shares: named statements, the schema, the sessions, polling, the tasks table.

Every statement of a dialect stands in ``sql/<dialect>.sql`` (as procrastinate's queries.sql):
``-- name: NAME`` starts a statement or fragment, other ``--`` lines are comments, a final ``;`` is
dropped and ``{word}`` marks a place :func:`fill` fills in. How a namespace is kept in rows (its
``read`` and ``transact``: the document and a row per name) is ``_rows.py``'s, on every adapter.
A dialect supplies the methods marked abstract.
"""

from __future__ import annotations

import functools
import select
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, TypeVar

from tasklocks import _pid
from tasklocks._url import ParsedURL, check_table_name
from tasklocks.errors import StoreError, StoreUnavailable

T = TypeVar("T")
SCHEMA_VERSION = 2  # 1: documents alone; 2: a row per name beside them (see _names.py)
EMPTY_DOCUMENT = '{"format":3,"procs":{},"locks":{}}'  # encode(EMPTY, compact=True)
# Every task column but ``id`` and ``version``, with its kind (the dialect's ``task_types`` maps
# kinds to SQL types). ``json`` columns hold JSON text (the tasks layer encodes and decodes them).
_COLUMNS = """kind:text target:json args:json locks:json namespace:text state:state percent:float
    message:text result:json error_code:text error_message:text exit_code:int signal:int pid:int
    pgid:int host:text start_token:text boot:text pidns:text created:float started:float
    finished:float log_path:text timeout:float stop_requested:float waited_for:json"""
TASK_COLUMNS = tuple((n, k) for n, _, k in (c.partition(":") for c in _COLUMNS.split()))
TASK_FIELDS: tuple[str, ...] = tuple(name for name, _kind in TASK_COLUMNS)
# What finds a task whose insert lost its reply: the process that started it, and the time it
# gave (with sub-microsecond digits, as stored: a float column keeps a float as it was sent).
_KNOWN_BY = ("host", "pid", "start_token", "created")
RETRIES_UNKNOWN = 3  # inserts of a task whose reply was lost, and the looks for it after each
TaskValue = str | int | float | None
TaskRow = dict[str, TaskValue]  # every TASK_FIELDS column plus "id" and "version"
Str = str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A namespace's row as read: its version and its document text, and the sessions of the
    lock table as read right after the row: the seconds each has left by the database's clock
    (zero or less: expired; a session missing from them expired long ago). ``None``: not read."""

    version: int
    data: str
    sessions: Mapping[str, float] | None = field(default=None, compare=False)
    read_at: float = field(default=0.0, compare=False)  # when, on this host's boot clock
    # Names held in their own rows that ``data`` does not show, as (name, token, lease, record):
    # the document is not one they could be written into (corrupt: see LockTable.repair).
    unshown: tuple[tuple[str, int, str, str], ...] = field(default=(), compare=False)


Change = tuple[str, bool]  # (new document text, wake waiters?)
Compute = Callable[[Snapshot], Change | None]  # None: change nothing


class OutcomeUnknown(StoreUnavailable):
    """The connection failed after a write was sent: it may or may not have been applied.
    The caller re-reads and looks for what it may already have written before retrying."""


class SidesDiffer(StoreUnavailable):
    """An engine's connections see other lock tables than tasklocks' own (``_check_side``)."""


class Retry(StoreError):
    """A deadlock, or a race creating the schema: safe to run the call again."""


class Call:
    """Per-attempt bookkeeping: has a change that may be applied been sent?"""

    sent = False  # (a class default: a Call is made without a Python call of its own)


@functools.cache
def load(dialect: str) -> dict[str, str]:
    """The named statements of ``dialect`` (``sqlite``, ``mysql``, ``postgres``), as written:
    those of ``sql/common.sql``, unless ``sql/<dialect>.sql`` names one too."""
    found: dict[str, list[str]] = {}
    for name in ("common", dialect):
        text = resources.files(__package__).joinpath("sql", f"{name}.sql").read_text("utf-8")
        lines: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("-- name:"):
                lines = found[line.removeprefix("-- name:").strip()] = []
            elif lines is not None and not line.lstrip().startswith("--"):
                lines.append(line.rstrip())
    return {name: "\n".join(body).strip("\n").removesuffix(";") for name, body in found.items()}


def statements(dialect: str, pieces: Sequence[str] = (), **values: object) -> dict[str, str]:
    """``dialect``'s named statements with its pieces filled in (``now``, then ``pieces``:
    statements of its file that others name, in that order, so that one may name a later one),
    then ``values``."""
    raw = load(dialect)
    named = {name: raw[name] for name in ("now", *pieces)}
    return {name: fill(text, **named, **values) for name, text in raw.items()}


def fill(text: str, **values: object) -> str:
    """``text`` with every ``{name}`` of ``values`` replaced by the value."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def _times(rows: Sequence[Sequence[Any]]) -> dict[str, float]:
    return {str(session): float(left) for session, left in rows}


Pace = tuple[float, float, float, float, float, float]  # see SQLStore._poll


def first_delay(pace: Pace, woken: bool) -> float:
    """The first pause between two polls of a wait (``woken``: a local wake-up may end it)."""
    return pace[4] if woken else pace[0]


def next_delay(pace: Pace, delay: float, waited: float, woken: bool) -> float:
    """The pause after a poll that found nothing new, ``waited`` seconds into the wait."""
    _, cap_young, share, cap_old, _, wake_cap = pace
    cap = wake_cap if woken else min(cap_old, max(cap_young, share * waited))
    return min(delay * 1.5, cap)


class SQLStore(ABC):
    """An adapter (a ``Backend``): the parts written once; see the module docstring."""

    DIALECT: ClassVar[str]  # its statements are sql/<DIALECT>.sql
    QUOTE: ClassVar[str] = ""  # how the dialect quotes a column name
    MARK: ClassVar[str] = "%s"  # the driver's placeholder
    PIECES: ClassVar[tuple[str, ...]] = ()  # statements of its file that others name ({now} too)
    POLL: ClassVar[Pace]  # see _poll
    url: str  # for messages, without a password
    table: str
    local: bool  # every holder runs on this machine (see owner.process_liveness)
    _where: str  # the database, for messages
    _driver_errors: tuple[type[BaseException], ...]  # every error the driver raises
    _parsed: ParsedURL
    reconnect_timeout: float = 5.0
    _side: SQLStore | None = None  # the sessions' store (see _sessions_store)
    _idle_ping = 1.0  # seconds idle after which a server connection is checked first
    REENTRANT: ClassVar[bool] = False  # does a call of this store call the store again?
    _lock_pid = 0
    _tasks_ready = False
    _shut = False  # closed: it never connects again (see _refuse_closed)

    @abstractmethod
    def __init__(self, parsed: ParsedURL, *, table: str, reconnect_timeout: float = 5.0) -> None:
        """Open the store and check (or create) its schema; a server that does not answer is
        tried again for ``reconnect_timeout`` seconds in every call."""

    def _load_sql(self, table: str, **values: object) -> None:
        self.table = check_table_name(table)
        self._side_mutex()  # (made now, while one thread has the store)
        self._known: set[str] = set()  # namespaces whose row exists
        # Where the last wait of a namespace stopped: (version to go on from, start, last poll,
        # delay, whether it timed out (else it saw that version appear)).
        self._backoff: dict[str, tuple[int, float, float, float, bool]] = {}
        raw = load(self.DIALECT)
        types = dict(kind.split(":", 1) for kind in raw["task_types"].split(", "))
        columns = ", ".join(f"{self._column(n)} {types[kind]}" for n, kind in TASK_COLUMNS)
        values = {**values, "mark": self.MARK, "t": table, "task_columns": columns}
        self._sql = statements(self.DIALECT, self.PIECES, **values)

    _side_lock_pid = 0

    def _side_mutex(self) -> Any:
        """The lock of the sessions' store's making and closing (a new one in a forked
        child, as ``_mutex``); never taken with ``_mutex`` held by the same call."""
        if self._side_lock_pid != _pid.pid():
            self._side_lock, self._side_lock_pid = threading.Lock(), _pid.pid()
        return self._side_lock

    def _mutex(self) -> Any:
        """The store's lock. In a forked child, a new one: the parent's may be held by a thread
        the child does not have."""
        if self._lock_pid != _pid.pid():
            lock = threading.RLock() if self.REENTRANT else threading.Lock()
            self._lock, self._lock_pid = lock, _pid.pid()
        return self._lock

    # --- what a dialect supplies ----------------------------------------------------------------

    @abstractmethod
    def _locked(self, body: Callable[[Any, Call], T]) -> T:
        """Run ``body(connection, call)`` under the store's lock, translating driver errors."""

    def _changing(self, body: Callable[[Any, Call], T]) -> T:
        return self._locked(body)  # a change may need more (SQLite queues its writers)

    @abstractmethod
    def _execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        """Run one statement on ``conn``; its DB-API cursor."""

    @abstractmethod
    def _missing_table(self, exc: BaseException) -> bool:
        """Did the statement fail because a table does not exist (yet)?"""

    @abstractmethod
    def _missing_column(self, exc: BaseException) -> bool:
        """Did the statement fail because a column does not exist?"""

    @abstractmethod
    def _outcome_known(self, exc: BaseException) -> bool:
        """After ``exc``, is it certain that nothing sent in this transaction was committed?"""

    def pace(self) -> Pace:
        """The polling pace of this store (see ``_poll``): ``POLL``, unless a dialect decides
        per URL."""
        return self.POLL

    def wait_for_change(
        self,
        namespace: str,
        version: int,
        timeout: float,
        wake_fd: int | None = None,
        *,
        pace: bool = False,
    ) -> bool:
        """See ``Store.wait_for_change``: polling (a dialect with notifications overrides it)."""
        return self._poll(namespace, version, timeout, wake_fd, pace=pace)

    @abstractmethod
    def _disconnect(self) -> None:
        """Close this store's connections (idempotent)."""

    def close(self) -> None:
        """Release connections (idempotent). A closed store stays closed: a thread that calls
        it afterwards (a session's renewal, a give-back) gets StoreUnavailable, and no
        connection is opened that nobody would close."""
        self._shut = True
        with self._side_mutex():  # (after a making of it in progress: it is closed here)
            side, self._side = self._side, None
        if side is not None and side is not self:
            side.close()
        self._disconnect()

    def _abandon_connection(self) -> None:  # noqa: B027 (SQLite knows: it rolls back)
        """Drop the connection after a change whose outcome is unknown (a new one next time)."""

    def _commit(self, conn: Any) -> None:
        self._execute(conn, self._sql["commit"])

    def _rollback(self, conn: Any) -> None:
        self._execute(conn, self._sql["rollback"])

    # --- the schema -----------------------------------------------------------------------------

    def _check_schema(self, conn: Any) -> None:
        """Create the tables on first use; refuse a schema this tasklocks does not know."""
        row = self._schema_row(conn)
        if row is None:  # concurrent creators may collide (PostgreSQL): dialects retry that
            self._execute(conn, self._sql["create_table"])
            self._refuse_a_foreign_table(conn)
            self._execute(conn, self._sql["create_meta"])
            self._execute(conn, self._sql["insert_meta"], (str(SCHEMA_VERSION),))
            row = self._schema_row(conn)
        try:
            version = int(row[0]) if row is not None else -1
        except ValueError:
            version = -1
        where = f"the lock table {self.table} at {self._where}"
        if version < 0:
            fix = f"fix or drop {self.table}_meta"
            raise StoreError(f"{where} has a bad schema version {row!r}; {fix}")
        if version > SCHEMA_VERSION:
            fix = f"newer than this tasklocks understands ({SCHEMA_VERSION}); upgrade tasklocks"
            raise StoreError(f"{where} has schema version {version}, {fix}")
        # A dialect's schema_version may say more, in the same round trip: whether everything
        # _schema_extras makes exists already, and whether the tasks table does.
        if len(row) > 2 and row[2]:
            self._tasks_ready = True
        if version == SCHEMA_VERSION and len(row) > 1 and row[1]:
            return
        self._schema_extras(conn)
        if version < SCHEMA_VERSION:
            self._upgrade(conn, version)

    def _refuse_a_foreign_table(self, conn: Any) -> None:
        """A table of this name that tasklocks did not make (it has no ``_meta`` beside it, and
        not the lock table's columns): refused before anything is written beside it.

        :raises StoreError: it is not a lock table."""
        try:
            self._execute(conn, self._sql["probe_table"])
        except self._driver_errors as exc:
            if not self._missing_column(exc):
                raise
            raise StoreError(
                f"the table {self.table} at {self._where} is not a tasklocks lock table (it has "
                "no columns namespace, version and data); use another database, or another "
                "table name (table= in Python), or rename that table"
            ) from None

    @abstractmethod
    def _upgrade(self, conn: Any, version: int) -> None:
        """Move a table of an older schema ``version`` to ``SCHEMA`` (after ``_schema_extras``
        made what the new one adds)."""

    def _schema_extras(self, conn: Any) -> None:
        """What is made idempotently at every open: the sessions table (added after schema
        version 1) and the index of their expiry (for a table made before the index was, too);
        a dialect may add its extras, or send them in one go."""
        self._execute(conn, self._sql["create_sessions"])
        self._execute(conn, self._sql["index_sessions"])

    def _schema_row(self, conn: Any) -> Any:
        try:
            return self._execute(conn, self._sql["schema_version"]).fetchone()
        except self._driver_errors as exc:
            if self._missing_table(exc):
                return None
            raise

    # --- documents: a layout supplies them ------------------------------------------------

    @abstractmethod
    def read(self, namespace: str) -> Snapshot:
        """See ``Store.read``."""

    @abstractmethod
    def transact(
        self,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
        names: Sequence[str] | None = None,
    ) -> Snapshot:
        """See ``Store.transact``."""

    # --- sessions: on a connection of their own, so that renewals never queue behind changes ---

    def _refuse_closed(self) -> None:
        """Raise StoreUnavailable if this store was closed (before opening a connection)."""
        if self._shut:
            raise StoreUnavailable(f"the lock table at {self.url} was closed; open it again")

    def _sessions_store(self) -> SQLStore:
        side = self._side
        if side is None:
            with self._side_mutex():  # one sessions' store, even if two threads ask at once
                side = self._side
                if side is None:
                    self._refuse_closed()
                    retry = self.reconnect_timeout
                    side = type(self)(
                        self._parsed,
                        table=self.table,
                        reconnect_timeout=retry,
                        **self._side_options(),
                    )
                    side._side = side
                    side._idle_ping = float("inf")  # a renewal whose reply is lost is renewed again
                    try:
                        self._check_side(side)
                    except BaseException:
                        side.close()
                        raise
                    self._side = side
        return side

    def _side_options(self) -> dict[str, Any]:
        """What the sessions' store is made with besides the URL and the table."""
        return {}

    def _check_side(self, side: SQLStore) -> None:  # noqa: B027 (most stores need none)
        """Check that what the new sessions' store ``side`` writes is what this store reads
        (a store whose connections are made otherwise than its sessions' does)."""

    def _on_side(self, name: str, params: Sequence[Any]) -> int:
        side = self._sessions_store()  # queued as changes are (SQLite's gate)
        return int(side._changing(lambda c, _: side._execute(c, side._sql[name], params).rowcount))

    def open_session(
        self, session: str, owner: str, host: str, pid: int | None, ttl: float
    ) -> None:
        """Open a session that expires ``ttl`` seconds from now by the database's clock (and
        forget sessions that expired an hour ago: their entries are free anyway)."""
        self._on_side("forget_sessions", ())
        self._on_side("open_session", (session, owner, host, pid, ttl, ttl))

    def renew_session(self, session: str) -> bool:
        """Push the session's expiry to ``ttl`` seconds from now; False if it had expired (it
        never comes back) or is unknown."""
        return self._on_side("renew_session", (session,)) == 1

    def reset(self, namespace: str, data: str) -> Snapshot:
        """Overwrite a namespace's document unconditionally (``repair``); bumps the version."""
        return self.transact(namespace, lambda snap: (data, True), None)

    def namespaces(self) -> list[str]:
        """Every namespace that has a row."""
        rows = self._locked(lambda c, _: self._execute(c, self._sql["namespaces"]).fetchall())
        return sorted(str(r[0]) for r in rows)

    def _poll(
        self,
        namespace: str,
        version: int,
        timeout: float,
        wake_fd: int | None,
        heard: int = -1,
        *,
        pace: bool = False,
    ) -> bool:
        """Wait for the version to differ from ``version``, polling from every ``POLL[0]`` s, x1.5
        each time, up to ``POLL[1]``, later to ``POLL[2]`` of the time waited (``POLL[3]`` at
        most); with a ``wake_fd`` (it ends the wait) from ``POLL[4]`` to ``POLL[5]`` s. Waits in
        slices go on where they stopped, unless ``heard`` (readable on a change) is given; so
        does a wait with ``pace`` for the version the last one saw (see ``wait_for_change``)."""
        pace_ = self.pace()
        now = time.monotonic()
        deadline = now + timeout
        previous = self._backoff.pop(namespace, None)
        # Go on where the last wait stopped if a slice of it timed out, or (``pace``) the change
        # it saw concerned nobody here.
        if previous is not None and previous[0] == version and heard < 0 and (previous[4] or pace):
            _, start, last, delay, _ = previous
        elif self.version(namespace) != version:
            return True
        else:
            start, last, delay = now, now, first_delay(pace_, wake_fd is not None)
        fds = [fd for fd in (wake_fd, heard) if fd is not None and fd >= 0]
        while True:
            now = time.monotonic()
            if now >= deadline:
                self._backoff[namespace] = (version, start, last, delay, True)
                return False
            due = last + delay
            if select.select(fds, [], [], max(0.0, min(due, deadline) - now))[0]:
                return True  # drained by the caller, not here
            if not due <= time.monotonic() < deadline:
                continue  # not due yet, or the time is up (the next call polls first)
            if (seen := self.version(namespace)) != version:
                self._backoff[namespace] = (seen, start, time.monotonic(), delay, False)
                return True
            last = time.monotonic()
            delay = next_delay(pace_, delay, last - start, wake_fd is not None)

    def version(self, namespace: str) -> int:
        """The namespace's version (0: no row yet), read alone: what a waiter polls."""

        def body(conn: Any, call: Call) -> int:
            row = self._execute(conn, self._sql["select_version"], (namespace,)).fetchone()
            return int(row[0]) if row is not None else 0

        return self._locked(body)

    # --- the tasks table: one row per task, each update a compare-and-swap on its version -----

    @classmethod
    def _column(cls, name: str) -> str:
        return f"{cls.QUOTE}{name}{cls.QUOTE}"

    def _tasks(
        self, sql: str, params: Sequence[Any], read: Callable[[Any], T], change: bool = False
    ) -> T:
        """Run one statement on the tasks table (created on first use); ``read`` its cursor.
        ``change``: a connection lost once it is sent raises ``OutcomeUnknown`` (it may have
        been applied), rather than running it again."""

        def body(conn: Any, call: Call) -> T:
            if not self._tasks_ready:
                for name in ("create_tasks", "create_tasks_index"):
                    if name in self._sql:
                        self._execute(conn, self._sql[name])
                self._tasks_ready = True
            call.sent = change
            cursor = self._execute(conn, sql, params)
            call.sent = False  # (the reply came)
            return read(cursor)

        return self._locked(body)

    def _inserted_id(self, cursor: Any) -> int:
        return int(cursor.lastrowid)

    @staticmethod
    def _rows(cursor: Any) -> list[TaskRow]:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def create_task(self, fields: Mapping[str, TaskValue]) -> int:
        """Insert a task (version 0) and return its id: increasing, never reused. An insert
        whose reply was lost is looked for by ``_KNOWN_BY`` (the starting process and the
        time it gave) before it is sent again, so that it is never written twice (a second row,
        pending, that the reconciliation would later call crashed); without those fields the
        ``OutcomeUnknown`` is raised, as it is when the look fails. (An insert still running
        on the server when its connection was cut, a lock wait past the guard's IO_TIMEOUT, is
        not seen by the look and is written twice: a unique key over those fields would close
        that; not built.)"""
        names = [n for n in TASK_FIELDS if n in fields]
        columns = "".join(f", {self._column(n)}" for n in names)
        sql = fill(self._sql["insert_task"], columns=columns, values=f", {self.MARK}" * len(names))
        known = [fields.get(n) for n in _KNOWN_BY]
        where = " AND ".join(f"{self._column(n)} = {self.MARK}" for n in _KNOWN_BY)
        find = fill(self._sql["find_task"], where=where)
        for _ in range(RETRIES_UNKNOWN):
            try:
                return self._tasks(sql, [fields[n] for n in names], self._inserted_id, True)
            except OutcomeUnknown:
                if any(v is None for v in known):
                    raise
            try:
                rows = self._tasks(find, known, lambda cursor: cursor.fetchall())
            except StoreError as exc:  # (not "nothing written": it may have been)
                raise OutcomeUnknown(
                    f"lost the connection while inserting a task into {self.table}_tasks, and "
                    f"could not look for it ({exc}); look for it with 'tasklocks tasks' before "
                    "starting it again"
                ) from exc
            if rows:
                return int(rows[0][0])  # written before its reply was lost
        raise OutcomeUnknown(
            f"the insert of a task into {self.table}_tasks kept losing its connection; look "
            "for it with 'tasklocks tasks' before starting it again"
        )

    def get_task(self, task_id: int) -> TaskRow | None:
        """One task's row, or None."""
        rows = self._tasks(self._sql["get_task"], (task_id,), self._rows)
        return rows[0] if rows else None

    def update_task(self, task_id: int, version: int, fields: Mapping[str, TaskValue]) -> bool:
        """Set ``fields`` and bump the version, only if the row still has ``version``."""
        names = [n for n in TASK_FIELDS if n in fields]
        sets = "".join(f", {self._column(n)} = {self.MARK}" for n in names)
        args = [*(fields[n] for n in names), task_id, version]
        sql = fill(self._sql["update_task"], sets=sets)
        return self._tasks(sql, args, lambda cursor: bool(cursor.rowcount == 1))

    def list_tasks(
        self, states: Sequence[str] | None = None, limit: int | None = None, namespace: Str = None
    ) -> list[TaskRow]:
        """Tasks (in ``states``, of ``namespace``, when given), newest first, at most ``limit``."""
        where: list[str] = []
        params = list(states or ())
        if states is not None:
            where.append(f"state IN ({', '.join([self.MARK] * len(states))})" if states else "0=1")
        if namespace is not None:
            where.append(f"{self._column('namespace')} = {self.MARK}")
            params.append(namespace)
        sql = fill(
            self._sql["list_tasks"],
            where=" WHERE " + " AND ".join(where) if where else "",
            limit="" if limit is None else f" LIMIT {int(limit)}",
        )
        return self._tasks(sql, params, self._rows)
