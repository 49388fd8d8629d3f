"""The task tests' runner fixture."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import raw_sql

from tasklocks.store import DEFAULT_TABLE
from tasklocks.tasks import Tasks

from .test_tasks import ROOT, kill_everything


@pytest.fixture
def files(tmp_path: Path) -> Callable[[str], Path]:
    """``files("go")``: a path in a scratch directory, for markers and go files."""
    scratch = tmp_path / "files"
    scratch.mkdir()
    return lambda name: scratch / name


def _runner(
    db_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str
) -> Iterator[Tasks]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    for var in ("TASKLOCKS_TASK_ID", "TASKLOCKS_TASK_PGID", "TASKLOCKS_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    runner = Tasks(db_url, namespace, log_dir=tmp_path / "logs", table=table)
    try:
        yield runner
    finally:
        try:
            kill_everything(runner)
        finally:
            runner.close()


@pytest.fixture
def tasks(
    db_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Tasks]:
    """A runner on ``db_url``/``namespace`` whose task processes can import the targets; every
    process it started is killed at the end."""
    yield from _runner(db_url, namespace, tmp_path, monkeypatch, DEFAULT_TABLE)


@pytest.fixture
def alone(
    db_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Tasks]:
    """``tasks`` on a table of its own, dropped afterwards: a test that needs a dead task to stay
    unmarked until its own ``reconcile`` (which looks at every namespace of the table, as the
    tests running beside it do) uses it."""
    table = "tl_" + uuid.uuid4().hex[:12]
    try:
        yield from _runner(db_url, namespace, tmp_path, monkeypatch, table)
    finally:
        for suffix in ("", "_meta", "_sessions", "_names", "_tasks", "_epoch"):
            with contextlib.suppress(Exception):
                raw_sql(db_url, f"DROP TABLE IF EXISTS {table}{suffix}")
