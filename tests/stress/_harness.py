"""Worker processes for the stress tests, as the test sees them (the workers: ``_workers.py``)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

WORKERS = Path(__file__).with_name("_workers.py")
DEADLINE = 120.0  # seconds for a whole test: a hang fails, it never passes

Popen = subprocess.Popen[str]
Message = dict[str, Any]


class Workers:
    """Worker processes whose stdout lines arrive on one queue as (index, message or None)."""

    def __init__(
        self, mode: str, configs: list[dict[str, Any]], stderr: Path | None = None
    ) -> None:
        """``stderr``: a directory for each worker's stderr (``<index>.err``), else inherited."""
        self.events: queue.Queue[tuple[int, Message | None]] = queue.Queue()
        self.procs: list[Popen] = []
        self.deadline = time.monotonic() + DEADLINE
        for cfg in configs:
            err = None if stderr is None else open(stderr / f"{len(self.procs)}.err", "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, str(WORKERS), mode, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            if err is not None:
                err.close()  # the worker has its own copy
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(len(self.procs) - 1,), daemon=True).start()

    def _read(self, index: int) -> None:
        stdout = self.procs[index].stdout
        assert stdout is not None
        for line in stdout:
            self.events.put((index, json.loads(line)))
        self.events.put((index, None))

    def next(self) -> tuple[int, Message | None]:
        left = self.deadline - time.monotonic()
        try:
            return self.events.get(timeout=max(left, 0.001))
        except queue.Empty:
            pytest.fail(f"the workers did not finish within {DEADLINE:g}s")

    def tell(self, index: int, line: str) -> None:
        stdin = self.procs[index].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def start(self) -> None:
        """Wait until every worker is connected, then let them all go at once."""
        ready: set[int] = set()
        while len(ready) < len(self.procs):
            index, msg = self.next()
            assert msg is not None, f"worker {index} died before it was ready"
            assert "ready" in msg, msg
            ready.add(index)
        for index in range(len(self.procs)):
            self.tell(index, "go")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@contextmanager
def workers(
    mode: str, configs: list[dict[str, Any]], stderr: Path | None = None
) -> Iterator[Workers]:
    w = Workers(mode, configs, stderr)
    try:
        yield w
    finally:
        w.close()
