"""Sessions, over every backend: a holder keeps its locks while it renews; once its session
expires by the database's clock anyone may take them, and the old holder learns it lost them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import tasklocks
from tasklocks import (
    LeaseLost,
    Liveness,
    LockHeld,
    LockTable,
    NotHeld,
    StoreUnavailable,
    StoreUnreachable,
    TasklocksError,
)
from tasklocks.store import Compute, OutcomeUnknown, Snapshot, Store, open_store

TTL = 1.0  # the shortest ttl allowed: these tests wait for expiries
WAIT = 20.0  # upper bound for anything that should happen "soon"; never the reason a test passes

# A holder in a process of its own: acquires NAME with the given ttl, prints the token, then
# waits for "report" on stdin and prints what it knows of its lease as JSON.
_HOLDER = r"""
import json, sys, time
import tasklocks
url, namespace, name, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
table = tasklocks.connect(url, namespace, ttl=ttl)
lease = table.acquire(name)
print(lease.token, flush=True)
for line in sys.stdin:
    if line.strip() == "report":
        # after a pause, the watchdog thread notices within one renewal period
        noticed = lease.lost.wait(ttl / 3 + 1.0)
        try:
            lease.check()
            checked = "ok"
        except tasklocks.LeaseLost as exc:
            checked = "LeaseLost: " + str(exc)
        try:
            lease.release()
            released = "ok"
        except tasklocks.LeaseLost as exc:
            released = "LeaseLost"
        print(json.dumps({"lost": noticed, "check": checked, "release": released}), flush=True)
"""


@pytest.fixture
def table(db_url: str, namespace: str) -> Iterator[LockTable]:
    with tasklocks.connect(db_url, namespace=namespace, ttl=TTL) as t:
        yield t


@contextmanager
def holder(db_url: str, namespace: str, name: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A process that holds ``name`` with a ttl of TTL; killed (and continued) afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, db_url, namespace, name, str(TTL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the holder could not take {name}: {line!r}"
        yield proc, int(line)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_entries_name_the_session_and_held_says_how_long_it_has_left(table: LockTable) -> None:
    lease = table.acquire("a")
    [held] = table.held()
    assert lease.session is not None
    assert held.holder.session == lease.session.id
    assert held.liveness is Liveness.ALIVE
    assert held.expires_in is not None and 0.0 < held.expires_in <= TTL * 4 / 3
    assert not lease.lost.is_set()
    lease.check()


def test_a_live_holder_keeps_its_locks_across_many_ttls(
    db_url: str, namespace: str, table: LockTable
) -> None:
    lease = table.acquire("a")
    with tasklocks.connect(db_url, namespace=namespace, ttl=TTL) as other:
        started = time.monotonic()
        while time.monotonic() - started < 3 * TTL:  # renewed every ttl/3 meanwhile
            with pytest.raises(LockHeld):
                other.acquire("a", owner="task:other")
            time.sleep(0.2)
        assert [h.liveness for h in other.held()] == [Liveness.ALIVE]
    assert not lease.lost.is_set()
    lease.check()
    lease.release()
    assert table.held() == []


def test_entries_without_a_process_have_no_session(table: LockTable) -> None:
    lease = table.acquire("a", owner="cli:deploy", process=None)
    [held] = table.held()
    assert held.holder.session is None and held.expires_in is None
    assert lease.session is None and not lease.lost.is_set()
    lease.check()


def test_closing_the_table_stops_renewing_its_session(db_url: str, namespace: str) -> None:
    first = tasklocks.connect(db_url, namespace=namespace, ttl=TTL)
    lease = first.acquire("a")
    first.close()
    with tasklocks.connect(db_url, namespace=namespace, ttl=TTL) as second:
        assert [h.liveness for h in second.held()] == [Liveness.ALIVE]
        taken = second.acquire("a", owner="task:next", wait=True, timeout=WAIT)
        assert taken.token > lease.token
    assert lease.lost.wait(WAIT)  # the watchdog still tells


def test_a_closed_session_keeps_no_thread_once_nothing_is_held(db_url: str, namespace: str) -> None:
    """A process that opens a table per request must not collect a thread per table for the
    session's lifetime: closing ends its threads when nothing is held, else once the last lease
    still held is released."""
    with tasklocks.connect(db_url, namespace=namespace, ttl=30) as table:
        lease = table.acquire("a")
        session = lease.session
        assert session is not None and all(t.is_alive() for t in session.threads)
        lease.release()
        table.acquire("b").release()
    for thread in session.threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in session.threads)
    assert not session.lost.is_set()  # nothing was lost: the watchdog just ended

    store = open_store(db_url)  # a store the tables share, so a lease outlives its table
    try:
        with LockTable(store, namespace, ttl=30) as table:
            kept = table.acquire("c")
            session = kept.session
        assert session is not None
        renew, watch = session.threads
        renew.join(WAIT)
        assert not renew.is_alive()  # closed: no renewal
        time.sleep(0.2)
        assert watch.is_alive()  # it still keeps time for the lease held
        kept.release()
        watch.join(WAIT)
        assert not watch.is_alive() and not kept.lost.is_set()
    finally:
        store.close()


def test_locks_released_by_name_or_owner_leave_no_thread_behind_close(
    db_url: str, namespace: str
) -> None:
    """(The session counted only releases through a Lease: a lease released by name stayed
    live, and its watchdog lived on for the session's lifetime, then set its lost.)"""
    with tasklocks.connect(db_url, namespace=namespace, ttl=30) as table:
        both = table.acquire("a", "b", owner="task:1")
        table.acquire("c", owner="task:2")
        session = both.session
        assert session is not None
        table.release("a", owner="task:1")
        assert session.live[both.lease_id] == ("task:1", ("b",)) and len(session.live) == 2
        table.release("b", owner="task:1")  # the last of its names
        assert both.lease_id not in session.live
        assert table.release_owner("task:2") == ["c"]
        assert not session.live
    for thread in session.threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in session.threads) and not both.lost.is_set()


