"""Profile tasklocks in the cases the benchmark shows to be the slowest.

Usage: ``python bench/profile_worst.py [--backend NAME...] [--case throughput|docsize|waiting ...]``

* ``throughput``: 32 processes taking and releasing distinct names (as in ``run.py`` section 2),
  each under cProfile with its default wall-clock timer, so time spent sleeping in a backoff or
  blocked on the database shows up as well as Python work. The statistics are merged.
* ``docsize``: one process, one more acquire+release with 1,000 locks held (section 5).
* ``waiting``: one waiter blocked on a held lock (section 4), to see what its polling costs.

Profiling slows Python code down (roughly 2x), which lengthens every critical section, so read the
output for where the time goes, not for absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import glob
import pstats
import secrets
import shutil
import sys
import tempfile
import time

from bench_common import BACKENDS, Config, probe
from bench_crew import Crew, LoopResult
from bench_pairs import TASKLOCKS, PairSpec, teardown


def report(stats: pstats.Stats, title: str, top: int) -> None:
    stats.files = []  # type: ignore[attr-defined]  # do not list 32 file names in every header
    print(f"\n--- {title}: top {top} by own time (all code) ---", flush=True)
    stats.sort_stats("tottime").print_stats(top)
    print(f"--- {title}: top {top} tasklocks functions by cumulative time ---", flush=True)
    stats.sort_stats("cumulative").print_stats(r"src/tasklocks/", top)


def profile_throughput(cfg: Config, crew: Crew, backend: str, duration: float, top: int) -> None:
    kind = TASKLOCKS[backend]
    ns = cfg.namespace(f"profile-{kind}")
    prefix = f"{cfg.tmpdir}/prof-{kind}"
    task = crew.submit(
        {
            i: ("loop", (PairSpec(kind, cfg, ns, f"w{i}"), duration, prefix))
            for i in range(crew.size)
        }
    )
    results: dict[int, LoopResult] = crew.collect(task, crew.size, timeout=duration + 180)
    pairs = sum(len(r.latencies) for r in results.values())
    print(f"\n=== {backend}: {crew.size} processes, {pairs / duration:,.0f} pairs/s under cProfile")
    stats = pstats.Stats(*sorted(glob.glob(prefix + ".*")))
    report(stats, f"{backend} throughput ({pairs} pairs)", top)


def profile_docsize(cfg: Config, backend: str, n: int, top: int) -> None:
    import tasklocks

    with tasklocks.connect(cfg.url(backend), cfg.namespace(f"profile-docsize-{backend}")) as t:
        leases = [t.acquire(*[f"held-{i}" for i in range(j, j + 100)]) for j in range(0, 1000, 100)]
        for _ in range(5):
            t.acquire("extra").release()
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for _ in range(n):
            t.acquire("extra").release()
        prof.disable()
        took = time.perf_counter() - start
        for lease in leases:
            lease.release()
    print(f"\n=== {backend}: 1,000 held, {took / n * 1e6:,.0f} us per pair under cProfile")
    stats = pstats.Stats(prof)
    report(stats, f"{backend} docsize ({n} pairs)", top)


def profile_waiting(cfg: Config, backend: str, seconds: float, top: int) -> None:
    """One waiter blocked on a lock held (under another owner) by this same process."""
    import tasklocks

    with tasklocks.connect(cfg.url(backend), cfg.namespace(f"profile-waiting-{backend}")) as t:
        lease = t.acquire("busy", owner="holder")
        prof = cProfile.Profile()
        cpu0 = time.process_time()
        prof.enable()
        with contextlib.suppress(tasklocks.LockTimeout):
            t.acquire("busy", wait=True, timeout=seconds)
        prof.disable()
        cpu = time.process_time() - cpu0
        lease.release()
    print(f"\n=== {backend}: one waiter, {cpu / seconds * 100:.1f}% of a core under cProfile")
    stats = pstats.Stats(prof)
    report(stats, f"{backend} waiting ({seconds:g} s)", top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["sqlite", "postgresql"])
    parser.add_argument(
        "--case", nargs="+", choices=("throughput", "docsize", "waiting"), default=None
    )
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cases = set(args.case or ("throughput", "docsize", "waiting"))
    tmpdir = tempfile.mkdtemp(prefix="tasklocks-profile-")
    cfg = Config(run_id=secrets.token_hex(4), tmpdir=tmpdir, quick=False)
    probe(cfg)
    crew = Crew(32) if "throughput" in cases else None
    try:
        for backend in args.backend:
            if cfg.tasklocks_skip[backend] is not None:
                print(f"{backend}: skipped: {cfg.tasklocks_skip[backend]}")
                continue
            if crew is not None:
                profile_throughput(cfg, crew, backend, args.duration, args.top)
            if "docsize" in cases:
                profile_docsize(cfg, backend, 100, args.top)
            if "waiting" in cases:
                profile_waiting(cfg, backend, args.duration, args.top)
    finally:
        if crew is not None:
            crew.close()
        teardown(cfg)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
