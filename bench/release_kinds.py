"""MariaDB: what a release that writes nothing durable could gain, kind by kind (issue 10).

Usage: ``python bench/release_kinds.py [--procs N] [--seconds S] [--rounds R] [--kinds K,...]``

N processes (32) each take and release a name of their own in a scratch copy of the names table
(``tl_release_kinds_*``, dropped at the end), for S seconds a kind, R rounds, the kinds
alternating within a round. Each sends tasklocks' own take of a free row (``name_retake``, with
the condition a kind needs) and a release of the kind, both prepared, through tasklocks' own
connection class (``Connection.ok_execute``, the road tasklocks takes). It prints the pairs a
second and, a pair, the clients' and the server's CPU (``cpu_split.server_cpu``). The kinds:

- ``durable``: the release tasklocks sends, an ``UPDATE`` that clears the lease (a commit that
  waits for InnoDB's log flush);
- ``memory``, ``memory16``, ``aria``: the release is a ``REPLACE`` of the name's released lease
  into a ``MEMORY`` table (in 16 hash partitions for ``memory16``) or a non-transactional Aria
  table, outside InnoDB's log, and the take accepts a lease found there;
- ``marker``: the release takes a user-level lock named after its lease (``DO GET_LOCK``), and
  the take accepts a lease whose marker is held (``IS_USED_LOCK``), letting go of its own
  earlier marker of the name;
- ``marker-checked``: as ``marker``, the marker taken by an ``UPDATE`` of the row that changes
  nothing, so that its OK packet says whether the lease held the row (what a release needs: a
  row the document took over is released through the document);
- ``ceiling``: the release is ``DO 1``, a round trip that writes nothing (the take then ignores
  the lease): what no release can beat.

design.md, "MariaDB: a release marked by a user lock, measured", reads the results. The figures
move with the machine: compare within a round.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import uuid
from multiprocessing.synchronize import Barrier
from typing import Any

import pymysql
from bench_common import MYSQL_URL, mysql_connect
from cpu_split import server_cpu

from tasklocks.store import parse_url
from tasklocks.store.mysql import _connection_class, _Positional

FREE = "lease IS NULL"
TAKE = (
    "UPDATE {t} SET version = LAST_INSERT_ID(version + 1{extra}), lease = %(lease)s, "
    "record = %(record)s WHERE namespace = %(ns)s AND name = %(name)s AND ({free}) AND mark = 0"
)
IN_TABLE = "lease = (SELECT lease FROM {f} WHERE namespace = %(ns)s AND name = %(name)s)"
INTO_TABLE = "REPLACE INTO {f} (namespace, name, lease) VALUES (%(ns)s, %(name)s, %(lease)s)"
MARKED = "IS_USED_LOCK(CONCAT('tlr:', lease)) IS NOT NULL"
UNMARK = " + 0 * COALESCE(RELEASE_LOCK(CONCAT('tlr:', lease)), 0)"  # (its own earlier marker)
# (name: take's extra SET, take's condition, release, the release's table suffix or "")
KINDS: dict[str, tuple[str, str, str, str]] = {
    "durable": (
        "",
        FREE,
        "UPDATE {t} SET lease = NULL, record = NULL, version = LAST_INSERT_ID(version) "
        "WHERE namespace = %(ns)s AND name = %(name)s AND lease = %(lease)s AND mark = 0",
        "",
    ),
    "memory": ("", f"{FREE} OR {IN_TABLE}", INTO_TABLE, "_mem"),
    "memory16": ("", f"{FREE} OR {IN_TABLE}", INTO_TABLE, "_mem16"),
    "aria": ("", f"{FREE} OR {IN_TABLE}", INTO_TABLE, "_aria"),
    "marker": (UNMARK, f"{FREE} OR {MARKED}", "DO GET_LOCK(CONCAT('tlr:', %(lease)s), 0)", ""),
    "marker-checked": (
        UNMARK,
        f"{FREE} OR {MARKED}",
        "UPDATE {t} SET version = version + 0 * LAST_INSERT_ID(IF(GET_LOCK(CONCAT('tlr:', "
        "lease), 0) = 1, version, 0)) WHERE namespace = %(ns)s AND name = %(name)s "
        "AND lease = %(lease)s AND mark = 0",
        "",
    ),
    "ceiling": ("", "1 = 1", "DO 1", ""),
}
ENGINES = {  # (the table's options, and what follows its character set)
    "_mem": ("ENGINE=MEMORY", ""),
    "_mem16": ("ENGINE=MEMORY", " PARTITION BY KEY (namespace, name) PARTITIONS 16"),
    "_aria": ("ENGINE=Aria TRANSACTIONAL=0", ""),
}


def _connect(url: str) -> Any:
    """tasklocks' own connection class (its prepared row statements), as the store opens it."""
    p = parse_url(url)
    return _connection_class(pymysql)(
        host=p.host,
        port=p.port or 3306,
        user=p.user or "root",
        password=p.password or "",
        database=p.database,
        charset="utf8mb4",
        autocommit=True,
    )


