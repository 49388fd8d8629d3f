"""tasklocks benchmarks: every speed target of the spec, as ratios measured in the same run.

Usage: ``python bench/run.py [--quick] [--only NAME...]`` with NAME one of
``uncontended``, ``throughput``, ``handoff``, ``waiting``, ``docsize``, ``tasks``, ``fairness``,
``layout``, ``aio``, ``floor``.

Sections run on every backend whose tasklocks adapter imports and whose server answers; the others
print "skipped: reason". One table at the end shows tasklocks next to each baseline, the ratio, the
target and PASS/FAIL. Baseline tables and this run's tasklocks rows are removed at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import bench_aio
import bench_floor
import bench_layout
from bench_common import BACKENDS, Config, median, percentile, pg_conninfo, probe, query_counter
from bench_common import redis_skip as probe_redis
from bench_crew import Crew, LoopResult, WaitResult, WorkerError
from bench_pairs import (
    BACKEND_OF,
    BASELINE_NAMES,
    TASKLOCKS,
    Pair,
    PairSpec,
    advisory_key,
    open_pair,
    setup_baselines,
    teardown,
)

import tasklocks

SECTIONS = (
    "uncontended",
    "throughput",
    "handoff",
    "waiting",
    "docsize",
    "tasks",
    "fairness",
    "layout",
    "aio",
    "floor",
)
LABEL = {"sqlite": "SQLite", "mysql": "MariaDB", "postgresql": "PostgreSQL"}
THROUGHPUT_WORKERS = 32
THROUGHPUT_ROUNDS = 3  # section 2: tasklocks and its baseline, alternating
WAITERS = 20


@dataclass
class Row:
    test: str
    tasklocks: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""


ROWS: list[Row] = []


def say(text: str) -> None:
    print(text, flush=True)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def us(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e6:,.0f} us"


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:,.1f} ms"


def skip_reason(cfg: Config, kind: str, redis_reason: str | None) -> str | None:
    backend = BACKEND_OF[kind]
    if backend == "redis":
        return redis_reason
    if kind.startswith("tl-"):
        return cfg.tasklocks_skip[backend]
    return cfg.server_skip[backend]


# --- 1. uncontended pair ------------------------------------------------------------------------


def measure_pairs(
    pairs: dict[str, Pair], n: int, warmup: int, block: int = 50
) -> dict[str, list[float]]:
    """Time ``n`` pairs of each contender, interleaved in blocks so drift hits all alike."""
    for p in pairs.values():
        for _ in range(warmup):
            p.pair()
    out: dict[str, list[float]] = {k: [] for k in pairs}
    clock = time.perf_counter
    done = 0
    while done < n:
        step = min(block, n - done)
        for k, p in pairs.items():
            lat = out[k]
            for _ in range(step):
                t0 = clock()
                p.pair()
                lat.append(clock() - t0)
        done += step
    return out


def section_uncontended(cfg: Config, redis_reason: str | None) -> None:
    say("\n== 1. uncontended acquire+release (one process, same lock) ==")
    n_local, n_server = (300, 200) if cfg.quick else (3000, 1500)
    ns = cfg.namespace("uncontended")

    def run(kinds: list[str], n: int) -> dict[str, list[float] | str]:
        result: dict[str, list[float] | str] = {}
        opened: dict[str, Pair] = {}
        for kind in kinds:
            reason = skip_reason(cfg, kind, redis_reason)
            if reason is not None:
                result[kind] = reason
                continue
            try:
                opened[kind] = open_pair(
                    PairSpec(kind, cfg, ns, "uncontended", advisory_key(cfg, 999))
                )
            except Exception as exc:
                result[kind] = f"{type(exc).__name__}: {exc}"
        try:
            result.update(measure_pairs(opened, n, warmup=max(50, n // 10)))
        except Exception as exc:
            for kind in opened:
                result[kind] = f"{type(exc).__name__}: {exc}"
        finally:
            for p in opened.values():
                p.close()
        for kind, value in result.items():
            if isinstance(value, str):
                say(f"  {BASELINE_NAMES[kind]}: skipped: {value}")
            else:
                say(
                    f"  {BASELINE_NAMES[kind]}: median {us(median(value))}, "
                    f"p99 {us(percentile(value, 99))} ({len(value)} pairs)"
                )
        return result

    def compare(
        backend: str, base: str, res: dict[str, list[float] | str], target: float, faster: bool
    ) -> None:
        tl = res[TASKLOCKS[backend]]
        bl = res[base]
        tl_med = median(tl) if isinstance(tl, list) else math.nan
        bl_med = median(bl) if isinstance(bl, list) else math.nan
        ok: bool | None = None
        ratio = ""
        if isinstance(tl, list) and isinstance(bl, list):
            r = bl_med / tl_med if faster else tl_med / bl_med
            ratio = f"{r:.2f}x"
            ok = r >= target if faster else r <= target
        ROWS.append(
            Row(
                f"1 pair {LABEL[backend]} (median)",
                us(tl_med) if isinstance(tl, list) else f"skipped: {tl}",
                f"{BASELINE_NAMES[base]} {us(bl_med)}" if isinstance(bl, list) else "skipped",
                ratio,
                f"base/tl >= {target}x" if faster else f"tl/base <= {target}x",
                verdict(ok),
            )
        )

    res = run(["tl-sqlite", "filelock", "cas-sqlite", "redis"], n_local)
    compare("sqlite", "filelock", res, 2.0, faster=True)
    info(res, "cas-sqlite", "1 pair BEGIN IMMEDIATE loop (info)")
    info(res, "redis", "1 pair redis-py Lock (info)")
    res = run(["tl-mysql", "cas-mysql", "getlock-mysql"], n_server)
    compare("mysql", "cas-mysql", res, 1.5, faster=False)
    info(res, "getlock-mysql", "1 pair MariaDB GET_LOCK (info)")
    res = run(["tl-pg", "cas-pg", "adv-pg"], n_server)
    compare("postgresql", "cas-pg", res, 1.5, faster=False)
    info(res, "adv-pg", "1 pair PG advisory lock (info)")


def info(res: dict[str, list[float] | str], kind: str, test: str) -> None:
    v = res[kind]
    ROWS.append(
        Row(
            test,
            "",
            f"{BASELINE_NAMES[kind]} {us(median(v))}" if isinstance(v, list) else "skipped",
        )
    )


# --- 2. throughput: 32 processes, distinct names --------------------------------------------------


def run_loop(crew: Crew, cfg: Config, kind: str, duration: float) -> list[LoopResult] | str:
    ns = cfg.namespace(f"throughput-{kind}")
    jobs: dict[int, tuple[str, tuple[Any, ...]]] = {
        i: ("loop", (PairSpec(kind, cfg, ns, f"w{i}", advisory_key(cfg, i)), duration))
        for i in range(crew.size)
    }
    task = crew.submit(jobs)
    try:
        return list(crew.collect(task, crew.size, timeout=duration + 180).values())
    except WorkerError as exc:
        return str(exc).strip().splitlines()[0]


class LoopSummary(NamedTuple):
    rate: float  # pairs/s, all processes together
    p50: float
    p99: float
    p999: float
    worst: float
    fewest: int  # pairs done by the slowest process
    per_pair: str  # server statements or transactions per pair, if counted


def summarise_loop(results: list[LoopResult]) -> LoopSummary:
    """pairs/s, p50, p99, p99.9, max, pairs done by the slowest process, server work per pair."""
    lat = [x for r in results for x in r.latencies]
    elapsed = max(r.elapsed for r in results)
    counts = [len(r.latencies) for r in results]
    rate = len(lat) / elapsed
    queries = sum(r.queries for r in results)
    per_pair = f"{queries / len(lat):.1f}" if queries else ""
    return LoopSummary(
        rate,
        median(lat),
        percentile(lat, 99),
        percentile(lat, 99.9),
        max(lat),
        min(counts),
        per_pair,
    )


def section_throughput(cfg: Config, crew: Crew, redis_reason: str | None) -> None:
    """tasklocks and its baseline in alternating rounds (tasklocks first, then the baseline
    first, ...): a 2-core machine's speed drifts by a fifth and more within minutes
    (pg_advisory_lock made 4,964 to 6,252 pairs/s in one session), and the ratio of two loops
    run back to back once moves with it. The ratio is the median of the rounds' ratios;
    the rates are the medians of the rounds', the latencies those of every round's pairs."""
    duration = 1.0 if cfg.quick else 3.0
    rounds = 1 if cfg.quick else THROUGHPUT_ROUNDS
    say(
        f"\n== 2. {crew.size} processes, distinct names, {duration:g} s each, "
        f"{rounds} alternating round(s) ==",
    )
    pairs = [
        ("postgresql", "adv-pg", 0.5, "stretch"),
        ("mysql", "getlock-mysql", 0.5, "stretch"),
        ("sqlite", "cas-sqlite", 1.0, ""),
    ]
    for backend, base, target, note in pairs:
        tl_kind = TASKLOCKS[backend]
        runs: dict[str, list[list[LoopResult]]] = {tl_kind: [], base: []}
        rates: dict[str, list[float]] = {tl_kind: [], base: []}  # pairs/s, round by round
        failed: dict[str, str] = {}
        for kind in (tl_kind, base):
            reason = skip_reason(cfg, kind, redis_reason)
            if reason is not None:
                failed[kind] = reason
        for r in range(rounds):
            order = (tl_kind, base) if r % 2 == 0 else (base, tl_kind)
            for kind in order:
                if kind in failed:
                    continue
                v = run_loop(crew, cfg, kind, duration)
                if isinstance(v, str):
                    failed[kind] = v
                    continue
                runs[kind].append(v)
                rate, p50, p99, p999, worst, fewest, per_pair = summarise_loop(v)
                rates[kind].append(rate)
                say(
                    f"  round {r + 1} {BASELINE_NAMES[kind]}: {rate:,.0f} pairs/s, p50 {ms(p50)}, "
                    f"p99 {ms(p99)}, p99.9 {ms(p999)}, max {ms(worst)}, slowest process did "
                    f"{fewest} pairs" + (f", {per_pair} queries/pair" if per_pair else "")
                )
        for kind, why in failed.items():
            say(f"  {BASELINE_NAMES[kind]}: skipped: {why}")
        tl_s = _rounds(runs[tl_kind], rates[tl_kind]) if tl_kind not in failed else None
        bl_s = _rounds(runs[base], rates[base]) if base not in failed else None
        lab = LABEL[backend]
        ratio, ok = "", None
        if tl_s and bl_s:
            ratios = [t / b for t, b in zip(rates[tl_kind], rates[base], strict=True)]
            mid = median(ratios)
            ratio, ok = f"{mid:.2f}x", mid >= target
            if len(ratios) > 1:
                say(f"  {lab}: ratio by round " + ", ".join(f"{x:.2f}x" for x in ratios))
        ROWS.append(
            Row(
                f"2 {crew.size}proc {lab} pairs/s",
                f"{tl_s.rate:,.0f}/s" + per(tl_s, backend)
                if tl_s
                else f"skipped: {failed[tl_kind]}",
                f"{BASELINE_NAMES[base]} {bl_s.rate:,.0f}/s" + per(bl_s, backend)
                if bl_s
                else "skipped",
                ratio,
                f"tl/base >= {target}x" + (f" ({note})" if note else ""),
                verdict(ok),
            )
        )
        for label, limit in (("p50", None), ("p99", 0.025), ("p99.9", 0.050)):
            tl_p = getattr(tl_s, _FIELD[label]) if tl_s else math.nan
            bl_p = getattr(bl_s, _FIELD[label]) if bl_s else math.nan
            ROWS.append(
                Row(
                    f"2 {crew.size}proc {lab} {label}" + (" (info)" if limit is None else ""),
                    ms(tl_p) if tl_s else "skipped",
                    f"{BASELINE_NAMES[base]} {ms(bl_p)}" if bl_s else "skipped",
                    "",
                    "" if limit is None else f"tl < {limit * 1e3:g} ms",
                    verdict(None if limit is None or not tl_s else tl_p < limit),
                )
            )


def _rounds(runs: list[list[LoopResult]], rates: list[float]) -> LoopSummary:
    """Rounds of one loop as one: the median of their ``rates``, the latencies of all their
    pairs."""
    pooled = summarise_loop([r for results in runs for r in results])
    return pooled._replace(rate=median(rates))


_FIELD = {"p50": "p50", "p99": "p99", "p99.9": "p999"}


def per(summary: LoopSummary, backend: str) -> str:
    if not summary.per_pair:
        return ""
    return f" ({summary.per_pair} q/pair)"


# --- 3. hand-off latency -------------------------------------------------------------------------


def section_handoff(cfg: Config, crew: Crew) -> None:
    rounds = 15 if cfg.quick else 50
    say(f"\n== 3. hand-off latency, {rounds} rounds, holds of 20-80 ms ==")
    for backend in BACKENDS:
        lab = LABEL[backend]
        reason = cfg.tasklocks_skip[backend]
        if reason is None:
            url, ns = cfg.url(backend), cfg.namespace(f"handoff-{backend}")
            crew.shared.held.clear()
            crew.shared.done.clear()
            task = crew.submit(
                {
                    0: ("handoff_holder", (url, ns, rounds + 1, 4711)),
                    1: ("handoff_waiter", (url, ns, rounds + 1)),
                }
            )
            try:
                got = crew.collect(task, 2, timeout=rounds * 2 + 120)
                # Round 0 is a warm-up; then latency = B's acquire-return minus A's release-start.
                lat = [b - a for a, b in zip(got[0][1:], got[1][1:], strict=True)]
            except WorkerError as exc:
                reason = str(exc).strip().splitlines()[0]
        if reason is not None:
            say(f"  {lab}: skipped: {reason}")
            ROWS.append(Row(f"3 hand-off {lab} p50", f"skipped: {reason}", target="<= 5 ms"))
            continue
        p50, p99 = median(lat), percentile(lat, 99)
        say(f"  {lab}: p50 {ms(p50)}, p99 {ms(p99)}, max {ms(max(lat))}")
        ROWS.append(Row(f"3 hand-off {lab} p50", ms(p50), "", "", "<= 5 ms", verdict(p50 <= 0.005)))
        ROWS.append(
            Row(f"3 hand-off {lab} p99", ms(p99), "", "", "<= 25 ms", verdict(p99 <= 0.025))
        )


# --- 4. waiting CPU ------------------------------------------------------------------------------


def section_waiting(cfg: Config, crew: Crew) -> None:
    duration = 3.0 if cfg.quick else 10.0
    say(f"\n== 4. {WAITERS} processes blocked on one held lock for {duration:g} s ==")

    for backend in BACKENDS:
        lab = LABEL[backend]
        reason = cfg.tasklocks_skip[backend]
        if reason is not None:
            say(f"  {lab}: skipped: {reason}")
            ROWS.append(Row(f"4 waiting CPU {lab}", f"skipped: {reason}", target="< 10% of a core"))
            continue
        url, ns = cfg.url(backend), cfg.namespace(f"waiting-{backend}")
        with tasklocks.connect(url, ns) as table:
            lease = table.acquire("busy")
            task = crew.submit({i: ("block", (url, ns, "busy", duration)) for i in range(WAITERS)})
            try:
                crew.wait_ready(task, WAITERS, timeout=120)
                if backend == "postgresql":
                    time.sleep(1.1)  # let the waiters' setup transactions reach pg_stat
                q0, t0 = query_counter(cfg, backend), time.monotonic()
                got: dict[int, WaitResult] = crew.collect(task, WAITERS, timeout=duration + 120)
                t1 = time.monotonic()
                if backend == "postgresql":
                    time.sleep(1.1)  # backends flush their statistics at most once a second
                q1 = query_counter(cfg, backend)
            except WorkerError as exc:
                reason = str(exc).strip().splitlines()[0]
            finally:
                lease.release()
        if reason is not None:
            say(f"  {lab}: skipped: {reason}")
            ROWS.append(Row(f"4 waiting CPU {lab}", f"skipped: {reason}", target="< 10% of a core"))
            continue
        cpu = sum(r.cpu for r in got.values())
        wall = median([r.wall for r in got.values()])
        pct = cpu / wall * 100
        outcomes = sorted({r.outcome for r in got.values()})
        queries = server = ""
        if backend != "sqlite":
            sent = sum(r.queries for r in got.values())
            queries = f"sent {sent:,} queries ({sent / wall / WAITERS:,.1f}/s per waiter)"
            if q0 is not None and q1 is not None:
                what = "xact_commit+rollback" if backend == "postgresql" else "Questions"
                server = f"; server {what} +{q1 - q0:,.0f} in {t1 - t0:.1f} s (all clients)"
        say(
            f"  {lab}: {cpu:.2f} s CPU in {wall:.1f} s = {pct:.1f}% of one core; "
            f"{queries or 'no server'}{server}; waiters {', '.join(outcomes)}"
        )
        ROWS.append(
            Row(
                f"4 waiting CPU {lab}",
                f"{pct:.1f}% of a core",
                queries,
                "",
                "< 10% of a core",
                verdict(pct < 10),
            )
        )


# --- 5. document size ----------------------------------------------------------------------------


SCALE = (10, 100, 1000, 10000)  # locks held in the namespace while one more pair is timed


def section_docsize(cfg: Config) -> None:
    n = 40 if cfg.quick else 150
    sizes = ", ".join(f"{k:,}" for k in SCALE)
    say(f"\n== 5. one more acquire+release with {sizes} locks held ({n} pairs each) ==")

    for backend in BACKENDS:
        lab = LABEL[backend]
        reason = cfg.tasklocks_skip[backend]
        if reason is not None:
            say(f"  {lab}: skipped: {reason}")
            ROWS.append(Row(f"5 1000 vs 10 held {lab}", f"skipped: {reason}", target="<= 5x"))
            continue
        # One namespace per size, measured in interleaved blocks so that a burst of load
        # elsewhere on the machine hits them all alike.
        url = cfg.url(backend)
        tables = {k: tasklocks.connect(url, cfg.namespace(f"docsize{k}-{backend}")) for k in SCALE}
        try:
            leases = []
            for k, table in tables.items():
                for start in range(0, k, 100):
                    names = [f"held-{i}" for i in range(start, min(k, start + 100))]
                    leases.append(table.acquire(*names))
            got = measure_pairs(
                {str(k): _TablePair(t) for k, t in tables.items()}, n, warmup=10, block=10
            )
            for lease in leases:
                lease.release()
        finally:
            for table in tables.values():
                table.close()
        m = {k: median(got[str(k)]) for k in SCALE}
        curve = ", ".join(f"{k:,} held {us(m[k])} ({m[k] / m[SCALE[0]]:.1f}x)" for k in SCALE)
        say(f"  {lab}: {curve}")
        for k in SCALE[1:]:
            r = m[k] / m[SCALE[0]]
            ROWS.append(
                Row(
                    f"5 {k} vs 10 held {lab}" + ("" if k == 1000 else " (info)"),
                    f"{us(m[k])} vs {us(m[SCALE[0]])}",
                    "",
                    f"{r:.2f}x",
                    "<= 5x" if k == 1000 else "",
                    verdict(r <= 5) if k == 1000 else "",
                )
            )


class _TablePair:
    """One more acquire+release on a name nobody holds, through an open LockTable."""

    def __init__(self, table: tasklocks.LockTable) -> None:
        self.table = table

    def pair(self) -> None:
        self.table.acquire("extra").release()

    def close(self) -> None:
        self.table.close()


# --- 8. the layout's ceiling: one document row against sharded rows (issue 10) ---------------


def section_layout(cfg: Config, crew: Crew) -> None:
    bl = bench_layout
    duration = 1.0 if cfg.quick else 3.0
    n = 30 if cfg.quick else 100
    say(
        f"\n== 8. the hand-written read+CAS pair on one row and on {bl.SHARDS} rows: "
        f"{crew.size} processes on distinct names ({duration:g} s each), and one pair "
        f"with {bl.HELD:,} held ({n} pairs) =="
    )
    for backend in BACKENDS:
        lab = LABEL[backend]
        reason = cfg.server_skip[backend]
        if reason is not None:
            say(f"  {lab}: skipped: {reason}")
            continue
        kind = bl.KIND[backend]
        layouts: dict[str, Callable[[str], str]] = {
            "1 row": lambda _name: bl.one_row(cfg),
            f"{bl.SHARDS} rows": lambda name: bl.shard_row(cfg, bl.shard_of(name)),
        }
        runs: list[tuple[str, str, Callable[[str], str]]] = [
            (label, kind, row) for label, row in layouts.items()
        ]
        runs += [(f"{label}, bare UPDATE", bl.BARE[backend], r) for label, r in layouts.items()]
        # tasklocks itself, each name in the namespace of its shard: what sharded documents
        # would reach with tasklocks' own statements (sessions, checks, the JSON), today.
        runs.append(
            (
                f"{bl.SHARDS} namespaces, tasklocks",
                TASKLOCKS[backend],
                lambda name: cfg.namespace(f"layout-tl-s{bl.shard_of(name)}"),
            )
        )
        if backend in bl.ROWS:  # (the kind makes a row per name under this prefix)
            runs.append(("a row per name", bl.ROWS[backend], lambda _n: cfg.namespace("rows")))
        if backend in bl.STATEMENTS:  # tasklocks' two statements from a client doing nothing else
            runs.append(
                (
                    "tasklocks' statements, bare client",
                    bl.STATEMENTS[backend],
                    lambda _n: cfg.namespace("statements"),
                )
            )
        if backend in bl.PEER:
            peer = bl.PEER[backend]  # (a peer's pairs name no row: any will do)
            runs.append((BASELINE_NAMES[peer], peer, layouts["1 row"]))
        for label, k, row in runs:
            jobs: dict[int, tuple[str, tuple[Any, ...]]] = {
                i: (
                    "loop",
                    (PairSpec(k, cfg, row(f"w{i}"), f"w{i}", advisory_key(cfg, i)), duration),
                )
                for i in range(crew.size)
            }
            task = crew.submit(jobs)
            try:
                got = list(crew.collect(task, crew.size, timeout=duration + 180).values())
            except WorkerError as exc:
                say(f"  {lab} {label}: failed: {str(exc).strip().splitlines()[0]}")
                continue
            summ = summarise_loop(got)
            say(
                f"  {lab} {label}: {summ.rate:,.0f} pairs/s, p50 {ms(summ.p50)}, "
                f"p99 {ms(summ.p99)}, p99.9 {ms(summ.p999)}"
            )
            ROWS.append(
                Row(
                    f"8 {crew.size}proc {lab} {label} (info)",
                    f"{summ.rate:,.0f}/s, p99 {ms(summ.p99)}",
                )
            )
        sizes = bl.fill_size_rows(cfg, backend)
        rows = bl.size_rows(cfg)
        got_sizes = measure_pairs(
            {k: open_pair(PairSpec(kind, cfg, rows[k], "extra", 0)) for k in rows},
            n,
            warmup=5,
            block=10,
        )
        m = {k: median(v) for k, v in got_sizes.items()}
        say(
            f"  {lab} one pair: 10 held {us(m['small'])} ({sizes['small']:,} B), "
            f"{bl.HELD:,} in one row {us(m['whole'])} ({sizes['whole']:,} B), "
            f"in one of {bl.SHARDS} rows {us(m['shard'])} ({sizes['shard']:,} B)"
        )
        for k, label in (("whole", "1 row"), ("shard", f"{bl.SHARDS} rows")):
            ROWS.append(
                Row(
                    f"8 {bl.HELD} held, {label}, {lab} (info)",
                    f"{us(m[k])} vs {us(m['small'])} with 10",
                    ratio=f"{m[k] / m['small']:.2f}x",
                )
            )


def section_floor(cfg: Config) -> None:
    seconds = 2.0 if cfg.quick else 5.0
    pairs_each = 300 if cfg.quick else 1000
    say(
        f"\n== 10. the servers' floor: tasklocks' two statements against the advisory locks, "
        f"{THROUGHPUT_WORKERS} clients of the server's own C client on distinct names =="
    )
    for backend, tool, peer in (
        ("postgresql", "pgbench", "pg_advisory_lock"),
        ("mysql", "mariadb-slap", "GET_LOCK"),
    ):
        lab = LABEL[backend]
        reason = cfg.server_skip[backend]
        if reason is None:
            if backend == "postgresql":
                got = bench_floor.pgbench(cfg, THROUGHPUT_WORKERS, seconds)
            else:
                got = bench_floor.slap(cfg, THROUGHPUT_WORKERS, pairs_each)
            reason = got if isinstance(got, str) else None
        if reason is not None or isinstance(got, str):
            say(f"  {lab}: skipped: {reason}")
            ROWS.append(
                Row(f"10 {THROUGHPUT_WORKERS} C clients {lab} (info)", f"skipped: {reason}")
            )
            continue
        say(f"  {lab} ({tool}): {got['rows']:,.0f} pairs/s, {peer} {got['advisory']:,.0f} pairs/s")
        ROWS.append(
            Row(
                f"10 {THROUGHPUT_WORKERS} C clients {lab} (info)",
                f"{got['rows']:,.0f}/s ({tool})",
                f"{peer} {got['advisory']:,.0f}/s",
                f"{got['rows'] / got['advisory']:.2f}x",
            )
        )
        if "one_write" in got:  # MariaDB: the ceiling of a release that writes nothing durable
            say(f"  {lab}, one durable write and a round trip a pair: {got['one_write']:,.0f}/s")
            ROWS.append(
                Row(
                    f"10 {THROUGHPUT_WORKERS} C clients {lab}, one durable write a pair (info)",
                    f"{got['one_write']:,.0f}/s ({tool})",
                    f"{peer} {got['advisory']:,.0f}/s",
                    f"{got['one_write'] / got['advisory']:.2f}x",
                )
            )


# --- the table -----------------------------------------------------------------------------------


def section_tasks(cfg: Config) -> None:
    """Issue 3: start() to the target's first line vs a bare `python -c pass`; task exit to a
    waiter holding its lock."""
    import bench_tasks

    rounds = 8 if cfg.quick else 25
    say(f"\n== 6. tasks: start latency and exit-to-free, {rounds} rounds ==")
    bare = [bench_tasks.bare_python_spawn() for _ in range(rounds)]
    say(f"  python -c pass: median {ms(median(bare))}")
    for backend in BACKENDS:
        reason = cfg.tasklocks_skip[backend]
        if reason is not None:
            ROWS.append(Row(f"6 start latency {LABEL[backend]}", f"skipped: {reason}"))
            continue
        url, ns = cfg.url(backend), cfg.namespace(f"tasks-{backend}")
        start = bench_tasks.start_latency(url, ns, cfg.tmpdir, rounds)
        free = bench_tasks.exit_to_free(url, ns, cfg.tmpdir, rounds)
        ratio = median(start) / median(bare)
        say(
            f"  {LABEL[backend]}: start->first line median {ms(median(start))}, "
            f"exit->lock held p50 {ms(median(free))} p99 {ms(percentile(free, 99))}"
        )
        ROWS.append(
            Row(
                f"6 start->first line {LABEL[backend]}",
                ms(median(start)),
                f"python -c pass {ms(median(bare))}",
                f"{ratio:.2f}x",
                "tl/base <= 3x",
                verdict(ratio <= 3),
            )
        )
        p99 = percentile(free, 99)
        ROWS.append(
            Row(
                f"6 task exit->lock free {LABEL[backend]} p99",
                ms(p99),
                target="< 25 ms",
                result=verdict(p99 < 0.025),
            )
        )


# --- 7. fairness: a waiter for {a, b} against rivals taking a and b in turn --------------------

FAIR_PEERS = {"sqlite": "flock", "mysql": "GET_LOCK", "postgresql": "pg_advisory_lock"}


def section_fairness(cfg: Config) -> None:
    """Issue 9: the longest wait of a process that wants {a, b} while two others take a and b in
    turn, next to the same scenario on the backend's own locks and on tasklocks before the queue."""
    import bench_fairness as bf

    rounds, budget, before_budget = (10, 10.0, 2.0) if cfg.quick else (30, 20.0, 4.0)
    say(
        f"\n== 7. fairness: a waiter for {{a, b}}, {rounds} rounds, against rivals taking a and b "
        f"in turn ({bf.HOLD * 1e3:.0f} ms each, {bf.OFFSET * 1e3:.0f} ms apart, no pause) =="
    )
    before_src: str | None = None
    before_reason: str | None = None
    try:
        repo = os.path.dirname(bf.HERE)
        before_src = bf.extract_before(repo, os.path.join(cfg.tmpdir, "before-queue"))
    except (OSError, subprocess.SubprocessError) as exc:
        before_reason = f"no source of tasklocks {bf.BEFORE_QUEUE} ({type(exc).__name__})"

    def scenario(
        what: str, spec: dict[str, Any], reason: str | None, seconds: float, path: str | None = None
    ) -> bf.Fairness | str:
        got = reason or bf.run_scenario(
            {"a": spec, "b": spec, "pair": spec}, rounds, seconds, cfg.tmpdir, path
        )
        if isinstance(got, str):
            say(f"  {what}: skipped: {got}")
        else:
            cut = f", {got.timeouts} cut at {bf.WAIT_TIMEOUT:g} s" if got.timeouts else ""
            say(
                f"  {what}: {len(got.waits)} waits{cut}, max {ms(max(got.waits))}, "
                f"p99 {ms(percentile(got.waits, 99))}, median {ms(median(got.waits))}; "
                f"rivals took {got.turns[0]} and {got.turns[1]} turns meanwhile"
            )
        return got

    for backend in BACKENDS:
        lab, peer_name = LABEL[backend], FAIR_PEERS[backend]
        t0 = time.monotonic()
        before_url = cfg.url(backend)
        peer_spec: dict[str, Any]
        if backend == "sqlite":
            peer_spec = {"kind": "flock", "path": os.path.join(cfg.tmpdir, "fairness-flock")}
            before_url = "sqlite:///" + os.path.join(cfg.tmpdir, "tasklocks-before.db")
        elif backend == "mysql":
            peer_spec = {"kind": "getlock", "url": cfg.mysql_url, "prefix": f"bench_{cfg.run_id}_"}
        else:
            keys = {"a": advisory_key(cfg, 7001), "b": advisory_key(cfg, 7002)}
            peer_spec = {"kind": "advisory", "conninfo": pg_conninfo(cfg.pg_url), "keys": keys}
        tl = scenario(
            f"{lab} tasklocks",
            {"kind": "tasklocks", "url": cfg.url(backend), "namespace": cfg.namespace("fair")},
            cfg.tasklocks_skip[backend],
            budget,
        )
        peer = scenario(f"{lab} {peer_name}", peer_spec, cfg.server_skip[backend], budget)
        before = scenario(
            f"{lab} tasklocks {bf.BEFORE_QUEUE}",
            {
                "kind": "tasklocks",
                "url": before_url,
                "namespace": cfg.namespace("fair-before"),
                "table": "tasklocks_before_queue",  # schema 1: this tree moves its tables to 2
            },
            cfg.tasklocks_skip[backend] or before_reason,
            before_budget,
            before_src,
        )
        say(f"  ({time.monotonic() - t0:.0f} s)")
        for label in ("max", "p99"):
            tl_v, peer_v = _fair_stat(tl, label), _fair_stat(peer, label)
            ROWS.append(
                Row(
                    f"7 fairness {{a,b}} wait {lab} {label}",
                    f"skipped: {tl}" if isinstance(tl, str) else ms(tl_v),
                    "skipped" if isinstance(peer, str) else f"{peer_name} {ms(peer_v)}",
                    "" if math.isnan(tl_v / peer_v) else f"{tl_v / peer_v:.2f}x",
                    "max < 1 s" if label == "max" else "",
                    verdict(tl_v < 1.0 if label == "max" and not isinstance(tl, str) else None),
                )
            )
        text = "skipped"
        if not isinstance(before, str):
            text = (
                f"{bf.BEFORE_QUEUE}: max {ms(_fair_stat(before, 'max'))}, "
                f"p99 {ms(_fair_stat(before, 'p99'))}"
            )
            if before.timeouts:
                text += f", {before.timeouts}/{len(before.waits)} cut at {bf.WAIT_TIMEOUT:g} s"
        ROWS.append(Row(f"7 fairness {{a,b}} {lab} before the queue (info)", "", text))


