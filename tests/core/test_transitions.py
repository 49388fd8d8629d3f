"""Unit tests of the pure lock-document transitions, named like rows of a truth table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasklocks._core import (
    EMPTY,
    FORMAT,
    Claimant,
    Deadlocked,
    Document,
    Encoder,
    Granted,
    Holder,
    LockDoc,
    Queued,
    Refused,
    Waiter,
    acquire,
    as_doc,
    check_not_already_held,
    decode,
    encode,
    holder_to_json,
    reap,
    release,
    release_all,
    release_owner,
)
from tasklocks.errors import (
    EXIT_LOCKED,
    CorruptLockTable,
    LockHeld,
    LockTimeout,
    NotHeld,
    StoreError,
    TasklocksError,
)
from tasklocks.owner import Liveness

NOW = 1_700_000_000.5
Outcome = Granted | Refused | Queued | Deadlocked


def claimant(
    owner: str = "task:1",
    lease: str = "lease-1",
    *,
    pid: int | None = 4711,
    host: str = "web-1",
    note: str | None = None,
) -> Claimant:
    return Claimant(
        owner=owner,
        pid=pid,
        start="123456",
        boot="boot-a",
        host=host,
        pidns="4026531836",
        pgid=pid,
        lease=lease,
        note=note,
    )


def holder(
    owner: str = "task:2",
    lease: str = "lease-2",
    *,
    token: int = 1,
    pid: int | None = 4712,
    host: str = "web-2",
    since: float = NOW - 60,
    note: str | None = None,
) -> Holder:
    return claimant(owner, lease, pid=pid, host=host, note=note).holder(since, token)


def doc_of(entries: Mapping[str, Holder]) -> LockDoc:
    return as_doc(dict(entries))


def never_dead(_: Holder | Waiter) -> bool:
    return False


def always_dead(_: Holder | Waiter) -> bool:
    return True


def dead_owners(*owners: str) -> Callable[[Holder | Waiter], bool]:
    return lambda h: h.owner in owners


def granted(result: Outcome) -> Granted:
    assert isinstance(result, Granted), result
    return result


def refused(result: Outcome) -> Refused:
    assert isinstance(result, Refused), result
    return result


# --- acquire --------------------------------------------------------------------------------------


def test_acquire_grants_free_names_to_claimant() -> None:
    me = claimant()
    result = granted(acquire(EMPTY, ["a", "b"], me, version=0, now=NOW, is_dead=never_dead))
    assert result.changed is True
    assert result.reaped == ()
    assert set(result.doc) == {"a", "b"}
    expected = me.holder(NOW, 1)
    assert result.doc["a"] == expected
    assert result.doc["b"] == expected
    assert EMPTY == {}  # the input is never mutated


def test_acquire_returns_an_immutable_document() -> None:
    result = granted(acquire(EMPTY, ["a"], claimant(), version=0, now=NOW, is_dead=never_dead))
    with pytest.raises(TypeError):
        result.doc["b"] = holder()  # type: ignore[index]


def test_token_is_version_plus_one() -> None:
    result = granted(acquire(EMPTY, ["a"], claimant(), version=41, now=NOW, is_dead=never_dead))
    assert result.token == 42
    assert result.doc["a"].token == 42
    assert result.doc["a"].since == NOW


def test_acquire_keeps_other_entries_untouched() -> None:
    other = holder()
    doc = doc_of({"x": other})
    result = granted(acquire(doc, ["a"], claimant(), version=5, now=NOW, is_dead=never_dead))
    assert result.doc["x"] is other
    assert set(result.doc) == {"x", "a"}
    assert set(doc) == {"x"}


def test_acquire_refused_when_live_holder() -> None:
    other = holder()
    doc = doc_of({"a": other})
    result = refused(acquire(doc, ["a"], claimant(), version=3, now=NOW, is_dead=never_dead))
    assert result.blockers == {"a": other}
    assert result.reaped == ()
    assert result.changed is False
    assert result.doc is doc


def test_acquire_refused_when_holder_liveness_unknown() -> None:
    # The core only frees on proof of death: "unknown" is passed in as not dead.
    liveness = {"task:2": Liveness.UNKNOWN}
    doc = doc_of({"a": holder()})
    result = refused(
        acquire(
            doc,
            ["a"],
            claimant(),
            version=3,
            now=NOW,
            is_dead=lambda h: liveness[h.owner] is Liveness.DEAD,
        )
    )
    assert set(result.blockers) == {"a"}
    assert result.doc is doc


def test_acquire_refused_when_same_owner_holds_it_under_another_lease() -> None:
    mine = holder("task:1", "old-lease")
    doc = doc_of({"a": mine})
    result = refused(
        acquire(doc, ["a"], claimant("task:1", "new-lease"), version=3, now=NOW, is_dead=never_dead)
    )
    assert result.blockers == {"a": mine}


def test_acquire_reaps_dead_holder_in_same_change() -> None:
    dead = holder("task:dead", "lease-dead")
    doc = doc_of({"a": dead})
    me = claimant()
    result = granted(acquire(doc, ["a"], me, version=7, now=NOW, is_dead=dead_owners("task:dead")))
    assert result.reaped == (("a", dead),)
    assert result.doc == {"a": me.holder(NOW, 8)}
    assert result.changed is True
    assert doc["a"] is dead


def test_acquire_refused_still_reaps_dead_holders() -> None:
    dead = holder("task:dead", "lease-dead")
    live = holder("task:live", "lease-live")
    doc = doc_of({"a": dead, "b": live})
    result = refused(
        acquire(doc, ["a", "b"], claimant(), version=7, now=NOW, is_dead=dead_owners("task:dead"))
    )
    assert result.blockers == {"b": live}
    assert result.reaped == (("a", dead),)
    assert result.changed is True
    assert result.doc == {"b": live}


def test_acquire_judges_only_the_wanted_names() -> None:
    judged: list[str] = []

    def is_dead(h: Holder | Waiter) -> bool:
        judged.append(h.owner)
        return True

    unrelated = holder("task:unrelated", "lease-u")
    wanted = holder("task:wanted", "lease-w")
    doc = doc_of({"x": unrelated, "a": wanted})
    result = granted(acquire(doc, ["a"], claimant(), version=1, now=NOW, is_dead=is_dead))
    assert judged == ["task:wanted"]
    assert result.doc["x"] is unrelated
    assert result.reaped == (("a", wanted),)


def test_acquire_all_or_nothing() -> None:
    other = holder()
    doc = doc_of({"b": other})
    result = refused(
        acquire(doc, ["a", "b", "c"], claimant(), version=2, now=NOW, is_dead=never_dead)
    )
    assert result.blockers == {"b": other}
    assert result.doc is doc
    assert "a" not in result.doc
    assert "c" not in result.doc


def test_acquire_names_every_blocker() -> None:
    b, c = holder("task:b", "lb"), holder("task:c", "lc")
    doc = doc_of({"b": b, "c": c})
    result = refused(
        acquire(doc, ["a", "b", "c"], claimant(), version=2, now=NOW, is_dead=never_dead)
    )
    assert result.blockers == {"b": b, "c": c}


def test_acquire_is_idempotent_by_lease() -> None:
    me = claimant()
    first = granted(acquire(EMPTY, ["a", "b"], me, version=9, now=NOW, is_dead=never_dead))
    # The write succeeded, the reply was lost; the retry reads the new document (version 10).
    retry = granted(acquire(first.doc, ["b", "a"], me, version=10, now=NOW + 5, is_dead=never_dead))
    assert retry.changed is False
    assert retry.token == first.token == 10
    assert retry.doc is first.doc
    assert retry.reaped == ()


def test_acquire_retry_never_reaps_its_own_entries() -> None:
    me = claimant()
    first = granted(acquire(EMPTY, ["a"], me, version=0, now=NOW, is_dead=never_dead))
    retry = granted(acquire(first.doc, ["a"], me, version=1, now=NOW, is_dead=always_dead))
    assert retry.changed is False
    assert retry.doc is first.doc


def test_acquire_partly_held_by_same_lease_is_refused() -> None:
    me = claimant()
    first = granted(acquire(EMPTY, ["a"], me, version=0, now=NOW, is_dead=never_dead))
    result = refused(acquire(first.doc, ["a", "b"], me, version=1, now=NOW, is_dead=never_dead))
    assert set(result.blockers) == {"a"}
    assert "b" not in result.doc


def test_acquire_collapses_duplicate_names_and_accepts_any_iterable() -> None:
    result = granted(
        acquire(
            EMPTY, (n for n in ["a", "a", "b"]), claimant(), version=0, now=NOW, is_dead=never_dead
        )
    )
    assert sorted(result.doc) == ["a", "b"]


# --- release --------------------------------------------------------------------------------------


def test_release_frees_own_names_and_keeps_others() -> None:
    me = claimant()
    doc = granted(acquire(EMPTY, ["a", "b"], me, version=0, now=NOW, is_dead=never_dead)).doc
    other = holder()
    doc = doc_of({**doc, "x": other})
    new = release(doc, ["a"], "task:1")
    assert set(new) == {"b", "x"}
    assert new["x"] is other
    assert set(doc) == {"a", "b", "x"}


def test_release_with_matching_lease_frees() -> None:
    doc = doc_of({"a": holder("task:1", "lease-1")})
    assert release(doc, ["a"], "task:1", lease="lease-1") == {}


def test_release_without_lease_frees_any_lease_of_owner() -> None:
    doc = doc_of({"a": holder("task:1", "lease-1"), "b": holder("task:1", "lease-9", token=2)})
    assert release(doc, ["a", "b"], "task:1") == {}


def test_release_by_other_owner_raises_not_held_naming_holder() -> None:
    other = holder("task:2", pid=4712, host="web-2")
    doc = doc_of({"a": other})
    with pytest.raises(NotHeld) as info:
        release(doc, ["a"], "task:1")
    err = info.value
    assert err.name == "a"
    assert err.owner == "task:1"
    assert err.holder is other
    msg = str(err)
    assert "a is held by task:2" in msg
    assert "pid 4712 on web-2" in msg
    assert "not by task:1" in msg
    assert "release it as its owner" in msg
    assert doc == {"a": other}


def test_release_of_free_name_raises_not_held_saying_nobody_holds_it() -> None:
    with pytest.raises(NotHeld) as info:
        release(EMPTY, ["a"], "task:1")
    assert info.value.holder is None
    assert str(info.value) == "a is not held by anyone, so task:1 cannot release it"


def test_release_with_wrong_lease_raises() -> None:
    mine = holder("task:1", "lease-1")
    doc = doc_of({"a": mine})
    with pytest.raises(NotHeld) as info:
        release(doc, ["a"], "task:1", lease="lease-other")
    assert info.value.holder is mine
    assert doc == {"a": mine}


def test_release_is_all_or_nothing_and_names_first_missing_lock() -> None:
    doc = doc_of({"a": holder("task:1", "lease-1"), "c": holder("task:1", "lease-1")})
    with pytest.raises(NotHeld) as info:
        release(doc, ["a", "b", "c"], "task:1")
    assert info.value.name == "b"
    assert set(doc) == {"a", "c"}


def test_release_owner_frees_only_that_owner() -> None:
    other = holder("task:2", "lease-2")
    doc = doc_of(
        {
            "a": holder("task:1", "lease-1"),
            "b": other,
            "c": holder("task:1", "lease-3", token=4),
        }
    )
    new, freed = release_owner(doc, "task:1")
    assert sorted(freed) == ["a", "c"]
    assert new == {"b": other}
    assert len(doc) == 3


def test_release_owner_without_locks_changes_nothing() -> None:
    doc = doc_of({"b": holder("task:2")})
    new, freed = release_owner(doc, "task:1")
    assert freed == []
    assert new is doc


def test_release_all() -> None:
    doc = doc_of({"a": holder("task:1", "l1"), "b": holder("task:2", "l2")})
    new, freed = release_all(doc)
    assert new == {}
    assert sorted(freed) == ["a", "b"]
    assert len(doc) == 2


def test_release_all_of_empty_document_frees_nothing() -> None:
    new, freed = release_all(EMPTY)
    assert new == {}
    assert freed == []


# --- reap -----------------------------------------------------------------------------------------


def test_reap_drops_dead_holders() -> None:
    dead = holder("task:dead", "ld")
    live = holder("task:live", "ll")
    doc = doc_of({"a": dead, "b": live, "c": dead})
    new, reaped = reap(doc, dead_owners("task:dead"))
    assert new == {"b": live}
    assert reaped == (("a", dead), ("c", dead))


def test_reap_keeps_unknown_and_live() -> None:
    liveness = {
        "task:alive": Liveness.ALIVE,
        "task:unknown": Liveness.UNKNOWN,
        "task:dead": Liveness.DEAD,
    }
    doc = doc_of({owner: holder(owner, f"lease-{owner}") for owner in liveness})
    new, reaped = reap(doc, lambda h: liveness[h.owner] is Liveness.DEAD)
    assert set(new) == {"task:alive", "task:unknown"}
    assert [name for name, _ in reaped] == ["task:dead"]


def test_reap_without_dead_holders_returns_same_document() -> None:
    doc = doc_of({"a": holder()})
    new, reaped = reap(doc, never_dead)
    assert new is doc
    assert reaped == ()


# --- check_not_already_held -----------------------------------------------------------------------


def test_check_not_already_held_raises_lock_held() -> None:
    mine = holder("task:1", "lease-1", pid=4711, host="web-1")
    doc = doc_of({"a": mine, "b": holder("task:2")})
    with pytest.raises(LockHeld) as info:
        check_not_already_held(doc, ["a", "b", "c"], "task:1")
    assert info.value.held == {"a": mine}
    assert "not re-entrant" in str(info.value)
    assert "a is held by task:1 (pid 4711 on web-1)" in str(info.value)


def test_check_not_already_held_passes_for_free_names_and_other_owners() -> None:
    doc = doc_of({"b": holder("task:2")})
    check_not_already_held(doc, ["a", "b"], "task:1")


# --- encoding -------------------------------------------------------------------------------------

_text = st.text(max_size=12)
_opt_text = st.none() | _text
_opt_int = st.none() | st.integers(min_value=0, max_value=2**31)
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._:/@-", min_size=1, max_size=20)

holders = st.builds(
    Holder,
    owner=_text,
    pid=_opt_int,
    start=_opt_text,
    boot=_opt_text,
    host=_text,
    pidns=_opt_text,
    pgid=_opt_int,
    since=st.floats(allow_nan=False, allow_infinity=False),
    token=st.integers(min_value=-(2**63), max_value=2**63),
    lease=_text,
    note=_opt_text,
)
documents = st.dictionaries(_names, holders, max_size=8).map(doc_of)


@given(documents)
def test_encode_decode_round_trip(doc: Document) -> None:
    text = encode(doc)
    assert decode(text, "ns") == doc
    assert decode(text.encode(), "ns") == doc
    assert encode(decode(text, "ns")) == text


@st.composite
def document_histories(draw: st.DrawFn) -> list[Document]:
    """Documents as a namespace sees them over time: one (lease, token) is one holder."""
    pool = draw(st.lists(holders, min_size=1, max_size=6))
    pool = [replace(h, token=i, lease=f"lease-{i}") for i, h in enumerate(pool)]
    choice = st.dictionaries(_names, st.sampled_from(pool), max_size=6).map(doc_of)
    return draw(st.lists(choice, min_size=1, max_size=6))


@given(document_histories())
def test_encoder_reuse_gives_same_text_as_fresh_encode(history: list[Document]) -> None:
    encoder = Encoder()
    for doc in history:
        assert encoder.encode(doc) == encode(doc)


def test_encoder_reuse_across_transitions() -> None:
    encoder = Encoder()
    doc: Document = EMPTY
    version = 0

    def take(names: list[str], owner: str, lease: str) -> Document:
        c = claimant(owner, lease)
        return granted(acquire(doc, names, c, version=version, now=NOW, is_dead=never_dead)).doc

    for step in range(6):
        if step == 0:
            doc = take(["a", "b"], "task:1", "l1")
        elif step == 1:
            doc = take(["c"], "task:2", "l2")
        elif step == 2:
            doc = release(doc, ["a"], "task:1")
        elif step == 3:
            doc = take(["a"], "task:3", "l3")
        elif step == 4:
            doc = release_owner(doc, "task:1")[0]
        else:
            doc = release_all(doc)[0]
        version += 1
        text = encoder.encode(doc)
        assert text == encode(doc)
        assert decode(text, "ns") == doc
    assert doc == {}


def test_encode_is_compact_stable_json() -> None:
    assert encode(EMPTY) == '{"format":1,"locks":{}}'
    h = holder(note="backup of café")
    text = encode(doc_of({"a": h}))
    assert " " not in text.replace("backup of café", "")
    assert "café" in text  # not \u-escaped
    assert json.loads(text) == {"format": 1, "locks": {"a": holder_to_json(h)}}


@pytest.mark.parametrize("text", [None, "", b""])
def test_decode_of_nothing_gives_empty(text: str | bytes | None) -> None:
    assert decode(text, "ns") == {}


def test_decode_accepts_integer_since_as_float() -> None:
    raw = holder_to_json(holder())
    raw["since"] = 17
    doc = decode(json.dumps({"format": 1, "locks": {"a": raw}}), "ns")
    assert doc["a"].since == 17.0
    assert isinstance(doc["a"].since, float)


_MISSING = object()


def _entry(**changes: Any) -> str:
    raw: dict[str, Any] = holder_to_json(holder())
    for key, value in changes.items():
        if value is _MISSING:
            del raw[key]
        else:
            raw[key] = value
    return json.dumps({"format": 1, "locks": {"a": raw}})


_GOOD = encode(doc_of({"a": holder(), "b": holder("task:3", "l3")}))

CORRUPT = {
    "garbage": "this is not json",
    "truncated": _GOOD[: len(_GOOD) // 2],
    "truncated-by-one": _GOOD[:-1],
    "invalid-utf8": b'{"format":1,"locks":{"\xff":1}}',
    "list": "[]",
    "number": "42",
    "missing-locks": '{"format":1}',
    "locks-not-object": '{"format":1,"locks":[]}',
    "locks-null": '{"format":1,"locks":null}',
    "missing-format": '{"locks":{}}',
    "format-zero": '{"format":0,"locks":{}}',
    "format-string": '{"format":"1","locks":{}}',
    "entry-not-object": '{"format":1,"locks":{"a":[1,2]}}',
    "owner-missing": _entry(owner=_MISSING),
    "owner-int": _entry(owner=1),
    "pid-string": _entry(pid="4711"),
    "pid-bool": _entry(pid=True),
    "pid-float": _entry(pid=4711.0),
    "pgid-bool": _entry(pgid=False),
    "host-null": _entry(host=None),
    "since-string": _entry(since="10:02"),
    "since-bool": _entry(since=True),
    "token-float": _entry(token=1.5),
    "token-bool": _entry(token=True),
    "token-missing": _entry(token=_MISSING),
    "lease-null": _entry(lease=None),
    "note-int": _entry(note=3),
    "start-int": _entry(start=123),
}


@pytest.mark.parametrize("text", list(CORRUPT.values()), ids=list(CORRUPT))
def test_decode_of_corrupt_document_raises_corrupt_lock_table_naming_namespace(
    text: str | bytes,
) -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(text, "billing")
    err = info.value
    assert err.namespace == "billing"
    assert "'billing'" in str(err)
    assert "tasklocks --namespace billing repair --yes" in str(err)
    assert isinstance(err, StoreError)


def test_decode_names_the_bad_entry_and_field() -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(_entry(pid=True), "ns")
    assert info.value.problem == "entry 'a' has a bad 'pid'"


def test_decode_of_newer_format_says_upgrade() -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(f'{{"format":{FORMAT + 1},"locks":{{}}}}', "billing")
    assert "'billing'" in str(info.value)
    assert "newer tasklocks" in str(info.value)
    assert "upgrade tasklocks" in str(info.value)


def test_decode_of_newer_format_without_locks_object_says_upgrade() -> None:
    with pytest.raises(CorruptLockTable) as info:
        decode(f'{{"format":{FORMAT + 1},"tables":{{}}}}', "billing")
    assert "upgrade tasklocks" in str(info.value)


def test_decode_of_deeply_nested_garbage_raises_corrupt_lock_table() -> None:
    with pytest.raises(CorruptLockTable):
        decode("[" * 100_000, "ns")


def test_decode_of_bool_format_raises_corrupt_lock_table() -> None:
    with pytest.raises(CorruptLockTable):
        decode('{"format":true,"locks":{}}', "ns")


# --- error messages -------------------------------------------------------------------------------


def test_lock_held_message_names_lock_owner_pid_host_and_hint() -> None:
    h = holder("task:12", pid=4711, host="web-1", since=NOW, note="nightly run")
    err = LockHeld({"full_backup:site-1": h})
    msg = str(err)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW))  # not today: with the date
    assert msg == (
        f"full_backup:site-1 is held by task:12 (pid 4711 on web-1) since {since}, nightly run; "
        "wait with wait=True"
    )
    assert err.held == {"full_backup:site-1": h}
    assert err.exit_code == EXIT_LOCKED
    assert isinstance(err, TasklocksError)


def test_lock_held_message_lists_every_lock_sorted_with_custom_hint() -> None:
    b = holder("task:b", "lb", pid=None, host="cli-host")
    a = holder("task:a", "la", pid=7, host="web-3")
    msg = str(LockHeld({"b": b, "a": a}, hint="try later"))
    assert msg.index("a is held by task:a (pid 7 on web-3)") < msg.index(
        "b is held by task:b (on cli-host)"
    )
    assert msg.endswith("; try later")


def test_lock_timeout_is_a_timeout_error() -> None:
    h = holder("task:12", pid=4711, host="web-1")
    err = LockTimeout(2.5, {"a": h})
    assert isinstance(err, TimeoutError)
    assert isinstance(err, TasklocksError)
    assert err.exit_code == EXIT_LOCKED
    assert err.timeout == 2.5
    assert err.held == {"a": h}
    msg = str(err)
    assert (
        "gave up after waiting 2.5s for the locks (a is held by task:12 (pid 4711 on web-1)" in msg
    )
    assert msg.endswith("raise the timeout or stop the holder")
    with pytest.raises(TimeoutError):
        raise err


def test_lock_timeout_without_holders_says_the_locks() -> None:
    assert str(LockTimeout(3, {})).startswith("gave up after waiting 3s for the locks;")
