"""Where a contended pair's CPU goes, the clients' and the server's, against the advisory locks.

Usage: ``python bench/cpu_split.py [--backend mysql|postgresql ...] [--procs N] [--seconds S]
[--rounds R]``

Section 2 of ``make bench`` runs 32 processes on distinct names on a 2-core machine: both cores are
busy, so the rate follows the CPU a pair costs, the clients' and the server's together. This runs
the same pairs (tasklocks, the advisory lock, and tasklocks' own two statements from a client that
does nothing else) from N processes for S seconds each and reads what they cost:

- the clients' CPU: each worker's user + system time over its loop (``os.times``);
- the server's CPU: ``/proc`` of the server's processes (``mariadbd``'s threads; every
  ``postgres`` process, its WAL writer included) over the same seconds, so the server must run on
  this machine.

It prints, a pair, the clients' and the server's microseconds and their sum, and the ratio of the
sums against the advisory lock's: the rate ratio the CPU alone allows (design.md, "MariaDB: no key
over the held names, and prepared row statements"). The figures move with the machine; compare
within a run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier, Event

from bench_common import Config
from bench_pairs import BACKEND_OF, BASELINE_NAMES, PairSpec, advisory_key, open_pair

import tasklocks

KINDS = {
    "mysql": ("tl-mysql", "stmt-mysql", "getlock-mysql"),
    "postgresql": ("tl-pg", "stmt-pg", "adv-pg"),
}
SERVER_COMM = {"mysql": "mariadbd", "postgresql": "postgres"}
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(backend: str) -> float:
    """Seconds of CPU the server's processes have used (their reaped children's too)."""
    total = 0.0
    wanted = {SERVER_COMM[backend], "mysqld"} if backend == "mysql" else {"postgres"}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue  # ended meanwhile
        if head.split("(", 1)[1] not in wanted:
            continue
        fields = rest.split()  # fields[0] is the state (field 3): utime is field 14
        total += sum(int(v) for v in fields[11:15]) / TICK  # utime, stime, cutime, cstime
    return total


@dataclass(frozen=True)
class Done:
    pairs: int
    cpu: float  # the worker's user + system seconds over its loop


def _worker(
    spec: PairSpec, seconds: float, start: Barrier, stop: Barrier, leave: Event, out: mp.Queue[Done]
) -> None:
    pair = open_pair(spec)
    for _ in range(50):  # warm: connections, prepared statements, the name's row
        pair.pair()
    start.wait()
    before = os.times()
    deadline = time.monotonic() + seconds
    pairs = 0
    while time.monotonic() < deadline:
        pair.pair()
        pairs += 1
    after = os.times()
    out.put(Done(pairs, after.user - before.user + after.system - before.system))
    stop.wait()
    leave.wait()  # connections stay open until the server's CPU is read
    pair.close()


def run(cfg: Config, kind: str, procs: int, seconds: float) -> tuple[float, float, float]:
    """pairs a second, the clients' and the server's CPU microseconds a pair."""
    backend = BACKEND_OF[kind]
    ctx = mp.get_context("fork")
    start, stop, leave = ctx.Barrier(procs + 1), ctx.Barrier(procs + 1), ctx.Event()
    out: mp.Queue[Done] = ctx.Queue()
    namespace = cfg.namespace("cpu")
    workers = [
        ctx.Process(
            target=_worker,
            args=(
                PairSpec(kind, cfg, namespace, f"n{i}", advisory_key(cfg, i)),
                seconds,
                start,
                stop,
                leave,
                out,
            ),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    start.wait()
    began, cpu0 = time.monotonic(), server_cpu(backend)
    stop.wait()
    elapsed, cpu1 = time.monotonic() - began, server_cpu(backend)
    leave.set()
    done = [out.get() for _ in workers]
    for w in workers:
        w.join()
    pairs = sum(d.pairs for d in done)
    return pairs / elapsed, 1e6 * sum(d.cpu for d in done) / pairs, 1e6 * (cpu1 - cpu0) / pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(KINDS), action="append")
    parser.add_argument("--procs", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tasklocks-cpu-") as tmpdir:
        cfg = Config(run_id=uuid.uuid4().hex[:8], tmpdir=tmpdir, quick=False)
        for backend in args.backend or sorted(KINDS):
            tasklocks.connect(cfg.url(backend), cfg.namespace("cpu")).close()  # the tables
            print(f"== {backend}: {args.procs} processes, {args.seconds:g} s a kind ==")
            for round_ in range(1, args.rounds + 1):
                totals = {}
                for kind in KINDS[backend]:
                    rate, client, server = run(cfg, kind, args.procs, args.seconds)
                    totals[kind] = client + server
                    print(
                        f"  round {round_} {BASELINE_NAMES[kind]}: {rate:,.0f} pairs/s, a pair: "
                        f"clients {client:.0f} us + server {server:.0f} us "
                        f"= {client + server:.0f} us"
                    )
                tl, stmt, adv = KINDS[backend]
                print(
                    f"  round {round_}: CPU a pair against {BASELINE_NAMES[adv]}'s: tasklocks "
                    f"{totals[adv] / totals[tl]:.2f}x, its statements alone "
                    f"{totals[adv] / totals[stmt]:.2f}x"
                )


if __name__ == "__main__":
    main()
