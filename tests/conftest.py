"""Shared fixtures: one database URL per backend, and unique namespaces.

Server backends come from ``$TASKLOCKS_TEST_MYSQL`` and ``$TASKLOCKS_TEST_POSTGRES`` (defaults: the
local servers). An unreachable server skips its tests, or fails them when ``CI=true``.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasklocks.store import DEFAULT_TABLE, parse_url

# A zygote that the tests start (tasklocks.tasks._zygote) goes away soon after the last test.
os.environ.setdefault("TASKLOCKS_ZYGOTE_IDLE", "30")

# The tests start hundreds of Python processes (the command line, supervisors, workers) that
# import tasklocks and tests.tasks. An editable install has no bytecode files, and where
# PYTHONDONTWRITEBYTECODE is set (as on our machines) no process writes them: each would
# compile every module from source again, about 0.1 s a process. Compile them once here (only
# files that changed; the processes only read them).
_ROOT = Path(__file__).resolve().parents[1]
for _tree in (_ROOT / "src" / "tasklocks", _ROOT / "tests"):
    compileall.compile_dir(_tree, quiet=1)

BACKENDS = ("sqlite", "mysql", "postgresql")
SERVER_BACKENDS = ("mysql", "postgresql")
_DEFAULTS = {
    "mysql": ("TASKLOCKS_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test"),
    "postgresql": ("TASKLOCKS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
}
_unreachable: dict[str, str | None] = {}  # backend -> why it cannot be used (None: it can)


def server_url(backend: str) -> str:
    """The configured URL of a server backend (``mysql`` or ``postgresql``)."""
    env, default = _DEFAULTS[backend]
    return os.environ.get(env) or default


def pg_url_without_host(url: str) -> str:
    """PostgreSQL's ``url`` without its host (``postgresql://user@:port/db``: libpq's default
    host, its Unix socket once $PGHOST is unset); the test is skipped unless ``url`` names this
    machine and the server's socket is in /var/run/postgresql."""
    p = parse_url(url)
    if p.host not in ("127.0.0.1", "localhost", "::1", "") or not os.path.exists(
        f"/var/run/postgresql/.s.PGSQL.{p.port or 5432}"
    ):
        pytest.skip(f"no Unix socket of the server at {p.display()} in /var/run/postgresql")
    return f"postgresql://{p.user or ''}@{f':{p.port}' if p.port else ''}/{p.database}"


def _probe(backend: str) -> str | None:
    """Connect once with a 3 s timeout; return why the server cannot be used, or None."""
    url = server_url(backend)
    p = parse_url(url)
    try:
        if backend == "mysql":
            import pymysql

            pymysql.connect(
                host=p.host,
                port=p.port or 3306,
                user=p.user or "root",
                password=p.password or "",
                database=p.database,
                connect_timeout=3,
            ).close()
        else:
            import psycopg

            psycopg.connect(
                host=p.host,
                port=p.port or 5432,
                user=p.user,
                password=p.password,
                dbname=p.database,
                connect_timeout=3,
            ).close()
    except Exception as exc:
        return f"{backend} at {p.display()} is unusable: {' '.join(str(exc).split())}"
    return None


def unreachable(backend: str) -> str | None:
    """Why a backend cannot be tested (probed once per session), or None if it can."""
    if backend == "sqlite":
        return None
    if backend not in _unreachable:
        _unreachable[backend] = _probe(backend)
    return _unreachable[backend]


def require(backend: str) -> None:
    """Skip the current test if ``backend`` is unusable (fail instead when ``CI=true``)."""
    why = unreachable(backend)
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def backend_url(backend: str, sqlite_dir: Path) -> str:
    """The URL a test uses for ``backend``; an SQLite file goes in ``sqlite_dir``."""
    if backend == "sqlite":
        return f"sqlite:///{sqlite_dir}/locks.db"  # four slashes: an absolute path
    return server_url(backend)


