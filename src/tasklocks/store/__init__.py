"""Database adapters: the only place SQL and drivers live.

A store keeps a namespace's document in one row, ``(namespace, version, data)``, and a row per lock
name beside it (``_names.py``), and knows nothing of locks: it reads the document (with the holders
of the names' rows written into it), and changes it atomically with :meth:`Store.transact`, which
hands the current ``Snapshot`` to a pure ``compute`` function and writes what it returns under the
row locks of that transaction. Nothing stays held between calls. Every adapter builds on
``_base.py`` and ``_rows.py``; ``mysql.py`` and ``postgres.py`` on ``_sql_server.py`` too. Each
names its statements in ``sql/<dialect>.sql``. What a backend offers beyond :class:`Store` is a
protocol of its own (:class:`FastPaths`, :class:`AsyncNotifies`), which callers ask for by type.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tasklocks._url import MYSQL_TLS, PG_TLS, TLS_FILES, ParsedURL, default_url, parse_url
from tasklocks.errors import BadURL
from tasklocks.names import validate_duration
from tasklocks.store._base import (
    EMPTY_DOCUMENT,
    SCHEMA_VERSION,
    Compute,
    OutcomeUnknown,
    Snapshot,
    TaskRow,
    TaskValue,
)
from tasklocks.store._engine import Engine, engine_url, is_async_engine, is_engine
from tasklocks.store._rows import RowsStore

__all__ = [
    "DEFAULT_TABLE",
    "EMPTY_DOCUMENT",
    "SCHEMA_VERSION",
    "AsyncNotifies",
    "Backend",
    "Compute",
    "Engine",
    "FastPaths",
    "OutcomeUnknown",
    "Snapshot",
    "Store",
    "TaskRow",
    "TaskValue",
    "default_url",
    "open_store",
    "parse_url",
    "preload",
]

DEFAULT_TABLE = "tasklocks"


class Store(Protocol):
    """What every database adapter offers (see the module docstring)."""

    url: str  # for messages, without a password
    table: str  # the lock table's name
    local: bool  # every holder runs on this machine (SQLite): see owner.process_liveness

    def read(self, namespace: str) -> Snapshot:
        """The current row (created empty, version 0, on first use)."""

    def transact(
        self,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
        names: Sequence[str] | None = None,
    ) -> Snapshot:
        """Apply ``compute`` atomically; return the row as it is after the call. ``hint`` (the
        caller's last snapshot) may be computed on and written without a read, if the row still
        is that. ``names``: the only names the change concerns beside those the document keeps
        (None: any); a holder of another name held in its own row need not be shown to it.
        ``compute`` may be called more than once and may raise (nothing is written then).
        Raises :class:`OutcomeUnknown` if the reply to a write was lost."""

    def reset(self, namespace: str, data: str) -> Snapshot:
        """Overwrite a namespace's document unconditionally (``repair``); bumps the version."""

    def wait_for_change(
        self,
        namespace: str,
        version: int,
        timeout: float,
        wake_fd: int | None = None,
        *,
        pace: bool = False,
    ) -> bool:
        """Return soon after the row's version differs from ``version`` or ``wake_fd`` (a local
        wake-up channel, not read here) becomes readable (True), or after ``timeout`` (False).
        ``pace``: the caller read ``version`` after the last wait returned and found nothing that
        concerns it (a waiter queued behind it): a backend that polls goes on at the pace it had
        reached instead of starting fast again."""

    def namespaces(self) -> list[str]:
        """Every namespace that has a row."""

    def open_session(
        self, session: str, owner: str, host: str, pid: int | None, ttl: float
    ) -> None:
        """Open a session that expires ``ttl`` seconds from now by the database's clock."""

    def renew_session(self, session: str) -> bool:
        """Push its expiry to ``ttl`` seconds from now; False if it had expired."""

    def close(self) -> None:
        """Release connections (idempotent)."""


@runtime_checkable
class FastPaths(Protocol):
    """One-statement changes of a single name in its own row (``_names.py``). Both write nothing
    and return None when their condition does not hold (several names, a name the document
    keeps, a namespace whose document has not moved to this layout yet), and raise
    :class:`OutcomeUnknown` if the connection failed after the statement was sent."""

    def fast_acquire(
        self, namespace: str, names: Sequence[str], lease: str, record: str
    ) -> int | None:
        """If ``names`` is one name, free in its row, write ``lease`` and its ``record`` (the
        lease's JSON array, see ``tasklocks._doc``) there: the row's new version (the token)."""

    def fast_release(
        self, namespace: str, names: Sequence[str], lease: str, renewed: bool = False
    ) -> int | None:
        """If ``names`` is one name held in its row by ``lease``, free it: the row's version.
        ``renewed``: the lease's session is renewed by this process, which gives the release
        back again should a crash of the server (or, on MariaDB, a lost connection) undo it
        (``lost_releases``); the store may then commit it without waiting for the flush
        (PostgreSQL), or without writing the row (MariaDB marks it: see ``flush_releases``)."""

    def lost_releases(self, check: bool = False) -> list[tuple[str, str]]:
        """``(namespace, lease)`` of ``renewed`` row releases that a crash of the server (or, on
        MariaDB, a lost connection) may have undone since they were reported done, each said
        once: their holder must give them back again. The store looks for a crash at each
        session renewal and reconnection; ``check``: look now. SQLite never loses one."""

    def has_lost(self) -> bool:
        """Whether ``lost_releases`` has releases to say (known now, without asking the
        server): the table's next acquisition gives them back first."""

    def flush_releases(self) -> None:
        """Write the rows of this process's releases that were not written (MariaDB's marked
        releases), as its session's renewals do; those a lost connection undid are said by
        ``lost_releases`` instead. Nothing elsewhere."""


@runtime_checkable
class AsyncNotifies(Protocol):
    """A backend whose notifications an asyncio loop can hear (PostgreSQL's LISTEN, on a
    connection of its own): ``tasklocks.aio``'s waiters wait on them instead of polling fast."""

    def listens(self) -> bool:
        """Whether there are notifications to hear (none behind a transaction pool)."""

    async def listen_async(
        self, heard: Callable[[str | None], None], ready: Callable[[bool], None]
    ) -> None:
        """Listen until cancelled: ``heard(namespace)`` for each change that asked to wake
        waiters, ``heard(None)`` after a reconnection (what happened meanwhile went unheard);
        ``ready(True)`` when listening, ``ready(False)`` when the connection is lost."""


Backend = RowsStore  # a database adapter: lock documents (a Store), task records, FastPaths


# What a URL's query may say: a parameter tasklocks does not use is refused, not ignored (an
# ignored sslmode=verify-full would connect without checking the server's certificate). The TLS
# ones go to the driver as they are (_url.py: libpq's names, PyMySQL's ssl_* arguments).
_QUERY = {
    "sqlite": (),
    "mysql": ("connect_timeout", "charset", *MYSQL_TLS),
    "postgresql": ("connect_timeout", "pool", *PG_TLS),
}

# libpq's (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-SSLMODE).
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_query(parsed: ParsedURL) -> None:
    """:raises BadURL: the URL's query has a parameter tasklocks does not use, a
    ``connect_timeout`` that is not a number of seconds, an ``sslmode`` libpq does not have, or a
    TLS file that is not there."""
    known = _QUERY[parsed.scheme]
    for key in parsed.query:
        if key not in known:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise BadURL(
                f"the {parsed.scheme} URL has {key}=, which tasklocks does not use ({takes}); "
                "remove it (from Python, a SQLAlchemy Engine made with it may be passed to "
                "tasklocks.connect() instead)"
            )
    charset = parsed.query.get("charset")
    if charset is not None and charset.lower() != "utf8mb4":
        raise BadURL(f"charset={charset} in the URL: tasklocks speaks utf8mb4; remove it")
    timeout = parsed.query.get("connect_timeout")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds <= 3600:
            raise BadURL(
                f"connect_timeout={timeout} in the URL: use a number of seconds, more than 0 "
                "and at most 3600"
            )
    sslmode = parsed.query.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:  # (libpq's own error was retried)
        raise BadURL(f"sslmode={sslmode} in the URL: use one of {', '.join(_SSLMODES)}")
    for key in ("ssl_verify_cert", "ssl_verify_identity"):
        if parsed.query.get(key, "true").lower() not in ("true", "false", "1", "0"):
            raise BadURL(f"{key}={parsed.query[key]} in the URL: use true or false")
    for key in TLS_FILES:  # (the drivers' own errors do not name the file)
        path = parsed.query.get(key)
        if path is None or os.path.isfile(path) or (key, path) == ("sslrootcert", "system"):
            continue
        if key != "sslkey" or ":" not in path:  # (libpq's sslkey=ENGINE:KEY names no file)
            raise BadURL(f"{key}={path} in the URL: no such file; fix the path")


def open_store(
    url: str | Engine | None = None,
    *,
    table: str = DEFAULT_TABLE,
    reconnect_timeout: float = 5.0,
) -> Backend:
    """Open the store a URL names (default: :func:`default_url`), or the database of a
    SQLAlchemy ``Engine``, whose pool then lends the connections (see ``_engine.py``). A server
    that does not answer is tried again for ``reconnect_timeout`` seconds in every call before
    StoreUnavailable.

    :raises BadURL: the URL is malformed, or the engine's driver is not one tasklocks speaks.
    :raises StoreUnavailable: the database cannot be reached or its driver is missing.
    """
    # (A NaN one never ended.)
    reconnect_timeout = validate_duration("reconnect_timeout", reconnect_timeout)
    engine = None
    if url is not None and not isinstance(url, str):
        if is_async_engine(url):
            raise BadURL(
                "an AsyncEngine is for tasklocks.aio.connect(); tasklocks.connect() takes a "
                "SQLAlchemy Engine"
            )
        if not is_engine(url):
            raise BadURL(
                f"a database URL or a SQLAlchemy Engine was expected, not {type(url).__name__}"
            )
        engine, parsed = url, engine_url(url)
    else:
        parsed = parse_url(default_url() if url is None else url)
        pool = parsed.query.get("pool")
        if pool is not None and parsed.scheme != "postgresql":
            raise BadURL(
                f"pool= is for PostgreSQL URLs (behind PgBouncer); remove it from the "
                f"{parsed.scheme} URL"
            )
        if pool not in (None, "session", "transaction"):
            raise BadURL(
                f"unknown pool={pool!r} in the PostgreSQL URL; use pool=transaction behind a "
                "transaction-pooling proxy such as PgBouncer, or leave it out"
            )
        _check_query(parsed)
    store: Backend
    lender: dict[str, Any] = (
        {} if engine is None or parsed.scheme == "sqlite" else {"engine": engine}
    )
    if parsed.scheme == "sqlite":
        from tasklocks.store.sqlite import SQLiteStore

        store = SQLiteStore(parsed, table=table)  # a file: nothing to reconnect to
    elif parsed.scheme == "mysql":
        from tasklocks.store.mysql import MySQLStore

        store = MySQLStore(parsed, table=table, reconnect_timeout=reconnect_timeout, **lender)
    else:
        from tasklocks.store.postgres import PostgresStore

        store = PostgresStore(parsed, table=table, reconnect_timeout=reconnect_timeout, **lender)
    return store


def preload() -> None:
    """Import every adapter, its driver where installed, and its named statements, now: for a
    process that forks others (the task zygote), so that a fork opens a store without importing
    or reading a file (without bytecode caches, the PostgreSQL adapter alone compiles in 6 ms)."""
    import contextlib

    from tasklocks.store import _base, mysql, postgres, sqlite

    for adapter in (sqlite.SQLiteStore, mysql.MySQLStore, postgres.PostgresStore):
        _base.load(adapter.DIALECT)
    with contextlib.suppress(ImportError):
        import psycopg  # noqa: F401
    mysql.preload()  # (imports PyMySQL too)
