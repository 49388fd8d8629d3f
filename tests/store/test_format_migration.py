"""Moves of the stored layout (issue 10), while a previous release still runs beside this one.

* **Format 3**, the compact document: every backend writes it and still reads formats 1 and 2. A
  process of the release before it (its ``src/``, taken from git at ``BEFORE_FORMAT_3``) shares
  a table of schema 1 with this one (its own table: this release moves every table it opens to
  schema 2, which that release refuses at once). It must never grant a lock the new document does
  not show, must fail clearly on its next call, and its held lock must stay held until it is gone.
* **A row per name** (schema 2, document format 4; see ``store/_names.py``): a process of the
  release before it (``BEFORE_NAMES``) keeps working until this one changes its namespace, then
  fails clearly; a new process of it refuses the table; its held locks move into the new layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, raw_rows, raw_sql, require, server_url

import tasklocks
from tasklocks.errors import LockHeld
from tasklocks.store import open_store

BEFORE_FORMAT_3 = "29f5ff19ebbc7ee2dde204507e2eeaf8ad1859f5"  # stop 13: formats 1 and 2 only
BEFORE_NAMES = "85db1916c2640b51b93f7358b884862d9de1a7d4"  # stop 15: documents alone (schema 1)
REPO = Path(__file__).resolve().parents[2]

# The old process: one command per line on stdin, one JSON answer per line on stdout.
OLD_CHILD = textwrap.dedent(
    """
    import json, sys
    import tasklocks
    from tasklocks.store import open_store
    try:
        store = open_store(sys.argv[1], table=sys.argv[3])
    except Exception as exc:
        print(json.dumps({"file": tasklocks.__file__, "error": str(exc)}), flush=True)
        sys.exit(1)
    table = tasklocks.LockTable(store, sys.argv[2], owns_store=True)
    print(json.dumps({"file": tasklocks.__file__}), flush=True)
    for line in sys.stdin:
        verb, name = line.split()
        try:
            if verb == "acquire":
                out = {"token": table.acquire(name, owner="task:old").token}
            elif verb == "release":
                table.release(name, owner="task:old")
                out = {"released": name}
            else:
                out = {"held": sorted(e.name for e in table.held())}
        except Exception as exc:
            out = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(out), flush=True)
    """
)


def _release_src(tmp_path_factory: pytest.TempPathFactory, commit: str) -> Path:
    """``src/`` of an earlier release, from this repository's history."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "src"],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the previous release is not in this checkout's history: {exc}")
    dest = tmp_path_factory.mktemp("old")
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


@pytest.fixture(scope="module")
def old_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _release_src(tmp_path_factory, BEFORE_FORMAT_3)


@pytest.fixture(scope="module")
def names_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _release_src(tmp_path_factory, BEFORE_NAMES)


class Old:
    """A process of an earlier release with a lock table open."""

    def __init__(self, src: Path, url: str, namespace: str, table: str = "tasklocks") -> None:
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OLD_CHILD, url, namespace, table],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.hello = self._answer()
        assert self.hello["file"].startswith(str(src)), self.hello  # the old code, not this one

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the old process ended"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def __call__(self, verb: str, name: str = "-") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{verb} {name}\n")
        self.proc.stdin.flush()
        return self._answer()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/locks.db"


@pytest.fixture
def old(old_src: Path, sqlite_url: str, namespace: str) -> Iterator[Old]:
    process = Old(old_src, sqlite_url, namespace)
    try:
        yield process
    finally:
        process.kill()


def _format(table: tasklocks.LockTable) -> int:
    return int(json.loads(table.raw().data)["format"])


def test_the_release_before_format_3_beside_this_one(
    old: Old, sqlite_url: str, namespace: str
) -> None:
    assert "token" in old("acquire", "kept")
    with tasklocks.connect(sqlite_url, namespace=namespace) as table:
        assert _format(table) == 1  # what the old release wrote
        assert [(e.name, e.holder.owner) for e in table.held()] == [("kept", "task:old")]
        with pytest.raises(LockHeld):
            table.acquire("kept", owner="task:new")
        mine = table.acquire("mine", owner="task:new")
        assert _format(table) == 3
        before = table.raw()
        # The old release fails clearly, and writes nothing.
        for verb, name in [("acquire", "other"), ("acquire", "mine"), ("release", "kept")]:
            answer = old(verb, name)
            assert answer.get("error") == "CorruptLockTable", answer
            assert (
                "format 4 was written by a newer tasklocks; upgrade tasklocks"
                in (answer["message"])
            )
        assert table.raw() == before
        # Its lock stays held while it lives, and is reclaimed by proof once it is gone.
        with pytest.raises(LockHeld):
            table.acquire("kept", owner="task:new")
        old.kill()
        with table.acquire("kept", owner="task:new") as kept:
            assert kept.token > mine.token
        assert sorted(e.name for e in table.held()) == ["mine"]