def _fair_stat(result: Any, label: str) -> float:
    """The longest or p99 wait of a fairness scenario's result; NaN if it was skipped."""
    if isinstance(result, str):
        return math.nan
    waits: list[float] = result.waits
    return max(waits) if label == "max" else percentile(waits, 99)


# --- 9. asyncio ----------------------------------------------------------------------------------


def section_aio(cfg: Config) -> None:
    say("\n== 9. tasklocks.aio: async pair, the loop's lag, idle waiters ==")
    n = 300 if cfg.quick else 2000
    for backend in BACKENDS:
        label = LABEL[backend]
        reason = cfg.tasklocks_skip[backend]
        if reason is not None:
            say(f"  {label}: skipped: {reason}")
            ROWS.append(Row(f"async pair {label} (median)", f"skipped: {reason}"))
            continue
        url, ns = cfg.url(backend), cfg.namespace(f"aio-{backend}")
        lockfile = bench_aio.lockfile(cfg.tmpdir) if backend == "sqlite" else None
        res = bench_aio.pairs(url, ns, n, lockfile)
        for kind, lat in res.items():
            say(f"  {label} {kind}: median {us(median(lat))}, p99 {us(percentile(lat, 99))}")
        mine, blocking = median(res["async"]), median(res["blocking"])
        ROWS.append(
            Row(
                f"async pair {label} (median)",
                us(mine),
                f"blocking pair {us(blocking)}",
                f"{mine / blocking:.2f}x the time",
            )
        )
        if "filelock" in res:
            theirs = median(res["filelock"])
            ROWS.append(
                Row(
                    "async pair SQLite vs AsyncFileLock",
                    us(mine),
                    f"filelock.AsyncFileLock {us(theirs)}",
                    f"{theirs / mine:.2f}x faster",
                )
            )
        lags, took = bench_aio.loop_lag(url, ns, 50, 1.0 if cfg.quick else 3.0)
        p99 = percentile(lags, 99)
        say(
            f"  {label}: 50 coroutines took the name in turn in {took:.2f} s; "
            f"ticker lag p99 {ms(p99)}"
        )
        ROWS.append(
            Row(
                f"loop lag p99, 50 waiters, {label}",
                ms(p99),
                "",
                "",
                "< 20 ms",
                verdict(p99 < 0.020),
            )
        )
        share = bench_aio.idle_cpu(url, ns, 20, 2.0 if cfg.quick else 5.0)
        say(f"  {label}: 20 idle async waiters cost {share:.1%} of a core")
        ROWS.append(
            Row(
                f"20 idle async waiters, {label}",
                f"{share:.1%} of a core",
                "",
                "",
                "< 5 %",
                verdict(share < 0.05),
            )
        )


