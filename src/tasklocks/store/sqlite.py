"""SQLite adapter (standard library): the embedded default, safe for many processes on one host.

* WAL mode, so readers never block the writer. ``synchronous=NORMAL``: in WAL mode a commit then
  survives a crash of any process and a power loss cannot corrupt the database; a power loss may
  only forget the last commits (https://www.sqlite.org/pragma.html#pragma_synchronous). Every
  holder lives on this host and dies with it; after the reboot its entries carry an old boot id,
  which proves them dead, so a forgotten change costs nothing. FULL would fsync every change.
  The WAL is cut back to 4 MiB whenever it starts over (``journal_size_limit``); under a steady
  load of many processes it would never start over by itself, so past 256 MiB a checkpoint
  makes it (``_bound_wal``).
* A change through the document takes the write lock up front (``BEGIN IMMEDIATE``), so it
  never fails its compare-and-swap and no name can be taken in its row meanwhile; a free name
  is taken and released in its row by one statement (``_rows.py``), the short write that most
  changes are. A change that finds the write lock busy yields the CPU and tries again a few
  times, then queues on an flock (see ``_changing``, ``_open_gate``); a busy database is retried
  with short jittered sleeps rather than SQLite's 1, 2, 5, 10... ms, for sub-millisecond hand-offs.
"""

from __future__ import annotations

import fcntl
import os
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from tasklocks import _pid
from tasklocks._clock import pause
from tasklocks._url import ParsedURL
from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.owner import boot_id
from tasklocks.store._base import Call, Change, fill
from tasklocks.store._names import stored
from tasklocks.store._rows import RowsStore

__all__ = ["SQLiteStore"]

T = TypeVar("T")
BUSY_DEADLINE = 60.0  # seconds a change may wait for SQLite's write lock before giving up
AT_ONCE = 1  # tries of a busy change again at once (its holder may be running on another core)
SPINS = 10  # then tries, each after a sched_yield, before it queues on the gate
# What the file or its filesystem refuses (opening, reading, writing it): the store cannot be
# used, as a server that does not answer (exit 69 on the command line), not "SQLite failed".
_CANNOT_USE = frozenset(
    (
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_FULL,
    )
)
# The WAL's bound (see _bound_wal): every WAL_LOOK_EVERY changes a store looks at the file's
# size; past WAL_LIMIT it checkpoints and waits at most 20 ms for the readers still in it
# (sqlite.sql: busy_timeout_checkpoint), so that the next change starts the file over.
WAL_LOOK_EVERY = 256
WAL_WAITED = 0.015  # a checkpoint that returned busy after this long waited for a reader
WAL_LIMIT = 256 << 20


_uptime = (0, -1)  # (pid, descriptor of /proc/uptime open in that process)


