"""The Store contract, run over every backend (tooz style): SQLite, MySQL/MariaDB, PostgreSQL."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SERVER_BACKENDS, delete_rows, raw_rows, raw_sql, require, server_url

from tasklocks.errors import StoreError, StoreUnavailable
from tasklocks.store import (
    DEFAULT_TABLE,
    EMPTY_DOCUMENT,
    SCHEMA_VERSION,
    OutcomeUnknown,
    Snapshot,
    Store,
    open_store,
    parse_url,
)

# --- helpers ---------------------------------------------------------------------------------


def drop_tables(url: str, table: str) -> None:
    for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
        raw_sql(url, f"DROP TABLE IF EXISTS {table}{suffix}")


def counter(snap: Snapshot) -> int:
    return int(json.loads(snap.data).get("n", 0))


def with_counter(n: int) -> str:
    doc = json.loads(EMPTY_DOCUMENT)
    doc["n"] = n
    return json.dumps(doc)


def increment(wake: bool = False) -> Callable[[Snapshot], tuple[str, bool]]:
    return lambda snap: (with_counter(counter(snap) + 1), wake)


@pytest.fixture
def stores(db_url: str, namespace: str) -> Iterator[Callable[[], Store]]:
    """Opens stores on ``db_url`` (default table); closes them and deletes the test's row after."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(open_store(db_url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()
    raw_sql(db_url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


@pytest.fixture
def store(stores: Callable[[], Store]) -> Store:
    return stores()


@pytest.fixture
def fresh_table(db_url: str) -> Iterator[str]:
    """A table name no one has used; dropped afterwards."""
    table = "tl_" + uuid.uuid4().hex[:12]
    yield table
    drop_tables(db_url, table)


@pytest.fixture(params=SERVER_BACKENDS)
def server(request: pytest.FixtureRequest) -> str:
    """The URL of a reachable server backend."""
    backend: str = request.param
    require(backend)
    return server_url(backend)


def with_url_part(url: str, *, port: int | None = None, password: str = "", db: str = "") -> str:
    p = parse_url(url)
    user = p.user or ("root" if p.scheme == "mysql" else "postgres")
    auth = f"{user}:{password}" if password else user
    return f"{p.scheme}://{auth}@{p.host}:{port or p.port}/{db or p.database}"


# --- reading and writing ---------------------------------------------------------------------


def test_first_read_is_an_empty_row_at_version_0(store: Store, namespace: str) -> None:
    assert store.read(namespace) == Snapshot(0, EMPTY_DOCUMENT)
    assert store.read(namespace) == Snapshot(0, EMPTY_DOCUMENT)


def test_url_has_no_password(db_url: str) -> None:
    store = open_store(db_url)
    try:
        assert "secret" not in store.url
        assert store.url == parse_url(db_url).display()
    finally:
        store.close()


@pytest.mark.parametrize("with_hint", [False, True])
def test_transact_writes_and_bumps_version_by_one(
    store: Store, namespace: str, with_hint: bool
) -> None:
    first = store.read(namespace)
    after = store.transact(namespace, increment(), first if with_hint else None)
    assert after == Snapshot(first.version + 1, with_counter(1))
    assert store.read(namespace) == after
    again = store.transact(namespace, increment(), after if with_hint else None)
    assert again == Snapshot(first.version + 2, with_counter(2))
    assert store.read(namespace) == again


def test_transact_on_an_unread_namespace_creates_the_row(store: Store, namespace: str) -> None:
    seen: list[Snapshot] = []

    def compute(snap: Snapshot) -> tuple[str, bool]:
        seen.append(snap)
        return with_counter(1), False

    assert store.transact(namespace, compute, None) == Snapshot(1, with_counter(1))
    assert seen == [Snapshot(0, EMPTY_DOCUMENT)]


@pytest.mark.parametrize("with_hint", [False, True])
def test_compute_returning_none_writes_nothing(
    store: Store, namespace: str, with_hint: bool
) -> None:
    before = store.transact(namespace, increment(), None)
    result = store.transact(namespace, lambda snap: None, before if with_hint else None)
    assert result == before
    assert store.read(namespace) == before


@pytest.mark.parametrize("with_hint", [False, True])
def test_compute_raising_writes_nothing_and_propagates(
    store: Store, namespace: str, with_hint: bool
) -> None:
    before = store.transact(namespace, increment(), None)

    def boom(snap: Snapshot) -> tuple[str, bool]:
        raise ZeroDivisionError("from compute")

    with pytest.raises(ZeroDivisionError, match="from compute"):
        store.transact(namespace, boom, before if with_hint else None)
    assert store.read(namespace) == before
    # The store is still usable: no transaction was left open.
    assert store.transact(namespace, increment(), before).version == before.version + 1


def test_stale_hint_recomputes_on_fresh_data(stores: Callable[[], Store], namespace: str) -> None:
    a, b = stores(), stores()
    stale = a.read(namespace)
    moved = b.transact(namespace, lambda snap: (with_counter(5), False), None)
    seen: list[Snapshot] = []

    def compute(snap: Snapshot) -> tuple[str, bool]:
        seen.append(snap)
        return with_counter(counter(snap) + 1), False

    result = a.transact(namespace, compute, stale)
    assert result == Snapshot(moved.version + 1, with_counter(6))
    assert seen[-1] == moved
    assert a.read(namespace) == b.read(namespace) == result


def test_stale_hint_with_no_change_returns_the_current_row(
    stores: Callable[[], Store], namespace: str
) -> None:
    a, b = stores(), stores()
    stale = a.read(namespace)
    moved = b.transact(namespace, increment(), None)
    assert a.transact(namespace, lambda snap: None, stale) == moved


def test_hint_with_hand_edited_data_at_the_same_version_is_not_trusted(
    store: Store, namespace: str, db_url: str
) -> None:
    hint = store.transact(namespace, increment(), None)
    raw_sql(
        db_url,
        f"UPDATE {DEFAULT_TABLE} SET data = %s WHERE namespace = %s",
        (with_counter(41), namespace),
    )
    seen: list[Snapshot] = []

    def compute(snap: Snapshot) -> tuple[str, bool]:
        seen.append(snap)
        return with_counter(counter(snap) + 1), False

    result = store.transact(namespace, compute, hint)
    assert seen[-1] == Snapshot(hint.version, with_counter(41))
    assert result == Snapshot(hint.version + 1, with_counter(42))


def test_refusal_on_a_stale_hint_is_decided_on_the_current_row(
    stores: Callable[[], Store], namespace: str
) -> None:
    a, b = stores(), stores()
    stale = a.read(namespace)
    moved = b.transact(namespace, increment(), None)

    def refuse_when_zero(snap: Snapshot) -> tuple[str, bool]:
        if counter(snap) == 0:
            raise LookupError("refused on a stale row")
        return with_counter(counter(snap) + 1), False

    assert a.transact(namespace, refuse_when_zero, stale) == Snapshot(
        moved.version + 1, with_counter(2)
    )
    with pytest.raises(LookupError):  # a refusal on the current row stands
        a.transact(namespace, lambda snap: refuse_when_zero(Snapshot(0, EMPTY_DOCUMENT)), moved)


def test_concurrent_increments_are_never_lost(stores: Callable[[], Store], namespace: str) -> None:
    per_thread, errors = 200, []
    both = [stores(), stores()]
    both[0].read(namespace)

    def work(store: Store) -> None:
        try:
            hint: Snapshot | None = None
            for _ in range(per_thread):
                hint = store.transact(namespace, increment(), hint)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in both for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = both[1].read(namespace)
    assert counter(final) == per_thread * len(threads)
    assert final.version == per_thread * len(threads)


def test_reset_overwrites_and_bumps_version(store: Store, namespace: str) -> None:
    before = store.transact(namespace, increment(), None)
    after = store.reset(namespace, '{"format":1,"locks":{},"repaired":true}')
    assert after == Snapshot(before.version + 1, '{"format":1,"locks":{},"repaired":true}')
    assert store.read(namespace) == after


def test_reset_creates_a_missing_row(store: Store, namespace: str) -> None:
    assert store.reset(namespace, with_counter(3)) == Snapshot(1, with_counter(3))


def test_namespaces_lists_rows_sorted(
    stores: Callable[[], Store], namespace: str, db_url: str
) -> None:
    store = stores()
    others = [f"{namespace}-b", f"{namespace}-A", f"{namespace}-a"]
    try:
        for name in [namespace, *others]:
            store.read(name)
        mine = [n for n in store.namespaces() if n.startswith(namespace)]
        assert mine == sorted([namespace, *others])
    finally:
        for name in others:
            raw_sql(db_url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (name,))


def test_unicode_and_large_documents_round_trip(store: Store, namespace: str) -> None:
    text = json.dumps({"format": 1, "locks": {}, "note": "ünïcødé ✓ 🐍" * 10, "pad": "x" * 300_000})
    after = store.transact(namespace, lambda snap: (text, False), None)
    assert store.read(namespace) == after == Snapshot(1, text)


def test_forked_child_does_not_disturb_the_parents_connection(store: Store, namespace: str) -> None:
    store.transact(namespace, increment(), None)
    pid = os.fork()
    if pid == 0:  # the child: use the store, then leave without running any cleanup
        code = 1
        try:
            snap = store.transact(namespace, increment(), None)
            store.close()
            code = 0 if counter(snap) == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counter(store.transact(namespace, increment(), store.read(namespace))) == 3


def _kill_session(url: str, store: Store) -> None:
    """End the store's server session from outside, as a server restart or a proxy would."""
    conn: Any = getattr(store, "_conn")  # noqa: B009 (white-box: the adapter's connection)
    if url.startswith("mysql"):
        raw_sql(url, f"KILL {int(conn.thread_id())}")
    else:
        raw_sql(url, "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))


def test_a_killed_session_is_replaced_transparently_on_read(server: str, namespace: str) -> None:
    store = open_store(server)
    try:
        before = store.read(namespace)
        _kill_session(server, store)
        assert store.read(namespace) == before
    finally:
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_a_write_on_a_killed_session_succeeds_or_says_outcome_unknown(
    server: str, namespace: str
) -> None:
    store = open_store(server)
    try:
        hint = store.transact(namespace, increment(), None)
        _kill_session(server, store)
        try:
            result = store.transact(namespace, increment(), hint)
        except OutcomeUnknown as exc:
            _assert_one_clear_line(exc, "may or may not")
            result = store.read(namespace)  # the next call reconnects
        assert counter(result) in (1, 2)
        assert store.read(namespace) == result
    finally:
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


@pytest.mark.parametrize("ran", [True, False], ids=["it-ran", "it-did-not"])
def test_a_task_insert_whose_reply_was_lost_is_written_once(server: str, ran: bool) -> None:
    """(``_locked`` sent the insert again after a lost reply: a second row, pending, of a task
    nobody started, which the reconciliation later called crashed.) The session is ended from
    outside as the insert is sent, after it ran or before; the insert is then looked for by
    the process that started it and the time it gave, and written only if it is not there."""
    from tasklocks.owner import current_process

    table = "tl_" + uuid.uuid4().hex[:12]
    store: Any = open_store(server, table=table)
    me = current_process()
    record = {
        "kind": "run", "target": "[]", "args": "[]", "locks": "[]", "namespace": "n",
        "state": "pending", "timeout": None, "pid": me.pid, "start_token": me.start,
        "boot": me.boot, "host": me.host, "pidns": me.pidns,
    }  # fmt: skip
    try:
        first = store.create_task({**record, "created": time.time()})  # (its table, a task)
        real = store._execute
        cuts: list[str] = []

        def execute(conn: Any, sql: str, params: Any = None) -> Any:
            if not (sql.startswith("INSERT INTO") and "_tasks" in sql) or cuts:
                return real(conn, sql, params)
            cuts.append(sql)
            if ran:
                real(conn, sql, params)
            _kill_session(server, store)
            return real(conn, "SELECT 1" if ran else sql, None if ran else params)  # (fails)

        store._execute = execute
        created = time.time()
        if ran:  # the look fails too: an unknown outcome, not "nothing written" (StoreUnreachable)
            good = store._sql
            store._sql = {**good, "find_task": "SELECT no_such_column FROM {t}_tasks"}
            with pytest.raises(OutcomeUnknown, match="could not look for it"):
                store.create_task({**record, "created": created})
            store._sql, cuts[:] = good, []
            created = time.time()
        task_id = store.create_task({**record, "created": created})
        assert cuts  # the session was cut as the insert went
        rows = store.list_tasks()
        assert [row["id"] for row in rows][:: len(rows) - 1] == [task_id, first]
        assert len(rows) == (3 if ran else 2)  # one row a task (the unknown one's too), never two
        assert store.get_task(task_id)["created"] == created
    finally:
        store.close()
        drop_tables(server, table)


def test_a_row_statement_on_a_killed_session_says_outcome_unknown(
    server: str, namespace: str
) -> None:
    """The warm road of a row statement (no ``_locked`` loop) fails as the loop does: the
    statement was sent, so a connection found gone is an unknown outcome, said in one line;
    the next call reconnects, and the name's row tells what happened."""
    store: Any = open_store(server)
    lease, record = _entry("K-1")
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)  # the rows layout
        assert store.fast_acquire(namespace, ["w"], "K-0", record) == 1
        assert store.fast_release(namespace, ["w"], "K-0") == 1
        _kill_session(server, store)
        try:
            taken = store.fast_acquire(namespace, ["w"], lease, record)
        except OutcomeUnknown as exc:
            _assert_one_clear_line(exc, "may or may not")
            taken = None
        assert taken is None  # the server ended the session before the statement ran
        assert "w" not in _locks(store, namespace)  # reconnected: nothing was written
        assert store.fast_acquire(namespace, ["w"], lease, record) == 2
        assert store.fast_release(namespace, ["w"], lease) == 2
    finally:
        store.close()
        delete_rows(server, namespace)


def test_a_mysql_row_statement_with_an_unexpected_reply_says_outcome_unknown(
    namespace: str,
) -> None:
    """A row statement whose reply is not one OK packet (here: a second statement's result
    after it, which the real statements never have) may have run: the connection is closed,
    the call is an unknown outcome in one line, and the next call reconnects."""
    require("mysql")
    url = server_url("mysql")
    store: Any = open_store(url)
    lease, record = _entry("U-1")
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)  # the rows layout
        assert store.fast_acquire(namespace, ["u"], lease, record) == 1
        good = store._sql["name_release"]
        store._sql = {**store._sql, "name_release": good.rstrip().rstrip(";") + "; DO 0"}
        with pytest.raises(OutcomeUnknown) as unknown:
            store.fast_release(namespace, ["u"], lease)
        _assert_one_clear_line(unknown.value, "may or may not")
        assert "unexpected reply" in str(unknown.value.__cause__)
        store._sql = {**store._sql, "name_release": good}
        assert "u" not in _locks(store, namespace)  # it ran (reconnected to read it)
        assert store.fast_acquire(namespace, ["u"], lease, record) == 2
    finally:
        store.close()
        delete_rows(url, namespace)