def backend_urls(sqlite_dir: Path) -> dict[str, str]:
    """URLs of every usable backend, by name (for tests that start subprocesses).

    Unusable servers are left out, or fail the test when ``CI=true``.
    """
    urls = {}
    for backend in BACKENDS:
        why = unreachable(backend)
        if why is None:
            urls[backend] = backend_url(backend, sqlite_dir)
        elif os.environ.get("CI") == "true":
            pytest.fail(why)
    return urls


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL, once per backend."""
    backend: str = request.param
    require(backend)
    return backend_url(backend, tmp_path)


def raw_sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> int:
    """Run one statement straight through the driver (``%s`` placeholders), autocommit, behind
    tasklocks' back; return the number of rows it changed."""
    return int(_raw(url, statement, params, lambda cur: cur.rowcount))


def raw_rows(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """``raw_sql`` for a query: its rows (bytes, as MySQL returns a VARBINARY, made text)."""

    def fetch(cur: Any) -> list[tuple[Any, ...]]:
        return [
            tuple(v.decode() if isinstance(v, bytes) else v for v in row) for row in cur.fetchall()
        ]

    rows: list[tuple[Any, ...]] = _raw(url, statement, params, fetch)
    return rows


@contextlib.contextmanager
def mysql_session(url: str) -> Iterator[Any]:
    """A MySQL server session of the test's own (autocommit), closed afterwards."""
    import pymysql

    from tasklocks.store.mysql import _connection_class

    p = parse_url(url)
    # tasklocks' subclass of PyMySQL's connection, for its one TLS context a process: PyMySQL's
    # own builds one for every connection, loading the system's CA certificates (about 17 ms of
    # CPU, most of a connect, paid by every raw_sql and three times by each MySQL test's
    # cleanup). The statements go through PyMySQL's cursor as before.
    conn = _connection_class(pymysql)(
        host=p.host,
        port=p.port or 3306,
        user=p.user or "root",
        password=p.password or "",
        database=p.database,
        autocommit=True,
    )
    try:
        yield conn
    finally:
        conn.close()


def _raw(url: str, statement: str, params: tuple[Any, ...], read: Callable[[Any], Any]) -> Any:
    p = parse_url(url)
    if p.scheme == "sqlite":
        conn = sqlite3.connect(p.path)
        try:
            with conn:
                return read(conn.execute(statement.replace("%s", "?"), params))
        finally:
            conn.close()
    if p.scheme == "mysql":
        with mysql_session(url) as mconn, mconn.cursor() as cur:
            cur.execute(statement, params)
            return read(cur)
    import psycopg

    with psycopg.connect(
        host=p.host,
        port=p.port or 5432,
        user=p.user or "postgres",
        password=p.password,
        dbname=p.database,
        autocommit=True,
    ) as pconn:
        return read(pconn.execute(statement.encode(), params))


def delete_rows(url: str, prefix: str, table: str = DEFAULT_TABLE) -> None:
    """Delete a server table's rows whose namespace starts with ``prefix`` (test cleanup), and
    the name rows and task records of those namespaces, where those tables exist."""
    if parse_url(url).scheme == "sqlite":
        return
    raw_sql(url, f"DELETE FROM {table} WHERE namespace LIKE %s", (prefix + "%",))
    for more in ("_names", "_tasks"):
        with contextlib.suppress(Exception):  # no such table: nothing to delete
            raw_sql(url, f"DELETE FROM {table}{more} WHERE namespace LIKE %s", (prefix + "%",))


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace no other test uses, so tests on shared servers never collide.

    With ``db_url``, rows of the default table named after it are deleted afterwards.
    """
    name = "t-" + uuid.uuid4().hex[:12]
    url: str | None = None
    if "db_url" in request.fixturenames:
        url = request.getfixturevalue("db_url")
    yield name
    if url is not None and not url.startswith("sqlite"):
        with contextlib.suppress(Exception):  # e.g. no table was ever created: nothing to clean
            delete_rows(url, name)