def test_a_namespace_the_release_before_format_3_left_is_taken_over(
    old_src: Path, sqlite_url: str, namespace: str
) -> None:
    """A document in format 1 or 2, as that release left it, is read, and the first change
    writes it in format 3."""
    old = Old(old_src, sqlite_url, namespace)
    try:
        assert "token" in old("acquire", "a")
        assert "token" in old("acquire", "b")
        assert old("release", "b") == {"released": "b"}
    finally:
        old.kill()  # its lock of a is reclaimed by proof
    with tasklocks.connect(sqlite_url, namespace=namespace) as table:
        assert _format(table) == 1
        with table.acquire("a", "b", owner="task:new"):
            assert _format(table) == 3
            assert sorted(e.name for e in table.held()) == ["a", "b"]
        assert json.loads(table.raw().data) == {"format": 3, "procs": {}, "locks": {}}


# --- a row per name (schema 2, format 4): the SQL servers -----------------------------------------


@pytest.fixture(params=BACKENDS)
def fresh_table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A URL and a lock table of its own (made by whoever opens it first), dropped
    afterwards."""
    backend: str = request.param
    require(backend)
    url = server_url(backend) if backend != "sqlite" else f"sqlite:///{tmp_path}/move.db"
    table = "tlmove_" + uuid.uuid4().hex[:8]
    try:
        yield url, table
    finally:
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            with contextlib.suppress(Exception):
                raw_sql(url, f"DROP TABLE IF EXISTS {table}{suffix}")


def _stored_format(url: str, table: str, namespace: str) -> int:
    return int(json.loads(_stored(url, table, namespace))["format"])


def _stored(url: str, table: str, namespace: str) -> str:
    """The document as stored (the store shows format 4 to the core as 3)."""
    return str(_select_one(url, f"SELECT data FROM {table} WHERE namespace = %s", (namespace,)))


def _schema(url: str, table: str) -> str:
    key = "`key`" if url.startswith("mysql") else "key"  # (a word SQLite takes as a name)
    sql = f"SELECT value FROM {table}_meta WHERE {key} = %s"
    return str(_select_one(url, sql, ("schema_version",)))


def _select_one(url: str, sql: str, params: tuple[Any, ...]) -> Any:
    rows = raw_rows(url, sql, params)
    assert rows
    return rows[0][0]


def test_the_release_before_name_rows_beside_this_one(
    names_src: Path, fresh_table: tuple[str, str], namespace: str
) -> None:
    url, table_name = fresh_table
    old = Old(names_src, url, namespace, table_name)  # makes the table, at schema 1
    try:
        kept_token = old("acquire", "kept")["token"]  # its one-statement path, in format 3
        assert _stored_format(url, table_name, namespace) == 3
        store = open_store(url, table=table_name)  # moves the table to schema 2
        with tasklocks.LockTable(store, namespace, owns_store=True) as table:
            assert _schema(url, table_name) == "2"
            assert [(e.name, e.holder.owner) for e in table.held()] == [("kept", "task:old")]
            with pytest.raises(LockHeld):
                table.acquire("kept", owner="task:new")
            # A running old process still works while the namespace is untouched.
            assert "token" in old("acquire", "early")
            assert old("release", "early") == {"released": "early"}
            # The first change of this release moves the document: format 4, its names marked.
            mine = table.acquire("mine", owner="task:new")
            assert _stored_format(url, table_name, namespace) == 4
            before = _stored(url, table_name, namespace)
            for verb, name in [("acquire", "other"), ("acquire", "mine"), ("release", "kept")]:
                answer = old(verb, name)
                assert answer.get("error") == "CorruptLockTable", answer
                assert (
                    "format 4 was written by a newer tasklocks; upgrade tasklocks"
                    in (answer["message"])
                )
            assert _stored(url, table_name, namespace) == before  # it wrote nothing
            # A new process of the old release refuses the table, saying why.
            late = Old(names_src, url, namespace, table_name)
            assert "schema version 2" in late.hello["error"]
            assert "upgrade tasklocks" in late.hello["error"]
            late.kill()
            # Its lock stays held while it lives, and is reclaimed by proof once it is gone;
            # the name's token only grows.
            with pytest.raises(LockHeld):
                table.acquire("kept", owner="task:new")
            old.kill()
            with table.acquire("kept", owner="task:new") as kept:
                assert kept.token > kept_token
            mine.release()
            # Free names are then taken in their own rows.
            with table.acquire("fresh", owner="task:new") as fresh:
                assert (
                    _select_one(
                        url,
                        f"SELECT lease FROM {table_name}_names WHERE namespace = %s AND name = %s",
                        (namespace, "fresh"),
                    )
                    == fresh.lease_id
                )
            assert table.held() == []
    finally:
        old.kill()