@pytest.mark.parametrize("how", ["release_all", "repair"])
def test_locks_an_administrator_released_leave_no_thread_behind_close(
    db_url: str, namespace: str, how: str
) -> None:
    """(release_all and repair released the session's leases in the database and left them
    live: the closed session's watchdog lived on for the session's lifetime, then set lost.)
    A lease so released is not lost (its session holds): its release raises NotHeld."""
    with tasklocks.connect(db_url, namespace=namespace, ttl=30) as table:
        table.acquire("warm").release()  # moves the namespace: names take rows
        mine = table.acquire("a")
        assert mine.lease_id in table._in_rows  # (taken in its name's row)
        table.acquire("b", "c", owner="task:1", shared="c")
        session = mine.session
        assert session is not None and len(session.live) == 2
        if how == "release_all":
            assert sorted(table.release_all()) == ["a", "b", "c"]
        else:
            table.repair()
        assert table.held() == [] and not session.live
        later = table.acquire("a")  # taken after it: held, live
        assert list(session.live) == [later.lease_id]
        mine.check()
        with pytest.raises(NotHeld):
            mine.release()
        later.release()
    for thread in session.threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in session.threads) and not mine.lost.is_set()


def test_a_lease_released_elsewhere_leaves_no_thread_once_its_release_finds_out(
    db_url: str, namespace: str
) -> None:
    """Another table (``tasklocks release --all``, say) cannot tell this session what it
    released; the lease's release, which raises NotHeld, finds which of its names it holds no
    more. (They stayed live: the closed session's watchdog lived on, then set lost.)"""
    with tasklocks.connect(db_url, namespace=namespace, ttl=30) as table:
        table.acquire("warm").release()  # moves the namespace: names take rows
        row = table.acquire("a")
        assert row.lease_id in table._in_rows  # (taken in its name's row)
        pair = table.acquire("b", "c")
        doc = table.acquire("d", shared=True)  # (in the document)
        part = table.acquire("e", "f", owner="task:1")
        session = row.session
        assert session is not None and len(session.live) == 4
        with tasklocks.connect(db_url, namespace=namespace) as admin:
            admin.release("e", owner="task:1")
            with pytest.raises(NotHeld):
                part.release()  # all or nothing: "f" is still held
            assert session.live[part.lease_id] == ("task:1", ("f",))
            assert sorted(admin.release_all()) == ["a", "b", "c", "d", "f"]
        assert len(session.live) == 4  # (this table cannot know)
        for lease in (row, pair, doc, part):
            with pytest.raises(NotHeld):
                lease.release()
        assert not session.live
    for thread in session.threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in session.threads) and not row.lost.is_set()