def test_a_row_statement_that_deadlocks_on_the_warm_road_runs_again(
    server: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock on the warm road (the server rolled the statement back) goes back to
    ``_locked``'s loop, which runs the statement again: the name is taken once, with the next
    token."""
    store: Any = open_store(server)
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)  # the rows layout
        assert store.fast_acquire(namespace, ["d"], *_entry("D-0")) == 1
        assert store.fast_release(namespace, ["d"], "D-0") == 1
        deadlock: Exception
        if server.startswith("mysql"):
            import pymysql

            deadlock = pymysql.err.OperationalError(1213, "Deadlock found (test)")
        else:
            import psycopg

            deadlock = psycopg.errors.DeadlockDetected("deadlock detected (test)")
        real = type(store)._run_name_statement
        calls: list[bool] = []

        def deadlocks_once(self: Any, conn: Any, acquire: bool, statement: Any) -> Any:
            calls.append(acquire)
            if len(calls) == 1:
                raise deadlock
            return real(self, conn, acquire, statement)

        with monkeypatch.context() as m:
            m.setattr(type(store), "_run_name_statement", deadlocks_once)
            assert store.fast_acquire(namespace, ["d"], *_entry("D-1")) == 2
        assert calls == [True, True]
        assert _locks(store, namespace)["d"].lease == "D-1"
        assert store.fast_release(namespace, ["d"], "D-1") == 2
    finally:
        store.close()
        delete_rows(server, namespace)


# --- waiting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wake", [True, False])
def test_wait_for_change_returns_soon_after_another_store_commits(
    stores: Callable[[], Store], namespace: str, wake: bool
) -> None:
    waiter, writer = stores(), stores()
    version = waiter.read(namespace).version
    timeout = 20.0

    def write() -> None:
        time.sleep(0.2)
        writer.transact(namespace, increment(wake), None)

    thread = threading.Thread(target=write)
    started = time.monotonic()
    thread.start()
    try:
        assert waiter.wait_for_change(namespace, version, timeout) is True
        elapsed = time.monotonic() - started
    finally:
        thread.join()
    assert elapsed < timeout
    assert waiter.read(namespace).version == version + 1


def test_wait_for_change_returns_at_once_if_the_version_differs(
    store: Store, namespace: str
) -> None:
    snap = store.transact(namespace, increment(), None)
    started = time.monotonic()
    assert store.wait_for_change(namespace, snap.version - 1, 20.0) is True
    assert time.monotonic() - started < 20.0


def test_wait_for_change_returns_after_the_timeout_without_change(
    store: Store, namespace: str
) -> None:
    version = store.read(namespace).version
    started = time.monotonic()
    assert store.wait_for_change(namespace, version, 0.3) is False
    assert time.monotonic() - started >= 0.29
    assert store.read(namespace).version == version


def test_several_threads_wait_on_one_store(stores: Callable[[], Store], namespace: str) -> None:
    waiter, writer = stores(), stores()
    version = waiter.read(namespace).version
    done: list[float] = []

    def wait() -> None:
        waiter.wait_for_change(namespace, version, 20.0)
        done.append(time.monotonic())

    threads = [threading.Thread(target=wait) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.2)
    writer.transact(namespace, increment(True), None)
    for t in threads:
        t.join()
    assert len(done) == 4
    assert all(t - started < 20.0 for t in done)


def test_a_closed_store_stays_closed(db_url: str, namespace: str) -> None:
    """A session's renewal thread, or a give-back, that calls a store after its table closed it
    is refused: it must not open a connection that nobody would close."""
    store = open_store(db_url)
    store.open_session("closed-" + namespace, "task:x", "h", os.getpid(), 30.0)
    store.read(namespace)
    store.close()
    for call in (
        lambda: store.renew_session("closed-" + namespace),
        lambda: store.read(namespace),
        lambda: store.open_session("again-" + namespace, "task:x", "h", os.getpid(), 30.0),
    ):
        with pytest.raises(StoreUnavailable, match="was closed; open it again"):
            call()
    assert getattr(store, "_side", None) is None and getattr(store, "_conn", None) is None
    store.close()  # (idempotent)


# --- schema ----------------------------------------------------------------------------------


def test_newer_schema_version_is_refused(db_url: str, fresh_table: str) -> None:
    store = open_store(db_url, table=fresh_table)
    store.read("x")
    store.close()
    key = "`key`" if db_url.startswith("mysql") else "key"
    raw_sql(db_url, f"UPDATE {fresh_table}_meta SET value = '999' WHERE {key} = 'schema_version'")
    with pytest.raises(StoreError, match="upgrade") as info:
        open_store(db_url, table=fresh_table).read("x")
    assert "999" in str(info.value)
    assert f"({SCHEMA_VERSION})" in str(info.value)


def test_a_table_of_that_name_that_is_not_a_lock_table_is_refused_and_nothing_is_made(
    db_url: str, fresh_table: str
) -> None:
    """(An application's own table named like the lock table: the first call failed with the
    database's "no such column: version", and had made the table's _meta beside it.)"""
    raw_sql(db_url, f"CREATE TABLE {fresh_table} (id INTEGER PRIMARY KEY, title TEXT)")
    for _ in range(2):  # (the second open finds nothing made by the first)
        with pytest.raises(StoreError, match="is not a tasklocks lock table") as info:
            store = open_store(db_url, table=fresh_table)  # (SQLite looks at its open)
            try:
                store.read("x")
            finally:
                store.close()
        assert f"the table {fresh_table} at " in str(info.value)
        assert "use another database, or another table name (table= in Python), or rename" in str(
            info.value
        )
        assert not isinstance(info.value, StoreUnavailable)
        with pytest.raises(Exception):  # noqa: B017 (each driver's own "no such table")
            raw_rows(db_url, f"SELECT * FROM {fresh_table}_meta")
    assert raw_rows(db_url, f"SELECT id, title FROM {fresh_table}") == []  # untouched


_FIRST_USE = textwrap.dedent(
    """
    import sys, time
    from tasklocks.store import open_store
    url, table, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    store = open_store(url, table=table)
    store.read("first-use")
    store.transact("first-use", lambda snap: (snap.data, False), None)
    store.close()
    """
)


def test_concurrent_first_use_by_8_processes_creates_the_schema_once(
    db_url: str, fresh_table: str
) -> None:
    start = time.time() + 2.0  # every process is ready by then: they start together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, db_url, fresh_table, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        for _ in range(8)
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    assert [r for r in results if r[0] != 0] == []
    store = open_store(db_url, table=fresh_table)
    try:
        assert store.read("first-use").version == 8
        assert store.namespaces() == ["first-use"]
    finally:
        store.close()


_PRELOADED_OPEN = textwrap.dedent(
    """
    import sys
    from tasklocks import store
    store.preload()
    before = set(sys.modules)
    opened = store.open_store(sys.argv[1])
    opened.read("preload")
    opened.close()
    print(" ".join(sorted(set(sys.modules) - before)))
    """
)


def test_a_preloaded_process_opens_a_store_without_importing(db_url: str, namespace: str) -> None:
    """store.preload() (the task zygote calls it before it forks supervisors) imports every
    adapter and driver, and reads their statements: a store's open then imports nothing."""
    out = subprocess.run(
        [sys.executable, "-c", _PRELOADED_OPEN, db_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    imported = out.stdout.split()
    assert [m for m in imported if m.split(".")[0] in ("tasklocks", "psycopg", "pymysql")] == []
    assert [m for m in imported if m.startswith("importlib.")] == []  # no statement file read


# --- unreachable servers ---------------------------------------------------------------------


def _assert_one_clear_line(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert "\n" not in text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text
    assert exc.__cause__ is not None


def test_unreachable_server_is_unavailable_quickly(server: str) -> None:
    url = with_url_part(server, port=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        open_store(url).read("x")
    assert time.monotonic() - started < 10.0
    _assert_one_clear_line(info.value, "127.0.0.1:1", "check")


def test_wrong_mysql_password_is_unavailable() -> None:
    require("mysql")
    url = with_url_part(server_url("mysql"), password="certainly-wrong-" + uuid.uuid4().hex[:6])
    with pytest.raises(StoreUnavailable) as info:
        open_store(url).read("x")
    _assert_one_clear_line(info.value, "password")
    assert "certainly-wrong" not in str(info.value)


def test_an_unknown_mysql_user_is_refused_at_once() -> None:
    """MariaDB answers an unknown user (or one that signs in only through unix_socket, as
    Debian's root over TCP) with error 1698, not 1045: still no retrying for 5 s."""
    require("mysql")
    user = "nobody_" + uuid.uuid4().hex[:6]
    url = server_url("mysql").replace("//root@", f"//{user}@", 1)
    assert user in url
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        open_store(url).read("x")
    assert time.monotonic() - started < 3.0  # (the reconnect timeout is 5 s)
    _assert_one_clear_line(info.value, user, "user")


def test_missing_database_is_unavailable(server: str) -> None:
    url = with_url_part(server, db="no_such_db_" + uuid.uuid4().hex[:8])
    with pytest.raises(StoreUnavailable) as info:
        open_store(url).read("x")
    _assert_one_clear_line(info.value, "no_such_db_", "database")


def test_a_paced_wait_on_mysql_goes_on_at_the_pace_it_had_reached(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter that saw a change that did not concern it (``pace``) polls at the pace it had
    reached; one whose way changed starts fast again. MariaDB has no notifications: each poll
    is a query, so 20 waiters that restart fast on every queue change cost twice the queries."""
    require("mysql")
    url = server_url("mysql")
    waiter, writer = open_store(url), open_store(url)
    polls = [0]
    version_of = waiter.version

    def counted(ns: str) -> int:
        polls[0] += 1
        return int(version_of(ns))

    monkeypatch.setattr(waiter, "version", counted)
    try:
        results = {}
        for pace in (True, False):
            version = waiter.read(namespace).version
            timer = threading.Timer(1.5, lambda: writer.transact(namespace, increment(), None))
            timer.start()
            assert waiter.wait_for_change(namespace, version, 20.0) is True  # paced up by now
            timer.join()
            seen = waiter.read(namespace).version
            polls[0] = 0
            assert waiter.wait_for_change(namespace, seen, 0.3, pace=pace) is False
            results[pace] = polls[0]
        # Reached pace: a poll every 0.1 s at most (POLL[3]); from the start: 1 ms, x1.5 each.
        assert results[True] <= 4, results
        assert results[False] >= 8, results
    finally:
        waiter.close()
        writer.close()
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


# --- server adapters: quoting, the pessimistic path, wake fds --------------------------------

# Characters SQL quoting must get right (PostgreSQL text cannot hold NUL; MySQL gets one too).
TRICKY = "back\\slash \\' quote' \"dq\" \n\r\t \x1a %s %% {} ü 漢 😀 \\0 '' \\\\"


def _server_store(server: str) -> Any:
    """An adapter, typed loosely: these tests use its newer keywords and its internals."""
    return open_store(server)


@pytest.mark.parametrize("hinted", [True, False])
def test_tricky_text_survives_both_write_paths(server: str, namespace: str, hinted: bool) -> None:
    text = TRICKY + ("\0" if server.startswith("mysql") else "")
    store = _server_store(server)
    try:
        hint = store.read(namespace)
        snap = store.transact(namespace, lambda s: (text, False), hint if hinted else None)
        assert snap.data == text
        assert store.read(namespace) == snap
        # The next optimistic change compares the MD5 of that text, server-side.
        again = store.transact(namespace, lambda s: (s.data + "!", False), snap)
        assert again == Snapshot(snap.version + 1, text + "!")
        assert store.read(namespace) == again
    finally:
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_mysql_quoting_under_no_backslash_escapes(namespace: str) -> None:
    require("mysql")
    url = server_url("mysql")
    store = _server_store(url)
    try:
        store.read(namespace)
        with store._conn.cursor() as cur:  # white-box: this session only
            cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        assert store._conn.server_status & 512  # SERVER_STATUS_NO_BACKSLASH_ESCAPES
        for hint in (None, store.read(namespace)):
            snap = store.transact(namespace, lambda s: (TRICKY + "\0", False), hint)
            assert store.read(namespace) == snap
            assert snap.data == TRICKY + "\0"
    finally:
        store.close()
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_mysql_connections_share_one_default_tls_context(namespace: str) -> None:
    # PyMySQL builds a TLS context (loading the CA store, ~20 ms) for every connection; the
    # adapter builds the default one once. Both stores must still work, and explicit TLS options
    # still get a context of their own.
    require("mysql")
    from tasklocks.store import mysql

    url = server_url("mysql")
    first, second = _server_store(url), _server_store(url)
    try:
        assert first.read(namespace) == second.read(namespace)
        a, b = first._conn, second._conn
        assert a is not None and b is not None and a is not b
        assert a.ctx is b.ctx is mysql._CONNECTION_CLASS._default_context
        own = mysql._CONNECTION_CLASS.__new__(mysql._CONNECTION_CLASS)._create_ssl_ctx(
            {"ca": None, "verify_mode": False}
        )
        assert own is not a.ctx
    finally:
        first.close()
        second.close()
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_the_driver_constants_the_mysql_adapter_copies() -> None:
    require("mysql")
    from pymysql.connections import MAX_PACKET_LEN
    from pymysql.constants import CLIENT, COMMAND, CR, SERVER_STATUS

    from tasklocks.store import mysql

    assert mysql.MULTI_STATEMENTS == CLIENT.MULTI_STATEMENTS
    assert mysql.NO_BACKSLASH_ESCAPES == SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
    assert mysql.MORE_RESULTS == SERVER_STATUS.SERVER_MORE_RESULTS_EXISTS
    assert mysql.COM_QUERY == COMMAND.COM_QUERY
    assert mysql.MAX_PACKET == MAX_PACKET_LEN
    assert mysql.CR_SERVER_LOST == CR.CR_SERVER_LOST
    assert mysql.CR_COMMANDS_OUT_OF_SYNC == CR.CR_COMMANDS_OUT_OF_SYNC


def test_mysql_ok_query_reads_what_pymysql_reads(namespace: str) -> None:
    """The row statements' lean reply reader (``ok_query``) against PyMySQL's own reading of the
    same replies: affected rows and insert id at every width of the packet's integers, an error
    packet raised as PyMySQL raises it (the connection usable after it), and the server status
    (which ``_quote`` reads) taken from the OK packet."""
    require("mysql")
    import pymysql

    url = server_url("mysql")
    store = _server_store(url)
    try:
        store.read(namespace)
        conn = store._conn  # white-box: this session only
        conn.query("CREATE TEMPORARY TABLE ok_reader (id INT PRIMARY KEY, v BIGINT UNSIGNED)")
        widths = [0, 249, 250, 251, 2**16 - 2, 2**16, 2**24 - 2, 2**24, 2**40, 2**63]
        conn.query(
            "INSERT INTO ok_reader VALUES " + ", ".join(f"({i}, {v})" for i, v in enumerate(widths))
        )
        bump = "UPDATE ok_reader SET v = LAST_INSERT_ID(v + 1) WHERE id = {}"
        for i, v in enumerate(widths):
            assert conn.ok_query(bump.format(i)) == (1, v + 1)
            assert conn.query(bump.format(i)) == 1 and conn.insert_id() == v + 2
        assert conn.ok_query(bump.format(99)) == (0, 0)
        assert conn.ok_query("UPDATE ok_reader SET v = v - 1") == (len(widths), 0)
        with pytest.raises(pymysql.err.ProgrammingError) as missing:
            conn.ok_query("UPDATE no_such_table_here SET v = 1")
        assert missing.value.args[0] == 1146  # ER_NO_SUCH_TABLE, as query() raises it
        assert conn.ok_query(bump.format(0)) == (1, 2)  # the connection is still in step
        assert not conn.server_status & 512
        conn.ok_query("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        assert conn.server_status & 512  # SERVER_STATUS_NO_BACKSLASH_ESCAPES, from the OK packet
        # An unbuffered result left half read: PyMySQL finishes it first, as query() does.
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute("SELECT id FROM ok_reader ORDER BY id")
        assert cur.fetchone() == (0,)
        with pytest.warns(UserWarning, match="left incomplete"):
            assert conn.ok_query(bump.format(1)) == (1, widths[1] + 2)  # +2, -1, +1
        conn.query("DROP TEMPORARY TABLE ok_reader")
    finally:
        store.close()
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_a_failed_pessimistic_write_leaves_no_transaction_open(server: str, namespace: str) -> None:
    store = _server_store(server)
    try:
        store.read(namespace)

        def refuse(snap: Snapshot) -> tuple[str, bool]:
            raise ValueError("refused")

        with pytest.raises(ValueError):
            store.transact(namespace, refuse, None)
        # A write from another session is not blocked by a row lock left behind.
        other = _server_store(server)
        try:
            assert other.transact(namespace, increment(), None).version == 1
        finally:
            other.close()
        assert store.transact(namespace, increment(), None).version == 2
    finally:
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_the_hint_is_not_used(db_url: str, namespace: str) -> None:
    """A change through the document locks the names held in their rows too, which a
    one-statement swap on the document cannot: every adapter computes on the locked row alone."""
    store, other = _server_store(db_url), _server_store(db_url)
    try:
        stale = store.read(namespace)
        other.transact(namespace, increment(), None)
        seen: list[Snapshot] = []

        def compute(snap: Snapshot) -> tuple[str, bool]:
            seen.append(snap)
            return increment()(snap)

        snap = store.transact(namespace, compute, stale)
        assert len(seen) == 1 and counter(seen[0]) == 1  # computed once, on the current row
        assert counter(snap) == 2 and snap == store.read(namespace)
    finally:
        store.close()
        other.close()
        delete_rows(db_url, namespace)


def test_wait_for_change_returns_when_the_wake_fd_is_readable(server: str, namespace: str) -> None:
    store = _server_store(server)
    read_end, write_end = os.pipe()
    try:
        version = store.read(namespace).version

        def wake() -> None:
            time.sleep(0.3)
            os.write(write_end, b"x")

        thread = threading.Thread(target=wake)
        started = time.monotonic()
        thread.start()
        assert store.wait_for_change(namespace, version, 20.0, wake_fd=read_end) is True
        elapsed = time.monotonic() - started
        thread.join()
        assert 0.25 < elapsed < 5.0
        assert os.read(read_end, 10) == b"x"  # not drained by the store
        # A change is still noticed with a wake fd that stays quiet.
        store.transact(namespace, increment(), None)
        started = time.monotonic()
        assert store.wait_for_change(namespace, version, 20.0, wake_fd=read_end) is True
        assert time.monotonic() - started < 5.0
    finally:
        os.close(read_end)
        os.close(write_end)
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


def test_threads_with_their_own_wake_fds_wake_one_by_one(server: str, namespace: str) -> None:
    store = _server_store(server)
    pipes = [os.pipe() for _ in range(3)]
    done: dict[int, float] = {}
    try:
        version = store.read(namespace).version

        def wait(i: int) -> None:
            store.wait_for_change(namespace, version, 20.0, wake_fd=pipes[i][0])
            done[i] = time.monotonic()

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # the later ones register while another thread reads
        time.sleep(0.2)
        for i in (2, 0, 1):
            woken = time.monotonic()
            os.write(pipes[i][1], b"x")
            threads[i].join(5.0)
            assert i in done and done[i] - woken < 2.0
            assert len(done) == (2 if i == 0 else 1 if i == 2 else 3)
    finally:
        for _r, w in pipes:
            os.write(w, b"x")
        for t in threads:
            t.join()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        store.close()
        raw_sql(server, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))


# --- a row per name (store/_names.py): the one-statement changes of the db_url adapters --------

FAST_NAMES = ("app_task:blog", "a/b@c.d-e", "x.y", "Z-9")


def _record(note: str | None = "n", session: str | None = None) -> list[Any]:
    """A lease's record as ``_doc.claim_record`` makes it (format 3)."""
    return ["pid:123@host", 123, "4567", "b00t", "host", None, 123, 1712345678.125, note, session]


def _entry(lease: str, note: str | None = "n") -> tuple[str, str]:
    """What fast_acquire takes: the lease, and its record's JSON."""
    return lease, json.dumps(_record(note), ensure_ascii=False, separators=(",", ":"))


@pytest.fixture
def fast(db_url: str, namespace: str) -> Iterator[Any]:
    """An adapter whose document of ``namespace`` exists (version 1, format 4); its rows
    are deleted afterwards."""
    store = _server_store(db_url)
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)
        yield store
    finally:
        store.close()
        delete_rows(db_url, namespace)


def _locks(store: Any, namespace: str) -> dict[str, Any]:
    from tasklocks._core import decode

    return dict(decode(store.read(namespace).data, namespace))


def _stored(db_url: str, namespace: str) -> Any:
    """The document as stored, and the namespace's name rows (name, version, lease, mark)."""
    docs = raw_rows(
        db_url, f"SELECT version, data FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,)
    )
    doc = docs[0] if docs else None
    rows = raw_rows(
        db_url,
        f"SELECT name, version, lease, mark FROM {DEFAULT_TABLE}_names WHERE namespace = %s",
        (namespace,),
    )
    names = {n: (int(v), lease, bool(mark)) for n, v, lease, mark in rows}
    moved = names.pop("", None)  # the namespace's layout row: marked once the document moved
    assert moved is None or moved[2] is (doc is not None and str(doc[1]).startswith('{"format":4,'))
    return (int(doc[0]), str(doc[1])) if doc else None, names


def test_fast_acquire_takes_a_free_name_in_its_row(fast: Any, db_url: str, namespace: str) -> None:
    tricky = "ü 漢 😀 \"dq\" 'q' back\\slash \n %s %% {}"
    doc_before = _stored(db_url, namespace)[0]
    assert json.loads(doc_before[1])["format"] == 4
    assert fast.fast_acquire(namespace, ["one"], *_entry("L1", note=tricky)) == 1  # a new row
    assert fast.fast_acquire(namespace, ["one"], *_entry("L2")) is None  # held
    doc, names = _stored(db_url, namespace)
    assert doc == doc_before  # the document is not touched
    assert names == {"one": (1, "L1", False)}
    one = _locks(fast, namespace)["one"]  # one read shows it
    assert (one.token, one.lease, one.note, one.pid, one.pidns) == (1, "L1", tricky, 123, None)
    assert one.since == 1712345678.125
    assert fast.read(namespace).version == doc_before[0]  # what waiters compare
    # Released by its lease alone, compared exactly; the token grows at the next holder.
    for lease in ("lease-1", "L2", "L10"):
        assert fast.fast_release(namespace, ["one"], lease) is None
    assert fast.fast_release(namespace, ["one"], "L1") == 1
    assert fast.fast_release(namespace, ["one"], "L1") is None
    assert _locks(fast, namespace) == {}
    assert fast.fast_acquire(namespace, ["one"], *_entry("L3")) == 2
    assert _stored(db_url, namespace)[1] == {"one": (2, "L3", False)}
    # Distinct names are distinct rows.
    for i, name in enumerate(FAST_NAMES):
        assert fast.fast_acquire(namespace, [name], *_entry(f"M{i}")) == 1
    assert sorted(_locks(fast, namespace)) == sorted(["one", *FAST_NAMES])


@pytest.mark.parametrize("db_url", ["mysql"], indirect=True)
def test_a_connection_the_driver_closed_on_an_error_is_opened_again(
    fast: Any, namespace: str
) -> None:
    """PyMySQL closes the connection on a packet out of sequence and raises InternalError,
    which is no "connection gone" error: the store kept the closed connection (the call failed
    with StoreError), and the next row statement, on the warm road, failed on it as a reply
    lost (OutcomeUnknown), though nothing was sent. The connection is opened again instead."""
    pymysql = pytest.importorskip("pymysql")
    assert fast.fast_acquire(namespace, ["one"], *_entry("L1")) == 1  # (a warm connection)
    conn = fast._conn

    def out_of_sequence(*args: object, **kwargs: object) -> None:
        conn._force_close()  # (as PyMySQL's _read_packet does before it raises this)
        raise pymysql.err.InternalError("Packet sequence number wrong - got 9 expected 1")

    conn._read_packet = out_of_sequence
    assert fast.read(namespace).version == 1  # nothing was sent: read again on a new one
    assert fast._conn is not conn
    assert fast.fast_release(namespace, ["one"], "L1") == 1


@pytest.mark.parametrize("db_url", ["mysql"], indirect=True)
def test_a_change_whose_connection_the_driver_closed_runs_again_or_is_unknown(
    fast: Any, namespace: str
) -> None:
    """The same on the document's path, where the store drops the connection before it asks
    whether the error ended it (the rollback of a change not sent; an unknown outcome): a change
    whose first reply was out of sequence, nothing written, runs again on a new connection (it
    failed with StoreError); one whose commit was sent is an unknown outcome (it said "failed")."""
    pymysql = pytest.importorskip("pymysql")
    conn = fast._conn

    def out_of_sequence(*args: object, **kwargs: object) -> None:
        conn._force_close()  # (as PyMySQL's _read_packet does before it raises this)
        raise pymysql.err.InternalError("Packet sequence number wrong - got 9 expected 1")

    conn._read_packet = out_of_sequence
    assert counter(fast.transact(namespace, increment(), None)) == 1  # run again
    assert fast._conn is not conn
    written = fast._write_kept

    def committed_then_out_of_sequence(conn: Any, *args: Any, **kwargs: Any) -> Any:
        written(conn, *args, **kwargs)
        conn._force_close()
        raise pymysql.err.InternalError("Packet sequence number wrong - got 9 expected 3")

    fast._write_kept = committed_then_out_of_sequence
    with pytest.raises(OutcomeUnknown):
        fast.transact(namespace, increment(), None)
    del fast._write_kept
    assert counter(fast.read(namespace)) == 2  # it was committed


@pytest.mark.parametrize("db_url", ["mysql"], indirect=True)
def test_an_interruption_between_a_row_statement_and_its_reply_closes_the_connection(
    fast: Any, db_url: str, namespace: str
) -> None:
    """A KeyboardInterrupt after a row statement was sent and before its reply was read (as
    text, prepared, or its preparation) leaves that reply unread: the connection is closed, so
    that no later statement reads it as its own, and the next call opens another (the warm
    road no longer takes a closed connection for one: a statement on it failed as a reply lost,
    OutcomeUnknown, though nothing was sent). Each call after reads its own reply: the token
    it returns is the row's version."""

    def row() -> tuple[int, str | None]:
        [(version, lease)] = raw_rows(
            db_url,
            f"SELECT version, lease FROM {DEFAULT_TABLE}_names WHERE namespace = %s AND name = 'n'",
            (namespace,),
        )
        return int(version), lease

    def interrupt_once(conn: Any) -> None:
        reply = conn._reply

        def interrupted() -> Any:
            conn._reply = reply
            raise KeyboardInterrupt

        conn._reply = interrupted

    assert fast.fast_acquire(namespace, ["n"], *_entry("first")) == 1
    assert fast.fast_release(namespace, ["n"], "first") == 1
    for use in range(6):  # through text, preparations and prepared statements
        conn = fast._conn
        interrupt_once(conn)
        with pytest.raises(KeyboardInterrupt):
            fast.fast_acquire(namespace, ["n"], *_entry(f"L{use}"))
        assert not conn.open, use
        version, lease = row()
        if lease is not None:  # the take ran, its reply unread
            assert fast.fast_release(namespace, ["n"], f"L{use}") == version, use
        taken = fast.fast_acquire(namespace, ["n"], *_entry(f"M{use}"))
        assert taken == row()[0] == version + 1, use
        assert fast._conn is not conn and fast._conn.open
        assert fast.fast_release(namespace, ["n"], f"M{use}") == taken, use
        assert row() == (taken, None)


def test_several_names_are_the_full_paths(fast: Any, namespace: str) -> None:
    """One token for several names must exceed each name's last one: the full path."""
    assert fast.fast_acquire(namespace, ["a", "b"], *_entry("L1")) is None
    assert fast.fast_release(namespace, ["a", "b"], "L1") is None
    assert fast.fast_acquire(namespace, ["b", "b"], *_entry("L1")) == 1  # repeats count once
    assert fast.fast_release(namespace, ["b", "b"], "L1") == 1


def test_a_name_taken_in_its_row_before_is_taken_again_by_its_update_alone(
    fast: Any, db_url: str, namespace: str
) -> None:
    """name_retake: once this process took a name in its row, the next take is the row's
    UPDATE alone (no insert, no look at the layout row). It refuses what name_acquire refuses
    (held; kept by the document), and a row gone behind its back is left to the full path."""
    sent: list[str] = []
    run = fast._run_name_statement

    def spy(conn: Any, acquire: bool, statement: tuple[str, Any]) -> Any:
        if acquire:
            sent.append(statement[0])
        return run(conn, acquire, statement)

    fast._run_name_statement = spy  # white-box: which statement each take sends
    first, again = fast._sql["name_acquire"], fast._sql["name_retake"]
    assert fast.fast_acquire(namespace, ["r"], *_entry("L1")) == 1
    assert fast.fast_release(namespace, ["r"], "L1") == 1
    assert fast.fast_acquire(namespace, ["r"], *_entry("L2", note="two")) == 2
    assert fast.fast_acquire(namespace, ["r"], *_entry("L3")) is None  # held: refused
    assert sent == [first, again, again]
    r = _locks(fast, namespace)["r"]
    assert (r.token, r.lease, r.note) == (2, "L2", "two")  # its record written too
    assert fast.fast_release(namespace, ["r"], "L2") == 2
    # Kept by the document (a change through it took the name): refused, as by name_acquire.
    fast.transact(namespace, _take("r", "D1"), None)
    assert fast.fast_acquire(namespace, ["r"], *_entry("L4")) is None
    assert sent[-1] == again
    # Let go by the document: free in its row again, the next token past its version.
    fast.transact(namespace, _drop("r"), None)
    version = _stored(db_url, namespace)[1]["r"][0]
    assert fast.fast_acquire(namespace, ["r"], *_entry("L5")) == version + 1
    assert fast.fast_release(namespace, ["r"], "L5") == version + 1
    # A row deleted behind tasklocks' back (it never deletes one): nothing taken, no token.
    raw_sql(
        db_url,
        f"DELETE FROM {DEFAULT_TABLE}_names WHERE namespace = %s AND name = %s",
        (namespace, "r"),
    )
    assert fast.fast_acquire(namespace, ["r"], *_entry("L6")) is None
    assert sent[-1] == again and "r" not in _stored(db_url, namespace)[1]


def _take(
    name: str, lease: str, note: str | None = "n"
) -> Callable[[Snapshot], tuple[str, bool] | None]:
    """A compute that grants ``name`` to ``lease`` with the next version as token, unless held."""

    def compute(snap: Snapshot) -> tuple[str, bool] | None:
        doc = json.loads(snap.data)
        if name in doc["locks"]:
            return None
        doc["procs"][lease] = _record(note)
        doc["locks"][name] = [lease, snap.version + 1]
        return json.dumps(doc, separators=(",", ":")), True  # compact, as the core writes

    return compute


def _drop(name: str) -> Callable[[Snapshot], tuple[str, bool] | None]:
    def compute(snap: Snapshot) -> tuple[str, bool] | None:
        doc = json.loads(snap.data)
        lease = doc["locks"].pop(name)[0]
        if not any(entry[0] == lease for entry in doc["locks"].values()):
            del doc["procs"][lease]
        return json.dumps(doc, separators=(",", ":")), True

    return compute


def test_the_full_path_takes_over_names_held_in_their_rows(
    fast: Any, db_url: str, namespace: str
) -> None:
    for _i in range(5):
        fast.fast_acquire(namespace, ["a"], *_entry("L1"))
        fast.fast_release(namespace, ["a"], "L1")
    assert fast.fast_acquire(namespace, ["a"], *_entry("L1")) == 6
    assert fast.fast_acquire(namespace, ["other"], *_entry("L9")) == 1
    # A change through the document sees them as held, with their tokens ...
    seen: list[Snapshot] = []

    def compute(snap: Snapshot) -> tuple[str, bool] | None:
        seen.append(snap)
        return _take("b", "L2")(snap)

    after = fast.transact(namespace, compute, None)
    assert json.loads(seen[0].data)["locks"] == {"a": ["L1", 6], "other": ["L9", 1]}
    assert seen[0].version == 6  # the highest token, to be exceeded by its grant
    assert after.version == 7 and json.loads(after.data)["locks"]["b"] == ["L2", 7]
    # ... and moves them into the document, which keeps them from then on (marked rows).
    doc, names = _stored(db_url, namespace)
    assert doc[0] == 7 and json.loads(doc[1])["format"] == 4
    assert json.loads(doc[1])["locks"] == {"a": ["L1", 6], "b": ["L2", 7], "other": ["L9", 1]}
    assert names == {"a": (7, None, True), "b": (7, None, True), "other": (7, None, True)}
    assert fast.fast_release(namespace, ["a"], "L1") is None  # the full path's now
    assert fast.fast_acquire(namespace, ["b"], *_entry("L3")) is None
    assert fast.fast_acquire(namespace, ["free"], *_entry("L4")) == 1  # other names go on
    # A name the document lets go is free in its row again, its version past every token.
    fast.transact(namespace, _drop("a"), None)
    assert _stored(db_url, namespace)[1]["a"] == (8, None, False)
    assert fast.fast_acquire(namespace, ["a"], *_entry("L5")) == 9
    # repair (an unconditional overwrite) frees every name, wherever it was held.
    fast.reset(namespace, EMPTY_DOCUMENT)
    assert _locks(fast, namespace) == {}
    assert all(
        lease is None and not mark for _, lease, mark in _stored(db_url, namespace)[1].values()
    )


def test_a_name_taken_in_its_row_during_a_change_is_not_granted_twice(
    fast: Any, db_url: str, namespace: str
) -> None:
    """A change computed while ``n`` had no row grants it; a one-statement acquisition of ``n``
    commits meanwhile. Either the change starts again and sees it (PostgreSQL), or the
    acquisition waits for the change and finds the name kept by the document (MariaDB, whose
    locking read also locks the gaps of the held names' index): never both."""
    other = _server_store(db_url)
    results: list[int | None] = []
    try:
        calls: list[Snapshot] = []

        def compute(snap: Snapshot) -> tuple[str, bool] | None:
            calls.append(snap)
            if len(calls) == 1:
                thread = threading.Thread(
                    target=lambda: results.append(
                        other.fast_acquire(namespace, ["n"], *_entry("F"))
                    )
                )
                thread.start()
                thread.join(1.0)
            return _take("n", "D")(snap)

        fast.transact(namespace, compute, None)
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
        holders = _locks(fast, namespace)
        assert list(holders) == ["n"]
        if results == [None]:  # it waited, then found the name kept by the document
            assert holders["n"].lease == "D" and len(calls) == 1
        else:  # it was first: the change ran again on what it wrote, and granted nothing
            assert results == [1] and holders["n"].lease == "F" and len(calls) == 2
            assert holders["n"].token == 1
    finally:
        other.close()


def test_name_rows_wait_for_a_document_of_their_layout(db_url: str, namespace: str) -> None:
    """A document an older tasklocks keeps (format 3), or a new one: the first change through it
    moves it (format 4, and the namespace's layout row marked), then names take their rows."""
    store = _server_store(db_url)
    try:
        raw_sql(
            db_url,
            f"INSERT INTO {DEFAULT_TABLE} (namespace, version, data) VALUES (%s, 5, %s)",
            (namespace, '{"format":3,"procs":{},"locks":{}}'),
        )
        assert store.fast_acquire(namespace, ["a"], *_entry("L")) is None
        assert _stored(db_url, namespace)[1] == {}
        assert store.read(namespace).version == 5  # read as it is: nothing moves on a read
        store.transact(namespace, _take("b", "L"), None)
        doc, names = _stored(db_url, namespace)
        assert doc[0] == 6 and json.loads(doc[1])["format"] == 4
        assert names == {"b": (6, None, True)}
        assert store.fast_acquire(namespace, ["a"], *_entry("L")) == 1
    finally:
        store.close()
        delete_rows(db_url, namespace)


def test_fast_paths_on_a_missing_row_write_nothing(db_url: str, namespace: str) -> None:
    store = _server_store(db_url)
    try:
        assert store.fast_acquire(namespace, ["a"], *_entry("L")) is None
        assert store.fast_release(namespace, ["a"], "L") is None
        assert store.namespaces().count(namespace) == 0
        assert _stored(db_url, namespace) == (None, {})
    finally:
        store.close()


@pytest.mark.parametrize("lease", ["it's", 'a"b', "back\\slash", "sp ace", ""])
def test_fast_paths_leave_a_lease_that_is_no_plain_name_to_the_full_path(
    fast: Any, namespace: str, lease: str
) -> None:
    """tasklocks' own leases are hex; any other one is left to the full path (None here, and
    nothing written)."""
    before = fast.read(namespace)
    assert fast.fast_acquire(namespace, ["a"], *_entry(lease)) is None
    assert fast.fast_release(namespace, ["a"], lease) is None
    assert fast.read(namespace) == before


@pytest.mark.parametrize("names", [[], ["bad name"], ['a"b'], ["a'b"], ["a\\b"]])
def test_fast_paths_check_the_names(fast: Any, namespace: str, names: list[str]) -> None:
    from tasklocks.errors import BadLockName

    with pytest.raises((ValueError, BadLockName)):
        fast.fast_acquire(namespace, names, *_entry("L"))
    with pytest.raises((ValueError, BadLockName)):
        fast.fast_release(namespace, names, "L")


def test_fast_paths_under_no_backslash_escapes(namespace: str) -> None:
    require("mysql")
    url = server_url("mysql")
    store = _server_store(url)
    try:
        store.read(namespace)
        with store._conn.cursor() as cur:  # white-box: this session only
            cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        note = "back\\slash 'q' \"dq\" \n"
        store.transact(namespace, _take("b", "L-2", note), None)  # the full path's quoting
        assert _locks(store, namespace)["b"].note == note
        assert store.fast_acquire(namespace, ["a"], *_entry("L-1", note=note)) == 1
        assert _locks(store, namespace)["a"].note == note
        assert store.fast_release(namespace, ["a"], "L-1") == 1
        assert sorted(_locks(store, namespace)) == ["b"]
    finally:
        store.close()
        delete_rows(url, namespace)


def test_row_statements_keep_tricky_notes_without_a_cursor(
    fast: Any, db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-name acquisition and its release go to a server without a driver cursor on a
    store's own connection (MariaDB: ``Connection.query``; PostgreSQL: libpq), and on every
    backend a note of quotes, backslashes, control characters, ``%`` and non-ASCII text comes
    back as written."""
    import psycopg
    import pymysql

    note = TRICKY + ("\0" if db_url.startswith("mysql") else "")

    def no_cursor(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a row statement made a cursor")

    assert fast.fast_acquire(namespace, ["warm"], *_entry("W-1")) == 1  # (prepared on PostgreSQL)
    assert fast.fast_release(namespace, ["warm"], "W-1") == 1
    with monkeypatch.context() as m:
        m.setattr(pymysql.connections.Connection, "cursor", no_cursor)
        m.setattr(psycopg.Connection, "cursor", no_cursor)
        assert fast.fast_acquire(namespace, ["t"], *_entry("L-1", note=note)) == 1
        assert fast.fast_acquire(namespace, ["t"], *_entry("L-2")) is None  # held
    assert _locks(fast, namespace)["t"].note == note
    with monkeypatch.context() as m:
        m.setattr(pymysql.connections.Connection, "cursor", no_cursor)
        m.setattr(psycopg.Connection, "cursor", no_cursor)
        assert fast.fast_release(namespace, ["t"], "L-2") is None  # not its lease
        assert fast.fast_release(namespace, ["t"], "L-1") == 1
        assert fast.fast_acquire(namespace, ["t"], *_entry("L-3", note=note)) == 2
    assert _locks(fast, namespace)["t"].note == note
    assert fast.fast_release(namespace, ["t"], "L-3") == 2
    assert "t" not in _locks(fast, namespace)


def test_concurrent_fast_acquire_and_release_lose_nothing(
    fast: Any, db_url: str, namespace: str
) -> None:
    """Threads, each on names of its own, take and release them in their rows: every token of a
    name follows the last, and the names kept throughout are all still there."""
    threads_n, rounds = 8, 100
    seen: dict[int, list[int]] = {}
    failures: list[str] = []

    def worker(i: int) -> None:
        store = _server_store(db_url)
        versions: list[int] = []
        try:
            kept = store.fast_acquire(namespace, [f"kept-{i}"], *_entry(f"K{i}"))
            if kept != 1:
                failures.append(f"thread {i}: kept lock refused ({kept})")
                return
            for r in range(rounds):
                got = store.fast_acquire(namespace, [f"w-{i}"], *_entry(f"L{i}.{r}"))
                back = store.fast_release(namespace, [f"w-{i}"], f"L{i}.{r}")
                if got is None or back != got:
                    failures.append(f"thread {i}: round {r}: acquired {got}, released {back}")
                    return
                versions.append(got)
        finally:
            seen[i] = versions
            store.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for versions in seen.values():
        assert versions == list(range(1, rounds + 1))
    locks = _locks(fast, namespace)
    assert sorted(locks) == sorted(f"kept-{i}" for i in range(threads_n))
    assert {locks[f"kept-{i}"].lease for i in range(threads_n)} == {f"K{i}" for i in seen}


def test_racing_fast_acquires_of_one_name_have_one_winner(
    fast: Any, db_url: str, namespace: str
) -> None:
    racers = [_server_store(db_url) for _ in range(8)]
    barrier = threading.Barrier(len(racers))
    results: dict[int, int | None] = {}

    def race(i: int, round_: int) -> None:
        barrier.wait()
        results[i] = racers[i].fast_acquire(namespace, ["one"], *_entry(f"L{i}.{round_}"))

    try:
        for round_ in range(5):
            results.clear()
            threads = [threading.Thread(target=race, args=(i, round_)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, v in results.items() if v is not None]
            assert len(results) == 8 and len(winners) == 1
            locks = _locks(fast, namespace)
            assert locks["one"].lease == f"L{winners[0]}.{round_}"
            assert locks["one"].token == results[winners[0]] == round_ + 1
            assert sorted(locks) == ["one"]
            assert fast.fast_release(namespace, ["one"], f"L{winners[0]}.{round_}") is not None
    finally:
        for racer in racers:
            racer.close()


def test_a_name_claimed_by_a_change_is_locked_until_it_commits(db_url: str, namespace: str) -> None:
    """A name the change brings into the document, whose row exists and is free, is locked from
    its claim to the commit: a one-statement acquisition of it meanwhile waits, then finds it
    kept by the document (never both granted)."""
    store, other = _server_store(db_url), _server_store(db_url)
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)  # moves the namespace
        assert other.fast_acquire(namespace, ["n"], *_entry("F0")) == 1  # the row exists ...
        assert other.fast_release(namespace, ["n"], "F0") == 1  # ... and is free
        real_claim = store._claim_names
        results: list[int | None] = []
        thread = threading.Thread(
            target=lambda: results.append(other.fast_acquire(namespace, ["n"], *_entry("F")))
        )

        def claim(conn: Any, ns: str, names: list[str]) -> Any:
            rows = real_claim(conn, ns, names)
            thread.start()  # between the claim and the commit
            thread.join(0.5)
            return rows

        store._claim_names = claim
        store.transact(namespace, _take("n", "D"), None)
        thread.join(10)
        assert results == [None]  # it waited for the change, then found the name kept
        holders = _locks(store, namespace)
        assert list(holders) == ["n"] and holders["n"].lease == "D"
        assert holders["n"].token > 1  # past the token its row handed out
    finally:
        store.close()
        other.close()
        delete_rows(db_url, namespace)


@pytest.mark.parametrize("names", [None, ["x"]], ids=["claimed-after", "claimed-first"])
def test_a_name_back_in_the_document_gets_a_token_past_its_rows(
    fast: Any, namespace: str, names: list[str] | None
) -> None:
    """Taken in its row many times since it left the document, a name that comes back into it
    is granted past every token its row handed out: whether the change claims its row after a
    first computation, or (naming it, on the servers) with the document's lock."""
    tokens = []
    for i in range(10):
        tokens.append(fast.fast_acquire(namespace, ["x"], *_entry(f"L{i}")))
        assert fast.fast_release(namespace, ["x"], f"L{i}") is not None
    after = fast.transact(namespace, _take("x", "D"), None, names)
    tokens.append(json.loads(after.data)["locks"]["x"][1])
    assert tokens == sorted(set(tokens)) and tokens[-1] > 10, tokens


def test_a_change_through_the_document_does_not_stop_other_names(
    server: str, namespace: str
) -> None:
    """While a change through the document is in progress, names it does not concern are taken
    in their rows at once (on MariaDB a locking read at REPEATABLE READ would lock the gaps of
    the held names' index, and every such acquisition would wait for the change)."""
    store, other = _server_store(server), _server_store(server)
    try:
        store.transact(namespace, lambda s: (EMPTY_DOCUMENT, False), None)
        assert other.fast_acquire(namespace, ["held"], *_entry("H")) == 1
        took: dict[str, float] = {}

        def take(name: str) -> None:
            start = time.monotonic()
            assert other.fast_acquire(namespace, [name], *_entry(f"T-{name}")) == 1
            took[name] = time.monotonic() - start

        def compute(snap: Snapshot) -> tuple[str, bool] | None:
            if not took:
                threads = [threading.Thread(target=take, args=(n,)) for n in ("aaa", "zzz")]
                for thread in threads:  # names on both sides of the held one
                    thread.start()
                for thread in threads:
                    thread.join(3.0)  # a wait for this change would outlast it
            return _take("m", "D")(snap)

        store.transact(namespace, compute, None)
        assert set(took) == {"aaa", "zzz"} and max(took.values()) < 2.0, took
    finally:
        store.close()
        other.close()
        delete_rows(server, namespace)


def test_a_change_takes_over_only_the_names_it_concerns(db_url: str, namespace: str) -> None:
    """A change of some names locks and moves into the document only their rows: the other
    names held in their rows stay there, and are still released in one statement."""
    import tasklocks

    with tasklocks.connect(db_url, namespace=namespace) as table:
        table.acquire("warm").release()  # moves the namespace: names now take their rows
        alone = table.acquire("alone", owner="task:1")
        both = table.acquire("a", "b", owner="task:2")  # the document's
        assert sorted(h.name for h in table.held()) == ["a", "alone", "b"]  # one read
        names = _stored(db_url, namespace)[1]
        assert names["alone"][1:] == (alone.lease_id, False)  # still in its own row
        assert names["a"][2] and names["b"][2]  # kept by the document
        seen: list[Snapshot] = []
        real = table.store.transact

        def spy(*args: Any) -> Snapshot:
            def compute(snap: Snapshot) -> tuple[str, bool] | None:
                seen.append(snap)
                return args[1](snap)  # type: ignore[no-any-return]

            return real(args[0], compute, *args[2:])

        setattr(table.store, "transact", spy)  # noqa: B010 (the one method, for this call)
        both.release()  # through the document: it sees a and b, not alone
        assert seen and all('"alone"' not in snap.data for snap in seen)
        setattr(table.store, "transact", real)  # noqa: B010
        assert _stored(db_url, namespace)[1]["alone"][1:] == (alone.lease_id, False)
        alone.release()
        assert table.held() == []
        # Everything (reap, release_owner, repair) still sees every name.
        kept = table.acquire("kept", owner="task:3")
        assert [h.name for h in table.held()] == ["kept"]
        assert table.release_owner("task:3") == ["kept"]
        del kept
    delete_rows(db_url, namespace)


def test_only_a_lease_taken_in_its_row_tries_its_row_first(db_url: str, namespace: str) -> None:
    """A release of a lease the document granted goes straight to the document: a try of the
    name's row would cost a round trip to miss (the hand-off's releaser pays it otherwise)."""
    import tasklocks

    with tasklocks.connect(db_url, namespace=namespace) as table:
        table.acquire("warm").release()  # moves the namespace: names now take their rows
        tries: list[tuple[str, ...]] = []
        real = table.store.fast_release  # type: ignore[attr-defined]

        def spy(ns: str, names: Any, lease: str, renewed: bool = False) -> int | None:
            tries.append(tuple(names))
            result: int | None = real(ns, names, lease, renewed)
            return result

        setattr(table.store, "fast_release", spy)  # noqa: B010
        table.acquire("row", owner="task:1").release()  # taken and released in its row
        table.acquire("doc", owner="task:2", shared=True).release()  # the document's
        assert tries == [("row",)]
        assert table.held() == []
    delete_rows(db_url, namespace)


def test_a_holder_taken_over_by_a_claim_is_judged_by_its_own_session(
    server: str, namespace: str
) -> None:
    """A name taken in its row by a process whose session opened after the change read the
    sessions, and found held when the change claims it, is judged by that session (read again):
    never as expired, so never reclaimed from its living holder. (SQLite has one writer: no
    name is taken during a change.)"""
    import tasklocks

    with tasklocks.connect(server, namespace=namespace) as table:
        table.acquire("warm").release()  # moves the namespace: names now take their rows
        store = table.store
        real_claim = store._claim_names  # type: ignore[attr-defined]
        late: list[tasklocks.Lease] = []

        def claim(conn: Any, ns: str, names: list[str]) -> Any:
            if not late:  # a new process (a new session) takes "n" in its row meanwhile
                done = threading.Event()

                def take() -> None:
                    other = tasklocks.connect(server, namespace=namespace)
                    late.append(other.acquire("n", owner="task:late"))
                    done.set()

                threading.Thread(target=take, daemon=True).start()
                assert done.wait(10)
            return real_claim(conn, ns, names)

        setattr(store, "_claim_names", claim)  # noqa: B010
        # The servers claim the names a change names in its first round trip, with the rows
        # locked before the sessions are read, where this cannot happen; the names a change
        # brings in beside them (a waiter it grants) are claimed as here: take that road.
        setattr(store, "_lock_and_claim", lambda *args: None)  # noqa: B010
        with pytest.raises(tasklocks.LockHeld) as info:
            table.acquire("m", "n", owner="task:both")  # through the document: claims m and n
        assert "task:late" in str(info.value)
        assert [(h.name, h.holder.owner) for h in table.held()] == [("n", "task:late")]
        late[0].release()
        late[0].table.close()
    delete_rows(server, namespace)


def test_the_mysql_names_table_has_no_key_beside_its_own_and_an_earlier_key_is_left_alone(
    namespace: str,
) -> None:
    """The names table has no key beside its primary one, so that a take and a release, which
    set the lease, change that key's entry only. A table made by an earlier release keeps its
    ``held (namespace, lease)`` key: this one neither drops nor makes it, and works with it or
    without it (names held in their rows and in the document, seen and released)."""
    require("mysql")
    url = server_url("mysql")
    table = "tl_" + uuid.uuid4().hex[:12]
    names = f"{table}_names"

    def keys() -> set[str]:
        return {str(row[2]) for row in raw_rows(url, f"SHOW INDEX FROM {names}")}

    def works(store: Store) -> None:
        import tasklocks

        locks = tasklocks.LockTable(store, namespace)
        for _ in range(5):
            locks.acquire("a").release()  # in its row
        locks.acquire("a", owner="x")  # in its row, held
        two = locks.acquire("b", "c", owner="y")  # several names: through the document
        assert sorted((h.name, h.holder.owner) for h in locks.held()) == [
            ("a", "x"),
            ("b", "y"),
            ("c", "y"),
        ]
        assert locks.release_owner("x") == ["a"]  # a whole-namespace change finds the row's
        two.release()
        assert locks.held() == []

    try:
        store = open_store(url, table=table)
        assert keys() == {"PRIMARY"}
        works(store)
        store.close()
        raw_sql(url, f"ALTER TABLE {names} ADD KEY held (namespace, lease)")  # an earlier table
        again = open_store(url, table=table)
        works(again)
        again.close()
        assert keys() == {"PRIMARY", "held"}
        raw_sql(url, f"ALTER TABLE {names} DROP KEY held")  # dropped by hand: not made again
        open_store(url, table=table).close()
        assert keys() == {"PRIMARY"}
    finally:
        drop_tables(url, table)


def test_mysql_row_statements_are_prepared_at_their_second_run_and_carry_any_text(
    namespace: str,
) -> None:
    """The row statements run as text on their first use on a session, are prepared at their
    second (``COM_STMT_PREPARE``) and executed by id after it, their values sent apart from the
    statement: any text reaches the row as written, under ``NO_BACKSLASH_ESCAPES`` too, and a
    value longer than 250 bytes (its length in three bytes). A statement the session lost runs as
    text and is prepared again; one the server will not prepare runs as text, where its error
    shows as before."""
    require("mysql")
    import pymysql

    import tasklocks

    url = server_url("mysql")
    store = _server_store(url)
    locks = tasklocks.LockTable(store, namespace)

    def status(name: str) -> int:
        with store._conn.cursor() as cur:  # white-box: this session's own counters
            cur.execute(f"SHOW SESSION STATUS LIKE '{name}'")
            return int(cur.fetchone()[1])

    def pairs(note: str, times: int) -> list[int]:
        tokens = []
        for _ in range(times):
            lease = locks.acquire("a", note=note)
            [held] = locks.held()
            assert held.holder.note == note  # as the row keeps it
            tokens.append(lease.token)
            lease.release()
        assert locks.held() == []
        return tokens

    try:
        store.read(namespace)  # connected
        prepared, executed = status("Com_stmt_prepare"), status("Com_stmt_execute")
        tokens = pairs("first", 2)  # the row made (first uses: text), then taken again
        tokens += pairs(TRICKY, 4)
        handles = {k: v for k, v in store._conn._row_statements.items() if v > 0}
        assert len(handles) >= 2  # the retake and the release at least
        assert status("Com_stmt_prepare") - prepared == len(handles)  # each once
        assert status("Com_stmt_execute") - executed >= 6
        tokens += pairs("é" * 300 + "'\\", 2)  # 602 bytes and more
        store._conn.query("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        tokens += pairs(TRICKY + "\\", 2)
        assert tokens == sorted(set(tokens))  # strictly increasing, each from its own take
        # The session loses a statement (COM_STMT_CLOSE has no reply): it runs as text, then
        # is prepared again.
        retake = next(k for k in handles if k.startswith("UPDATE") and "lease IS NULL" in k)
        conn = store._conn
        conn._write_bytes(struct.pack("<iBI", 5, 0x19, handles[retake]))  # COM_STMT_CLOSE
        executed = status("Com_stmt_execute")
        tokens += pairs("again", 3)
        assert conn._row_statements[retake] not in (0, -1, handles[retake])  # prepared again
        assert status("Com_stmt_execute") - executed >= 4
        assert tokens == sorted(set(tokens))
        # A statement the server will not prepare (here: no such table) runs as text.
        from tasklocks.store.mysql import _Positional

        missing = _Positional("UPDATE no_such_table_here SET v = %(v)s")
        assert conn.ok_execute(missing, ("1",)) is None  # first use: text
        assert conn.ok_execute(missing, ("1",)) is None  # refused: text from now on
        assert conn._row_statements[missing.sql] == -1
        with pytest.raises(pymysql.err.ProgrammingError) as refused:
            conn.ok_query("UPDATE no_such_table_here SET v = '1'")
        assert refused.value.args[0] == 1146  # ER_NO_SUCH_TABLE
        assert pairs("after", 2)  # the session still in step
        # Without parameters (no parameter block) and with one named twice.
        conn.query("CREATE TEMPORARY TABLE prepared_here (id INT PRIMARY KEY, v BIGINT)")
        conn.query("INSERT INTO prepared_here VALUES (1, 1)")
        bare = _Positional("UPDATE prepared_here SET v = LAST_INSERT_ID(v + 1) WHERE id = 1")
        assert [conn.ok_execute(bare, ()) for _ in range(3)] == [None, (1, 2), (1, 3)]
        twice = _Positional(
            "UPDATE prepared_here SET v = LAST_INSERT_ID(v + %(d)s) WHERE id = %(id)s "
            "AND %(id)s = 1"
        )
        given = twice.values({"d": "10", "id": "1"})
        assert [conn.ok_execute(twice, given) for _ in range(3)] == [None, (1, 13), (1, 23)]
        conn.query("DROP TEMPORARY TABLE prepared_here")
    finally:
        store.close()
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE} WHERE namespace = %s", (namespace,))
        raw_sql(url, f"DELETE FROM {DEFAULT_TABLE}_names WHERE namespace = %s", (namespace,))
