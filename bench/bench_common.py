"""Shared configuration, statistics and backend probing for the benchmark harness.

Everything here is importable from spawned worker processes: the configuration is a plain
picklable dataclass, and nothing opens a connection at import time.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import pymysql

MYSQL_URL: Final = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
PG_URL: Final = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST: Final = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT: Final = int(os.environ.get("BENCH_REDIS_PORT", "6379"))

BACKENDS: Final = ("sqlite", "mysql", "postgresql")


@dataclass(frozen=True)
class Config:
    """What every worker needs to know about this run (picklable)."""

    run_id: str  # unique per run: namespaces, baseline tables, advisory keys, GET_LOCK names
    tmpdir: str  # SQLite files and the filelock file live here
    quick: bool
    mysql_url: str = MYSQL_URL
    pg_url: str = PG_URL
    redis_host: str = REDIS_HOST
    redis_port: int = REDIS_PORT
    # backend -> None when tasklocks can run on it, else the reason it cannot
    tasklocks_skip: dict[str, str | None] = field(default_factory=dict)
    # backend -> None when its server (or driver) can run baselines, else the reason
    server_skip: dict[str, str | None] = field(default_factory=dict)

    def url(self, backend: str) -> str:
        """The tasklocks URL of ``backend``."""
        if backend == "sqlite":
            return "sqlite:///" + os.path.join(self.tmpdir, "tasklocks.db")
        if backend == "mysql":
            return self.mysql_url
        return self.pg_url

    def namespace(self, section: str) -> str:
        return f"bench-{self.run_id}-{section}"

    @property
    def cas_table(self) -> str:
        """The hand-written read+CAS baseline's table (MariaDB, PostgreSQL and SQLite)."""
        return f"bench_cas_{self.run_id}"

    @property
    def sqlite_baseline_path(self) -> str:
        return os.path.join(self.tmpdir, "baseline.db")

    @property
    def filelock_path(self) -> str:
        return os.path.join(self.tmpdir, "filelock.lock")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def tasklocks_sql(dialect: str, table: str) -> dict[str, str]:
    """tasklocks' statements of ``dialect`` (``mysql``, ``postgres``) for ``table``, as its
    adapter fills them in."""
    from tasklocks.store import mysql, postgres
    from tasklocks.store._base import statements

    store = mysql.MySQLStore if dialect == "mysql" else postgres.PostgresStore
    return statements(dialect, store.PIECES, t=table)


def mysql_connect(url: str, connect_timeout: float = 10) -> pymysql.Connection[Any]:
    """A PyMySQL connection in autocommit mode for a mysql:// URL."""
    import pymysql

    from tasklocks.store import parse_url

    p = parse_url(url)
    return pymysql.connect(
        host=p.host,
        port=p.port or 3306,
        user=p.user or "root",
        password=p.password or "",
        database=p.database,
        autocommit=True,
        connect_timeout=connect_timeout,
    )


def pg_conninfo(url: str) -> str:
    """A psycopg conninfo string for a postgresql:// URL (psycopg takes URLs as they are)."""
    return url.replace("postgres://", "postgresql://", 1)


def _probe_server(backend: str, cfg: Config) -> str | None:
    try:
        if backend == "sqlite":
            import sqlite3

            sqlite3.connect(":memory:").close()
        elif backend == "mysql":
            mysql_connect(cfg.mysql_url, connect_timeout=3).close()
        else:
            import psycopg

            psycopg.connect(pg_conninfo(cfg.pg_url), connect_timeout=3).close()
    except Exception as exc:  # any failure means: skip this backend's baselines
        return f"server unreachable ({type(exc).__name__}: {str(exc).strip()[:120]})"
    return None


def _probe_tasklocks(backend: str, cfg: Config) -> str | None:
    module = {"sqlite": "sqlite", "mysql": "mysql", "postgresql": "postgres"}[backend]
    try:
        __import__(f"tasklocks.store.{module}")
    except Exception as exc:
        return f"adapter tasklocks.store.{module} does not import ({type(exc).__name__}: {exc})"
    try:
        import tasklocks

        with tasklocks.connect(cfg.url(backend), cfg.namespace("probe")) as table:
            table.acquire("probe").release()
    except Exception as exc:
        return f"tasklocks fails on {backend} ({type(exc).__name__}: {str(exc).strip()[:160]})"
    return None


def probe(cfg: Config) -> None:
    """Fill ``cfg.server_skip`` and ``cfg.tasklocks_skip`` for every backend."""
    for backend in BACKENDS:
        cfg.server_skip[backend] = _probe_server(backend, cfg)
        reason = cfg.server_skip[backend]
        cfg.tasklocks_skip[backend] = reason or _probe_tasklocks(backend, cfg)


def redis_skip(cfg: Config) -> str | None:
    try:
        import redis

        redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=3).ping()
    except Exception as exc:
        return f"redis unreachable ({type(exc).__name__}: {exc})"
    return None


def query_counter(cfg: Config, backend: str) -> float | None:
    """Statements the server has seen (MariaDB) or transactions in db test (PostgreSQL)."""
    try:
        if backend == "mysql":
            conn = mysql_connect(cfg.mysql_url)
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
                row = cur.fetchone()
            conn.close()
            return float(row[1]) if row else None
        if backend == "postgresql":
            import psycopg

            with psycopg.connect(pg_conninfo(cfg.pg_url), autocommit=True) as pconn:
                pconn.execute("SELECT pg_stat_clear_snapshot()")
                prow = pconn.execute(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                    "WHERE datname = current_database()"
                ).fetchone()
            return float(prow[0]) if prow else None
    except Exception:
        return None
    return None