def print_table() -> None:
    headers = Row("test", "tasklocks", "baseline", "ratio", "target", "result")
    rows = [headers, *ROWS]
    cols = ["test", "tasklocks", "baseline", "ratio", "target", "result"]
    clip = {c: 60 for c in cols}
    widths = {c: min(clip[c], max(len(getattr(r, c)) for r in rows)) for c in cols}

    def line(r: Row) -> str:
        cells = []
        for c in cols:
            text = getattr(r, c)
            if len(text) > widths[c]:
                text = text[: widths[c] - 3] + "..."
            cells.append(text.ljust(widths[c]))
        return " | ".join(cells).rstrip()

    say("\n" + line(headers))
    say("-+-".join("-" * widths[c] for c in cols))
    for r in ROWS:
        say(line(r))
    passed = sum(r.result == "PASS" for r in ROWS)
    failed = sum(r.result == "FAIL" for r in ROWS)
    skipped = sum(1 for r in ROWS if r.target and not r.result)
    say(f"\n{passed} PASS, {failed} FAIL, {skipped} skipped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="NAME", help=", ".join(SECTIONS)
    )
    args = parser.parse_args(argv)
    only = set(args.only or SECTIONS)
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="tasklocks-bench-")
    cfg = Config(run_id=secrets.token_hex(4), tmpdir=tmpdir, quick=args.quick)
    say(
        f"tasklocks bench, run {cfg.run_id}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, temp dir {tmpdir}"
    )
    probe(cfg)
    redis_reason = probe_redis(cfg)
    for backend in BACKENDS:
        state = cfg.tasklocks_skip[backend]
        say(f"  {LABEL[backend]}: " + ("ready" if state is None else f"tasklocks skipped: {state}"))
    crew: Crew | None = None
    try:
        setup_baselines(
            cfg,
            [
                cfg.namespace("uncontended"),
                *(cfg.namespace(f"throughput-{k}") for k in BASELINE_NAMES),
                *bench_layout.namespaces(cfg),
            ],
        )
        if only & {"throughput", "handoff", "waiting", "layout"}:
            t = time.monotonic()
            crew = Crew(THROUGHPUT_WORKERS)
            say(f"started {THROUGHPUT_WORKERS} worker processes in {time.monotonic() - t:.1f} s")
        if "uncontended" in only:
            section_uncontended(cfg, redis_reason)
        if crew is not None and "throughput" in only:
            section_throughput(cfg, crew, redis_reason)
        if crew is not None and "handoff" in only:
            section_handoff(cfg, crew)
        if crew is not None and "waiting" in only:
            section_waiting(cfg, crew)
        if "docsize" in only:
            section_docsize(cfg)
        if "tasks" in only:
            section_tasks(cfg)
        if "fairness" in only:
            section_fairness(cfg)
        if crew is not None and "layout" in only:
            section_layout(cfg, crew)
        if "aio" in only:
            section_aio(cfg)
        if "floor" in only:
            section_floor(cfg)
    finally:
        if crew is not None:
            crew.close()
        for problem in teardown(cfg):
            say(f"cleanup: {problem}")
        shutil.rmtree(tmpdir, ignore_errors=True)
    print_table()
    say(f"\ntotal {time.monotonic() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
