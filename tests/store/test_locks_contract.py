"""The LockTable contract, run once per database URL (tooz style).

Every test here goes through the public API against a real database (the ``db_url`` fixture is
parametrised over SQLite, MariaDB and PostgreSQL); only the corrupt-row tests touch the table
directly, through the database's own driver, to write what tasklocks never would.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import pytest
from blocking_aio import BlockingAio, BlockingLease
from conftest import raw_sql

import tasklocks
from tasklocks import (
    CorruptLockTable,
    Holder,
    Lease,
    Liveness,
    LockHeld,
    LockTable,
    LockTimeout,
    NotHeld,
    ProcessIdentity,
    current_process,
)
from tasklocks.errors import StoreUnreachable
from tasklocks.store import Compute, OutcomeUnknown, Snapshot, Store, open_store, parse_url

TABLE = "tasklocks"
Popen = subprocess.Popen[str]
WAIT = 20.0  # upper bound for anything that should happen "soon"; never the reason a test passes


@pytest.fixture(params=["blocking", "aio"])
def table(request: pytest.FixtureRequest, db_url: str, namespace: str) -> Iterator[LockTable]:
    """The table under test: a LockTable, or the async API driven from here (blocking_aio)."""
    if request.param == "aio":
        with BlockingAio(db_url, namespace) as b:
            yield cast(LockTable, b)  # the same methods, not the same class
        return
    with tasklocks.connect(db_url, namespace=namespace) as t:
        yield t


@pytest.fixture
def other(db_url: str, namespace: str) -> Iterator[LockTable]:
    """A second, independent connection to the same namespace."""
    with tasklocks.connect(db_url, namespace=namespace) as t:
        yield t


def me_owner() -> str:
    me = current_process()
    return f"pid:{me.host}:{me.pid}"


def names_held(table: LockTable) -> dict[str, str]:
    return {h.name: h.holder.owner for h in table.held()}


# --- a lock holder in another process ------------------------------------------------------------

_HOLDER_SCRIPT = """
import sys
import tasklocks

