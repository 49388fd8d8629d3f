"""Truth-table tests of the queue: FIFO waiters, shared and counted names, deadlocks, and the
document's formats (the Hypothesis machine in ``test_queue_machine.py`` explores the rest)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tasklocks._core import (
    EMPTY,
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
    blocked,
    decode,
    encode,
    held_token,
    promote,
    reap,
    release,
    release_all,
    release_lease,
    release_owner,
    wants,
)
from tasklocks.errors import CorruptLockTable, LimitMismatch, LockHeld

NOW = 1_700_000_000.0
Outcome = Granted | Refused | Queued | Deadlocked


def who(owner: str, n: int = 0, session: str | None = "s") -> Claimant:
    return Claimant(
        owner, 100 + n, "st", "boot", "web-1", "ns", None, f"{owner}/{n}", None, session
    )


def never(_: Holder | Waiter) -> bool:
    return False


def go(doc: LockDoc, names: list[str | Want], c: Claimant, version: int, queue: bool) -> Outcome:
    return acquire(doc, names, c, version=version, now=NOW + version, is_dead=never, queue=queue)


def take(doc: LockDoc, names: list[str | Want], c: Claimant, version: int = 0) -> LockDoc:
    result = go(doc, names, c, version, queue=False)
    assert isinstance(result, Granted), result
    return result.doc


def queue_up(doc: LockDoc, names: list[str | Want], c: Claimant, version: int = 0) -> LockDoc:
    result = go(doc, names, c, version, queue=True)
    assert isinstance(result, Queued), result
    return result.doc


def test_a_try_is_refused_by_a_waiter_for_a_free_name() -> None:
    doc = take(EMPTY, ["b"], who("task:b"))
    doc = queue_up(doc, ["a", "b"], who("task:ab"))
    result = go(doc, ["a"], who("task:late"), 2, queue=False)
    assert isinstance(result, Refused)
    assert result.blocked.holders == {}
    assert [w.owner for w in result.blocked.ahead] == ["task:ab"]
    assert result.changed is False and result.doc is doc


def test_a_waiter_is_granted_by_the_write_that_frees_its_names() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = queue_up(doc, ["a"], who("task:2"), 1)
    doc = queue_up(doc, ["a"], who("task:3"), 2)
    assert [b.position for b in (blocked(doc, w.lease) for w in doc.queue)] == [1, 2]
    freed = release(doc, ["a"], "task:1")
    promoted, granted, dropped = promote(freed, version=3, now=NOW)
    assert [w.owner for w in granted] == ["task:2"] and dropped == ()
    assert promoted["a"].owner == "task:2" and promoted["a"].token == 4
    assert [w.owner for w in promoted.queue] == ["task:3"]
    assert held_token(promoted, ["a"], "task:2/0") == 4


def test_disjoint_waiters_granted_by_one_write_share_its_token() -> None:
    doc = take(EMPTY, ["a", "b"], who("task:1"))
    doc = queue_up(doc, ["a"], who("task:2"), 1)
    doc = queue_up(doc, ["b"], who("task:3"), 2)
    promoted, granted, _ = promote(release(doc, ["a", "b"], "task:1"), version=3, now=NOW)
    assert [w.owner for w in granted] == ["task:2", "task:3"]
    assert promoted["a"].token == promoted["b"].token == 4


def test_shared_holders_coexist_and_a_queued_exclusive_one_stops_new_ones() -> None:
    doc = take(EMPTY, [Want("db", SHARED)], who("task:r1"))
    doc = take(doc, [Want("db", SHARED)], who("task:r2"), 1)
    assert [h.owner for h in doc.holders("db")] == ["task:r1", "task:r2"]
    doc = queue_up(doc, ["db"], who("task:w"), 2)
    assert [h.owner for h in blocked(doc, "task:w/0").holders["db"]] == ["task:r1", "task:r2"]
    late = go(doc, [Want("db", SHARED)], who("task:r3"), 3, queue=False)
    assert isinstance(late, Refused)
    assert [w.owner for w in late.blocked.ahead] == ["task:w"]


def test_a_counted_name_admits_its_limit_and_counts_the_waiters_ahead() -> None:
    slot = Want("slots", SHARED, 2)
    doc = take(EMPTY, [slot, "x"], who("task:1"))
    doc = take(doc, [slot], who("task:2"), 1)
    full = go(doc, [slot], who("task:3"), 2, queue=False)
    assert isinstance(full, Refused)
    assert [h.owner for h in full.blocked.holders["slots"]] == ["task:1", "task:2"]
    # task:4 wants a slot and x (held): it waits, and keeps a slot for itself when one frees.
    doc = queue_up(doc, [slot, "x"], who("task:4"), 2)
    freed, _, _ = promote(release(doc, ["slots"], "task:2"), version=3, now=NOW)
    assert isinstance(go(freed, [slot], who("task:5"), 4, queue=False), Refused)


def test_a_different_limit_raises_limit_mismatch() -> None:
    doc = take(EMPTY, [Want("slots", SHARED, 3)], who("task:1"))
    with pytest.raises(LimitMismatch) as info:
        go(doc, [Want("slots", SHARED, 4)], who("task:2"), 1, queue=True)
    assert (info.value.name, info.value.asked, info.value.theirs) == ("slots", 4, 3)
    assert str(info.value).startswith("slots is taken with limit 3 by task:1 (pid 100 on web-1)")
    with pytest.raises(LimitMismatch):
        go(doc, [Want("slots", SHARED)], who("task:2"), 1, queue=False)
    assert isinstance(go(doc, ["slots"], who("task:2"), 1, queue=True), Queued)  # exclusive


def test_a_name_asked_for_in_two_ways_is_refused() -> None:
    with pytest.raises(ValueError, match="a is asked for twice"):
        wants(["a", Want("a", SHARED)])
    assert wants(["a", "a", Want("b", SHARED)]) == (Want("a"), Want("b", SHARED))


def test_the_wait_closing_a_cycle_is_refused_with_the_cycle() -> None:
    doc = take(EMPTY, ["x"], who("task:12"))
    doc = take(doc, ["y"], who("task:13"), 1)
    doc = queue_up(doc, ["y"], who("task:12", 1), 2)
    result = go(doc, ["x"], who("task:13", 1), 3, queue=True)
    assert isinstance(result, Deadlocked)
    assert result.owners == ("task:13", "task:12")
    assert result.cycle == (
        "task:13 holds y and waits for x",
        "task:12 holds x and waits for y",
    )
    assert result.doc is doc and result.changed is False  # not queued


def test_a_cycle_through_a_waiter_ahead_says_it_is_in_line_first() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = take(doc, ["b"], who("task:0"), 1)
    doc = queue_up(doc, ["b"], who("task:2"), 2)
    doc = queue_up(doc, ["b"], who("task:1", 1), 3)
    result = go(doc, ["a"], who("task:2", 1), 4, queue=True)
    assert isinstance(result, Deadlocked)
    assert result.cycle == (
        "task:2 is in line for b first and waits for a",
        "task:1 holds a and waits for b",
    )


def test_a_cycle_hidden_behind_a_holder_that_will_finish_is_found() -> None:
    """task:4 holds c and waits for a place of ``a`` (limit 2) behind task:2 and task:3, who
    wait for c. task:1's exclusive hold of ``a`` hid them (it is the first in the way, and it
    will finish): found by the Hypothesis machine."""
    two = Want("a", SHARED, 2)
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = take(doc, ["c"], who("task:4"), 1)
    doc = queue_up(doc, [two, "c"], who("task:2"), 2)
    doc = queue_up(doc, [two, "c"], who("task:3"), 3)
    result = go(doc, [two], who("task:4", 1), 4, queue=True)
    assert isinstance(result, Deadlocked)
    assert result.owners == ("task:4", "task:2")
    assert result.cycle == (
        "task:4 holds c and waits for a",
        "task:2 is in line for a first and waits for c",
    )


def test_waiting_behind_a_chain_that_ends_is_no_deadlock() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    granted = go(doc, ["b"], who("task:1", 1), 0, queue=True)  # b is free: granted at once
    assert isinstance(granted, Granted)
    doc = granted.doc
    assert doc.queue == () and doc["b"].owner == "task:1"
    doc = take(doc, ["c"], who("task:3"), 1)
    doc = queue_up(doc, ["c"], who("task:2"), 2)  # task:3 waits for nothing: it will release
    assert isinstance(go(doc, ["a"], who("task:3", 1), 3, queue=True), Queued)


def test_gone_waiters_leave_the_queue() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = queue_up(doc, ["a"], who("task:dead"), 1)
    doc = queue_up(doc, ["a"], who("task:2"), 2)
    result = acquire(
        doc, ["a"], who("task:2"), version=3, now=NOW, is_dead=lambda e: e.owner == "task:dead",
        queue=True,
    )  # fmt: skip
    assert isinstance(result, Queued)
    assert [w.owner for w in result.dropped] == ["task:dead"]
    assert [w.owner for w in result.doc.queue] == ["task:2"]
    assert result.blocked.position == 1
    new, reaped = reap(doc, lambda e: e.owner == "task:dead")
    assert reaped == () and [w.owner for w in new.queue] == ["task:2"]


def test_a_waiter_under_a_new_session_goes_to_the_end() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = queue_up(doc, ["a"], who("task:2", session="old"), 1)
    doc = queue_up(doc, ["a"], who("task:3"), 2)
    again = go(doc, ["a"], who("task:2", session="new"), 3, queue=True)
    assert isinstance(again, Queued)
    assert [(w.owner, w.session) for w in again.doc.queue] == [("task:3", "s"), ("task:2", "new")]


def test_releases_take_waiters_out_too() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = queue_up(doc, ["a"], who("task:2"), 1)
    doc = queue_up(doc, ["a"], who("task:3"), 2)
    new, freed = release_lease(doc, "task:2/0")
    assert freed == [] and [w.owner for w in new.queue] == ["task:3"]
    new, freed = release_owner(doc, "task:3")
    assert freed == [] and [w.owner for w in new.queue] == ["task:2"]
    new, freed = release_all(doc)
    assert freed == ["a"] and new.queue == ()


def test_a_waiter_without_a_process_waits_as_the_calling_one_and_gets_detached_entries() -> None:
    me = who("cli:me")
    kept = Claimant("cli:ops", None, None, None, "web-1", None, None, "ops/0", None, None, me)
    doc = take(EMPTY, ["a"], who("task:1"))
    doc = queue_up(doc, ["a"], kept, 1)
    [waiter] = doc.queue
    assert (waiter.owner, waiter.pid, waiter.session, waiter.detached) == (
        "cli:ops",
        100,
        "s",
        True,
    )
    promoted, _, _ = promote(release(doc, ["a"], "task:1"), version=2, now=NOW)
    holder = promoted["a"]
    assert (holder.owner, holder.pid, holder.session, holder.start) == ("cli:ops", None, None, None)


def test_lock_held_names_holders_and_the_queue() -> None:
    doc = take(EMPTY, [Want("db", SHARED)], who("task:1"))
    doc = take(doc, [Want("db", SHARED)], who("task:2"), 1)
    doc = queue_up(doc, ["db"], who("task:3"), 2)
    way = blocked(doc, "task:3/0")
    err = LockHeld(way.blockers, holders=way.holders, queue=doc.queue)
    assert str(err).startswith("db is held by task:1 (pid 100 on web-1) since ")
    assert " and 1 other; 1 waiter is ahead in the queue: task:3 (pid 100 on web-1) since " in str(
        err
    )


# --- formats --------------------------------------------------------------------------------------


def test_a_plain_document_stays_in_format_1_and_a_queue_needs_format_2() -> None:
    doc = take(EMPTY, ["a"], who("task:1"))
    assert json.loads(encode(doc))["format"] == 1
    queued = queue_up(doc, ["a"], who("task:2"), 1)
    raw = json.loads(encode(queued))
    assert raw["format"] == 2
    assert raw["queue"][0]["wants"] == [["a", "x", None]]
    assert decode(encode(queued), "ns") == queued
    shared = take(EMPTY, [Want("db", SHARED, 3)], who("task:1"))
    raw = json.loads(encode(shared))
    assert raw["format"] == 2 and raw["locks"]["db"][0]["mode"] == "s"
    assert raw["locks"]["db"][0]["limit"] == 3
    assert decode(encode(shared), "ns") == shared
    gone, _, _ = promote(release(queued, ["a"], "task:1"), version=2, now=NOW)
    assert json.loads(encode(gone))["format"] == 1  # back to what every version reads


def _doc2(locks: object, queue: object = ()) -> str:
    return json.dumps({"format": 2, "locks": locks, "queue": queue})


H = {
    "owner": "o", "pid": 1, "start": "s", "boot": "b", "host": "h", "pidns": None, "pgid": None,
    "since": 1.0, "token": 1, "lease": "l", "note": None, "session": None,
}  # fmt: skip
W = {k: v for k, v in H.items() if k != "token"} | {"wants": [["a", "x", None]]}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_doc2({"a": [{**H, "mode": "q"}]}), "entry 'a' has a bad 'mode'"),
        (_doc2({"a": [{**H, "mode": "s", "limit": 0}]}), "entry 'a' has a bad 'limit'"),
        (_doc2({"a": [{**H, "mode": "x", "limit": 2}]}), "entry 'a' has a bad 'limit'"),
        (_doc2({"a": []}), "entry 'a' is an empty list"),
        (_doc2({"a": [H, {**H, "lease": "m"}]}), "entry 'a' is exclusive but shared"),
        (
            _doc2({"a": [{**H, "mode": "s", "limit": 1}, {**H, "mode": "s", "limit": 1}]}),
            "entry 'a' has more holders than its limit",
        ),
        (
            _doc2({"a": [{**H, "mode": "s", "limit": 2}, {**H, "mode": "s", "limit": 3}]}),
            "entry 'a' has holders of different limits",
        ),
        (_doc2({}, "x"), "'queue' is not a list"),
        (_doc2({}, [{**W, "wants": []}]), "waiter 1 has a bad 'wants'"),
        (_doc2({}, [{**W, "wants": [["a", "s", 0]]}]), "waiter 1 has a bad 'limit'"),
        (_doc2({}, [{**W, "pid": "x"}]), "waiter 1 has a bad 'pid'"),
        (_doc2({}, [W, W]), "a lease waits twice in the queue"),
        (_doc2({}, [{**W, "detached": 1}]), "waiter 1 has a bad 'detached'"),
        (json.dumps({"format": 1, "locks": {"a": [H]}}), "entry 'a' is not an object"),
    ],
)
def test_decode_of_a_bad_format_2_document_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(text, "ns")
    assert info.value.problem == problem


def test_format_3_keeps_a_lease_once_and_a_name_as_lease_and_token() -> None:
    doc = take(EMPTY, ["a", "b"], who("task:1"))
    doc = take(doc, [Want("db", SHARED, 3)], who("task:2"), 1)
    doc = take(doc, [Want("db", SHARED, 3)], who("task:3"), 2)
    doc = queue_up(doc, ["a"], who("task:4"), 3)
    text = encode(doc, compact=True)
    raw = json.loads(text)
    assert raw["format"] == 3
    assert raw["procs"] == {
        "task:1/0": ["task:1", 100, "st", "boot", "web-1", "ns", None, NOW, None, "s"],
        "task:2/0": ["task:2", 100, "st", "boot", "web-1", "ns", None, NOW + 1, None, "s"],
        "task:3/0": ["task:3", 100, "st", "boot", "web-1", "ns", None, NOW + 2, None, "s"],
    }
    assert raw["locks"] == {
        "a": ["task:1/0", 1],
        "b": ["task:1/0", 1],
        "db": [["task:2/0", 2, 3], ["task:3/0", 3, 3]],
    }
    assert raw["queue"][0]["owner"] == "task:4"
    assert decode(text, "ns") == doc
    # Changes keep the parts up to date: a lease's record goes with its last entry.
    gone = release(release(doc, ["a", "b"], "task:1"), ["db"], "task:2")
    raw = json.loads(encode(gone, compact=True))
    assert sorted(raw["procs"]) == ["task:3/0"] and raw["locks"] == {"db": [["task:3/0", 3, 3]]}
    fresh = encode(decode(encode(gone), "ns"), compact=True)
    assert json.loads(encode(gone, compact=True)) == json.loads(fresh)
    assert json.loads(encode(EMPTY, compact=True)) == {"format": 3, "procs": {}, "locks": {}}


def test_format_3_is_a_fraction_of_format_1() -> None:
    doc = EMPTY
    for start in range(0, 1000, 100):
        doc = take(doc, [f"held-{i}" for i in range(start, start + 100)], who(f"task:{start}"))
    one, three = len(encode(doc)), len(encode(doc, compact=True))
    assert three * 5 < one, (one, three)
    assert (three - 10 * 80) / 1000 < 40  # per entry, past the ten records


def test_format_3_of_a_lease_with_two_records_keeps_both() -> None:
    """Only a hand-made document has two holders of one lease that differ: each keeps its own."""
    a = who("task:1").holder(NOW, 1)
    b = who("task:2").holder(NOW, 2)
    b = dataclasses.replace(b, lease=a.lease)
    doc = LockDoc({"a": (a,), "b": (b,), a.lease + "~1": (a,)})
    text = encode(doc, compact=True)
    assert len(json.loads(text)["procs"]) == 2
    back = decode(text, "ns")
    assert back == doc and back["b"].owner == "task:2" and back["b"].lease == a.lease
    # The same after changes that went through the kept parts.
    changed = doc.derive(remove=["a"])
    assert decode(encode(changed, compact=True), "ns") == changed
    # Once the other record is gone, the document is encoded the quick way again.
    plain = changed.derive(remove=["b"])
    assert len(json.loads(encode(plain, compact=True))["procs"]) == 1
    assert plain._compact is not None and not plain._compact.odd
    assert decode(encode(plain, compact=True), "ns") == plain


def _doc3(procs: object, locks: object, **more: object) -> str:
    return json.dumps({"format": 3, "procs": procs, "locks": locks, **more})


R = ["o", 1, "s", "b", "h", None, None, 1.0, None, None]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (json.dumps({"format": 3, "locks": {}}), "no 'procs' object"),
        (_doc3({}, {"a": ["l", 1]}), "record 'l' is missing from 'procs'"),
        (_doc3({"l": R[:9]}, {"a": ["l", 1]}), "record 'l' is not a list of 10 or 11 items"),
        (_doc3({"l": [*R[:1], "1", *R[2:]]}, {"a": ["l", 1]}), "record 'l' has a bad 'pid'"),
        (_doc3({"l": [*R, 5]}, {"a": ["l", 1]}), "record 'l' has a bad 'lease'"),
        (_doc3({"l": R}, {"a": ["l", "1"]}), "entry 'a' has a bad 'token'"),
        (_doc3({"l": R}, {"a": ["l", 1, 2]}), "entry 'a' is not a list of 2 items"),
        (_doc3({"l": R}, {"a": []}), "entry 'a' is not a non-empty list"),
        (_doc3({"l": R}, {"a": [["l", 1, 0]]}), "entry 'a' has a bad 'limit'"),
        (
            _doc3({"l": R}, {"a": [["l", 1, 1], ["l", 2, 1]]}),
            "entry 'a' has more holders than its limit",
        ),
        (_doc3({"l": R}, {}, queue=[W, W]), "a lease waits twice in the queue"),
    ],
)
def test_decode_of_a_bad_format_3_document_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(text, "ns")
    assert info.value.problem == problem


def test_want_describes_itself() -> None:
    assert [w.describe() for w in (Want("a"), Want("b", SHARED), Want("c", SHARED, 3))] == [
        "a",
        "b (shared)",
        "c (limit 3)",
    ]