def _host_clock() -> float:
    """Seconds since this host booted, from the kernel: the clock of an SQLite lock table, one
    that no process's faked (libfaketime) or stepped (NTP) wall clock moves."""
    global _uptime
    try:
        if _uptime[0] != os.getpid():  # a fork may have pointed ours at /dev/null
            _uptime = (os.getpid(), os.open("/proc/uptime", os.O_RDONLY | os.O_CLOEXEC))
        return float(os.pread(_uptime[1], 64, 0).split()[0])
    except (OSError, ValueError, IndexError):  # no /proc: this process's clock, then
        return time.clock_gettime(time.CLOCK_BOOTTIME)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _Token:
    """``tasklocks_token(v)`` of one connection: keeps ``v`` for the adapter, and returns it (a
    plain object, so that the connection holds no reference back to its store)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: int | None = None

    def __call__(self, version: int) -> int:
        self.value = version
        return version


class SQLiteStore(RowsStore):
    """A lock table in one SQLite file."""

    DIALECT = "sqlite"
    MARK = "?"
    REENTRANT = True
    _driver_errors = (sqlite3.Error,)
    local = True  # every holder runs on this machine (see owner.process_liveness)
    # With a local wake-up channel every release on this host wakes a waiter at once, and
    # polling is a fallback; without one it is the signal, polled briskly (a read is cheap).
    POLL = (0.0005, 0.004, 0.0, 0.004, 0.2, 0.2)

    def __init__(self, parsed: ParsedURL, *, table: str, reconnect_timeout: float = 5.0) -> None:
        self._load_sql(table)
        self._parsed = parsed
        self.path = self._where = parsed.path
        self.url = "sqlite:///" + os.path.realpath(parsed.path)  # one name per file (wake-ups)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._gate_fd: int | None = None
        self._gate_pid = 0
        self._gate_made = False  # the last _open_gate made the file
        # Changes until the next look at the WAL's size (see _bound_wal): the first look of each
        # process comes after a random number of them, so that short-lived processes look too.
        self._changes = random.randrange(WAL_LOOK_EVERY)
        self._wal = os.path.realpath(parsed.path) + "-wal"  # (the working directory may change)
        self._wal_quiet = (0.0, 0.0)  # (no look before this monotonic time, the next pause)
        self._token = _Token()
        with self._mutex():
            self._connect()

    # --- connection ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == _pid.pid():
            return self._conn
        self._refuse_closed()
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
        conn.create_function("tasklocks_now", 0, _host_clock)
        conn.create_function("tasklocks_boot", 0, boot_id)
        conn.create_function("tasklocks_token", 1, self._token)
        self._conn = conn
        self._pid = os.getpid()
        had_gate = self._gate_fd is not None and self._gate_pid == _pid.pid()
        self._gate_fd = self._open_gate()
        self._known = set()
        self._tasks_ready = False
        try:
            conn.execute(self._sql["page_size"])  # before WAL mode writes a new file's header
            mode = self._retry(lambda c: c.execute(self._sql["journal_wal"]).fetchone()[0])
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"SQLite refused WAL mode for {self.path!r} (got {mode}); "
                    "put the lock table on a local filesystem"
                )
            conn.execute(self._sql["synchronous_normal"])
            conn.execute(self._sql["journal_size_limit"])
            self._retry(self._check_schema)
        except BaseException:
            self._conn = None
            conn.close()
            if not had_gate and self._gate_made and self._gate_fd is not None:
                # (not a database, say: the <db>-lock this open made beside it goes too)
                os.close(self._gate_fd)
                self._gate_fd = None
                with suppress(OSError):
                    os.unlink(self.path + "-lock")
            raise
        return conn

    def _open_gate(self) -> int | None:
        """The writers' queue: an flock(2) on ``<db>-lock`` around each change that found the
        write lock busy after its spins (see ``_changing``). SQLite's own
        answer to a busy write lock is to retry, a storm of sleeps with many processes; a kernel
        lock queues them and wakes the next at once. It is held inside one call and dies with its
        process. Without the file (no permission), changes still work, by retrying."""
        if self._gate_fd is not None and self._gate_pid == _pid.pid():
            return self._gate_fd
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:  # never reuse a descriptor inherited over fork: it would share the parent's lock
            try:
                fd = os.open(self.path + "-lock", flags | os.O_EXCL, 0o600)
                self._gate_made = True  # (removed again if this first open fails)
            except FileExistsError:
                fd = os.open(self.path + "-lock", flags, 0o600)
                self._gate_made = False
        except OSError:
            return None
        self._gate_pid = os.getpid()
        return fd

    def _retry(self, body: Callable[[sqlite3.Connection], T], queue: bool = False) -> T:
        """Run ``body`` on the connection, again while SQLite says the database is locked: with
        ``queue`` (a change, see ``_changing``) first at once and after ``sched_yield``, then
        queued on the gate; then with short jittered sleeps."""
        deadline = 0.0  # set at the first busy answer that sleeps
        delay = 0.00005
        spins = AT_ONCE + SPINS if queue else 0
        queued = not queue
        gate: int | None = None  # held while queued (None without the file)
        try:
            while True:
                conn = self._connect()
                try:
                    return body(conn)
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise self._error(exc) from exc
                    if spins:
                        spins -= 1
                        if spins < SPINS:
                            os.sched_yield()
                        if spins:
                            continue
                    if not queued:  # the spins are spent: try again once queued
                        queued, gate = True, self._gate_fd
                        if gate is not None:
                            fcntl.flock(gate, fcntl.LOCK_EX)
                        continue
                    deadline = deadline or time.monotonic() + BUSY_DEADLINE
                    if time.monotonic() > deadline:
                        raise self._error(exc) from exc
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
                pause(random.uniform(0, delay))
                delay = min(delay * 2, 0.002)
        finally:
            if gate is not None:
                fcntl.flock(gate, fcntl.LOCK_UN)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            return StoreUnavailable(
                f"the SQLite lock table {self.path!r} stayed locked for {BUSY_DEADLINE:g}s; "
                "is some process holding a long transaction on it?"
            )
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
        if code == sqlite3.SQLITE_NOTADB:
            return StoreUnavailable(
                f"{self.path!r} is not an SQLite database ({exc}); check the path in the URL"
            )
        if code in _CANNOT_USE:
            return StoreUnavailable(
                f"cannot use the SQLite lock table {self.path!r}: {exc}; check the path, its "
                "permissions and that its filesystem is writable and not full"
            )
        return StoreError(f"SQLite failed on {self.path!r}: {exc}")

    def _locked(self, body: Callable[[Any, Call], T]) -> T:
        with self._mutex():
            return self._retry(lambda conn: body(conn, Call()))

    def _changing(self, body: Callable[[Any, Call], T]) -> T:
        """A change is tried at once. If SQLite's write lock is busy it is tried again at once
        (``AT_ONCE``: a holder running on another core is done within microseconds), then after
        giving up the CPU (``sched_yield``), ``SPINS`` times: on a host with more busy processes
        than cores the holder is most often one that was preempted, and yielding lets it finish.
        Only then does the change queue on the gate (see ``_open_gate``), where the first in line
        retries with short sleeps and the others sleep in the kernel. (Measured in
        docs/design.md, "SQLite: what a statement and a wait cost".)"""
        with self._mutex():
            result = self._retry(lambda conn: body(conn, Call()), queue=True)
            self._changes += 1
            if self._changes >= WAL_LOOK_EVERY:
                self._changes = 0
                self._bound_wal()
            return result

    def _bound_wal(self) -> None:
        """Keep the WAL from growing without end. SQLite starts the file over only when a
        checkpoint is complete and no reader is still in it; under the steady load of many
        processes that moment never comes (16 processes grew it by 55 MB a second, without
        end), and ``journal_size_limit`` cuts it back only once it starts over. Past
        ``WAL_LIMIT``, the process whose look finds it runs a ``RESTART`` checkpoint: it copies
        the rest of the WAL into the database and waits (20 ms at most, holding the write lock:
        a reader is microseconds long unless it was preempted) for the readers still in it; the
        next change then starts the file over, cut back to 4 MiB. Most looks find the checkpoint
        lock taken by another process's checkpoint and return at once. One that waited in vain
        (a long reader: a backup, a shell's open transaction, a stopped process) pauses this
        process's looks, 1 s and doubling up to a minute, so that it does not stall every
        writer again and again while nothing can succeed. Under the store's mutex, between
        changes. Measured in docs/design.md ("SQLite's WAL under a steady load")."""
        conn = self._conn
        quiet_until, pause_for = self._wal_quiet
        if conn is None or conn.in_transaction or time.monotonic() < quiet_until:
            return
        try:
            if os.stat(self._wal).st_size <= WAL_LIMIT:
                return
        except OSError:
            return
        started = time.monotonic()
        try:
            conn.execute(self._sql["busy_timeout_checkpoint"])
            busy = conn.execute(self._sql["wal_restart"]).fetchone()[0]
        except sqlite3.Error:
            busy = 1  # another process's checkpoint, or its write lock held past the wait
        finally:
            try:
                conn.execute(self._sql["busy_timeout_off"])
            except BaseException as exc:  # never leave it waiting SQLite's way:
                self._let_go()  # a new connection next time
                if not isinstance(exc, sqlite3.Error):
                    raise
        waited = time.monotonic() - started
        if not busy:
            self._wal_quiet = (0.0, 0.0)
        elif waited >= WAL_WAITED:  # it had the lock and waited in vain: a reader stays
            pause_for = min(60.0, max(1.0, pause_for * 2))
            self._wal_quiet = (time.monotonic() + pause_for, pause_for)

    def _execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        return conn.execute(sql, params or ())

    def _missing_table(self, exc: BaseException) -> bool:
        return "no such table" in str(exc)

    def _missing_column(self, exc: BaseException) -> bool:
        return "no such column" in str(exc)

    def _schema_extras(self, conn: Any) -> None:
        for name in ("create_sessions", "index_sessions", "create_names", "index_names"):
            conn.execute(self._sql[name])

    # --- the layout's round trips (rows.py): one connection, under the write lock -------------

    def _read_kept(self, conn: Any, namespace: str) -> tuple[list[Any], Any]:
        rows = conn.execute(self._sql["select_kept"], {"ns": namespace}).fetchall()
        return rows, conn.execute(self._sql["sessions"]).fetchall()

    def _lock_kept(
        self, conn: Any, namespace: str, names: list[str] | None
    ) -> tuple[Any, list[Any], Any]:
        conn.execute(self._sql["begin_immediate"])  # the write lock, taken up front
        row = conn.execute(self._sql["select"], (namespace,)).fetchone()
        only = "" if names is None else f" AND name IN ({', '.join('?' * len(names))})"
        sql = fill(self._sql["lock_held_names"], only=only if names != [] else " AND 0")
        held = conn.execute(sql, (namespace, *(names or ()))).fetchall()
        return row, held, conn.execute(self._sql["sessions"]).fetchall()

    def _claim_names(self, conn: Any, namespace: str, names: list[str]) -> list[Any]:
        # The transaction holds the database's one write lock: the rows only need reading.
        sql = fill(self._sql["claimed_names"], names=", ".join("?" * len(names)))
        return conn.execute(sql, (namespace, *names)).fetchall()  # type: ignore[no-any-return]

    def _write_kept(
        self,
        conn: Any,
        namespace: str,
        version: int,
        new_version: int,
        change: Change,
        marks: Mapping[str, bool],
    ) -> None:
        rows = [(namespace, name, new_version, int(marks[name])) for name in sorted(marks)]
        conn.executemany(self._sql["set_names"], rows)
        conn.execute(self._sql["update_to"], (stored(change[0]), new_version, namespace, version))
        conn.execute(self._sql["commit"])

    def _name_version(self, cursor: Any, acquire: bool) -> int | None:
        # The statement set the row's version through tasklocks_token (see sqlite.sql); a call
        # made before it found the row taken may have set it too, so only a changed row counts.
        # (Under the mutex of the call: each statement's token is taken once.)
        token, self._token.value = self._token.value, None
        if cursor.rowcount != 1:
            return None
        if token is None:
            raise StoreError(
                f"the SQLite lock table {self.path!r} changed a name's row "
                "without reporting its token; is tasklocks_token redefined?"
            )
        return token

    def _outcome_known(self, exc: BaseException) -> bool:
        return True  # nothing is committed before COMMIT returns: roll back whatever happened

    def _rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            conn.execute(self._sql["rollback"])

    def _disconnect(self) -> None:
        with self._mutex():
            self._let_go()

    def _let_go(self) -> None:
        """Close the connection and the gate (under the store's mutex)."""
        if self._conn is not None and self._pid == os.getpid():
            with suppress(sqlite3.Error):
                self._conn.close()
        if self._gate_fd is not None and self._gate_pid == os.getpid():
            os.close(self._gate_fd)
        self._conn = None
        self._gate_fd = None
