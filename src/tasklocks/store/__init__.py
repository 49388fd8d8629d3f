"""Database adapters: the only place SQL and drivers live.

A store keeps one row per namespace: ``(namespace, version, data)``. It knows nothing of locks:
it reads a row, and changes it atomically with :meth:`Store.transact`, which hands the current
``Snapshot`` to a pure ``compute`` function and writes what it returns with ``version + 1``, only if
the row still has the version the text was computed from. Nothing stays held between calls.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasklocks.errors import BadURL, StoreUnavailable

__all__ = [
    "DEFAULT_TABLE",
    "SCHEMA_VERSION",
    "TASK_COLUMNS",
    "TASK_FIELDS",
    "Backend",
    "Compute",
    "OutcomeUnknown",
    "ParsedURL",
    "Snapshot",
    "Store",
    "TaskRow",
    "TaskStore",
    "TaskValue",
    "check_table_name",
    "default_url",
    "open_store",
    "parse_url",
    "task_filter",
]

DEFAULT_TABLE = "tasklocks"
SCHEMA_VERSION = 1
EMPTY_DOCUMENT = '{"format":1,"locks":{}}'
# One-statement changes (fast_acquire/fast_release) make the server parse the whole document;
# past this size the client's path, which re-encodes only what changed, is cheaper.
FAST_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A namespace's row as read: its version and its document text."""

    version: int
    data: str


# compute(snapshot) -> None (change nothing) or (new text, wake waiters?)
Compute = Callable[[Snapshot], "tuple[str, bool] | None"]


class OutcomeUnknown(StoreUnavailable):
    """The connection failed after a write was sent: it may or may not have been applied.

    The caller re-reads and looks for what it may already have written before retrying.
    """


class Store(Protocol):
    """What a database adapter offers (see the module docstring)."""

    url: str  # for messages, without a password

    def read(self, namespace: str) -> Snapshot:
        """The current row (created empty, version 0, on first use)."""
        ...

    def transact(self, namespace: str, compute: Compute, hint: Snapshot | None) -> Snapshot:
        """Apply ``compute`` atomically; return the row as it is after the call.

        ``hint`` is the caller's last known snapshot: an adapter may compute on it and write
        with ``WHERE version = hint.version`` without reading first; if the row moved on, it
        computes again on the current row. ``compute`` may be called more than once and may raise
        (nothing is written then). Raises :class:`OutcomeUnknown` if the reply to a write was lost.
        """
        ...

    def reset(self, namespace: str, data: str) -> Snapshot:
        """Overwrite a namespace's document unconditionally (``repair``); bumps the version."""
        ...

    def wait_for_change(
        self, namespace: str, version: int, timeout: float, wake_fd: int | None = None
    ) -> bool:
        """Return soon after the row's version differs from ``version``, or after ``timeout``,
        or as soon as ``wake_fd`` (a local wake-up channel; not read here) becomes readable.
        With a ``wake_fd`` an adapter may watch the database itself less often. True: something
        happened (a change, a notification, a wake-up); False: the timeout passed."""
        ...

    def namespaces(self) -> list[str]:
        """Every namespace that has a row."""
        ...

    def close(self) -> None:
        """Release connections (idempotent)."""
        ...


_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")


def check_table_name(table: str) -> str:
    """Table names are spliced into SQL, so only plain identifiers are allowed."""
    if _TABLE.fullmatch(table) is None:
        raise BadURL(f"bad table name {table!r}: use letters, digits and _ (not first a digit)")
    return table


# --- task records -------------------------------------------------------------------------------
# The tasks table (``<table>_tasks``) holds one row per task. Every column but ``id`` and
# ``version`` is listed here once, with its kind; each adapter maps kinds to its SQL types.
# ``json`` columns hold JSON text (the tasks layer encodes and decodes them).
TASK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("kind", "text"),
    ("target", "json"),
    ("args", "json"),
    ("locks", "json"),
    ("namespace", "text"),
    ("state", "state"),
    ("percent", "float"),
    ("message", "text"),
    ("result", "json"),
    ("error_code", "text"),
    ("error_message", "text"),
    ("exit_code", "int"),
    ("signal", "int"),
    ("pid", "int"),
    ("pgid", "int"),
    ("host", "text"),
    ("start_token", "text"),
    ("boot", "text"),
    ("pidns", "text"),
    ("created", "float"),
    ("started", "float"),
    ("finished", "float"),
    ("log_path", "text"),
    ("timeout", "float"),
    ("stop_requested", "float"),
    ("waited_for", "json"),
)
TASK_FIELDS: tuple[str, ...] = tuple(name for name, _kind in TASK_COLUMNS)
TaskValue = str | int | float | None
TaskRow = dict[str, TaskValue]  # every TASK_FIELDS column plus "id" and "version"


