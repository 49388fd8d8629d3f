"""The layout's ceiling (issue 10): what the simplest correct code reaches on one document row
against the same code on a namespace sharded over ``SHARDS`` rows, before tasklocks adds anything.

Both use the hand-written read+CAS pair of :mod:`bench_pairs` (SELECT version, data; UPDATE ...
WHERE version = ?; twice per pair, each a durable commit). Only the row differs: one row for every
name, or the row of ``crc32(name) % SHARDS``. Two figures come out of it:

- contention: 32 processes on distinct names, pairs/s and latency, next to the advisory locks;
- size: one process, one more pair on a namespace holding ``HELD`` entries, whole (one row of
  ``HELD`` entries) or sharded (a row of about ``HELD / SHARDS``), next to a row of 10.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from typing import Any

from bench_common import Config, mysql_connect, pg_conninfo
from bench_pairs import _entry

SHARDS = 64
HELD = 10_000
KIND = {"sqlite": "cas-sqlite", "mysql": "cas-mysql", "postgresql": "cas-pg"}
BARE = {"sqlite": "upd-sqlite", "mysql": "upd-mysql", "postgresql": "upd-pg"}
PEER = {"mysql": "getlock-mysql", "postgresql": "adv-pg"}
ROWS = {"mysql": "row-mysql", "postgresql": "row-pg"}  # a row per lock name
STATEMENTS = {"mysql": "stmt-mysql", "postgresql": "stmt-pg"}  # tasklocks' own, nothing else


def shard_of(name: str) -> int:
    return zlib.crc32(name.encode()) % SHARDS


def one_row(cfg: Config) -> str:
    return cfg.namespace("layout-one")


def shard_row(cfg: Config, shard: int) -> str:
    return cfg.namespace(f"layout-s{shard}")


def size_rows(cfg: Config) -> dict[str, str]:
    """The rows of the size figure: 10 held, ``HELD`` held in one row, one shard of them."""
    return {k: cfg.namespace(f"layout-size-{k}") for k in ("small", "whole", "shard")}


def namespaces(cfg: Config) -> list[str]:
    """Every baseline row this section uses (created with the other baseline rows)."""
    return [
        one_row(cfg),
        *(shard_row(cfg, s) for s in range(SHARDS)),
        *size_rows(cfg).values(),
    ]


def _document(names: list[str]) -> str:
    return json.dumps(
        {"format": 1, "locks": {n: _entry(i) for i, n in enumerate(names)}}, separators=(",", ":")
    )


def fill_size_rows(cfg: Config, backend: str) -> dict[str, int]:
    """Write the size figure's documents; their sizes in bytes."""
    held = [f"held-{i}" for i in range(HELD)]
    docs = {
        "small": _document(held[:10]),
        "whole": _document(held),
        "shard": _document([n for n in held if shard_of(n) == 0]),
    }
    rows = size_rows(cfg)
    table = cfg.cas_table
    params = [(docs[k], rows[k]) for k in docs]
    if backend == "sqlite":
        conn = sqlite3.connect(cfg.sqlite_baseline_path, isolation_level=None)
        conn.executemany(f"UPDATE {table} SET data = ? WHERE namespace = ?", params)
        conn.close()
    elif backend == "mysql":
        mconn: Any = mysql_connect(cfg.mysql_url)
        with mconn.cursor() as cur:
            cur.executemany(f"UPDATE {table} SET data = %s WHERE namespace = %s", params)
        mconn.close()
    else:
        import psycopg

        with (
            psycopg.connect(pg_conninfo(cfg.pg_url), autocommit=True) as pconn,
            pconn.cursor() as cur,
        ):
            cur.executemany(f"UPDATE {table} SET data = %s WHERE namespace = %s", params)
    return {k: len(v.encode()) for k, v in docs.items()}
