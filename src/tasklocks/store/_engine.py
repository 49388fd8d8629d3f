"""A SQLAlchemy ``Engine`` as the source of connections (``tasklocks.connect(engine)``).

The application's engine (SQLAlchemy 2, imported by the application, never here) lends tasklocks
a connection of its pool for each call and gets it back at the end of the call, as the driver
connection it made: psycopg 3 (``postgresql+psycopg://``) or PyMySQL (``mysql+pymysql://``,
``mariadb+pymysql://``). Every call is pool-safe (no state is kept on a connection between calls),
so the pool may hand the connection to anyone afterwards. While it is lent, tasklocks turns the
connection's autocommit on (its statements are one-statement changes or explicit transactions)
and gives it back as it found it. tasklocks' own connections, the sessions' (renewals never wait
for the pool) and PostgreSQL's LISTEN (a pool's connection cannot listen between calls), are made
by the engine as it makes its pool's (URL, ``connect_args``, ``creator``) and detached from the
pool (``ServerStore._made_by_engine``); the sessions' connection must see the tables the pool's
connections see, or the engine is refused (``ServerStore._check_side``). An SQLite engine names a
file: tasklocks opens it itself (its lock gate is per file), so nothing is shared there but the
file.
"""

from __future__ import annotations

from typing import Any, Protocol

from tasklocks._url import ParsedURL
from tasklocks.errors import BadURL

__all__ = ["Engine", "engine_url", "is_async_engine", "is_engine"]

DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql", "sqlite": "pysqlite"}
SCHEMES = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql", "sqlite": "sqlite"}


class Engine(Protocol):
    """What tasklocks uses of a SQLAlchemy ``Engine``."""

    @property
    def url(self) -> Any: ...

    @property
    def dialect(self) -> Any: ...

    def raw_connection(self) -> Any: ...


def is_engine(value: object) -> bool:
    """Is ``value`` a SQLAlchemy ``Engine`` (an ``AsyncEngine`` is not)?"""
    attrs = ("raw_connection", "dialect", "url")
    return all(hasattr(value, a) for a in attrs) and not hasattr(value, "sync_engine")


def is_async_engine(value: object) -> bool:
    """Is ``value`` a SQLAlchemy ``AsyncEngine``? (Here, not in ``_loop_engine.py``: the
    check must not import asyncio into every process that opens a store.) Not an
    ``AsyncConnection``, which has a ``sync_engine`` too."""
    return (
        hasattr(value, "sync_engine")
        and hasattr(value, "dialect")
        and not hasattr(value, "sync_connection")
    )


def engine_url(engine: Engine) -> ParsedURL:
    """The engine's database, as tasklocks parses URLs. :raises BadURL: a dialect or driver
    tasklocks does not speak."""
    dialect, driver = engine.dialect.name, engine.dialect.driver
    if dialect not in DRIVERS:
        raise BadURL(
            f"tasklocks cannot use a {dialect} engine; use PostgreSQL, MariaDB/MySQL or SQLite"
        )
    if driver != DRIVERS[dialect]:
        want = f"{dialect}+{DRIVERS[dialect]}://"
        raise BadURL(
            f"tasklocks needs the {DRIVERS[dialect]} driver for {dialect}, and this engine uses "
            f"{driver}; create the engine with a {want} URL"
        )
    u = engine.url
    scheme = SCHEMES[dialect]
    if scheme == "sqlite":
        if not u.database or u.database == ":memory:":
            raise BadURL("an SQLite engine for tasklocks must name a file, not :memory:")
        return ParsedURL("sqlite", u.database, "", None, None, None, "", {})
    query = {k: v if isinstance(v, str) else v[-1] for k, v in dict(u.query).items()}
    # No host: psycopg's is libpq's default host (PostgreSQL's "", as _url.py reads
    # postgresql:///db, and as an AsyncEngine's own connections must be opened); PyMySQL's is
    # localhost over TCP.
    host = u.host or ("" if scheme == "postgresql" else "127.0.0.1")
    return ParsedURL(scheme, "", host, u.port, u.username, u.password, u.database or "", query)
