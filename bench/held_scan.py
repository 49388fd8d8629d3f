"""The servers: what a whole-namespace call costs without a key over the held names.

Usage: ``python bench/held_scan.py [--names N ...] [--url URL ...]`` (default: both servers)

Since stop 25 the names table has no index beside its key on PostgreSQL (design.md, "PostgreSQL:
no index over the held names"), and since stop 28 none on MariaDB (design.md, "MariaDB: no key
over the held names"), so the names held in their rows are found through the key's range, every
row the namespace ever had. For each N this fills a fresh table's namespace with N names ever
used, 10 of them still held in their rows, then times (median of 200, or 100 for the pair)
``held()``, ``release_owner()`` of an owner holding nothing and a two-name acquire+release, with
the index an earlier release made (PostgreSQL's ``<table>_names_held``, MariaDB's ``held``, made
here by hand), then without it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Callable

from bench_common import MYSQL_URL, PG_URL

from tasklocks import LockTable
from tasklocks.store import open_store

HELD = 10  # names still held among the N


def _median_ms(call: Callable[[], object], times: int) -> float:
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        spent.append(time.perf_counter() - began)
    return statistics.median(spent) * 1e3


def _sql(url: str, statement: str) -> None:
    """One statement straight through the driver, autocommit."""
    if url.startswith("mysql"):
        import pymysql

        parts = urllib.parse.urlsplit(url)
        conn = pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=parts.username or "root",
            password=urllib.parse.unquote(parts.password or ""),
            database=parts.path.lstrip("/"),
            autocommit=True,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(url.replace("postgresql://", "postgres://"), autocommit=True) as pg:
        pg.execute(statement)


def run(url: str, names: int) -> None:
    table = "scan_" + uuid.uuid4().hex[:8]
    mysql = url.startswith("mysql")
    store = open_store(url, table=table)
    locks = LockTable(store, "scan")
    try:
        if mysql:
            _sql(url, f"ALTER TABLE {table}_names ADD KEY held (namespace, lease)")
        else:
            _sql(
                url,
                f"CREATE INDEX {table}_names_held ON {table}_names (namespace) "
                "WHERE lease IS NOT NULL",
            )
        for i in range(names):
            locks.acquire(f"n{i}", owner="filler")
            if i >= HELD:
                locks.release(f"n{i}", owner="filler")
        _sql(url, f"ANALYZE TABLE {table}_names" if mysql else f"VACUUM ANALYZE {table}_names")
        server = "MariaDB" if mysql else "PostgreSQL"
        for label in ("with the index", "without it"):
            if label == "without it":
                if mysql:
                    _sql(url, f"ALTER TABLE {table}_names DROP KEY held")
                else:
                    _sql(url, f"DROP INDEX {table}_names_held")
            held = _median_ms(locks.held, 200)
            owner = _median_ms(lambda: locks.release_owner("nobody"), 200)

            def pair() -> None:
                locks.acquire("x1", "x2", owner="pair")
                locks.release("x1", "x2", owner="pair")

            two = _median_ms(pair, 100)
            print(
                f"{server}, {names:>7,} names, {label:>14}: held() {held:.2f} ms, "
                f"release_owner {owner:.2f} ms, two-name pair {two:.2f} ms",
                flush=True,
            )
    finally:
        locks.close()
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            _sql(url, f"DROP TABLE IF EXISTS {table}{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--url", action="append", help="a server's URL (default: both servers)")
    args = parser.parse_args()
    for url in args.url or [MYSQL_URL, PG_URL]:
        for n in args.names:
            run(url, n)


if __name__ == "__main__":
    main()