@pytest.mark.parametrize("how", ["reap", "acquire"])
def test_locks_of_a_dead_process_taken_over_leave_no_thread_behind_close(
    db_url: str, namespace: str, how: str
) -> None:
    """Entries for another process of this host are kept by this process's session: once that
    process is dead, a reap, or an acquisition that takes a name over, releases them, and the
    session holds them no more (it kept them live until its expiry). Its own lease stays."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with tasklocks.connect(db_url, namespace=namespace, ttl=30) as table:
            table.acquire("warm").release()  # moves the namespace: names take rows
            child = tasklocks.process_identity(sleeper.pid)
            theirs = table.acquire("a", "b", owner="job:1", process=child)
            mine = table.acquire("c")
            session = mine.session
            assert session is not None and theirs.session is session
            sleeper.kill()
            sleeper.wait()
            if how == "reap":
                assert sorted(n for n, _ in table.reap()) == ["a", "b"]
            else:
                taken = table.acquire("a", owner="task:2")  # "b" is not wanted: still held
                assert session.live[theirs.lease_id] == ("job:1", ("b",))
                taken.release()
                assert [n for n, _ in table.reap()] == ["b"]
            assert list(session.live) == [mine.lease_id]
            mine.release()
        for thread in session.threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in session.threads) and not mine.lost.is_set()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lease_that_comes_after_close_is_still_watched(db_url: str, namespace: str) -> None:
    """An acquisition that another thread finishes after close() (its write was on its way)
    gets a watchdog again: its lost is set at the expiry, as for a lease held at close."""
    with tasklocks.connect(db_url, namespace=namespace, ttl=TTL) as table:
        table.acquire("a").release()
        session = table._session
    assert session is not None
    session.threads[1].join(WAIT)
    assert not session.threads[1].is_alive()
    session.hold("late", "me", ("a",))  # as Lease() does when the write returns
    assert session.threads[1].is_alive() and not session.lost.is_set()
    assert session.lost.wait(WAIT)  # at the expiry: nothing renews a closed session


@pytest.mark.parametrize("own_store", [False, True])
def test_a_wait_on_a_closed_table_gives_up_and_leaves_nothing(
    db_url: str, namespace: str, own_store: bool
) -> None:
    """Another thread's close() ends a wait: it raises, and its place in the queue is given
    back, whether the table's store stays open (shared) or closes with it (connect())."""
    store = open_store(db_url)
    try:
        other = LockTable(store, namespace, ttl=TTL)
        if own_store:
            waiter = tasklocks.connect(db_url, namespace, ttl=TTL)
        else:
            waiter = LockTable(store, namespace, ttl=TTL)
        held = other.acquire("x", owner="other")
        outcome: list[BaseException | object] = []

        def wait() -> None:
            try:
                outcome.append(waiter.acquire("x", owner="waiter", wait=True, timeout=WAIT))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + WAIT
        while not other.waiting():
            assert time.monotonic() < deadline, "the waiter never queued"
            time.sleep(0.02)
        waiter.close()
        held.release()
        thread.join(WAIT)
        [result] = outcome
        assert isinstance(result, StoreUnavailable) and "was closed" in str(result), result
        assert other.held() == [] and other.waiting() == []
        with pytest.raises(StoreUnavailable, match="was closed; open it again"):
            waiter.acquire("y")  # and no session is opened for it
        assert waiter._session is None
        assert other.held() == []
        other.close()
    finally:
        store.close()


def test_a_paused_holder_loses_its_locks_and_learns_it(
    db_url: str, namespace: str, table: LockTable
) -> None:
    with holder(db_url, namespace, "a") as (proc, old_token):
        paused = time.monotonic()
        proc.send_signal(signal.SIGSTOP)  # for 3 x ttl: it cannot renew
        with pytest.raises(LockHeld):
            table.acquire("a", owner="task:next")
        lease = table.acquire("a", owner="task:next", wait=True, timeout=WAIT)
        waited = time.monotonic() - paused
        assert waited >= TTL - 0.05  # a ttl at least, whenever it stopped renewing
        assert lease.token > old_token
        time.sleep(max(0.0, 3 * TTL - waited))
        proc.send_signal(signal.SIGCONT)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("report\n")
        proc.stdin.flush()
        report = json.loads(proc.stdout.readline())
        assert report["lost"] is True
        assert report["check"].startswith("LeaseLost: ") and "fencing token" in report["check"]
        assert report["release"] == "LeaseLost"
        [held] = table.held()  # the old holder's release left the new holder's lock alone
        assert (held.holder.owner, held.holder.token) == ("task:next", lease.token)
        assert held.liveness is Liveness.ALIVE


def test_held_says_expired_before_anyone_takes_the_lock(
    db_url: str, namespace: str, table: LockTable
) -> None:
    with holder(db_url, namespace, "a") as (proc, _token):
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + WAIT
        while (held := table.held())[0].liveness is not Liveness.EXPIRED:
            assert held[0].liveness is Liveness.ALIVE
            assert time.monotonic() < deadline, "the paused holder's session never expired"
            time.sleep(0.05)
        assert held[0].expires_in == 0.0
        assert table.reap() == [("a", held[0].holder)]  # expired entries are reaped too