class TaskStore(Protocol):
    """Rows of the tasks table; every update is a compare-and-swap on the row's version."""

    def create_task(self, fields: Mapping[str, TaskValue]) -> int:
        """Insert a task (version 0) and return its id: increasing, never reused."""
        ...

    def get_task(self, task_id: int) -> TaskRow | None:
        """One task's row, or None."""
        ...

    def update_task(self, task_id: int, version: int, fields: Mapping[str, TaskValue]) -> bool:
        """Set ``fields`` and bump the version, only if the row still has ``version``."""
        ...

    def list_tasks(
        self,
        states: Sequence[str] | None = None,
        limit: int | None = None,
        namespace: str | None = None,
    ) -> list[TaskRow]:
        """Tasks (in ``states``, of ``namespace``, when given), newest first, at most ``limit``."""
        ...


def task_filter(
    states: Sequence[str] | None,
    namespace: str | None,
    limit: int | None,
    *,
    mark: str,
    namespace_column: str = "namespace",
) -> tuple[str, str, list[str]]:
    """The WHERE and LIMIT clauses of ``list_tasks`` and their parameters, for a driver whose
    placeholder is ``mark``."""
    conditions: list[str] = []
    params: list[str] = []
    if states is not None:
        conditions.append(f"state IN ({', '.join([mark] * len(states))})" if states else "1 = 0")
        params.extend(states)
    if namespace is not None:
        conditions.append(f"{namespace_column} = {mark}")
        params.append(namespace)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    tail = "" if limit is None else f" LIMIT {int(limit)}"
    return where, tail, params


class Backend(Store, TaskStore, Protocol):
    """A database adapter: lock documents and task records."""


def default_url() -> str:
    """``$TASKLOCKS_DB``, else an SQLite file in the user's state directory."""
    env = os.environ.get("TASKLOCKS_DB")
    if env:
        return env
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return "sqlite:///" + str(Path(state) / "tasklocks" / "tasklocks.db")


@dataclass(frozen=True, slots=True)
class ParsedURL:
    scheme: str  # sqlite, mysql, postgresql
    path: str  # the SQLite file (sqlite only)
    host: str
    port: int | None
    user: str | None
    password: str | None
    database: str
    query: dict[str, str]

    def display(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:///{self.path}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{self.host}{port}/{self.database}"


_SCHEMES = {
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mysql",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}


def parse_url(url: str) -> ParsedURL:
    """Split a database URL; raise :class:`BadURL` (a usage error) if it is malformed."""
    if "://" not in url:
        raise BadURL(
            f"bad database URL {url!r}: use sqlite:///path.db, mysql://user:pass@host:port/db "
            "or postgresql://user@host:port/db"
        )
    scheme_raw = url.split("://", 1)[0].lower()
    scheme = _SCHEMES.get(scheme_raw)
    if scheme is None:
        raise BadURL(
            f"unsupported database URL scheme {scheme_raw!r}: use sqlite://, mysql://, "
            "mariadb:// or postgresql://"
        )
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    if scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////abs/path.db, as in SQLAlchemy.
        path = url.split("://", 1)[1].split("?", 1)[0]
        if not path.startswith("/") or len(path) < 2:
            raise BadURL(f"bad SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////abs.db")
        return ParsedURL("sqlite", path[1:], "", None, None, None, "", query)
    try:
        port = parts.port
    except ValueError as exc:
        raise BadURL(f"bad port in database URL {url!r}: use host:port with a number") from exc
    database = parts.path.lstrip("/")
    if not parts.hostname or not database:
        raise BadURL(
            f"bad database URL {url!r}: it needs a host and a database, {scheme}://host/db"
        )
    return ParsedURL(
        scheme,
        "",
        parts.hostname,
        port,
        urllib.parse.unquote(parts.username) if parts.username else None,
        urllib.parse.unquote(parts.password) if parts.password else None,
        database,
        query,
    )


def open_store(url: str | None = None, *, table: str = DEFAULT_TABLE) -> Backend:
    """Open the store a URL names (default: :func:`default_url`)."""
    parsed = parse_url(url or default_url())
    if parsed.scheme == "sqlite":
        from tasklocks.store.sqlite import SQLiteStore

        return SQLiteStore(parsed, table=table)
    if parsed.scheme == "mysql":
        from tasklocks.store.mysql import MySQLStore

        store: Backend = MySQLStore(parsed, table=table)
        return store
    from tasklocks.store.postgres import PostgresStore

    store = PostgresStore(parsed, table=table)
    return store
