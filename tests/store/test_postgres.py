"""What only the PostgreSQL adapter does: a name's row statements go through libpq itself,
prepared once per connection, and fall back to psycopg's cursor where that is not safe; an open
checks the schema in one statement."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import delete_rows, pg_url_without_host, raw_rows, raw_sql, require, server_url

import tasklocks
import tasklocks.aio
from tasklocks.store import open_store, parse_url, postgres


@pytest.fixture
def url(namespace: str) -> Iterator[str]:
    require("postgresql")
    yield server_url("postgresql")
    delete_rows(server_url("postgresql"), namespace)


def _on_the_connection(table: tasklocks.LockTable, sql: str) -> list[Any]:
    """Run ``sql`` on the store's own connection (the one the row statements use)."""
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    conn = store._connection()
    try:
        cursor = conn.execute(sql)
        return list(cursor.fetchall()) if cursor.description else []
    finally:
        store._give_back()


def _prepared(table: tasklocks.LockTable) -> set[str]:
    rows = _on_the_connection(table, "SELECT name FROM pg_prepared_statements")
    return {r[0] for r in rows if r[0].startswith("tasklocks_")}


def test_the_row_statements_are_prepared_at_their_second_run_and_again_after_a_deallocate(
    url: str, namespace: str
) -> None:
    table = tasklocks.connect(url, namespace)
    table.acquire("warm").release()  # the namespace's first change moves it to the row layout
    tokens = []

    def pair() -> None:
        lease = table.acquire("job")
        tokens.append(lease.token)
        lease.release()

    pair()  # name_acquire's first run on this connection: unnamed (name_release ran at "warm")
    assert len(_prepared(table)) == 1
    pair()
    assert len(_prepared(table)) == 2  # name_acquire and name_release, by names of their own
    _on_the_connection(table, "DEALLOCATE ALL")  # as a pooler's reset would
    pair()  # "does not exist": run unnamed, once
    pair()  # prepared again
    assert len(_prepared(table)) == 2
    pair()
    assert tokens == list(range(tokens[0], tokens[0] + 5))
    assert table.held() == []
    table.close()


def test_a_url_whose_host_is_an_escaped_directory_connects_through_its_unix_socket(
    url: str, namespace: str
) -> None:
    """libpq reads ``postgresql://user@%2Fvar%2Frun%2Fpostgresql/db`` as the Unix socket in that
    directory (the escaped host went to DNS as it was written, and failed)."""
    p = parse_url(url)
    port = p.port or 5432
    if p.host not in ("127.0.0.1", "localhost", "::1") or not os.path.exists(
        f"/var/run/postgresql/.s.PGSQL.{port}"
    ):
        pytest.skip(f"no Unix socket of the server at {p.display()} in /var/run/postgresql")
    socket_url = f"postgresql://{p.user}@%2Fvar%2Frun%2Fpostgresql:{port}/{p.database}"
    table = tasklocks.connect(socket_url, namespace)
    try:
        assert table.store.url == socket_url
        table.acquire("job").release()
        assert _on_the_connection(table, "SELECT inet_client_addr()") == [(None,)]  # no TCP
    finally:
        table.close()