def test_a_lost_lease_is_given_back_and_raises(db_url: str, namespace: str) -> None:
    table = tasklocks.connect(db_url, namespace=namespace, ttl=TTL)
    try:
        lease = table.acquire("a")
        assert lease.session is not None
        lease.session.deadline = 0.0  # as if this process had been paused past its ttl
        with pytest.raises(LeaseLost) as info:
            lease.check()
        assert info.value.exit_code == 75 and info.value.token == lease.token
        assert lease.lost.wait(WAIT)  # the watchdog, woken by check(), sets it
        with pytest.raises(LeaseLost):
            lease.release()
        assert table.held() == []  # what was left of it is given back
        again = table.acquire("a")  # with a new session
        assert again.session is not None and again.session is not lease.session
        assert again.token > lease.token
    finally:
        table.close()


def test_a_forked_child_opens_a_session_of_its_own(table: LockTable, tmp_path: Path) -> None:
    mine = table.acquire("a")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through a file
        code = 1
        try:
            # The parent's session is not this process's, but it lives: its locks too.
            assert [h.liveness for h in table.held()] == [Liveness.ALIVE]
            assert table.reap() == []
            for call in (mine.release, mine.check):  # (check() said LeaseLost: it is not)
                try:
                    call()
                    raise AssertionError("a forked child used its parent's lease")
                except LeaseLost as exc:
                    raise AssertionError(f"the parent's lease is not lost: {exc}") from None
                except TasklocksError as exc:
                    assert "a forked child can neither check nor release it" in str(exc)
            theirs = table.acquire("b")
            assert theirs.session is not None and mine.session is not None
            ok = theirs.session.id != mine.session.id and theirs.session.pid == os.getpid()
            (tmp_path / "child").write_text("ok" if ok else "same session")
            theirs.release()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child").read_text() == "ok"
    assert not mine.lost.is_set()
    assert [h.name for h in table.held()] == ["a"]


@pytest.mark.parametrize("ttl", [0.1, 86_401.0, 1e10, float("inf"), float("nan"), "30", None, True])
def test_ttl_must_be_a_second_to_a_day(db_url: str, ttl: Any) -> None:
    """(A ttl of 1e10 s overflowed the renewal thread's waits; 1e301, the expiry itself: the
    lock showed expired while its holder ran.)"""
    with pytest.raises(ValueError, match="ttl must be 1 to 86400 seconds"):
        tasklocks.connect(db_url, ttl=ttl)


def test_a_reconnect_timeout_that_is_not_a_number_is_refused(db_url: str) -> None:
    """(A NaN one never ended: a call on a server that does not answer waited for ever.)"""
    with pytest.raises(ValueError, match="reconnect_timeout must be a number of seconds"):
        tasklocks.connect(db_url, reconnect_timeout=float("nan"))


def test_a_day_is_a_ttl(db_url: str, namespace: str) -> None:
    with tasklocks.connect(db_url, namespace, ttl=86_400.0) as table, table.acquire("a") as lease:
        assert not lease.lost.is_set()
        (lock,) = table.held()
        assert lock.liveness is Liveness.ALIVE
        assert lock.expires_in is not None and 86_000 < lock.expires_in <= 86_400 * 4 / 3


# --- a call that raises leaves nothing of itself behind -------------------------------------------


