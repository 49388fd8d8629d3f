"""A Hypothesis state machine for the queue: FIFO waiters, shared and exclusive modes, counted
limits and deadlock detection, driven through the pure core as ``LockTable`` drives it (every
write is promoted).

Owners behave as single threads of work: an owner waits for at most one acquisition at a time and
does nothing else while it waits (it may give up: a timeout). The rules themselves are restated
here, independently of ``_core``, as the invariants:

* a name has one exclusive holder or only shared ones, all with one limit, never more than it;
* the queue is settled: after every write no waiter could be granted (so nothing waits for
  nothing);
* grants are FIFO: a waiter is granted only if no waiter still queued ahead of it wants one of
  its names in a conflicting way (for a counted name: the holders plus those waiters ahead fit
  the limit);
* no deadlock ever stays: if every owner that waits for nothing released what it holds, again
  and again, the queue would empty. So every cycle was reported (``Deadlocked``), and each
  ``Deadlocked`` is real: queueing that waiter would have left it stuck;
* a try is granted exactly when it would be granted at the end of the queue.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tasklocks._core import (
    EMPTY,
    EXCLUSIVE,
    SHARED,
    Claimant,
    Deadlocked,
    Granted,
    Holder,
    LockDoc,
    Queued,
    Refused,
    Waiter,
    Want,
    acquire,
    check_not_already_held,
    decode,
    encode,
    promote,
    reap,
    release,
    release_lease,
    release_owner,
)
from tasklocks.errors import LimitMismatch, LockHeld

NAMES = ("a", "b", "c")
OWNERS = ("task:1", "task:2", "task:3", "task:4")

wants_lists = st.lists(
    st.tuples(
        st.sampled_from(NAMES),
        st.sampled_from(["x", "s", "2", "3"]),  # exclusive, shared, limit 2, limit 3
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t[0],
)


def to_wants(spec: Sequence[tuple[str, str]]) -> tuple[Want, ...]:
    out = []
    for name, how in spec:
        if how == "x":
            out.append(Want(name))
        elif how == "s":
            out.append(Want(name, SHARED))
        else:
            out.append(Want(name, SHARED, int(how)))
    return tuple(out)


def admits(holders: Sequence[Holder], ahead: Sequence[Want], want: Want) -> bool:
    """The rule, restated: may ``want`` be granted next to ``holders``, behind ``ahead``?"""
    if want.mode == EXCLUSIVE:
        return not holders and not ahead
    if any(h.mode == EXCLUSIVE for h in holders) or any(a.mode == EXCLUSIVE for a in ahead):
        return False
    return want.limit is None or len(holders) + len(ahead) < want.limit


def grantable(doc: LockDoc, index: int, queue: Sequence[Waiter] | None = None) -> bool:
    q = doc.queue if queue is None else queue
    waiter = q[index]
    return all(
        admits(
            doc.holders(w.name),
            [x for e in q[:index] for x in e.wants if x.name == w.name],
            w,
        )
        for w in waiter.wants
    )


def stuck_after_everyone_finishes(doc: LockDoc, version: int) -> tuple[Waiter, ...]:
    """Let every owner that waits for nothing release all it holds, promote, and again, until
    nothing moves: the waiters left can never be granted."""
    for _ in range(100):
        waiting = {w.owner for w in doc.queue}
        idle = sorted({h.owner for _, h in doc.entries()} - waiting)
        if not idle:
            return doc.queue
        for owner in idle:
            doc, _ = release_owner(doc, owner)
        doc, _, _ = promote(doc, version=version, now=0.0)
    raise AssertionError("no fixpoint")


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.doc: LockDoc = EMPTY
        self.version = 0
        self.clock = 1000.0
        self.dead: set[str] = set()
        self.leases = itertools.count()
        self.holding: dict[str, set[str]] = {o: set() for o in OWNERS}  # granted lease ids
        self.deadlocks = 0
        self.stored: LockDoc | None = None  # the document as last stored in format 3

    # --- helpers ------------------------------------------------------------------------------

    def is_dead(self, entry: Holder | Waiter) -> bool:
        return entry.owner in self.dead

    def claimant(self, owner: str) -> Claimant:
        i = OWNERS.index(owner)
        return Claimant(
            owner, 100 + i, f"s{i}", "boot", "web-1", "ns", None, f"{owner}/{next(self.leases)}",
            None, f"session-{i}",
        )  # fmt: skip

    def waiting(self, owner: str) -> Waiter | None:
        return next((w for w in self.doc.queue if w.owner == owner), None)

    def commit(self, new: LockDoc, changed: bool, *, promoted: bool = False) -> None:
        """Write ``new`` as LockTable does: promoted (unless the step did it), version + 1."""
        if not changed:
            assert new is self.doc or new == self.doc
            return
        if not promoted:
            new, _, _ = promote(new, version=self.version, now=self.clock, is_dead=self.is_dead)
        self.check_fifo(self.doc, new)
        self.version += 1
        self.doc = new
        encode(new, compact=True)  # as LockTable writes it: the next changes keep its parts
        for owner in OWNERS:  # leases granted to waiters, and leases gone
            self.holding[owner] = {h.lease for _, h in new.entries() if h.owner == owner}

    def check_fifo(self, old: LockDoc, new: LockDoc) -> None:
        still = {w.lease for w in new.queue}
        held = {h.lease for _, h in new.entries()}
        for i, waiter in enumerate(old.queue):
            if waiter.lease in still or waiter.lease not in held:
                continue  # still waiting, or gone without being granted
            earlier = [e for e in old.queue[:i] if e.lease in still]
            for want in waiter.wants:
                ahead = [x for e in earlier for x in e.wants if x.name == want.name]
                if want.mode == EXCLUSIVE or any(x.mode == EXCLUSIVE for x in ahead):
                    assert not ahead, f"{waiter.owner} overtook a waiter for {want.name}"
                elif want.limit is not None:
                    count = len(new.holders(want.name))
                    assert count + len(ahead) <= want.limit, "a counted slot was overtaken"

    # --- rules --------------------------------------------------------------------------------

    @rule(owner=st.sampled_from(OWNERS), spec=wants_lists)
    def try_(self, owner: str, spec: list[tuple[str, str]]) -> None:
        self.acquire(owner, spec, False)

    @rule(owner=st.sampled_from(OWNERS), spec=wants_lists)
    def wait(self, owner: str, spec: list[tuple[str, str]]) -> None:
        self.acquire(owner, spec, True)

    @rule(owner=st.sampled_from(OWNERS), spec=wants_lists)
    def wait_too(self, owner: str, spec: list[tuple[str, str]]) -> None:
        self.acquire(owner, spec, True)

    def acquire(self, owner: str, spec: list[tuple[str, str]], queue: bool) -> None:
        if self.waiting(owner) is not None or owner in self.dead:
            return  # an owner waits for one thing at a time, and the dead do nothing
        wanted = to_wants(spec)
        me = self.claimant(owner)
        self.clock += 1
        try:
            check_not_already_held(self.doc, [w.name for w in wanted], owner)
        except LockHeld:
            return  # not re-entrant: LockTable refuses it before the core
        try:
            result = acquire(
                self.doc, wanted, me, version=self.version, now=self.clock,
                is_dead=self.is_dead, queue=queue,
            )  # fmt: skip
        except LimitMismatch as exc:
            entries = [h for h in self.doc.holders(exc.name) if h.mode == SHARED] + [
                x for w in self.doc.queue for x in w.wants if x.name == exc.name and x.shared
            ]
            assert any(e.limit != exc.asked for e in entries)
            return
        # The same call at the end of the queue (with the gone dropped), judged by the rule.
        tidy, _ = reap(self.doc, self.is_dead)
        tidy, _, _ = promote(tidy, version=self.version, now=self.clock)
        alone = tidy.derive(queue=(*tidy.queue, me.waiter(self.clock, wanted)))
        would = grantable(alone, len(alone.queue) - 1)
        if isinstance(result, Granted):
            assert would
            assert result.token == self.version + 1
            self.commit(result.doc, True, promoted=True)
            assert me.lease in self.holding[owner]
        elif isinstance(result, Refused):
            assert not queue and not would
            self.commit(result.doc, result.changed, promoted=True)
        elif isinstance(result, Queued):
            assert queue and not would
            assert result.doc.queue[-1].lease == me.lease
            self.commit(result.doc, True, promoted=True)
        else:
            assert isinstance(result, Deadlocked)
            assert queue and not would
            assert result.owners[0] == owner
            assert len(result.cycle) == len(result.owners) >= 2
            assert all(
                phrase.startswith(o) for phrase, o in zip(result.cycle, result.owners, strict=True)
            )
            queued, _, _ = promote(alone, version=self.version, now=self.clock)
            stuck = stuck_after_everyone_finishes(queued, self.version)
            assert me.lease in {w.lease for w in stuck}, "a deadlock reported that is none"
            assert me.lease not in {w.lease for w in result.doc.queue}
            self.deadlocks += 1
            self.commit(result.doc, result.changed, promoted=True)

    @rule(owner=st.sampled_from(OWNERS))
    def poll(self, owner: str) -> None:
        """A waiter runs its acquisition again (woken): it keeps its place, or is granted."""
        waiter = self.waiting(owner)
        if waiter is None:
            return
        me = Claimant(
            owner, waiter.pid, waiter.start, waiter.boot, waiter.host, waiter.pidns, None,
            waiter.lease, None, waiter.session,
        )  # fmt: skip
        result = acquire(
            self.doc, waiter.wants, me, version=self.version, now=self.clock + 1,
            is_dead=self.is_dead, queue=True,
        )  # fmt: skip
        assert isinstance(result, Queued | Granted)
        if isinstance(result, Queued):
            assert result.doc.waiter(waiter.lease) == waiter  # the same place, not re-queued
            if not self.dead:
                assert result.changed is False
        self.commit(result.doc, result.changed, promoted=True)

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def release_one(self, owner: str, data: st.DataObject) -> None:
        if not self.holding[owner] or self.waiting(owner) is not None:
            return
        lease = data.draw(st.sampled_from(sorted(self.holding[owner])))
        names = sorted({n for n, h in self.doc.entries() if h.lease == lease})
        self.commit(release(self.doc, names, owner, lease=lease), True)

    @rule(owner=st.sampled_from(OWNERS))
    def give_up(self, owner: str) -> None:
        """A waiter times out (or is stopped): it leaves the queue."""
        waiter = self.waiting(owner)
        if waiter is None:
            return
        new, freed = release_lease(self.doc, waiter.lease)
        assert freed == []
        self.commit(new, True)

    @rule(owner=st.sampled_from(OWNERS))
    def die(self, owner: str) -> None:
        self.dead.add(owner)

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data())
    def revive(self, data: st.DataObject) -> None:
        self.dead.discard(data.draw(st.sampled_from(sorted(self.dead))))

    @rule()
    def reap(self) -> None:
        new, _ = reap(self.doc, self.is_dead)
        dropped = [w for w in self.doc.queue if self.is_dead(w)]
        self.commit(new, new is not self.doc)
        assert not any(w in self.doc.queue for w in dropped)

    @rule()
    def store_and_reload(self) -> None:
        # Format 3 first, from the parts the changes since the last reload kept up to date.
        compact = encode(self.doc, compact=True)
        assert decode(compact, "ns") == self.doc
        text = encode(self.doc)  # formats 1 and 2 (this drops the kept format-3 parts)
        loaded = decode(text, "ns")
        assert loaded == self.doc
        fresh = encode(decode(text, "ns"), compact=True)
        assert json.loads(compact) == json.loads(fresh)  # the kept parts are the fresh ones
        if self.stored is not None:  # read by a process that saw the document stored before
            again = decode(compact, "ns", self.stored)
            assert again == self.doc
            assert json.loads(encode(again, compact=True)) == json.loads(compact)
        self.stored = decode(compact, "ns")
        encode(self.stored, compact=True)  # its parts are kept, for the next read
        assert ('"format":1' in text) == (not self.doc.queue and not any(
            h.mode != EXCLUSIVE or len(self.doc.holders(n)) > 1 for n, h in self.doc.entries()
        ))  # fmt: skip
        self.doc = loaded
        encode(loaded, compact=True)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def modes_and_limits_hold(self) -> None:
        for name in self.doc:
            holders = self.doc.holders(name)
            assert holders
            if len(holders) > 1 or holders[0].mode == SHARED:
                assert all(h.mode == SHARED for h in holders), f"{name}: shared and exclusive"
                assert len({h.limit for h in holders}) == 1, f"{name}: limits differ"
                limit = holders[0].limit
                assert limit is None or len(holders) <= limit, f"{name}: over its limit"

    @invariant()
    def queue_is_settled(self) -> None:
        for i in range(len(self.doc.queue)):
            assert not grantable(self.doc, i), f"{self.doc.queue[i].owner} could be granted"

    @invariant()
    def no_deadlock_stays(self) -> None:
        assert stuck_after_everyone_finishes(self.doc, self.version) == ()

    @invariant()
    def entries_are_consistent(self) -> None:
        leases = [w.lease for w in self.doc.queue]
        assert len(leases) == len(set(leases))
        held = {h.lease for _, h in self.doc.entries()}
        assert not held & set(leases), "a lease both holds and waits"
        assert len({w.owner for w in self.doc.queue}) == len(self.doc.queue)
        assert all(h.token <= self.version for _, h in self.doc.entries())


QueueMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase


def test_the_machine_can_reach_a_deadlock() -> None:
    """The machine's deadlock rule is not vacuous: two owners crossing is reported."""
    m = QueueMachine()
    m.acquire("task:1", [("a", "x")], False)
    m.acquire("task:2", [("b", "x")], False)
    m.acquire("task:1", [("b", "x")], True)
    m.acquire("task:2", [("a", "x")], True)
    assert m.deadlocks == 1
    m.no_deadlock_stays()
