"""Many processes on one lock table, per backend: never two holders at once, even when holders
are SIGKILLed.

The workers (``_workers.py``) are real processes started with ``subprocess``; they report on
stdout, one JSON object per line. Two holders of one name would show as an occupancy marker that
already exists, a counter that lost an increment, or a fencing token that went backwards.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
from _harness import Message, workers

import tasklocks
from tasklocks import Liveness

pytestmark = pytest.mark.stress

PROCESSES = 8
NAMES = ["n0", "n1", "n2", "n3", "n4"]
# Sized for a 2-core machine: SQLite hands over much faster than the servers.
ITERATIONS = {"sqlite": 150, "mysql": 150, "postgresql": 150}


def backend(db_url: str) -> str:
    return tasklocks.store.parse_url(db_url).scheme


def test_overlapping_sets_are_never_held_twice(db_url: str, namespace: str, tmp_path: Path) -> None:
    iterations = int(os.environ.get("TASKLOCKS_STRESS_ITERATIONS", ITERATIONS[backend(db_url)]))
    base_seed = random.randrange(2**32)
    configs = [
        {
            "url": db_url,
            "namespace": namespace,
            "names": NAMES,
            "dir": str(tmp_path),
            "iterations": iterations,
            "pause": 0.0005,
            "seed": base_seed + i,
        }
        for i in range(PROCESSES)
    ]
    results: dict[int, Message] = {}
    with workers("occupancy", configs) as w:
        w.start()
        ended = 0
        while ended < PROCESSES:
            index, msg = w.next()
            if msg is None:
                ended += 1
            else:
                results[index] = msg
        for proc in w.procs:
            assert proc.wait() == 0
    assert sorted(results) == list(range(PROCESSES)), f"seed {base_seed}"

    violations = [v for r in results.values() for v in r["violations"]]
    assert violations == [], f"seed {base_seed}"

    expected: Counter[str] = Counter()
    for r in results.values():
        expected.update(r["counts"])
    acquisitions = [(token, names) for r in results.values() for token, names in r["acquisitions"]]
    assert len(acquisitions) == PROCESSES * iterations
    for name in NAMES:  # waiters granted by one write share its token, never on one name
        tokens = [token for token, names in acquisitions if name in names]
        assert len(set(tokens)) == len(tokens), f"a fencing token of {name} was handed out twice"
    for name in NAMES:
        count, last_token = _read_counter(tmp_path, name)
        assert count == expected[name], f"{name}: lost updates (seed {base_seed})"
        assert last_token == max((t for t, ns in acquisitions if name in ns), default=0)
        assert not (tmp_path / f"{name}.held").exists()

    with tasklocks.connect(db_url, namespace=namespace) as table:
        assert table.held() == []


def _read_counter(directory: Path, name: str) -> tuple[int, int]:
    path = directory / f"{name}.count"
    if not path.exists():
        return 0, 0
    count, token = path.read_text().split()
    return int(count), int(token)


ROUNDS = 6
KILLS = 4


def test_killed_holders_are_replaced_and_never_held_twice(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    """Every worker wants ``k0`` (and maybe ``k1`` or ``k2``) for several rounds. The test tells
    each holder when to release, and instead SIGKILLs a random holder at a few random moments
    while the others wait: the next contender must take the lock from the dead holder."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    configs = [
        {
            "url": db_url,
            "namespace": namespace,
            "dir": str(tmp_path),
            "rounds": ROUNDS,
            "seed": seed + i,
        }
        for i in range(PROCESSES)
    ]
    # Kill at these holding events (counted from 0); early enough that others still want k0.
    kill_at = sorted(rng.sample(range(PROCESSES * ROUNDS // 2), KILLS))
    holders: dict[str, int] = {}  # name -> index of the worker holding it (as far as we know)
    rounds = [0] * PROCESSES
    killed: dict[int, int] = {}  # index -> pid
    awaiting_reclaim: dict[int, set[str]] = {}  # pid of a killed holder -> its names not retaken
    warnings: list[str] = []
    done: set[int] = set()
    events = 0
    with workers("killable", configs) as w:
        w.start()
        ended = 0
        while ended < PROCESSES:
            index, msg = w.next()
            if msg is None:
                ended += 1
                continue
            if "done" in msg:
                done.add(index)
                continue
            names: list[str] = msg["holding"]
            where = f"event {events} (seed {seed}): worker {index} holding {names}"
            assert msg["violations"] == [], where
            for name in names:
                previous = holders.get(name)
                assert previous is None or previous in killed, f"{where}: {name} held twice"
                # A marker left by a killed holder is stale; any other marker would be a bug.
                assert (name in msg["stale"]) == (previous is not None), where
                if previous is not None:
                    awaiting_reclaim[killed[previous]].discard(name)
                holders[name] = index
            warnings += msg["warnings"]
            rounds[index] += 1
            others_want_k0 = any(
                j != index and j not in killed and rounds[j] < ROUNDS for j in range(PROCESSES)
            )
            if kill_at and events >= kill_at[0] and others_want_k0:
                kill_at.pop(0)
                w.procs[index].send_signal(signal.SIGKILL)  # left a zombie until the end
                killed[index] = msg["pid"]
                awaiting_reclaim[msg["pid"]] = set(names)
            else:
                for name in names:
                    del holders[name]
                w.tell(index, "release")
            events += 1
        codes = {i: p.wait() for i, p in enumerate(w.procs)}

    assert kill_at == [], f"only {len(killed)} of {KILLS} kills happened (seed {seed})"
    assert len(killed) == KILLS
    for index, code in codes.items():
        if index in killed:
            assert code == -signal.SIGKILL
        else:
            assert code == 0
            assert index in done
            assert rounds[index] == ROUNDS
    # Every killed holder's k0 was taken over by a later contender, which logged the reclaim.
    for pid, left in awaiting_reclaim.items():
        assert "k0" not in left, f"k0 of killed pid {pid} was never taken over (seed {seed})"
        assert any(f"pid {pid} " in m and "k0" in m for m in warnings), (pid, warnings)

    # What is still held belongs to killed holders only (names nobody wanted afterwards).
    with tasklocks.connect(db_url, namespace=namespace) as table:
        held = table.held()
        leftovers = {pid: names for pid, names in awaiting_reclaim.items() if names}
        assert {(h.name, h.holder.pid) for h in held} == {
            (name, pid) for pid, names in leftovers.items() for name in names
        }
        assert {h.liveness for h in held} <= {Liveness.DEAD}
        reaped = table.reap()
        assert {(n, h.pid) for n, h in reaped} == {(h.name, h.holder.pid) for h in held}
        assert table.held() == []
