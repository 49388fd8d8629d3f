"""Fair queues with real processes, per backend: a multi-name waiter is not starved, a counted
name never admits more than its limit, readers share and a writer gets its turn, a two-process
deadlock is reported at once, and a SIGKILLed waiter at the head of a queue does not block it.

The workers (``_workers.py``) are real processes; occupancy is checked with marker files they
make while they hold a lock (see ``occupant``), never by trusting tasklocks' own view.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from _harness import Message, Workers, workers

import tasklocks
from tasklocks import Liveness

pytestmark = pytest.mark.stress

SOON = 20.0  # upper bound for what should happen at once; never the reason a test passes


def _collect(w: Workers, n: int) -> dict[int, Message]:
    """The last message of each of ``n`` workers, once all have ended."""
    results: dict[int, Message] = {}
    ended = 0
    while ended < n:
        index, msg = w.next()
        if msg is None:
            ended += 1
        else:
            results[index] = msg
    return results


def test_a_two_name_waiter_is_not_starved_by_rivals_taking_turns(
    db_url: str, namespace: str
) -> None:
    """Two workers take a and b in turn (50 ms each, offset by 25 ms) without pause; a third
    wants {a, b} at once, ten times: each wait ends within a second (FIFO: once it queues, the
    rivals queue behind it)."""
    base = {"url": db_url, "namespace": namespace}
    rivals = [
        {**base, "name": "a", "hold": 0.05, "gap": 0.0, "offset": 0.0},
        {**base, "name": "b", "hold": 0.05, "gap": 0.0, "offset": 0.025},
    ]
    with (
        workers("turns", rivals) as r,
        workers(
            "pair", [{**base, "names": ["a", "b"], "rounds": 10, "pause": 0.1, "hold": 0.01}]
        ) as p,
    ):
        r.start()
        time.sleep(0.3)  # the rivals are in their stride
        p.start()
        [result] = _collect(p, 1).values()
        for i in range(2):
            r.tell(i, "stop")
        turns = _collect(r, 2)
    waits = result["waits"]
    summary = (
        f"{db_url.split(':')[0]}: waits of the {{a, b}} waiter: max {max(waits) * 1000:.0f} ms, "
        f"median {statistics.median(waits) * 1000:.0f} ms"
    )
    print(summary)
    assert len(waits) == 10
    assert max(waits) < 1.0, summary
    assert all(t["turns"] > 0 for t in turns.values())  # the rivals really ran


def test_six_processes_on_a_limit_of_three(db_url: str, namespace: str, tmp_path: Path) -> None:
    cfg = {
        "url": db_url,
        "namespace": namespace,
        "name": "app_tasks",
        "kind": "slot",
        "limit": 3,
        "dir": str(tmp_path),
        "rounds": 12,
        "hold": 0.03,
        "gap": 0.0,
    }
    with workers("occupant", [cfg] * 6) as w:
        w.start()
        results = _collect(w, 6)
        assert [p.wait() for p in w.procs] == [0] * 6
    assert [v for r in results.values() for v in r["violations"]] == []
    assert max(r["most"] for r in results.values()) == 3  # the limit was reached, never passed
    with tasklocks.connect(db_url, namespace=namespace) as table:
        assert table.held() == [] and table.waiting() == []


def test_readers_share_and_a_writer_gets_its_turn(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"  # (the SQLite database lives in tmp_path)
    markers.mkdir()
    base = {"url": db_url, "namespace": namespace, "name": "db", "dir": str(markers)}
    readers = [{**base, "kind": "reader", "rounds": 15, "hold": 0.03, "gap": 0.005}] * 4
    writer = [{**base, "kind": "writer", "rounds": 6, "hold": 0.02, "gap": 0.05}]
    with workers("occupant", readers + writer) as w:
        w.start()
        results = _collect(w, 5)
        assert [p.wait() for p in w.procs] == [0] * 5
    assert [v for r in results.values() for v in r["violations"]] == []
    assert max(results[i]["most"] for i in range(4)) >= 2  # readers did share
    writer_waits = results[4]["waits"]
    assert len(writer_waits) == 6
    assert max(writer_waits) < 2.0, f"the writer waited {max(writer_waits):.2f}s"


class Script:
    """Scripted workers: commands to one, answers from one (others' answers wait their turn;
    the end of a worker's output, as when it is killed, is skipped)."""

    def __init__(self, w: Workers) -> None:
        self.w = w
        self.pending: dict[int, list[Message]] = {}
        for i in range(len(w.procs)):
            assert "ready" in self.answer(i)

    def ask(self, index: int, **cmd: Any) -> None:
        self.w.tell(index, json.dumps(cmd))

    def answer(self, index: int) -> Message:
        while not self.pending.get(index):
            got, msg = self.w.next()
            if msg is None:
                assert got != index, f"worker {index} died"
                continue
            self.pending.setdefault(got, []).append(msg)
        return self.pending[index].pop(0)


def _until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + SOON
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_two_process_deadlock_is_reported_at_once(db_url: str, namespace: str) -> None:
    cfg = {"url": db_url, "namespace": namespace}
    with (
        workers("scripted", [cfg, cfg]) as w,
        tasklocks.connect(db_url, namespace=namespace) as table,
    ):
        s = Script(w)
        s.ask(0, op="acquire", names=["x"], key="x")
        assert "granted" in s.answer(0)
        s.ask(1, op="acquire", names=["y"], key="y")
        assert "granted" in s.answer(1)
        s.ask(0, op="acquire", names=["y"], key="y", wait=True, timeout=60)
        _until(lambda: len(table.waiting()) == 1, "the first process queued for y")
        started = time.monotonic()
        s.ask(1, op="acquire", names=["x"], key="x", wait=True, timeout=60)
        refused = s.answer(1)
        took = time.monotonic() - started
        assert refused["error"] == "Deadlock", refused
        assert took < 5.0, f"the deadlock took {took:.1f}s to report"
        pids = [p.pid for p in w.procs]
        assert f":{pids[1]} holds y and waits for x" in refused["message"]
        assert f":{pids[0]} holds x and waits for y" in refused["message"]
        s.ask(1, op="release", key="y")
        assert s.answer(1) == {"released": "y"}
        assert "granted" in s.answer(0)  # the older waiter goes on once the cycle is broken


def test_a_sigkilled_waiter_at_the_head_does_not_block_the_queue(
    db_url: str, namespace: str
) -> None:
    cfg = {"url": db_url, "namespace": namespace}
    with (
        tasklocks.connect(db_url, namespace=namespace) as table,
        workers("scripted", [cfg, cfg]) as w,
    ):
        s = Script(w)
        lease = table.acquire("a")
        for i in range(2):
            s.ask(i, op="acquire", names=["a"], key="a", wait=True, timeout=60)
            _until(lambda i=i: len(table.waiting()) == i + 1, f"waiter {i} queued")
        head, second = w.procs
        assert [q.waiter.pid for q in table.waiting()] == [head.pid, second.pid]
        os.kill(head.pid, signal.SIGKILL)
        head.wait()
        _until(lambda: table.waiting()[0].liveness is Liveness.DEAD, "the head seen dead")
        started = time.monotonic()
        lease.release()
        granted = s.answer(1)
        took = time.monotonic() - started
        assert "granted" in granted, granted
        assert took < 2.0, f"the second waiter got it {took:.1f}s after the release"
        assert table.waiting() == []
        assert [h.holder.pid for h in table.held()] == [second.pid]


def test_a_waiter_killed_while_nobody_writes_leaves_the_queue(db_url: str, namespace: str) -> None:
    """The head waiter wants {a, b}; b's holder is the test. The second waiter wants only a,
    which is free: once the head is SIGKILLed, the second gets a by itself (its death check)."""
    cfg = {"url": db_url, "namespace": namespace}
    with (
        tasklocks.connect(db_url, namespace=namespace) as table,
        workers("scripted", [cfg, cfg]) as w,
    ):
        s = Script(w)
        lease = table.acquire("b")
        s.ask(0, op="acquire", names=["a", "b"], key="ab", wait=True, timeout=60)
        _until(lambda: len(table.waiting()) == 1, "the head queued")
        s.ask(1, op="acquire", names=["a"], key="a", wait=True, timeout=60)
        _until(lambda: len(table.waiting()) == 2, "the second queued behind it")
        os.kill(w.procs[0].pid, signal.SIGKILL)
        started = time.monotonic()
        granted = s.answer(1)
        took = time.monotonic() - started
        assert "granted" in granted, granted
        assert took < 3.0, f"the second waiter got a {took:.1f}s after the head died"
        lease.release()