def _setup(url: str, table: str, procs: int) -> None:
    conn = mysql_connect(url)
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {table} (namespace VARCHAR(191) NOT NULL, name VARBINARY(255) "
            "NOT NULL, version BIGINT NOT NULL, lease VARBINARY(255), record TEXT, mark TINYINT "
            "NOT NULL DEFAULT 0, PRIMARY KEY (namespace, name)) ENGINE=InnoDB "
            "DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        )
        for suffix, (engine, after) in ENGINES.items():
            cur.execute(
                f"CREATE TABLE {table}{suffix} (namespace VARCHAR(191) NOT NULL, name "
                "VARBINARY(255) NOT NULL, lease VARBINARY(64), PRIMARY KEY (namespace, name)) "
                f"{engine} DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin{after}"
            )
        for i in range(procs):
            cur.execute(f"INSERT INTO {table} VALUES ('ns', %s, 1, NULL, NULL, 0)", (f"n{i}",))
    conn.close()


def _drop(url: str, table: str) -> None:
    conn = mysql_connect(url)
    with conn.cursor() as cur:
        for suffix in ("", *ENGINES):
            cur.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
    conn.close()


def _statements(kind: str, table: str) -> tuple[str, str]:
    extra, free, release, suffix = KINDS[kind]
    free = free.format(f=table + suffix)
    return (
        TAKE.format(t=table, extra=extra, free=free),
        release.format(t=table, f=table + suffix),
    )


def _worker(
    url: str, table: str, kind: str, i: int, seconds: float, barrier: Barrier, out: Any
) -> None:
    conn = _connect(url)
    take, release = (_Positional(s) for s in _statements(kind, table))
    record = "x" * 130  # about a real record's size

    def send(statement: _Positional, params: dict[str, str]) -> tuple[int, int]:
        reply = conn.ok_execute(statement, statement.values(params))
        if reply is None:  # its first use on the session: as text, as tasklocks sends it
            with conn.cursor() as cur:
                cur.execute(_as_pymysql(statement.sql), statement.values(params))
                return int(cur.rowcount), int(cur.lastrowid or 0)
        return reply  # type: ignore[no-any-return]

    def pair() -> None:
        params = {"ns": "ns", "name": f"n{i}", "lease": os.urandom(8).hex(), "record": record}
        if not send(take, params)[1]:
            raise RuntimeError(f"{kind}: n{i} was not taken")
        released = send(release, params)
        if kind == "marker-checked" and not released[1]:
            raise RuntimeError(f"{kind}: n{i} was not released")

    for _ in range(50):  # warm: prepared statements, the row
        pair()
    barrier.wait()
    before, pairs = os.times(), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pair()
        pairs += 1
    after = os.times()
    out.put((pairs, after.user - before.user + after.system - before.system))
    barrier.wait()
    conn.close()


def _as_pymysql(sql: str) -> str:
    """A prepared statement's text (its ``?``) as PyMySQL's cursor takes it (``%s``)."""
    return sql.replace("?", "%s")


def run(url: str, table: str, kind: str, procs: int, seconds: float) -> tuple[float, float, float]:
    """Pairs a second, and the clients' and the server's CPU microseconds a pair."""
    conn = mysql_connect(url)
    with conn.cursor() as cur:  # every row free, whatever the kind before left in it
        cur.execute(f"UPDATE {table} SET lease = NULL, record = NULL")
    conn.close()
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(url, table, kind, i, seconds, barrier, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    barrier.wait(timeout=60)
    began, cpu0 = time.monotonic(), server_cpu("mysql")
    barrier.wait(timeout=seconds + 60)
    elapsed, cpu1 = time.monotonic() - began, server_cpu("mysql")
    done = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join()
    pairs = sum(d[0] for d in done)
    return pairs / elapsed, 1e6 * sum(d[1] for d in done) / pairs, 1e6 * (cpu1 - cpu0) / pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {', '.join(unknown)}; use {', '.join(KINDS)}")
    url = MYSQL_URL
    table = "tl_release_kinds_" + uuid.uuid4().hex[:8]
    try:
        _setup(url, table, args.procs)
        print(f"== MariaDB: {args.procs} processes, {args.seconds:g} s a kind ==")
        for round_ in range(1, args.rounds + 1):
            for kind in kinds:
                rate, client, server = run(url, table, kind, args.procs, args.seconds)
                print(
                    f"  round {round_} {kind:15} {rate:8,.0f} pairs/s, a pair: clients "
                    f"{client:.0f} us + server {server:.0f} us",
                    flush=True,
                )
    finally:
        _drop(url, table)


if __name__ == "__main__":
    main()
