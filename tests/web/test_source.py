"""The dashboard's :class:`Source` on an SQLite file of the test: shutdown, the default URL, and
what it remembers about stop requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tasklocks.store import TaskValue
from tasklocks.tasks import Tasks
from tasklocks.web._source import Source

from .conftest import DEADLINE


@pytest.fixture
def url(tmp_path: Path) -> str:
    """An SQLite database of this test, created."""
    url = f"sqlite:///{tmp_path}/locks.db"
    Tasks(url, "web").close()
    return url


def test_close_does_not_wait_for_a_database_call_that_hangs(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(url, "web")
    inside, release = threading.Event(), threading.Event()

    def hang(tasks: Tasks) -> None:
        inside.set()
        release.wait(DEADLINE)

    caller = threading.Thread(target=source.call, args=(hang,), daemon=True)
    caller.start()
    assert inside.wait(DEADLINE)
    try:
        closer = threading.Thread(target=source.close, kwargs={"timeout": 0.1}, daemon=True)
        closer.start()
        closer.join(DEADLINE)
        assert not closer.is_alive(), "close() waited for the hung call"
        assert "a database call did not end" in caplog.text
    finally:
        release.set()
        caller.join(DEADLINE)
    caplog.clear()
    source.close()  # nothing in progress now: it closes the connection
    assert "did not end" not in caplog.text


def test_without_a_url_a_missing_default_file_is_reported_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state" / "tasklocks" / "tasklocks.db"
    monkeypatch.delenv("TASKLOCKS_DB", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where the default file is
    source = Source(None, "web")
    try:
        snapshot = source.snapshot()
    finally:
        source.close()
    assert snapshot.error == f"the database file {db} is missing", snapshot
    assert not db.exists() and not db.parent.exists()


def test_a_stop_error_is_forgotten_when_the_task_ends(url: str) -> None:
    with Tasks(url, "web") as tasks:
        now = time.time()
        fields: dict[str, TaskValue] = {
            "kind": "ended",
            "target": '["true"]',
            "locks": "[]",
            "namespace": "web",
            "created": now - 2,
            "started": now - 2,
        }
        ended = tasks.store.create_task({**fields, "state": "succeeded", "finished": now - 1})
        running = tasks.store.create_task({**fields, "state": "running"})
    source = Source(url, "web")
    source.stop_errors.update({ended: "permission denied", running: "permission denied"})
    try:
        snapshot = source.snapshot()  # the first read
    finally:
        source.close()
    assert {r.id for r in snapshot.tasks} == {ended, running}
    assert source.stop_errors == {running: "permission denied"}
