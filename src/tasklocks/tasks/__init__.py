"""The process-per-task runner (see :mod:`tasklocks.tasks.runner`)."""

from tasklocks.tasks._record import FINAL, TaskRecord, TaskState, can_move
from tasklocks.tasks.runner import (
    BadTarget,
    NotInTask,
    NoWorkingDirectory,
    TaskNotFound,
    Tasks,
    current_task_id,
    default_tasks,
    progress,
    reconcile,
    start,
    stop,
    wait,
)

__all__ = [
    "FINAL",
    "BadTarget",
    "NoWorkingDirectory",
    "NotInTask",
    "TaskNotFound",
    "TaskRecord",
    "TaskState",
    "Tasks",
    "can_move",
    "current_task_id",
    "default_tasks",
    "progress",
    "reconcile",
    "start",
    "stop",
    "wait",
]
