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
from dataclasses import dataclass, fields, replace
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
    waited_for: list[dict[str, Any]] | None  # the holders it waited for: lock, owner, note

    @classmethod
    def from_row(cls, row: TaskRow) -> TaskRecord:
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = row.get(f.name)
            if f.name in _JSON_FIELDS:
                value = None if value is None else json.loads(str(value))
            values[f.name] = value
        values["state"] = TaskState(str(values["state"]))
        values["locks"] = list(values["locks"] or [])
        return cls(**values)

    def to_row(self) -> dict[str, TaskValue]:
        """Every column but id and version, ready for the store."""
        out: dict[str, TaskValue] = {}
        for f in fields(self):
            if f.name in ("id", "version"):
                continue
            value = getattr(self, f.name)
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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        return out
