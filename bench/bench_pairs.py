"""One acquire+release pair for tasklocks and for every baseline, behind one small interface.

A ``PairSpec`` (picklable) names what to run; :func:`open_pair` opens its connection in the
calling process, so a connection never crosses a process boundary.

The hand-written read+CAS baselines keep a JSON document like tasklocks does (one row per
namespace, ``version`` bumped by every change) with a small entry per held name, so the
comparison is "tasklocks versus the simplest correct code with the same driver".
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from bench_common import Config, mysql_connect, pg_conninfo, tasklocks_sql

from tasklocks.store._base import fill
from tasklocks.store.mysql import MARKED_MAX

TASKLOCKS = {"sqlite": "tl-sqlite", "mysql": "tl-mysql", "postgresql": "tl-pg"}
BASELINE_NAMES = {
    "tl-sqlite": "tasklocks SQLite",
    "tl-mysql": "tasklocks MariaDB",
    "tl-pg": "tasklocks PostgreSQL",
    "filelock": "filelock.FileLock",
    "cas-mysql": "read+CAS PyMySQL",
    "cas-pg": "read+CAS psycopg",
    "cas-sqlite": "BEGIN IMMEDIATE loop",
    "adv-pg": "pg_advisory_lock",
    "getlock-mysql": "GET_LOCK",
    "upd-sqlite": "bare UPDATE SQLite",
    "upd-mysql": "bare UPDATE MariaDB",
    "upd-pg": "bare UPDATE PostgreSQL",
    "row-mysql": "row per name MariaDB",
    "row-pg": "row per name PostgreSQL",
    "stmt-mysql": "tasklocks' statements MariaDB",
    "stmt-pg": "tasklocks' statements PostgreSQL",
    "redis": "redis-py Lock",
}
BACKEND_OF = {
    "tl-sqlite": "sqlite",
    "tl-mysql": "mysql",
    "tl-pg": "postgresql",
    "filelock": "sqlite",  # local: runs whenever SQLite does
    "cas-mysql": "mysql",
    "cas-pg": "postgresql",
    "cas-sqlite": "sqlite",
    "adv-pg": "postgresql",
    "getlock-mysql": "mysql",
    "upd-sqlite": "sqlite",
    "upd-mysql": "mysql",
    "upd-pg": "postgresql",
    "row-mysql": "mysql",
    "row-pg": "postgresql",
    "stmt-mysql": "mysql",
    "stmt-pg": "postgresql",
    "redis": "redis",
}
SQLITE_BUSY_TIMEOUT = 30.0  # seconds, the baseline's busy handler (sqlite3 ``timeout=``)


@dataclass(frozen=True)
class PairSpec:
    kind: str  # a key of BASELINE_NAMES
    cfg: Config
    namespace: str  # tasklocks namespace, or the baseline row's key
    name: str  # the lock name (distinct per process in the throughput test)
    key: int = 0  # advisory lock key


class Pair(Protocol):
    def pair(self) -> None:
        """Acquire the lock and release it."""
        ...

    def close(self) -> None: ...


class TasklocksPair:
    def __init__(self, spec: PairSpec) -> None:
        import tasklocks

        self.table = tasklocks.connect(spec.cfg.url(BACKEND_OF[spec.kind]), spec.namespace)
        self.name = spec.name

    def pair(self) -> None:
        self.table.acquire(self.name).release()

    def close(self) -> None:
        self.table.close()


class FileLockPair:
    def __init__(self, spec: PairSpec) -> None:
        import filelock

        self.lock = filelock.FileLock(spec.cfg.filelock_path + "." + spec.name)

    def pair(self) -> None:
        self.lock.acquire()
        self.lock.release()

    def close(self) -> None:
        pass


class RedisPair:
    def __init__(self, spec: PairSpec) -> None:
        import redis

        self.client = redis.Redis(host=spec.cfg.redis_host, port=spec.cfg.redis_port)
        self.lock = self.client.lock(f"bench:{spec.cfg.run_id}:{spec.name}", timeout=60)

    def pair(self) -> None:
        self.lock.acquire()
        self.lock.release()

    def close(self) -> None:
        self.client.close()


def _entry(version: int) -> dict[str, Any]:
    return {
        "owner": f"pid:{_HOST}:{os.getpid()}",
        "pid": os.getpid(),
        "host": _HOST,
        "since": time.time(),
        "token": version + 1,
    }


_HOST = socket.gethostname()


def _acquired(data: str, name: str, version: int) -> str:
    doc = json.loads(data)
    if name in doc["locks"]:
        raise RuntimeError(f"baseline: {name} is already held")
    doc["locks"][name] = _entry(version)
    return json.dumps(doc, separators=(",", ":"))


def _released(data: str, name: str) -> str:
    doc = json.loads(data)
    del doc["locks"][name]
    return json.dumps(doc, separators=(",", ":"))


class MySQLCasPair:
    """acquire = SELECT version, data + UPDATE ... WHERE version = ?; release likewise."""

    def __init__(self, spec: PairSpec) -> None:
        self.conn = mysql_connect(spec.cfg.mysql_url)
        self.table = spec.cfg.cas_table
        self.ns = spec.namespace
        self.name = spec.name

    def _change(self, acquire: bool) -> None:
        with self.conn.cursor() as cur:
            while True:
                cur.execute(
                    f"SELECT version, data FROM {self.table} WHERE namespace = %s", (self.ns,)
                )
                row = cur.fetchone()
                assert row is not None
                version, data = int(row[0]), str(row[1])
                new = _acquired(data, self.name, version) if acquire else _released(data, self.name)
                cur.execute(
                    f"UPDATE {self.table} SET data = %s, version = version + 1 "
                    "WHERE namespace = %s AND version = %s",
                    (new, self.ns, version),
                )
                if cur.rowcount == 1:
                    return

    def pair(self) -> None:
        self._change(True)
        self._change(False)

    def close(self) -> None:
        self.conn.close()


class PgCasPair:
    """The same read+CAS pair with psycopg 3 in autocommit mode."""

    def __init__(self, spec: PairSpec) -> None:
        import psycopg

        self.conn = psycopg.connect(pg_conninfo(spec.cfg.pg_url), autocommit=True)
        self.table = spec.cfg.cas_table
        self.ns = spec.namespace
        self.name = spec.name

    def _change(self, acquire: bool) -> None:
        while True:
            row = self.conn.execute(
                f"SELECT version, data FROM {self.table} WHERE namespace = %s",
                (self.ns,),
            ).fetchone()
            assert row is not None
            version, data = int(row[0]), str(row[1])
            new = _acquired(data, self.name, version) if acquire else _released(data, self.name)
            cur = self.conn.execute(
                f"UPDATE {self.table} SET data = %s, version = version + 1 "
                "WHERE namespace = %s AND version = %s",
                (new, self.ns, version),
            )
            if cur.rowcount == 1:
                return

    def pair(self) -> None:
        self._change(True)
        self._change(False)

    def close(self) -> None:
        self.conn.close()


class SQLiteImmediatePair:
    """BEGIN IMMEDIATE; SELECT data; UPDATE; COMMIT, twice, with SQLite's own busy timeout.

    Same settings as tasklocks' SQLite store: WAL and synchronous=NORMAL.
    """

    def __init__(self, spec: PairSpec) -> None:
        self.conn = sqlite3.connect(
            spec.cfg.sqlite_baseline_path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None
        )
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.table = spec.cfg.cas_table
        self.ns = spec.namespace
        self.name = spec.name

    def _change(self, acquire: bool) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            version, data = c.execute(
                f"SELECT version, data FROM {self.table} WHERE namespace = ?", (self.ns,)
            ).fetchone()
            new = _acquired(data, self.name, version) if acquire else _released(data, self.name)
            c.execute(
                f"UPDATE {self.table} SET data = ?, version = version + 1 WHERE namespace = ?",
                (new, self.ns),
            )
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def pair(self) -> None:
        self._change(True)
        self._change(False)

    def close(self) -> None:
        self.conn.close()


class AdvisoryPair:
    def __init__(self, spec: PairSpec) -> None:
        import psycopg

        self.conn = psycopg.connect(pg_conninfo(spec.cfg.pg_url), autocommit=True)
        self.key = spec.key

    def pair(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))

    def close(self) -> None:
        self.conn.close()


class GetLockPair:
    def __init__(self, spec: PairSpec) -> None:
        self.conn = mysql_connect(spec.cfg.mysql_url)
        self.lock_name = f"bench_{spec.cfg.run_id}_{spec.name}"

    def pair(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 30)", (self.lock_name,))
            row = cur.fetchone()
            if row is None or row[0] != 1:
                raise RuntimeError(f"GET_LOCK({self.lock_name}) returned {row}")
            cur.execute("SELECT RELEASE_LOCK(%s)", (self.lock_name,))
            cur.fetchone()

    def close(self) -> None:
        self.conn.close()


class BareUpdatePair:
    """Two bare durable ``UPDATE ... SET version = version + 1`` of the spec's row, each its own
    commit: the floor of any layout whose change is one statement on that row (issue 10)."""

    def __init__(self, spec: PairSpec) -> None:
        self.backend = BACKEND_OF[spec.kind]
        table, mark = spec.cfg.cas_table, "?" if self.backend == "sqlite" else "%s"
        self.sql = f"UPDATE {table} SET version = version + 1 WHERE namespace = {mark}"
        self.params = (spec.namespace,)
        self.conn: Any
        if self.backend == "sqlite":
            self.conn = sqlite3.connect(
                spec.cfg.sqlite_baseline_path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None
            )
            self.conn.execute("PRAGMA synchronous=NORMAL")
        elif self.backend == "mysql":
            self.conn = mysql_connect(spec.cfg.mysql_url)
        else:
            import psycopg

            self.conn = psycopg.connect(pg_conninfo(spec.cfg.pg_url), autocommit=True)

    def _update(self) -> None:
        if self.backend == "mysql":
            with self.conn.cursor() as cur:
                cur.execute(self.sql, self.params)
        else:
            self.conn.execute(self.sql, self.params)

    def pair(self) -> None:
        self._update()
        self._update()

    def close(self) -> None:
        self.conn.close()


class RowPerNamePair(BareUpdatePair):
    """A row per lock name (issue 10's other layout): taking a free name is one upsert that
    writes the lease and bumps the row's version (the name's fencing token) only if no lease is
    there, and releasing is one UPDATE conditioned on the lease, each its own durable commit. The
    floor of a layout where distinct names share no row, before any bookkeeping."""

    def __init__(self, spec: PairSpec) -> None:
        super().__init__(spec)
        t = spec.cfg.cas_table
        self.key = f"{spec.namespace}/{spec.name}"
        self.lease = f"lease-{os.getpid()}"
        if self.backend == "mysql":
            self.take = (
                f"INSERT INTO {t} (namespace, version, data) VALUES (%s, 1, %s) "
                "ON DUPLICATE KEY UPDATE version = IF(data = '', LAST_INSERT_ID(version + 1), "
                "version), data = IF(data = '', VALUES(data), data)"
            )
        else:
            self.take = (
                f"INSERT INTO {t} AS r (namespace, version, data) VALUES (%s, 1, %s) "
                "ON CONFLICT (namespace) DO UPDATE SET version = r.version + 1, "
                "data = EXCLUDED.data WHERE r.data = '' RETURNING version"
            )
        self.give = f"UPDATE {t} SET data = '' WHERE namespace = %s AND data = %s"

    def pair(self) -> None:
        for sql in (self.take, self.give):
            if self.backend == "mysql":
                with self.conn.cursor() as cur:
                    if cur.execute(sql, (self.key, self.lease)) == 0:
                        raise RuntimeError(f"{self.key}: not changed")
            elif self.conn.execute(sql, (self.key, self.lease)).rowcount != 1:
                raise RuntimeError(f"{self.key}: not changed")


class StatementsPair:
    """tasklocks' own two statements of a one-name pair, from its SQL files, with a fresh lease
    and a record of a real one's size: ``name_acquire`` the first time, ``name_retake`` (the row
    is known) after it, as tasklocks sends them, and the release of a process that releases
    often (PostgreSQL's ``name_release_unflushed``, MariaDB's ``name_release_marked`` and its
    batch, ``free_marked``); from a client that does
    nothing else: on PostgreSQL through libpq's prepared statements, the road tasklocks' adapter
    takes; on MariaDB through PyMySQL's cursor, as text (tasklocks itself, since stops 27 and 28,
    reads their replies without the cursor and prepares them, which costs its client and the
    server less than this one). What tasklocks' Python adds to a pair is the difference between
    this and tasklocks itself (issue 10)."""

    def __init__(self, spec: PairSpec) -> None:
        from tasklocks.store.postgres import _Numbered

        self.backend = BACKEND_OF[spec.kind]
        dialect = "mysql" if self.backend == "mysql" else "postgres"
        table = "tasklocks"  # the table the bench's tasklocks pairs use
        sql = tasklocks_sql(dialect, table)
        self.ns, self.name = spec.namespace, spec.name
        self.acquire = sql["name_acquire"]
        self.retake = sql["name_retake"]
        self.seen = False  # the row exists: name_retake
        # What a session's lease releases with, in a process that releases often (PostgreSQL:
        # without waiting for the flush; MariaDB: its marker, and every MARKED_MAX releases the
        # rows written free and the markers let go, as tasklocks does).
        self.release = sql.get("name_release_unflushed") or sql["name_release_marked"]
        self.free_marked = sql.get("free_marked", "")
        self.marked: list[str] = []
        self.record = "x" * 130  # about a real record's size (the text is not read)
        layout = f"INSERT INTO {table}_names (namespace, name, version, mark) VALUES (%s, '', 1, "
        self.conn: Any
        if self.backend == "mysql":
            self.conn = mysql_connect(spec.cfg.mysql_url)
            with self.conn.cursor() as cur:
                cur.execute(layout.replace("INSERT", "INSERT IGNORE") + "1)", (self.ns,))
            return
        import psycopg
        import psycopg.generators

        self.conn = psycopg.connect(pg_conninfo(spec.cfg.pg_url), autocommit=True)
        self.conn.execute(layout + "true) ON CONFLICT DO NOTHING", (self.ns,))
        self.execute = psycopg.generators.execute
        self.pg = self.conn.pgconn
        self.numbered: dict[bytes, Any] = {}  # $n parameters, as the adapter numbers them
        texts = {b"bench_acquire": self.acquire, b"bench_retake": self.retake}
        for key, text in {**texts, b"bench_release": self.release}.items():
            self.numbered[key] = _Numbered(text)
            self.pg.prepare(key, self.numbered[key].sql)

    def _pg(self, statement: bytes, params: dict[str, str]) -> None:
        given = self.numbered[statement].values(params)
        self.pg.send_query_prepared(statement, [v.encode() for v in given])
        result = self.conn.wait(self.execute(self.pg))[-1]
        if result.ntuples != 1:
            raise RuntimeError(f"{self.name}: not changed ({result.error_message!r})")

    def pair(self) -> None:
        lease = os.urandom(8).hex()
        params = {"ns": self.ns, "name": self.name, "lease": lease, "record": self.record}
        if self.backend == "mysql":
            with self.conn.cursor() as cur:
                cur.execute(self.retake if self.seen else self.acquire, params)
                if not cur.lastrowid:
                    raise RuntimeError(f"{self.name}: not taken")
                cur.execute(self.release, params)
                if not cur.lastrowid:
                    raise RuntimeError(f"{self.name}: not released")
                self.marked.append(lease)
                if len(self.marked) >= MARKED_MAX:
                    self._free_marked()
        else:
            self._pg(b"bench_retake" if self.seen else b"bench_acquire", params)
            self._pg(b"bench_release", params)
        self.seen = True

    def _free_marked(self) -> None:
        """MariaDB: the rows of the marked releases written free, the markers let go."""
        if not self.marked:
            return
        esc = self.conn.escape
        leases = " UNION ALL ".join(f"SELECT {esc(m)} AS lease" for m in self.marked)
        last = self.marked[-1]
        taken = f"namespace = {esc(self.ns)} AND name = {esc(self.name)}"
        rows = f"{taken} AND lease = {esc(last)}"
        sql = fill(self.free_marked, leases=leases, taken=taken, rows=rows)
        with self.conn.cursor() as cur:
            # (its three statements one by one: this connection sends one a query)
            for statement in sql.split(";"):
                if statement.strip():
                    cur.execute(statement)
        self.marked.clear()

    def close(self) -> None:
        if self.backend == "mysql":  # (its last row holds a record tasklocks cannot read)
            self._free_marked()
        self.conn.close()


_KINDS: dict[str, type[Pair]] = {
    "stmt-mysql": StatementsPair,
    "stmt-pg": StatementsPair,
    "row-mysql": RowPerNamePair,
    "row-pg": RowPerNamePair,
    "upd-sqlite": BareUpdatePair,
    "upd-mysql": BareUpdatePair,
    "upd-pg": BareUpdatePair,
    "tl-sqlite": TasklocksPair,
    "tl-mysql": TasklocksPair,
    "tl-pg": TasklocksPair,
    "filelock": FileLockPair,
    "redis": RedisPair,
    "cas-mysql": MySQLCasPair,
    "cas-pg": PgCasPair,
    "cas-sqlite": SQLiteImmediatePair,
    "adv-pg": AdvisoryPair,
    "getlock-mysql": GetLockPair,
}


def open_pair(spec: PairSpec) -> Pair:
    """Open the connection ``spec`` needs, in this process."""
    return _KINDS[spec.kind](spec)  # type: ignore[call-arg]


def advisory_key(cfg: Config, index: int) -> int:
    """A per-run, per-process advisory lock key (64-bit signed)."""
    return (zlib.crc32(cfg.run_id.encode()) << 20) + index


# --- baseline tables: created before the run, dropped after it ------------------------------

_EMPTY = '{"format":1,"locks":{}}'


def setup_baselines(cfg: Config, namespaces: list[str]) -> None:
    """Create the read+CAS tables (one row per ``namespaces`` entry) wherever the server is up."""
    t = cfg.cas_table
    conn = sqlite3.connect(cfg.sqlite_baseline_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        f"CREATE TABLE {t} (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL, data TEXT)"
    )
    conn.executemany(f"INSERT INTO {t} VALUES (?, 0, ?)", [(ns, _EMPTY) for ns in namespaces])
    conn.close()
    if cfg.server_skip.get("mysql") is None:
        mconn = mysql_connect(cfg.mysql_url)
        with mconn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE {t} (namespace VARCHAR(200) PRIMARY KEY, "
                "version BIGINT NOT NULL, data LONGTEXT NOT NULL) ENGINE=InnoDB"
            )
            cur.executemany(
                f"INSERT INTO {t} VALUES (%s, 0, %s)", [(ns, _EMPTY) for ns in namespaces]
            )
        mconn.close()
    if cfg.server_skip.get("postgresql") is None:
        import psycopg

        with psycopg.connect(pg_conninfo(cfg.pg_url), autocommit=True) as pconn:
            pconn.execute(
                f"CREATE TABLE {t} (namespace TEXT PRIMARY KEY, "
                "version BIGINT NOT NULL, data TEXT NOT NULL)"
            )
            with pconn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {t} VALUES (%s, 0, %s)",
                    [(ns, _EMPTY) for ns in namespaces],
                )


def teardown(cfg: Config) -> list[str]:
    """Drop the baseline tables and delete this run's tasklocks rows; return what went wrong."""
    problems: list[str] = []
    prefix = cfg.namespace("") + "%"
    if cfg.server_skip.get("mysql") is None:
        try:
            mconn = mysql_connect(cfg.mysql_url)
            with mconn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {cfg.cas_table}")
                if cfg.tasklocks_skip.get("mysql") is None:
                    cur.execute("DELETE FROM tasklocks WHERE namespace LIKE %s", (prefix,))
                    cur.execute("SHOW TABLES LIKE 'tasklocks_tasks'")
                    if cur.fetchone():
                        cur.execute(
                            "DELETE FROM tasklocks_tasks WHERE namespace LIKE %s", (prefix,)
                        )
            mconn.close()
        except Exception as exc:
            problems.append(f"MariaDB cleanup: {exc}")
    if cfg.server_skip.get("postgresql") is None:
        try:
            import psycopg

            with psycopg.connect(pg_conninfo(cfg.pg_url), autocommit=True) as pconn:
                pconn.execute(f"DROP TABLE IF EXISTS {cfg.cas_table}")
                if cfg.tasklocks_skip.get("postgresql") is None:
                    pconn.execute("DELETE FROM tasklocks WHERE namespace LIKE %s", (prefix,))
                    if pconn.execute("SELECT to_regclass('tasklocks_tasks')").fetchone() != (None,):
                        pconn.execute(
                            "DELETE FROM tasklocks_tasks WHERE namespace LIKE %s", (prefix,)
                        )
        except Exception as exc:
            problems.append(f"PostgreSQL cleanup: {exc}")
    return problems
