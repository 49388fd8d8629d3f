"""SQLite's WAL under a steady load: its size, with tasklocks' bound and without it.

Usage: ``python bench/wal_bound.py [--seconds S] [--processes N] [--rounds R]``

N processes take and release a name each (distinct names, as in ``run.py`` section 2) on one
SQLite file for S seconds, in alternating rounds: ``bounded`` as shipped (``_bound_wal``: past
``WAL_LIMIT`` a RESTART checkpoint), ``unbounded`` with the look turned off (``WAL_LOOK_EVERY``
out of reach), which is SQLite's own behaviour. Each round prints pairs/s, p50/p99/p99.9 of a pair
and the largest size of the ``-wal`` file seen (sampled every 0.25 s). Without the bound the WAL
grows as long as the load lasts: SQLite starts it over only at a moment when no reader is in it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time

import tasklocks
from tasklocks.store import sqlite as sqlite_store


def _work(db: str, index: int, start_at: float, stop_at: float, bounded: bool) -> list[float]:
    if not bounded:
        sqlite_store.WAL_LOOK_EVERY = 1 << 62
    table = tasklocks.connect(f"sqlite:///{db}", "wal-bound")
    table.acquire(f"n{index}").release()
    took: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop_at:
        started = time.perf_counter()
        table.acquire(f"n{index}").release()
        took.append(time.perf_counter() - started)
    table.close()
    return took


def one_round(seconds: float, processes: int, bounded: bool) -> str:
    where = tempfile.mkdtemp(prefix="tasklocks-wal-")
    db = os.path.join(where, "locks.db")
    try:
        tasklocks.connect(f"sqlite:///{db}", "wal-bound").close()
        start_at = time.time() + 1.0
        args = [(db, i, start_at, start_at + seconds, bounded) for i in range(processes)]
        peak = 0
        with multiprocessing.Pool(processes) as pool:
            pending = pool.starmap_async(_work, args)
            while not pending.ready():
                time.sleep(0.25)
                with contextlib.suppress(OSError):  # (none yet, or just removed)
                    peak = max(peak, os.path.getsize(db + "-wal"))
            took = sorted(t for one in pending.get() for t in one)
    finally:
        shutil.rmtree(where, ignore_errors=True)

    def ms(q: float) -> str:
        return f"{took[min(len(took) - 1, int(len(took) * q))] * 1000:.1f} ms"

    label = "bounded" if bounded else "unbounded"
    return (
        f"{label:>9}: {len(took) / seconds:,.0f} pairs/s, p50 {ms(0.5)}, p99 {ms(0.99)}, "
        f"p99.9 {ms(0.999)}; WAL peak {peak / 1e6:,.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=14.0)
    parser.add_argument("--processes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        f"{args.processes} processes, {args.seconds:g} s a round, bound "
        f"{sqlite_store.WAL_LIMIT >> 20} MiB, {os.cpu_count()} CPUs",
        flush=True,
    )
    for _ in range(args.rounds):
        for bounded in (False, True):
            print(one_round(args.seconds, args.processes, bounded), flush=True)


if __name__ == "__main__":
    main()
