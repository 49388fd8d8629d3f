"""The move to the compact document format 3 (issue 10), while the previous release still runs.

Every backend writes format 3 from this version on and still reads formats 1 and 2. A process of
the previous release (its ``src/``, taken from git at ``BEFORE_FORMAT_3``) runs beside this one on
the same table: it must never grant a lock the new document does not show, must fail clearly on
its next call, and its held lock must stay held until it is gone.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tasklocks
from tasklocks.errors import LockHeld

BEFORE_FORMAT_3 = "29f5ff19ebbc7ee2dde204507e2eeaf8ad1859f5"  # stop 13: formats 1 and 2 only
REPO = Path(__file__).resolve().parents[2]

# The old process: one command per line on stdin, one JSON answer per line on stdout.
OLD_CHILD = textwrap.dedent(
    """
    import json, sys
    import tasklocks
    table = tasklocks.connect(sys.argv[1], namespace=sys.argv[2])
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


@pytest.fixture(scope="module")
def old_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``src/`` of the previous release, from this repository's history."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE_FORMAT_3, "src"],
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


class Old:
    """A process of the previous release with a lock table open."""

    def __init__(self, src: Path, url: str, namespace: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OLD_CHILD, url, namespace],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        hello = self._answer()
        assert hello["file"].startswith(str(src)), hello  # the old code, not this one

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
def old(old_src: Path, db_url: str, namespace: str) -> Iterator[Old]:
    process = Old(old_src, db_url, namespace)
    try:
        yield process
    finally:
        process.kill()


def _format(table: tasklocks.LockTable) -> int:
    return int(json.loads(table.raw().data)["format"])


def test_the_previous_release_beside_this_one(old: Old, db_url: str, namespace: str) -> None:
    assert "token" in old("acquire", "kept")
    with tasklocks.connect(db_url, namespace=namespace) as table:
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
                "format 3 was written by a newer tasklocks; upgrade tasklocks"
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


def test_a_namespace_the_previous_release_left_is_taken_over(
    old_src: Path, db_url: str, namespace: str
) -> None:
    """A document in format 1 or 2, as the previous release left it, is read, and the first
    change writes it in format 3 (on the servers, the fast paths then apply)."""
    old = Old(old_src, db_url, namespace)
    try:
        assert "token" in old("acquire", "a")
        assert "token" in old("acquire", "b")
        assert old("release", "b") == {"released": "b"}
    finally:
        old.kill()  # its lock of a is reclaimed by proof
    with tasklocks.connect(db_url, namespace=namespace) as table:
        assert _format(table) == 1
        with table.acquire("a", "b", owner="task:new"):
            assert _format(table) == 3
            assert sorted(e.name for e in table.held()) == ["a", "b"]
        assert json.loads(table.raw().data) == {"format": 3, "procs": {}, "locks": {}}