table = tasklocks.connect(sys.argv[1], namespace=sys.argv[2])
lease = table.acquire(*sys.argv[3:])
print(lease.token, flush=True)
if sys.stdin.readline().strip() == "release":
    lease.release()
    print("released", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def holder_process(db_url: str, namespace: str, *names: str) -> Iterator[tuple[Popen, int]]:
    """A child process that holds ``names`` (as ``pid:<host>:<pid>``) until told or killed.

    Yields the process and the token of its lease; the child is killed on exit.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_SCRIPT, db_url, namespace, *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"holder process failed to acquire {names}: {line!r}"
        yield proc, int(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def tell(proc: Popen, line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def pid_owner(pid: int) -> str:
    return f"pid:{current_process().host}:{pid}"


# --- acquire and release -------------------------------------------------------------------------


def test_acquire_then_release_frees_the_lock(table: LockTable, other: LockTable) -> None:
    lease = table.acquire("a")
    assert lease.names == ("a",)
    assert lease.owner == me_owner()
    assert names_held(other) == {"a": me_owner()}
    lease.release()
    assert other.held() == []
    assert lease.released


def test_acquire_several_names_holds_all(table: LockTable) -> None:
    lease = table.acquire("a", "b", "c", owner="task:1")
    assert lease.names == ("a", "b", "c")
    assert names_held(table) == {"a": "task:1", "b": "task:1", "c": "task:1"}
    assert {h.holder.token for h in table.held()} == {lease.token}
    lease.release()
    assert table.held() == []


def test_acquire_is_all_or_nothing(table: LockTable, other: LockTable) -> None:
    other.acquire("b", owner="task:other")
    with pytest.raises(LockHeld) as info:
        table.acquire("a", "b", owner="task:me")
    assert set(info.value.held) == {"b"}
    assert names_held(table) == {"b": "task:other"}  # "a" was not taken
    lease = table.acquire("a", owner="task:third")  # and is free for anyone
    assert lease.names == ("a",)


def test_lock_held_names_the_lock_and_its_holder(table: LockTable, other: LockTable) -> None:
    other.acquire("app_task:blog", owner="task:12", note="updating blog")
    with pytest.raises(LockHeld) as info:
        table.acquire("app_task:blog", owner="task:13")
    err = info.value
    assert list(err.held) == ["app_task:blog"]
    holder = err.held["app_task:blog"]
    assert holder.owner == "task:12"
    assert holder.note == "updating blog"
    assert "app_task:blog" in str(err)
    assert "task:12" in str(err)
    assert err.exit_code == 75


def test_duplicate_names_in_one_call_are_taken_once(table: LockTable) -> None:
    lease = table.acquire("a", "a", "b", owner="task:1")
    assert lease.names == ("a", "b")
    lease.release()
    assert table.held() == []


def test_acquire_without_names_is_refused(table: LockTable) -> None:
    with pytest.raises(ValueError):
        table.acquire()


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "x" * 201])
def test_bad_lock_name_is_refused(table: LockTable, bad: str) -> None:
    with pytest.raises(tasklocks.BadLockName):
        table.acquire(bad)
    assert table.held() == []


@pytest.mark.parametrize(
    ("note", "error"),
    [
        (5, TypeError),
        (["x"], TypeError),
        (b"x", TypeError),
        ("\ud800", ValueError),
        ("a\x00b", ValueError),  # (PostgreSQL's text cannot hold it: a waiting task's message)
    ],
)
@pytest.mark.parametrize("names", [("a",), ("a", "b")])
def test_a_note_that_is_not_text_is_refused_and_writes_nothing(
    table: LockTable, other: LockTable, names: tuple[str, ...], note: object, error: type
) -> None:
    """(An int was written as it was: every later read of the namespace, by anyone, raised
    CorruptLockTable until a repair dropped every lock.)"""
    with pytest.raises(error, match="note"):
        table.acquire(*names, note=note)  # type: ignore[arg-type]
    assert other.held() == [] and table.held() == []
    with other.acquire("a", "b", note="fine") as lease:
        assert lease.names == ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"shared": None}, "shared= is True, False or lock names"),
        ({"shared": 1}, "shared= is True, False or lock names"),
        ({"process": 123}, "process= is THIS_PROCESS, a ProcessIdentity"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(
    table: LockTable, kwargs: dict[str, object], complaint: str
) -> None:
    with pytest.raises(TypeError, match=complaint):
        table.acquire("a", owner="me", **kwargs)  # type: ignore[arg-type]
    assert table.held() == [] and table.waiting() == []


@pytest.mark.parametrize("timeout", [float("nan"), "1", -1, -0.5, float("-inf"), -(10**400)])
def test_a_timeout_that_is_not_a_number_is_refused(table: LockTable, timeout: object) -> None:
    """(A NaN deadline never came: a waiting acquisition waited for ever. A negative one, which
    filelock reads as "wait for ever", gave up at once: "gave up after waiting -1s".)"""
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        table.acquire("a", wait=True, timeout=timeout)  # type: ignore[arg-type]
    assert table.held() == [] and table.waiting() == []


def test_a_long_note_is_kept_for_one_name_as_for_two(table: LockTable) -> None:
    """(On MySQL a name's own row keeps a record in a TEXT: 33,000 characters of 2 bytes failed
    there with "Data too long", for one name only.)"""
    note = "é" * 33_000
    for names in (("a", "b"), ("a",)):
        lease = table.acquire(*names, owner="task:1", note=note)
        assert [h.holder.note for h in table.held()] == [note] * len(names)
        lease.release()
    assert table.held() == []


def test_a_lease_released_twice_says_so(table: LockTable) -> None:
    lease = table.acquire("a", "b", owner="task:1")
    lease.release()
    table.acquire("a", owner="task:2")
    with pytest.raises(NotHeld) as info:  # (it said "a is not held by anyone")
        lease.release()
    assert str(info.value) == "this lease of a, b was released already; task:1 holds it no more"
    assert [h.holder.owner for h in table.held()] == ["task:2"]


def test_a_lease_released_by_name_says_so_when_its_owner_holds_the_name_again(
    table: LockTable,
) -> None:
    """(It said "a is held by task:1 (...), not by task:1; release it as its owner".)"""
    first = table.acquire("a", owner="task:1")
    table.release("a", owner="task:1")
    second = table.acquire("a", owner="task:1")
    with pytest.raises(NotHeld) as info:
        first.release()
    assert str(info.value) == (
        "this lease of a was released already; task:1 holds a under another lease, "
        "which that lease's release() gives back"
    )
    assert [h.holder.lease for h in table.held()] == [second.lease_id]
    second.release()
    assert table.held() == []


def test_a_timeout_past_floats_range_is_accepted(table: LockTable) -> None:
    """(10**400 raised OverflowError from float().)"""
    table.acquire("a", wait=True, timeout=10**400).release()


def test_locks_are_not_reentrant_for_an_explicit_owner(table: LockTable) -> None:
    table.acquire("a", owner="task:1")
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:1")
    assert info.value.held["a"].owner == "task:1"
    assert "re-entrant" in str(info.value)
    # Also in a bigger set, and the other names stay free.
    with pytest.raises(LockHeld):
        table.acquire("b", "a", owner="task:1")
    assert names_held(table) == {"a": "task:1"}


def test_locks_are_not_reentrant_for_this_process(table: LockTable) -> None:
    table.acquire("a")
    with pytest.raises(LockHeld):
        table.acquire("a")


def test_reentrant_acquire_with_wait_fails_at_once_instead_of_deadlocking(
    table: LockTable,
) -> None:
    table.acquire("a", owner="task:1")
    started = time.monotonic()
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:1", wait=True, timeout=WAIT)
    assert not isinstance(info.value, LockTimeout)
    assert time.monotonic() - started < WAIT


def test_tokens_strictly_increase_for_each_name(table: LockTable, other: LockTable) -> None:
    """Whichever path grants a name (its own row alone, or the document with others), its
    tokens only grow. Tokens of different names are not compared (a name taken in its own row
    counts on its own)."""
    tokens: dict[str, list[int]] = {}

    def took(lease: Lease) -> None:
        for name in lease.names:
            tokens.setdefault(name, []).append(lease.token)

    for i in range(4):
        a = table.acquire("a", owner="task:1")
        b = other.acquire(f"b{i}", "c", owner="task:2")
        took(a)
        took(b)
        a.release()
        b.release()
        took(table.acquire("a", "c", owner="task:3"))
        table.release_owner("task:3")
    assert [len(t) for t in (tokens["a"], tokens["c"])] == [8, 8]
    for name, seen in tokens.items():
        assert seen == sorted(set(seen)), (name, seen)


def test_held_reports_the_token_of_the_lease(table: LockTable) -> None:
    lease = table.acquire("a", "b", owner="task:1")
    assert {h.name: h.holder.token for h in table.held()} == {"a": lease.token, "b": lease.token}


# --- Lease and hold() as context managers --------------------------------------------------------


def test_lease_is_a_context_manager(table: LockTable, other: LockTable) -> None:
    with table.acquire("a", "b") as lease:
        assert isinstance(lease, Lease | BlockingLease)
        assert set(names_held(other)) == {"a", "b"}
    assert lease.released
    assert other.held() == []
    with pytest.raises(NotHeld):
        lease.release()  # twice


def test_lease_is_released_when_the_block_raises(table: LockTable) -> None:
    with pytest.raises(RuntimeError), table.acquire("a"):
        raise RuntimeError("boom")
    assert table.held() == []


def test_hold_takes_and_releases(table: LockTable, other: LockTable) -> None:
    with table.hold("a", owner="task:1") as lease:
        assert lease.owner == "task:1"
        assert names_held(other) == {"a": "task:1"}
    assert other.held() == []


def test_hold_waits_until_another_thread_releases(
    db_url: str, namespace: str, table: LockTable
) -> None:
    first = table.acquire("a", owner="task:first")
    waiting = threading.Event()
    got: list[int] = []
    held_inside: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def contender() -> None:
        try:
            with (
                tasklocks.connect(db_url, namespace=namespace) as mine,
                mine.hold(
                    "a", timeout=WAIT, owner="task:second", on_wait=lambda h: waiting.set()
                ) as lease,
            ):
                got.append(lease.token)
                held_inside.append(names_held(mine))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=contender)
    thread.start()
    try:
        assert waiting.wait(WAIT), "the contender never started waiting"
        assert got == []  # still waiting while we hold it
        first.release()
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    assert errors == []
    assert held_inside == [{"a": "task:second"}]
    assert got[0] > first.token
    assert table.held() == []


def test_hold_waits_until_another_process_releases(
    db_url: str, namespace: str, table: LockTable
) -> None:
    with holder_process(db_url, namespace, "a", "b") as (proc, token):
        told: list[Mapping[str, Holder]] = []

        def on_wait(holders: Mapping[str, Holder]) -> None:
            told.append(holders)
            tell(proc, "release")  # the holder releases only once we are waiting

        with table.hold("b", "c", timeout=WAIT, on_wait=on_wait) as lease:
            assert names_held(table) == {"b": me_owner(), "c": me_owner()}
            assert lease.token > token
        assert len(told) == 1
        assert set(told[0]) == {"b"}
        assert told[0]["b"].pid == proc.pid
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "released"


def test_wait_times_out_with_lock_timeout(table: LockTable, other: LockTable) -> None:
    other.acquire("a", owner="task:holder")
    stop = threading.Event()

    def churn() -> None:
        # Unrelated changes wake the waiter up again and again: it must tell on_wait only once.
        while not stop.is_set():
            with other.acquire("unrelated", owner="task:churn"):
                pass

    told: list[Mapping[str, Holder]] = []
    thread = threading.Thread(target=churn)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(LockTimeout) as info:
            table.acquire("a", "b", owner="task:me", wait=True, timeout=0.5, on_wait=told.append)
    finally:
        stop.set()
        thread.join(WAIT)
    elapsed = time.monotonic() - started
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.exit_code == 75
    assert elapsed >= 0.5
    assert set(err.held) == {"a"}
    assert err.held["a"].owner == "task:holder"
    assert "task:holder" in str(err)
    assert len(told) == 1
    assert {n: h.owner for n, h in told[0].items()} == {"a": "task:holder"}
    assert names_held(table) == {"a": "task:holder"}  # "b" was not taken meanwhile


def test_hold_times_out(table: LockTable, other: LockTable) -> None:
    other.acquire("a", owner="task:holder")
    with pytest.raises(LockTimeout), table.hold("a", timeout=0.2, owner="task:me"):
        pytest.fail("the block must not run")
    assert names_held(table) == {"a": "task:holder"}


# --- release ------------------------------------------------------------------------------------


def test_release_by_name_and_default_owner(table: LockTable) -> None:
    table.acquire("a", "b")
    table.release("a")
    assert names_held(table) == {"b": me_owner()}
    table.release("b", owner=me_owner())
    assert table.held() == []


def test_release_by_the_wrong_owner_names_the_holder(table: LockTable) -> None:
    table.acquire("a", owner="task:12")
    with pytest.raises(NotHeld) as info:
        table.release("a", owner="task:13")
    err = info.value
    assert err.name == "a"
    assert err.owner == "task:13"
    assert err.holder is not None and err.holder.owner == "task:12"
    assert "task:12" in str(err)
    assert names_held(table) == {"a": "task:12"}


def test_release_of_a_free_lock_raises_not_held(table: LockTable) -> None:
    with pytest.raises(NotHeld) as info:
        table.release("a", owner="task:1")
    assert info.value.holder is None
    assert "not held" in str(info.value)


def test_release_is_all_or_nothing(table: LockTable) -> None:
    table.acquire("a", owner="task:1")
    table.acquire("b", owner="task:2")
    with pytest.raises(NotHeld) as info:
        table.release("a", "b", owner="task:1")
    assert info.value.name == "b"
    assert names_held(table) == {"a": "task:1", "b": "task:2"}


def test_lease_release_after_someone_else_took_over_raises(table: LockTable) -> None:
    lease = table.acquire("a", owner="task:1")
    table.release_all()
    table.acquire("a", owner="task:1")  # same owner, another lease
    with pytest.raises(NotHeld):
        lease.release()
    assert names_held(table) == {"a": "task:1"}


def test_release_owner_returns_the_names(table: LockTable) -> None:
    table.acquire("a", "b", owner="task:1")
    table.acquire("c", owner="task:1")
    table.acquire("d", owner="task:2")
    assert sorted(table.release_owner("task:1")) == ["a", "b", "c"]
    assert names_held(table) == {"d": "task:2"}
    assert table.release_owner("task:1") == []


def test_release_all(table: LockTable) -> None:
    table.acquire("a", "b", owner="task:1")
    table.acquire("c", owner="task:2")
    assert sorted(table.release_all()) == ["a", "b", "c"]
    assert table.held() == []
    assert table.release_all() == []


# --- held() -------------------------------------------------------------------------------------


def test_held_shows_the_holder_fields(table: LockTable) -> None:
    before = time.time()
    lease = table.acquire("b", "a", note="a note")
    after = time.time()
    held = table.held()
    assert [h.name for h in held] == ["a", "b"]
    me = current_process()
    for h in held:
        assert h.liveness is Liveness.ALIVE
        holder = h.holder
        assert holder.owner == me_owner()
        assert holder.pid == os.getpid()
        assert holder.host == socket.gethostname()
        assert holder.start == me.start
        assert holder.boot == me.boot
        assert holder.pidns == me.pidns
        assert before - 1 <= holder.since <= after + 1
        assert holder.token == lease.token
        assert holder.note == "a note"


def test_held_says_unknown_for_entries_without_a_process(table: LockTable) -> None:
    table.acquire("a", owner="cli:deploy", process=None)
    [h] = table.held()
    assert h.holder.pid is None
    assert h.liveness is Liveness.UNKNOWN
    assert table.reap() == []
    with pytest.raises(LockHeld):
        table.acquire("a", owner="task:2")


def test_entry_without_a_process_needs_an_owner(table: LockTable) -> None:
    with pytest.raises(ValueError):
        table.acquire("a", process=None)
    assert table.held() == []


def test_namespaces_are_independent(db_url: str, namespace: str, table: LockTable) -> None:
    with tasklocks.connect(db_url, namespace=namespace + ".other") as second:
        table.acquire("a", owner="task:1")
        second.acquire("a", owner="task:2")  # not blocked by the first namespace
        assert names_held(table) == {"a": "task:1"}
        assert names_held(second) == {"a": "task:2"}
        table.release("a", owner="task:1")
        assert table.held() == []
        assert names_held(second) == {"a": "task:2"}
        assert second.release_all() == ["a"]


# --- dead holders --------------------------------------------------------------------------------


@pytest.mark.parametrize("zombie", [False, True], ids=["waited", "zombie"])
def test_dead_holder_is_reclaimed_by_the_next_acquire(
    db_url: str, namespace: str, table: LockTable, caplog: pytest.LogCaptureFixture, zombie: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="tasklocks")
    with holder_process(db_url, namespace, "a", "b") as (proc, _token):
        assert {h.name: h.liveness for h in table.held()} == {
            "a": Liveness.ALIVE,
            "b": Liveness.ALIVE,
        }
        with pytest.raises(LockHeld):
            table.acquire("a")
        proc.send_signal(signal.SIGKILL)
        if not zombie:
            proc.wait()
        else:
            deadline = time.monotonic() + WAIT  # killed, not yet waited for
            while _proc_state(proc.pid) != "Z":
                assert time.monotonic() < deadline, "the killed holder never became a zombie"
                time.sleep(0.001)
        assert {h.liveness for h in table.held()} == {Liveness.DEAD}
        lease = table.acquire("a")
        held = {h.name: h for h in table.held()}
        assert held["a"].holder.owner == me_owner()
        assert held["a"].holder.token == lease.token
        assert held["a"].liveness is Liveness.ALIVE
        # "b" was not asked for: it still names the dead holder until someone wants it.
        assert held["b"].holder.pid == proc.pid
        assert held["b"].liveness is Liveness.DEAD
    records = [r for r in caplog.records if r.name == "tasklocks" and r.levelno == logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    assert " a " in message
    assert str(proc.pid) in message
    assert namespace in message


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()[0]


def test_waiter_gets_the_lock_when_its_holder_is_killed(
    db_url: str, namespace: str, table: LockTable
) -> None:
    with holder_process(db_url, namespace, "a") as (proc, token):

        def on_wait(holders: Mapping[str, Holder]) -> None:
            assert holders["a"].pid == proc.pid
            proc.send_signal(signal.SIGKILL)

        lease = table.acquire("a", wait=True, timeout=WAIT, on_wait=on_wait)
        assert lease.token > token
        assert names_held(table) == {"a": me_owner()}


def test_reap_removes_dead_entries_and_returns_them(
    db_url: str, namespace: str, table: LockTable, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tasklocks")
    table.acquire("mine", owner="task:alive")
    with holder_process(db_url, namespace, "a", "b") as (proc, token):
        assert table.reap() == []  # alive: nothing to reap
        proc.kill()
        proc.wait()
        reaped = table.reap()
        assert sorted(name for name, _ in reaped) == ["a", "b"]
        for _, holder in reaped:
            assert holder.pid == proc.pid
            assert holder.owner == pid_owner(proc.pid)
            assert holder.token == token
        assert names_held(table) == {"mine": "task:alive"}
        assert table.reap() == []
    assert sum(r.name == "tasklocks" for r in caplog.records) == 2


def test_reap_of_an_owner_takes_the_owners_it_heads(table: LockTable) -> None:
    """``reap(owner="task:7")`` is a task's cleanup: it takes the dead entries of ``task:7`` and
    of the owners it heads (``task:7:aio-1``, tasklocks.aio's inside that task), not those of
    ``task:70`` or ``task:8``, and never a live one."""
    me = current_process()
    dead = ProcessIdentity(pid=_dead_pid(), start="1", boot=me.boot, host=me.host, pidns=me.pidns)
    for name, owner in (("a", "task:7"), ("b", "task:7:aio-1"), ("c", "task:70"), ("d", "task:8")):
        table.acquire(name, owner=owner, process=dead)
    table.acquire("e", owner="task:7:aio-2")  # alive (this process)
    reaped = table.reap(owner="task:7")
    assert sorted((name, h.owner) for name, h in reaped) == [("a", "task:7"), ("b", "task:7:aio-1")]
    assert names_held(table) == {"c": "task:70", "d": "task:8", "e": "task:7:aio-2"}


def test_holder_with_a_reused_pid_is_dead(table: LockTable) -> None:
    me = current_process()
    reused = ProcessIdentity(pid=me.pid, start="1", boot=me.boot, host=me.host, pidns=me.pidns)
    table.acquire("a", owner="task:old", process=reused)
    assert [h.liveness for h in table.held()] == [Liveness.DEAD]
    lease = table.acquire("a", owner="task:new")
    assert names_held(table) == {"a": "task:new"}
    assert lease.names == ("a",)


def test_holder_on_another_host_is_never_reclaimed(table: LockTable) -> None:
    me = current_process()
    gone = _dead_pid()
    remote = ProcessIdentity(
        pid=gone, start="12345", boot=me.boot, host="elsewhere", pidns=me.pidns
    )
    table.acquire("a", owner="task:remote", process=remote)
    [h] = table.held()
    assert h.holder.host == "elsewhere"
    assert h.holder.pid == gone
    assert h.liveness is Liveness.UNKNOWN
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:local")
    assert info.value.held["a"].owner == "task:remote"
    assert table.reap() == []
    assert names_held(table) == {"a": "task:remote"}


def test_holder_in_another_pid_namespace_is_never_reclaimed(table: LockTable) -> None:
    me = current_process()
    other_ns = ProcessIdentity(
        pid=_dead_pid(), start="12345", boot=me.boot, host=me.host, pidns="other-namespace"
    )
    table.acquire("a", owner="task:container", process=other_ns)
    assert [h.liveness for h in table.held()] == [Liveness.UNKNOWN]
    with pytest.raises(LockHeld):
        table.acquire("a", owner="task:local")
    assert table.reap() == []


def _dead_pid() -> int:
    """The pid of a process that has exited and been waited for."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- corrupt rows ---------------------------------------------------------------------------------

GARBAGE = {
    "not-json": "{this is not json",
    "truncated": '{"format":1,"locks":{"a":{"owner":"task:1","pid":nu',
    "not-a-document": '["just", "a", "list"]',
    "bad-entry": '{"format":1,"locks":{"a":{"owner":12}}}',
    "newer-format": '{"format":99,"locks":{}}',
}


def write_row(db_url: str, namespace: str, data: str, *, bump: bool) -> None:
    """Overwrite the namespace's ``data`` column behind tasklocks' back, with the driver;
    ``bump`` also adds one to ``version``, as a careful hand edit would."""
    version = ", version = version + 1" if bump else ""
    sql = f"UPDATE {TABLE} SET data = %s{version} WHERE namespace = %s"
    assert raw_sql(db_url, sql, (data, namespace)) == 1


def corrupt(
    db_url: str, namespace: str, table: LockTable, kind: str, *, bump: bool = True
) -> Snapshot:
    # Make sure the row exists, and that ``table`` knows its version and text: a long-lived
    # process has a cached snapshot of the row when someone edits it by hand.
    table.acquire("a", owner="task:1").release()
    try:
        write_row(db_url, namespace, GARBAGE[kind], bump=bump)
    except Exception as exc:  # a column type that validates JSON refuses some garbage
        if kind in ("not-json", "truncated"):
            pytest.skip(f"this database refuses non-JSON text in the data column: {exc}")
        raise
    return table.raw()


@pytest.mark.parametrize("bump", [True, False], ids=["data-and-version", "data-only"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_corrupt_document_is_refused_and_left_alone(
    db_url: str,
    namespace: str,
    table: LockTable,
    kind: str,
    bump: bool,
) -> None:
    before = corrupt(db_url, namespace, table, kind, bump=bump)
    # A free name no document keeps is taken in its own row (store/_names.py), without reading
    # the document; the names the document keeps stay marked, and every change through it is
    # refused.
    table.acquire("b", owner="task:2").release()
    table.acquire("b", owner="task:2", wait=True, timeout=1).release()
    attempts: list[Callable[[], object]] = [
        lambda: table.acquire("a", "b", owner="task:2"),
        lambda: table.release("a", owner="task:1"),
        table.release_all,
        table.reap,
        table.held,
    ]
    for attempt in attempts:
        with pytest.raises(CorruptLockTable) as info:
            attempt()
        assert info.value.namespace == namespace
        assert repr(namespace) in str(info.value)
        assert "repair" in str(info.value)
    after = table.raw()
    assert after == before  # same version, same text: never overwritten silently
    if parse_url(db_url).scheme == "sqlite":
        assert after.data == GARBAGE[kind]


@pytest.mark.parametrize("kind", ["not-json", "bad-entry"])
def test_repair_resets_a_corrupt_document_and_returns_the_old_text(
    db_url: str, namespace: str, table: LockTable, kind: str
) -> None:
    before = corrupt(db_url, namespace, table, kind)
    old = table.repair()
    assert old.data == before.data
    assert old.version == before.version
    assert table.held() == []
    assert table.raw().version > before.version
    lease = table.acquire("a", "b", owner="task:1")
    assert lease.token > before.version
    assert names_held(table) == {"a": "task:1", "b": "task:1"}


def test_repair_of_a_healthy_table_frees_everything(table: LockTable) -> None:
    table.acquire("a", owner="task:1")
    old = table.repair()
    assert '"a"' in old.data
    assert table.held() == []


def test_a_corrupt_namespace_does_not_affect_another(
    db_url: str, namespace: str, table: LockTable
) -> None:
    corrupt(db_url, namespace, table, "not-a-document")
    with tasklocks.connect(db_url, namespace=namespace + ".ok") as healthy:
        with healthy.acquire("a", owner="task:1"):
            assert names_held(healthy) == {"a": "task:1"}
        assert healthy.held() == []


# --- lost replies -------------------------------------------------------------------------------


class LosingStore:
    """A store whose next ``lose`` writes are applied but answered with OutcomeUnknown
    (a connection that dropped after the COMMIT), or, with ``before=True``, not applied at all
    (dropped before the statement reached the server)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url, self.table, self.local = inner.url, inner.table, inner.local
        self.lose = 0
        self.before = False
        self.lost = 0

    def read(self, namespace: str) -> Snapshot:
        return self.inner.read(namespace)

    def transact(
        self,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
        names: Sequence[str] | None = None,
    ) -> Snapshot:
        if self.lose and self.before:
            self.lose -= 1
            self.lost += 1
            raise OutcomeUnknown("connection lost before the write (test)")
        wrote: list[bool] = []

        def spy(snap: Snapshot) -> tuple[str, bool] | None:
            change = compute(snap)
            wrote.append(change is not None)
            return change

        snap = self.inner.transact(namespace, spy, hint, names)
        if self.lose and wrote and wrote[-1]:
            self.lose -= 1
            self.lost += 1
            raise OutcomeUnknown("connection lost after the write (test)")
        return snap

    def reset(self, namespace: str, data: str) -> Snapshot:
        return self.inner.reset(namespace, data)

    def wait_for_change(
        self,
        namespace: str,
        version: int,
        timeout: float,
        wake_fd: int | None = None,
        *,
        pace: bool = False,
    ) -> bool:
        return self.inner.wait_for_change(namespace, version, timeout, wake_fd, pace=pace)

    def namespaces(self) -> list[str]:
        return self.inner.namespaces()

    def open_session(
        self, session: str, owner: str, host: str, pid: int | None, ttl: float
    ) -> None:
        self.inner.open_session(session, owner, host, pid, ttl)

    def renew_session(self, session: str) -> bool:
        return self.inner.renew_session(session)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def losing(db_url: str, namespace: str) -> Iterator[tuple[LockTable, LosingStore]]:
    store = LosingStore(open_store(db_url))
    with LockTable(store, namespace, owns_store=True) as t:
        yield t, store


@pytest.mark.parametrize("before", [False, True], ids=["reply-lost", "request-lost"])
def test_acquire_survives_a_lost_reply(
    losing: tuple[LockTable, LosingStore], other: LockTable, before: bool
) -> None:
    table, store = losing
    start = table.raw().version
    store.lose, store.before = 1, before
    lease = table.acquire("a", "b", owner="task:1")
    assert store.lost == 1
    held = other.held()
    assert [(h.name, h.holder.owner, h.holder.lease) for h in held] == [
        ("a", "task:1", lease.lease_id),
        ("b", "task:1", lease.lease_id),
    ]
    assert {h.holder.token for h in held} == {lease.token}
    assert other.raw().version == start + 1  # written exactly once
    lease.release()
    assert other.held() == []


@pytest.mark.parametrize("before", [False, True], ids=["reply-lost", "request-lost"])
def test_lease_release_survives_a_lost_reply(
    losing: tuple[LockTable, LosingStore], other: LockTable, before: bool
) -> None:
    table, store = losing
    lease = table.acquire("a", "b", owner="task:1")
    start = table.raw().version
    store.lose, store.before = 1, before
    lease.release()
    assert store.lost == 1
    assert lease.released
    assert other.held() == []
    assert other.raw().version == start + 1
    assert other.acquire("a", owner="task:2").token > lease.token


@pytest.mark.parametrize("before", [False, True], ids=["reply-lost", "request-lost"])
def test_release_by_name_survives_a_lost_reply(
    losing: tuple[LockTable, LosingStore], other: LockTable, before: bool
) -> None:
    table, store = losing
    table.acquire("a", owner="task:1")
    table.acquire("b", owner="task:2")
    store.lose, store.before = 1, before
    table.release("a", owner="task:1")
    assert store.lost == 1
    assert names_held(other) == {"b": "task:2"}


def test_acquire_after_a_lost_reply_is_not_taken_for_reentry(
    losing: tuple[LockTable, LosingStore], other: LockTable
) -> None:
    """The retry finds the entry it wrote itself, owned by the same owner: that is ours, not a
    second acquisition (which would raise LockHeld)."""
    table, store = losing
    store.lose = 1
    lease = table.acquire("a")
    assert names_held(other) == {"a": me_owner()}
    with pytest.raises(LockHeld):
        table.acquire("a")  # a real second acquisition still is refused
    lease.release()


def test_acquire_after_a_lost_reply_still_refuses_a_live_holder(
    losing: tuple[LockTable, LosingStore], other: LockTable
) -> None:
    table, store = losing
    other.acquire("a", owner="task:other")
    store.lose, store.before = 1, True
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:1")
    assert info.value.held["a"].owner == "task:other"
    assert names_held(other) == {"a": "task:other"}


def test_reentrant_acquire_after_a_lost_request_still_fails_at_once(
    losing: tuple[LockTable, LosingStore],
) -> None:
    table, store = losing
    table.acquire("a", owner="task:1")
    store.lose, store.before = 1, True
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:1", wait=True, timeout=2)
    assert not isinstance(info.value, LockTimeout)


# --- decisions are made on the current row, never on a cached copy ------------------------------


def test_release_decides_on_the_current_row(table: LockTable, other: LockTable) -> None:
    table.acquire("warm", owner="task:0").release()  # table now caches a row where "a" is free
    other.acquire("a", owner="task:1")  # another connection takes "a" for task:1
    table.release("a", owner="task:1")
    assert other.held() == []


def test_acquire_decides_reentry_on_the_current_row(table: LockTable, other: LockTable) -> None:
    table.acquire("a", owner="task:1")  # table caches a row where task:1 holds "a"
    other.release("a", owner="task:1")  # released through another connection
    lease = table.acquire("a", owner="task:1")  # free now: not a re-entry
    assert names_held(other) == {"a": "task:1"}
    assert lease.names == ("a",)


class LosingFastStore:
    """Delegates to a real store; its one-statement acquire/release lose one reply on request
    (after or before the statement ran), as a dropped connection would."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.lose = 0
        self.before = False
        self.lost = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def _maybe_lose(self, call: str, *args: object) -> int | None:
        method = getattr(self.inner, call)
        if self.lose:
            self.lose -= 1
            self.lost += 1
            if not self.before:
                method(*args)
            raise OutcomeUnknown(f"{call}: reply lost (test)")
        result: int | None = method(*args)
        return result

    def fast_acquire(
        self, namespace: str, names: tuple[str, ...], lease: str, record: str
    ) -> int | None:
        return self._maybe_lose("fast_acquire", namespace, names, lease, record)

    def fast_release(
        self, namespace: str, names: tuple[str, ...], lease: str, renewed: bool = False
    ) -> int | None:
        return self._maybe_lose("fast_release", namespace, names, lease, renewed)

    def lost_releases(self, check: bool = False) -> list[tuple[str, str]]:
        # (Defined, not only delegated: FastPaths' isinstance check looks the methods up on the
        # class from Python 3.12.)
        lost: list[tuple[str, str]] = self.inner.lost_releases(check)  # type: ignore[attr-defined]
        return lost


@pytest.fixture
def losing_fast(db_url: str, namespace: str) -> Iterator[tuple[LockTable, LosingFastStore]]:
    inner = open_store(db_url)
    assert hasattr(inner, "fast_acquire"), "every adapter takes a free name in one statement"
    store = LosingFastStore(inner)
    with LockTable(store, namespace, owns_store=True) as t:  # type: ignore[arg-type]
        yield t, store


@pytest.mark.parametrize("db_url", ["sqlite", "mysql", "postgresql"], indirect=True)
@pytest.mark.parametrize("before", [False, True], ids=["reply-lost", "request-lost"])
def test_one_statement_acquire_and_release_survive_a_lost_reply(
    losing_fast: tuple[LockTable, LosingFastStore], other: LockTable, before: bool
) -> None:
    table, store = losing_fast
    table.acquire("warm", owner="task:0").release()  # moves the namespace: names take rows
    start = other.raw().version
    store.lose, store.before = 1, before
    lease = table.acquire("a", owner="task:1")  # its reply lost: the full path takes over
    assert store.lost == 1
    held = other.held()
    assert [(h.name, h.holder.lease, h.holder.token) for h in held] == [
        ("a", lease.lease_id, lease.token)
    ]
    # Written once: in its row (the reply was lost: the full path finds it there and writes
    # nothing), or by the document (the request was lost).
    assert other.raw().version == (start + 1 if before else start)
    in_row = table.acquire("c", owner="task:1")  # taken in its row
    store.lose, store.before = 1, before
    in_row.release()  # its reply lost: the full path releases it, or finds it released
    assert store.lost == 2
    assert in_row.released
    assert [h.name for h in other.held()] == ["a"]
    lease.release()
    assert other.held() == []


class CountingFastStore(LosingFastStore):
    """A :class:`LosingFastStore` that counts its one-statement acquisitions, and can make the
    next ones fail before anything is sent (``unreachable``), as a server that is down does."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.tries = 0
        self.unreachable = 0

    def fast_acquire(
        self, namespace: str, names: tuple[str, ...], lease: str, record: str
    ) -> int | None:
        self.tries += 1
        if self.unreachable:
            self.unreachable -= 1
            raise StoreUnreachable("the server does not answer (test)")
        return super().fast_acquire(namespace, names, lease, record)


@pytest.fixture
def counting_fast(db_url: str, namespace: str) -> Iterator[tuple[LockTable, CountingFastStore]]:
    store = CountingFastStore(open_store(db_url))
    with LockTable(store, namespace, owns_store=True) as t:  # type: ignore[arg-type]
        t.acquire("warm", owner="task:0").release()  # moves the namespace: names take rows
        yield t, store


@pytest.mark.parametrize("db_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_refused_try_in_the_row_is_not_made_again(
    counting_fast: tuple[LockTable, CountingFastStore], other: LockTable
) -> None:
    """acquire(name) tries the name's row once (``_quick_acquire``); refused there, the steps
    find out why through the document without trying the row again."""
    table, store = counting_fast
    held = other.acquire("a", owner="task:9")
    store.tries = 0
    with pytest.raises(LockHeld) as info:
        table.acquire("a", owner="task:1")
    assert store.tries == 1
    assert [h.owner for h in info.value.holders["a"]] == ["task:9"]
    held.release()
    store.tries = 0
    with table.acquire("a", owner="task:1") as lease:  # free again: taken in its row
        assert store.tries == 1 and lease.token > held.token
    assert not table._unsure


@pytest.mark.parametrize("db_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_try_in_the_row_that_finds_the_server_down(
    counting_fast: tuple[LockTable, CountingFastStore], other: LockTable
) -> None:
    """Nothing was sent: without ``wait`` the error is raised and nothing is kept; with it, the
    steps go on (they wait through an outage) and take the name through the document."""
    table, store = counting_fast
    store.unreachable = 1
    with pytest.raises(StoreUnreachable):
        table.acquire("a", owner="task:1")
    assert other.held() == [] and not table._unsure
    store.unreachable, store.tries = 1, 0
    with table.acquire("a", owner="task:1", wait=True, timeout=WAIT) as lease:
        assert store.tries == 1  # the steps took it through the document
        assert [(h.name, h.holder.lease) for h in other.held()] == [("a", lease.lease_id)]
    assert other.held() == [] and not table._unsure
