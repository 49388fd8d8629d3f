"""A Hypothesis state machine driving the pure core against a plain dict model.

The model maps each held name to ``(owner, lease, token, since)``. Every transition's result is
predicted from the model, then compared with what the core returns; afterwards the document must
equal the model exactly. The machine keeps the row ``version`` itself, bumping it by one whenever a
transition reports a change, as the caller's compare-and-swap write would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tasklocks._core import (
    EMPTY,
    Claimant,
    Document,
    Encoder,
    Granted,
    Holder,
    Refused,
    Waiter,
    acquire,
    decode,
    encode,
    reap,
    release,
    release_all,
    release_owner,
)
from tasklocks.errors import NotHeld

NAMES = ("a", "b", "c", "d", "e")
OWNERS = ("task:1", "task:2", "task:3", "cli:ops")
LEASES = ("l0", "l1")


def _claimant(i: int, owner: str, lease: str) -> Claimant:
    pid = None if owner.startswith("cli:") else 1000 + i
    return Claimant(
        owner=owner,
        pid=pid,
        start=None if pid is None else f"start-{i}",
        boot="boot-a",
        host="web-1",
        pidns="ns-1",
        pgid=pid,
        lease=f"{owner}/{lease}",
        note=None if pid is None else f"note {i}",
    )


CLAIMANTS: Mapping[tuple[str, str], Claimant] = {
    (owner, lease): _claimant(i, owner, lease)
    for i, (owner, lease) in enumerate((o, le) for o in OWNERS for le in LEASES)
}

names_lists = st.lists(st.sampled_from(NAMES), min_size=1, max_size=6)
owners = st.sampled_from(OWNERS)
leases = st.sampled_from(LEASES)


class Entry(NamedTuple):
    owner: str
    lease: str  # the full lease id
    token: int
    since: float


class LockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.doc: Document = EMPTY
        self.model: dict[str, Entry] = {}
        self.version = 0
        self.clock = 1000.0
        self.dead: set[str] = set()
        self.last_token = 0
        self.encoder = Encoder()

    # --- helpers ----------------------------------------------------------------------------------

    def is_dead(self, entry: Holder | Waiter) -> bool:
        return entry.owner in self.dead

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def commit(self, new: Document, changed: bool) -> None:
        """Adopt ``new`` as the stored document; the write bumps the version if anything changed."""
        if changed:
            self.version += 1
        else:
            assert new is self.doc, "an unchanged transition must return the same document"
        self.doc = new

    def check_removed_only(self, new: Document, *, allowed: set[str]) -> None:
        """Every entry missing from ``new`` (or replaced) belonged to an owner in ``allowed``."""
        for name, old in self.doc.items():
            if new.get(name) != old:
                assert old.owner in allowed, f"{name} of live {old.owner} removed"

    # --- rules ------------------------------------------------------------------------------------

    @rule(owner=owners)
    def mark_dead(self, owner: str) -> None:
        self.dead.add(owner)

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data())
    def revive(self, data: st.DataObject) -> None:
        # The predicate may change between reads (a holder once judged unknown becomes provable, or
        # the opposite); the core must not care.
        self.dead.discard(data.draw(st.sampled_from(sorted(self.dead))))

    @rule(names=names_lists, owner=owners, lease=leases)
    def acquire(self, names: list[str], owner: str, lease: str) -> None:
        claimant = CLAIMANTS[owner, lease]
        now = self.tick()
        wanted = list(dict.fromkeys(names))

        # Predict from the model.
        mine = all(n in self.model and self.model[n].lease == claimant.lease for n in wanted)
        will_reap = {n for n in wanted if n in self.model and self.model[n].owner in self.dead}
        will_block = {n for n in wanted if n in self.model and n not in will_reap}

        result = acquire(
            self.doc, names, claimant, version=self.version, now=now, is_dead=self.is_dead
        )

        if mine:
            assert isinstance(result, Granted)
            assert result.changed is False
            assert result.token == self.model[wanted[0]].token
            assert result.reaped == ()
            self.commit(result.doc, False)
            return

        assert {name for name, _ in result.reaped} == will_reap
        for name, old in result.reaped:
            assert old == self.doc[name]
        self.check_removed_only(result.doc, allowed=self.dead)
        for name in will_reap:
            del self.model[name]

        if will_block:
            assert isinstance(result, Refused)
            assert set(result.blockers) == will_block
            for name, blocker in result.blockers.items():
                assert blocker == self.doc[name]
            assert result.changed is bool(will_reap)
            # All-or-nothing: nothing wanted was taken.
            assert not any(
                n in result.doc and result.doc[n].lease == claimant.lease
                for n in wanted
                if n not in self.doc or self.doc[n].lease != claimant.lease
            )
            self.commit(result.doc, result.changed)
            return

        assert isinstance(result, Granted)
        assert result.changed is True
        assert result.token == self.version + 1
        assert result.token > self.last_token, "tokens must strictly increase"
        self.last_token = result.token
        for name in wanted:
            assert result.doc[name] == claimant.holder(now, result.token)
            self.model[name] = Entry(owner, claimant.lease, result.token, now)
        self.commit(result.doc, True)

    @rule(
        names=names_lists,
        owner=owners,
        lease=st.none() | leases,
    )
    def release(self, names: list[str], owner: str, lease: str | None) -> None:
        lease_id = None if lease is None else CLAIMANTS[owner, lease].lease

        def mine(name: str) -> bool:
            entry = self.model.get(name)
            return (
                entry is not None
                and entry.owner == owner
                and (lease_id is None or entry.lease == lease_id)
            )

        first_missing = next((n for n in dict.fromkeys(names) if not mine(n)), None)
        if first_missing is not None:
            with pytest.raises(NotHeld) as info:
                release(self.doc, names, owner, lease=lease_id)
            assert info.value.name == first_missing
            assert info.value.owner == owner
            assert info.value.holder == self.doc.get(first_missing)
            return

        new = release(self.doc, names, owner, lease=lease_id)
        self.check_removed_only(new, allowed={owner})
        for name in names:
            self.model.pop(name, None)
        self.commit(new, True)

    @rule(owner=owners)
    def release_owner(self, owner: str) -> None:
        new, freed = release_owner(self.doc, owner)
        expected = sorted(n for n, e in self.model.items() if e.owner == owner)
        assert sorted(freed) == expected
        self.check_removed_only(new, allowed={owner})
        for name in freed:
            del self.model[name]
        self.commit(new, bool(freed))

    @rule()
    def release_all(self) -> None:
        new, freed = release_all(self.doc)
        assert sorted(freed) == sorted(self.model)
        self.model.clear()
        self.commit(new, new is not self.doc)

    @rule()
    def reap(self) -> None:
        new, reaped = reap(self.doc, self.is_dead)
        expected = {n for n, e in self.model.items() if e.owner in self.dead}
        assert {name for name, _ in reaped} == expected
        self.check_removed_only(new, allowed=self.dead)
        for name, _ in reaped:
            del self.model[name]
        self.commit(new, bool(reaped))

    @rule()
    def store_and_reload(self) -> None:
        text = self.encoder.encode(self.doc)
        assert text == encode(self.doc)
        loaded = decode(text, "ns")
        assert loaded == self.doc
        self.doc = loaded  # later transitions start from a document as read back from the row

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def document_matches_model(self) -> None:
        expected = {
            name: CLAIMANTS[e.owner, e.lease.rsplit("/", 1)[1]].holder(e.since, e.token)
            for name, e in self.model.items()
        }
        assert dict(self.doc) == expected

    @invariant()
    def tokens_never_exceed_version(self) -> None:
        assert all(h.token <= self.version for h in self.doc.values())
        assert self.last_token <= self.version


LockMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLockMachine = LockMachine.TestCase
