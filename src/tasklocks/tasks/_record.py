"""Task records and their state machine: pure code.

States and the only transitions that exist::

    pending -> waiting -> running -> succeeded | failed | stopped | timed_out | crashed
    pending -> running                 (the locks were free at once: nothing to wait for)
    pending | waiting -> failed | stopped | timed_out | crashed

A finished task never changes again.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tasklocks.store import TaskRow, TaskValue

__all__ = ["FINAL", "TaskRecord", "TaskState", "can_move"]


class TaskState(enum.StrEnum):
    """Where a task is in its life."""

    PENDING = "pending"
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.STOPPED,
        TaskState.TIMED_OUT,
        TaskState.CRASHED,
    }
)
_ENDINGS = FINAL - {TaskState.SUCCEEDED}
_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.WAITING, TaskState.RUNNING} | _ENDINGS),
    TaskState.WAITING: frozenset({TaskState.RUNNING} | _ENDINGS),
    TaskState.RUNNING: FINAL,
}


def can_move(old: TaskState, new: TaskState) -> bool:
    """Whether a task may go from ``old`` to ``new``."""
    return new in _MOVES.get(old, frozenset())


_JSON_FIELDS = frozenset({"target", "args", "locks", "result", "waited_for"})
_IN_LOCKS = "shared"  # a field kept in the locks column, not a column of its own


def split_locks(raw: list[Any]) -> tuple[list[str], dict[str, int | None]]:
    """The locks column's list as (names, {shared name: its limit or None}): an exclusive lock
    is its name, a shared one ``{"name": ..., "limit": n or null}``."""
    names: list[str] = []
    shared: dict[str, int | None] = {}
    for item in raw:
        if isinstance(item, dict):
            names.append(str(item["name"]))
            limit = item.get("limit")
            shared[str(item["name"])] = None if limit is None else int(limit)
        else:
            names.append(str(item))
    return names, shared


def join_locks(names: list[str], shared: dict[str, int | None]) -> list[Any]:
    """The locks column's list (see :func:`split_locks`)."""
    return [n if n not in shared else {"name": n, "limit": shared[n]} for n in names]


@dataclass(frozen=True)
class TaskRecord:
    """One task, as stored in the tasks table."""

    id: int
    version: int
    kind: str | None
    target: str | list[str]
    args: Any
    locks: list[str]
    namespace: str
    state: TaskState
    percent: float | None
    message: str | None
    result: Any
    error_code: str | None
    error_message: str | None
    exit_code: int | None
    signal: int | None
    pid: int | None
    pgid: int | None
    host: str | None
    start_token: str | None
    boot: str | None
    pidns: str | None
    created: float
    started: float | None
    finished: float | None
    log_path: str | None
    timeout: float | None
    stop_requested: float | None
    # The wait history: every holder it was blocked by, in order, as {lock, owner, note, since}
    # where ``since`` is when it began waiting for that holder (None: it never waited).
    waited_for: list[dict[str, Any]] | None
    # The locks taken shared: name -> the limit of holders (None: any number); the others of
    # ``locks`` are exclusive. Stored in the locks column (see split_locks).
    shared: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: TaskRow) -> TaskRecord:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == _IN_LOCKS:
                continue
            value = row.get(f.name)
            if f.name in _JSON_FIELDS:
                value = None if value is None else json.loads(str(value))
            values[f.name] = value
        values["state"] = TaskState(str(values["state"]))
        values["locks"], values["shared"] = split_locks(list(values["locks"] or []))
        return cls(**values)

    def to_row(self) -> dict[str, TaskValue]:
        """Every column but id and version, ready for the store."""
        out: dict[str, TaskValue] = {}
        for f in fields(self):
            if f.name in ("id", "version", _IN_LOCKS):
                continue
            value = getattr(self, f.name)
            if f.name == "locks":
                value = join_locks(value, self.shared)
            if f.name in _JSON_FIELDS:
                value = None if value is None else json.dumps(value, separators=(",", ":"))
            elif isinstance(value, TaskState):
                value = value.value
            out[f.name] = value
        return out

    def changed(self, **changes: Any) -> dict[str, TaskValue]:
        """The columns that ``changes`` sets, encoded for the store (a transition is checked)."""
        new_state = changes.get("state")
        if (
            new_state is not None
            and new_state != self.state
            and not can_move(self.state, new_state)
        ):
            raise ValueError(f"task {self.id} cannot go from {self.state} to {new_state}")
        row = replace(self, **changes).to_row()
        return {name: row[name] for name in changes}

    def updated(self, cols: Mapping[str, TaskValue]) -> TaskRecord:
        """The record as the store holds it once ``cols`` (from :meth:`changed`) were written over
        this version by a compare-and-swap that succeeded: what a read would return, unread."""
        return TaskRecord.from_row(
            {**self.to_row(), **cols, "id": self.id, "version": self.version + 1}
        )

    @property
    def title(self) -> str:
        """A short description: the kind, else the target."""
        if self.kind:
            return self.kind
        return self.target if isinstance(self.target, str) else " ".join(self.target)

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        end = self.finished
        if end is None:
            import time

            end = time.time()
        return max(0.0, end - self.started)

    @property
    def wait_started(self) -> float | None:
        """When the task began waiting for a held lock; None if its locks were free at once.

        Start-up (from ``created`` until the first try for the locks) is not waiting. A record
        written before the history kept ``since`` counts from ``created`` (an upper bound).
        """
        if not self.waited_for:
            return None
        times = [w["since"] for w in self.waited_for if isinstance(w.get("since"), int | float)]
        return min(times) if times else self.created

    @property
    def wait_ended(self) -> float | None:
        """When the wait ended: the task got its locks (``started``) or ended while waiting
        (``finished``); None if it never waited or is waiting still."""
        if self.wait_started is None:
            return None
        return self.started if self.started is not None else self.finished

    @property
    def waited(self) -> float:
        """Seconds the task was blocked on held locks (so far, while it waits); 0.0 when
        nothing held them."""
        start = self.wait_started
        if start is None:
            return 0.0
        end = self.wait_ended
        if end is None:
            import time

            end = time.time()
        return max(0.0, end - start)

    def wait_history(self) -> list[dict[str, Any]]:
        """The wait history, each entry with ``since`` and ``until``: until the next holder came
        in its way, else until the wait ended (None while it still waits)."""
        start = self.wait_started
        entries = [dict(w, since=w.get("since", start)) for w in self.waited_for or []]
        for entry in entries:
            later = [e["since"] for e in entries if e["since"] > entry["since"]]
            entry["until"] = min(later) if later else self.wait_ended
        return entries

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        return out
