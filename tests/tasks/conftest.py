"""The task tests' runner fixture."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasklocks.tasks import Tasks

from .test_tasks import ROOT, kill_everything


@pytest.fixture
def files(tmp_path: Path) -> Callable[[str], Path]:
    """``files("go")``: a path in a scratch directory, for markers and go files."""
    scratch = tmp_path / "files"
    scratch.mkdir()
    return lambda name: scratch / name


@pytest.fixture
def tasks(
    db_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Tasks]:
    """A runner on ``db_url``/``namespace`` whose task processes can import the targets; every
    process it started is killed at the end."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    for var in ("TASKLOCKS_TASK_ID", "TASKLOCKS_TASK_PGID", "TASKLOCKS_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    runner = Tasks(db_url, namespace, log_dir=tmp_path / "logs")
    try:
        yield runner
    finally:
        try:
            kill_everything(runner)
        finally:
            runner.close()