def test_a_url_without_a_host_connects_where_libpq_does(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``postgresql://user@/db`` is libpq's default host, as psql and psycopg read it: $PGHOST,
    else its Unix socket (it was refused: "it needs a host and a database"; Django's empty HOST
    became 127.0.0.1, whose sign-in may differ). The store passes no host, so libpq decides;
    the asyncio table's LISTEN connection too."""
    no_host = pg_url_without_host(url)
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    table = tasklocks.connect(no_host, namespace)
    try:
        assert table.store.url == no_host
        lease = table.acquire("job")
        over_tcp = tasklocks.connect(url, namespace)  # the same database
        assert [h.name for h in over_tcp.held()] == ["job"]
        over_tcp.close()
        lease.release()
        assert _on_the_connection(table, "SELECT inet_client_addr()") == [(None,)]  # no TCP
    finally:
        table.close()

    async def waited() -> None:  # a waiter woken by a notification, heard on no host either
        async_table = await tasklocks.aio.connect(no_host, namespace)
        try:
            first = await async_table.acquire("job")

            async def wait() -> tasklocks.aio.AsyncLease:  # (another task: another owner)
                return await async_table.acquire("job", wait=True, timeout=20)

            second = asyncio.create_task(wait())
            await asyncio.sleep(0.2)
            assert not second.done()
            await first.release()
            await (await second).release()
        finally:
            await async_table.close()

    asyncio.run(waited())
    monkeypatch.setenv("PGHOST", "127.0.0.1")  # and libpq's default is $PGHOST's
    table = tasklocks.connect(no_host, namespace)
    try:
        table.acquire("job").release()
        assert _on_the_connection(table, "SELECT inet_client_addr()::text") == [("127.0.0.1/32",)]
    finally:
        table.close()


@pytest.fixture
def warm(url: str, namespace: str) -> Iterator[tuple[tasklocks.LockTable, Any]]:
    """A table whose namespace has moved to the row layout, and its store."""
    table = tasklocks.connect(url, namespace)
    table.acquire("warm").release()
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    yield table, store
    table.close()


def test_a_server_error_in_a_row_statement_is_the_drivers_error(
    warm: tuple[tasklocks.LockTable, Any],
) -> None:
    table, store = warm
    # A statement the server refuses, sent the way the row statements are: the error is
    # psycopg's (what the adapter translates), with its SQLSTATE, and the connection stays usable.
    conn = store._connection()
    try:
        with pytest.raises(store._psycopg.errors.DivisionByZero):
            store._run_name_statement(conn, True, ("SELECT 1 / %(zero)s", {"zero": 0}))
        assert store._run_name_statement(conn, True, ("SELECT %(v)s::int", {"v": 7})) == 7
        assert store._run_name_statement(conn, True, ("SELECT 1 WHERE false", {})) is None
    finally:
        store._give_back()
    table.acquire("job").release()


def test_inside_a_transaction_the_row_statement_takes_the_cursor(
    warm: tuple[tasklocks.LockTable, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _table, store = warm
    sent: list[str] = []
    through_libpq = store._result

    def counted(conn: Any, missing: str = "") -> Any:
        sent.append(missing)
        return through_libpq(conn, missing)

    monkeypatch.setattr(store, "_result", counted)
    statement = ("SELECT %(v)s::int", {"v": 3})
    conn = store._connection()
    try:
        assert store._run_name_statement(conn, True, statement) == 3
        assert len(sent) == 1  # an idle connection: libpq
        conn.execute("BEGIN")
        assert store._run_name_statement(conn, True, statement) == 3
        assert len(sent) == 1  # in a transaction: psycopg's cursor
        conn.execute("ROLLBACK")
    finally:
        store._give_back()


def test_an_open_that_finds_the_schema_made_makes_nothing_and_a_missing_part_is_made_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """schema_version says in the same round trip whether the extras and the tasks table exist:
    an open that finds them all sends no DDL (a task's start opens a store), and one that finds
    an index dropped makes it again."""
    table = "tl_" + uuid.uuid4().hex[:12]
    extras: list[str] = []
    made = postgres.PostgresStore._schema_extras

    def counted(self: postgres.PostgresStore, conn: Any) -> None:
        extras.append(self.table)
        made(self, conn)

    monkeypatch.setattr(postgres.PostgresStore, "_schema_extras", counted)

    def exists(name: str) -> bool:
        return raw_rows(url, "SELECT to_regclass(%s) IS NOT NULL", (name,)) == [(True,)]

    def opened() -> postgres.PostgresStore:
        store = open_store(url, table=table)
        assert isinstance(store, postgres.PostgresStore)
        return store

    try:
        first = opened()
        assert extras == [table] and not first._tasks_ready  # created: extras made
        assert first.get_task(1) is None  # the tasks table, made on first use
        first.close()
        again = opened()
        assert extras == [table] and again._tasks_ready  # all there: one statement, no DDL
        again.close()
        assert not exists(f"{table}_names_held")  # (see the next test)
        raw_sql(url, f"DROP INDEX {table}_sessions_expires")
        opened().close()
        assert exists(f"{table}_sessions_expires")
        raw_sql(url, f"DROP TABLE {table}_epoch")  # (made by a tasklocks before it had one)
        opened().close()
        assert exists(f"{table}_epoch")
        assert extras == [table, table, table]
        raw_sql(url, f"DROP INDEX {table}_tasks_state")
        last = opened()
        assert not last._tasks_ready
        assert last.get_task(1) is None
        assert exists(f"{table}_tasks_state")
        last.close()
    finally:
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            raw_sql(url, f"DROP TABLE IF EXISTS {table}{suffix}")


def test_a_take_and_a_release_in_the_row_are_hot_updates_and_an_earlier_index_is_left_alone(
    url: str, namespace: str
) -> None:
    """The names table has no index beside its key, so that a take and a release, which set the
    lease, are HOT updates (no new index entries). A table made by an earlier release keeps its
    index over the held names (an earlier release asks for it at each open): this one neither
    drops nor makes it, and works with it."""
    table = "tl_" + uuid.uuid4().hex[:12]
    names = f"{table}_names"

    def updates() -> tuple[int, int]:
        rows = raw_rows(
            url,
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %s",
            (names,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def pairs(store: Any) -> tuple[int, int]:
        """20 pairs on one name; the table's (updates, HOT updates) once they are counted."""
        before = updates()
        locks = tasklocks.LockTable(store, namespace)
        for _ in range(20):
            locks.acquire("a").release()
        _on_the_connection(locks, "SELECT pg_stat_force_next_flush()")  # (else in 10 s idle)
        deadline = time.monotonic() + 10
        while updates()[0] - before[0] < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = updates()
        return after[0] - before[0], after[1] - before[1]

    try:
        store = open_store(url, table=table)
        indexes = raw_rows(url, "SELECT indexname FROM pg_indexes WHERE tablename = %s", (names,))
        assert indexes == [(f"{names}_pkey",)]
        done, hot = pairs(store)
        assert done >= 40 and hot >= done * 0.8, (done, hot)  # (an index over lease: none HOT)
        store.close()
        raw_sql(url, f"CREATE INDEX {names}_held ON {names} (namespace) WHERE lease IS NOT NULL")
        again = open_store(url, table=table)
        done, hot = pairs(again)
        assert done >= 40 and hot == 0  # the earlier index is there, and used
        assert tasklocks.LockTable(again, namespace).held() == []
        again.close()
        raw_sql(url, f"DROP INDEX {names}_held")  # dropped by hand: not made again
        open_store(url, table=table).close()
        assert raw_rows(url, "SELECT to_regclass(%s) IS NULL", (f"{names}_held",)) == [(True,)]
    finally:
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            raw_sql(url, f"DROP TABLE IF EXISTS {table}{suffix}")


def test_a_change_through_the_document_is_one_simple_query_a_round_trip_quoted_by_psycopg(
    warm: tuple[tasklocks.LockTable, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several names change the document: its statements go as one query a round trip, not
    through psycopg's pipeline (whose machinery cost more CPU than the statements), and the
    names' rows are claimed in the first (two round trips a change); a note with quotes,
    backslashes, a semicolon and a line break comes back as it was."""
    import psycopg

    table, _store = warm

    def no_pipeline(self: Any) -> Any:
        raise AssertionError("a pipeline was opened")

    monkeypatch.setattr(psycopg.Connection, "pipeline", no_pipeline)
    sent: list[str] = []
    execute = psycopg.ClientCursor.execute

    def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.ClientCursor, "execute", counted)
    note = "it's a \\ back'slash; \"quoted\" -- no SQL; \u00fcn\u00efcode \u2713\nline two $$ %s"
    lease = table.acquire("a", "b", note=note)
    # Lock the document, claim and lock the names' rows, read the sessions; write and commit.
    assert len(sent) == 2
    held = table.held()
    assert sorted(h.name for h in held) == ["a", "b"]
    assert {h.holder.note for h in held} == {note}
    assert len(sent) == 3  # the read: the document, the rows and the sessions at once
    lease.release()
    assert len(sent) == 5  # the same two round trips
    assert table.held() == []


def _names_row(url: str, namespace: str, name: str) -> tuple[Any, ...]:
    rows = raw_rows(
        url,
        "SELECT lease, record FROM tasklocks_names WHERE namespace = %s AND name = %s",
        (namespace, name),
    )
    assert len(rows) == 1
    return rows[0]


def test_a_row_release_that_a_crash_undid_is_given_back_at_the_next_renewal(
    url: str, namespace: str
) -> None:
    """A row release commits without waiting for the flush, so a crash of the server may undo
    it: the name is then held by a lease its process let go of, in a live session. Here the
    crash is made by hand, as crash recovery leaves things (the row as before the release, the
    unlogged epoch row gone); tests/stress/test_outages.py crashes the server itself. The
    process's next renewal finds the epoch changed and gives the lease back, through the
    document too: the other table's waiting acquisition moved the name there first."""
    table = tasklocks.connect(url, namespace, ttl=1.0)  # renewed every third of a second
    other = tasklocks.connect(url, namespace)
    try:
        table.acquire("warm").release()  # the namespace's first change moves it to the rows
        lease = table.acquire("job")
        held = _names_row(url, namespace, "job")
        assert held[0] == lease.lease_id
        lease.release()
        assert _names_row(url, namespace, "job") == (None, None)
        raw_sql(
            url,
            "UPDATE tasklocks_names SET lease = %s, record = %s WHERE namespace = %s AND name = %s",
            (*held, namespace, "job"),
        )
        raw_sql(url, "TRUNCATE tasklocks_epoch")
        session = table._session
        assert session is not None
        started = time.monotonic()
        taken = other.acquire("job", owner="other", wait=True, timeout=10.0)
        waited = time.monotonic() - started
        taken.release()
        # Not freed by an expiry: the session that held it lives on, renewed.
        assert session.alive() and not session.lost.is_set() and table._session is session
        assert waited < 5.0
        assert isinstance(table.store, postgres.PostgresStore)
        assert table.store.lost_releases() == []  # said once
        assert [h.name for h in table.held()] == []
    finally:
        other.close()
        table.close()


def _remembered(store: postgres.PostgresStore) -> set[str]:
    return {k[1] for k in store._released} | {k[1] for _, g in store._older for k in g}


def test_row_releases_are_forgotten_once_the_wal_flush_has_passed_them(
    url: str, namespace: str
) -> None:
    """Without a crash, what a process remembers of its releases is forgotten at the first look
    at the epoch that finds the WAL's flush past the position read at the look before: it does
    not grow with the releases made."""
    table = tasklocks.connect(url, namespace, ttl=30.0)  # no renewal during the test
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    try:
        table.acquire("warm").release()  # (opens the session: the first look)
        assert store._unflushed
        for i in range(50):
            table.acquire(f"n{i}").release()
        assert _remembered(store) >= {f"n{i}" for i in range(50)}
        store._check_epoch()  # their WAL position read; flushed since, or soon
        # The WAL writer flushes an asynchronous commit within 3 x wal_writer_delay (0.6 s by
        # default); a busy host may take longer: look again until a look finds it passed.
        deadline = time.monotonic() + 20.0
        while True:
            time.sleep(0.2)
            store._check_epoch()
            if not _remembered(store) or time.monotonic() > deadline:
                break
        assert _remembered(store) == set()
        assert store.lost_releases() == []
        assert [h.name for h in table.held()] == []
    finally:
        table.close()


def test_a_lease_without_a_session_and_a_store_without_its_epoch_release_with_the_flush(
    url: str, namespace: str
) -> None:
    """Only a lease whose session this process renews may release without the flush (nothing
    else would give it back after a crash), and only while the last look at the epoch worked."""
    table = tasklocks.connect(url, namespace, ttl=30.0)
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    try:
        table.acquire("warm").release()
        bare = table.acquire("bare", owner="admin", process=None)  # kept until released
        bare.release()
        assert _names_row(url, namespace, "bare") == (None, None)
        assert "bare" not in _remembered(store)
        table.acquire("mine").release()
        assert "mine" in _remembered(store)
        sql = store._sql
        store._sql = {**sql, "release_epoch": "SELECT epoch FROM no_such_table_of_epochs"}
        try:
            store._check_epoch()  # fails: releases wait for the flush from now on
        finally:
            store._sql = sql
        assert not store._unflushed
        assert "mine" in _remembered(store)  # kept until a look works
        table.acquire("after").release()
        assert "after" not in _remembered(store)
        store._check_epoch()
        assert store._unflushed
    finally:
        table.close()


def test_a_forked_child_starts_with_nothing_to_give_back_and_free_locks(
    url: str, namespace: str
) -> None:
    table = tasklocks.connect(url, namespace, ttl=30.0)
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    try:
        table.acquire("warm").release()
        table.acquire("mine").release()
        assert _remembered(store)
        with store._epoch_lock:  # as a renewal's look might hold it at the fork
            pid = os.fork()
            if pid == 0:  # the child: exit at once, whatever happens
                ok = store._epoch_lock.acquire(timeout=2.0) and not _remembered(store)
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "mine" in _remembered(store)  # the parent's are the parent's
    finally:
        table.close()


@pytest.mark.parametrize("cut", [True, False], ids=["reconnected", "same-connection"])
def test_the_same_process_takes_a_name_again_after_a_crash_undid_its_release(
    url: str, namespace: str, cut: bool
) -> None:
    """The process that released a name takes it again after a crash undid that release,
    without waiting for a renewal (every 10 s here): its reconnection finds the crash, or, where
    its connection survived (PgBouncer keeps the client's), the acquisition that meets its own
    process's lease looks at the epoch then. The lost release is given back before it decides
    (else: "locks are not re-entrant", by its own forgotten lease)."""
    table = tasklocks.connect(url, namespace, ttl=30.0)
    store = table.store
    assert isinstance(store, postgres.PostgresStore)
    try:
        table.acquire("warm").release()
        lease = table.acquire("job")
        held = _names_row(url, namespace, "job")
        lease.release()
        raw_sql(
            url,
            "UPDATE tasklocks_names SET lease = %s, record = %s WHERE namespace = %s AND name = %s",
            (*held, namespace, "job"),
        )
        raw_sql(url, "TRUNCATE tasklocks_epoch")
        if cut:  # the crash ended the server's sessions: this process's connection among them
            (pid,) = _on_the_connection(table, "SELECT pg_backend_pid()")[0]
            raw_sql(url, "SELECT pg_terminate_backend(%s)", (pid,))
        again = table.acquire("job", timeout=5.0)
        assert again.token > lease.token
        assert [h.name for h in table.held()] == ["job"]
        again.release()
        assert _names_row(url, namespace, "job") == (None, None)
    finally:
        table.close()