class FlakyStore:
    """A real store whose next write is applied but its reply lost, after which the database
    "does not answer" until :meth:`up` (every call raises StoreUnavailable); or whose next
    change, once ``refuse_next`` is set, gets no answer (and is not applied), the database
    answering again at once after it."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url, self.table, self.local = inner.url, inner.table, inner.local
        self.lose_next_write = False
        self.refuse_next = False
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnreachable("the database does not answer (test)")

    def up(self) -> None:
        self.down = False

    def read(self, namespace: str) -> Snapshot:
        self._check()
        return self.inner.read(namespace)

    def transact(
        self,
        namespace: str,
        compute: Compute,
        hint: Snapshot | None,
        names: Sequence[str] | None = None,
    ) -> Snapshot:
        self._check()
        if self.refuse_next:
            self.refuse_next = False
            raise StoreUnreachable("the database does not answer (test)")
        snap = self.inner.transact(namespace, compute, hint, names)
        if self.lose_next_write:
            self.lose_next_write, self.down = False, True
            raise OutcomeUnknown("the reply to the write was lost (test)")
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
        self._check()
        return self.inner.wait_for_change(namespace, version, timeout, wake_fd, pace=pace)

    def namespaces(self) -> list[str]:
        return self.inner.namespaces()

    def open_session(
        self, session: str, owner: str, host: str, pid: int | None, ttl: float
    ) -> None:
        self.inner.open_session(session, owner, host, pid, ttl)

    def renew_session(self, session: str) -> bool:
        self._check()
        return self.inner.renew_session(session)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("settled_by", ["next call", "session renewal"])
def test_an_acquisition_that_raises_leaves_nothing_behind(
    db_url: str, namespace: str, settled_by: str
) -> None:
    flaky = FlakyStore(open_store(db_url))
    with LockTable(flaky, namespace, owns_store=True, ttl=TTL) as table:
        table.held()  # the session opens with the first lock: fine while the database answers
        flaky.lose_next_write = True
        with pytest.raises(StoreUnreachable):
            table.acquire("a", owner="task:mine")
        with tasklocks.connect(db_url, namespace=namespace) as other:
            # The write was applied: its entry is there while the database "does not answer".
            assert [(h.name, h.holder.owner) for h in other.held()] == [("a", "task:mine")]
            flaky.up()
            if settled_by == "next call":
                assert table.held() == []  # the next contact gives it back first
            deadline = time.monotonic() + WAIT
            while other.held():  # the session thread gives it back after its next renewal
                assert time.monotonic() < deadline, "the orphan entry was never given back"
                time.sleep(0.05)
            lease = other.acquire("a", owner="task:other")  # free for anyone again
            assert lease.token > 0


def test_a_release_that_raises_is_completed_once_the_database_answers(
    db_url: str, namespace: str
) -> None:
    flaky = FlakyStore(open_store(db_url))
    with LockTable(flaky, namespace, owns_store=True, ttl=TTL) as table:
        lease = table.acquire("a", owner="task:mine")
        flaky.down = True
        with pytest.raises(StoreUnreachable):
            lease.release()
        with tasklocks.connect(db_url, namespace=namespace) as other:
            assert [h.holder.owner for h in other.held()] == ["task:mine"]  # still held
            flaky.up()
            deadline = time.monotonic() + WAIT
            while other.held():  # given back after the session's next renewal
                assert time.monotonic() < deadline, "the release was never completed"
                time.sleep(0.05)


def test_a_lease_whose_give_back_is_due_is_not_handed_out(db_url: str, namespace: str) -> None:
    """An acquisition granted under a session lost meanwhile gives its lease back and tries
    again. If that give-back gets no answer, the lease waits to be given back later: the
    acquisition must not be handed out under it meanwhile (the later give-back would free what
    the caller holds). It gives it back first, then takes the name again."""
    flaky = FlakyStore(open_store(db_url))
    with LockTable(flaky, namespace, owns_store=True, ttl=TTL) as table:
        table.held()
        session = table._live_session()
        alive = session.alive
        lost_once: list[bool] = []

        def alive_but_once() -> bool:
            if sys._getframe(1).f_code.co_name == "_acquire" and not lost_once:
                lost_once.append(True)
                flaky.refuse_next = True  # the give-back that follows gets no answer
                return False
            return alive()

        session.alive = alive_but_once  # type: ignore[method-assign]
        lease = table.acquire("a", owner="task:mine")
        assert lost_once, "the session was never found lost: nothing was tested"
        assert lease.lease_id not in table._orphans
        assert [h.holder.lease for h in table.held()] == [lease.lease_id]  # (held() settles)
        with tasklocks.connect(db_url, namespace=namespace) as other:
            assert [(h.name, h.holder.lease) for h in other.held()] == [("a", lease.lease_id)]
        lease.release()


@pytest.mark.parametrize("db_url", ["mysql", "postgresql"], indirect=True)
def test_the_sessions_connection_does_not_check_the_schema_again(
    db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process's start opens the table's connection and then the sessions' one: the schema,
    checked by the first, is not checked again by the second (round trips a task's start pays)."""
    from tasklocks.store._base import SQLStore

    checked: list[str] = []
    check = SQLStore._check_schema

    def counted(self: SQLStore, conn: object) -> None:
        checked.append(type(self).__name__)
        check(self, conn)

    monkeypatch.setattr(SQLStore, "_check_schema", counted)
    table = tasklocks.connect(db_url, namespace)
    lease = table.acquire("job")  # opens the session, on the sessions' own connection
    assert lease.session is not None
    assert isinstance(table.store, SQLStore) and table.store._side is not None
    lease.release()
    table.close()
    assert len(checked) == 1
