"""The tasks table and the lock table of one database: what the runner and its supervisors share.

:class:`tasklocks.tasks.Tasks` (the facade) builds on :class:`TaskDB`; the supervisor and the zygote
use it directly and never import the facade.
"""

from __future__ import annotations

import numbers
from types import TracebackType
from typing import Any, Self

from tasklocks.errors import TasklocksError
from tasklocks.locks import LockTable
from tasklocks.names import validate_namespace
from tasklocks.store import Backend, default_url, open_store
from tasklocks.tasks._record import TaskRecord

__all__ = ["TaskDB", "TaskNotFound"]


class TaskNotFound(TasklocksError, LookupError):
    """No task has that id."""

    exit_code = 2

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id
        super().__init__(f"there is no task {task_id}; list tasks with 'tasklocks tasks --all'")


class TaskDB:
    """Task records in the database at ``url`` (default ``$TASKLOCKS_DB``, else the per-user SQLite
    file), with the lock table of ``namespace`` in it."""

    def __init__(
        self, url: str | None = None, namespace: str = "default", *, table: str = "tasklocks"
    ) -> None:
        self.url = default_url() if url is None else url
        self.namespace = validate_namespace(namespace)
        self.table = table
        self.store: Backend = open_store(self.url, table=table)
        self.locks = LockTable(self.store, self.namespace, owns_store=True)

    def get(self, task_id: int) -> TaskRecord:
        """One task's record. :raises TaskNotFound: no such task. :raises TypeError: the id is
        not an int."""
        if isinstance(task_id, bool) or not isinstance(task_id, numbers.Integral):
            raise TypeError(f"a task id is an int, not {task_id!r}")
        task_id = int(task_id)  # (numpy's integers too)
        if not 0 < task_id < 2**63:  # (ids are 64-bit: SQLite's driver cannot even send more)
            raise TaskNotFound(task_id)
        row = self.store.get_task(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return TaskRecord.from_row(row)

    def update(self, task_id: int, **changes: Any) -> TaskRecord | None:
        """Change a record with a compare-and-swap, retrying on conflicts.

        Returns the new record, or None if the record is already final (finished tasks never
        change) or the change is not a valid transition.
        """
        return self.update_from(self.get(task_id), **changes)

    def update_from(self, record: TaskRecord, **changes: Any) -> TaskRecord | None:
        """:meth:`update`, starting from ``record`` as last read: one round trip while it is
        still the stored version (a conflict reads the record again)."""
        while True:
            if record.state.is_final:
                return None
            try:
                cols = record.changed(**changes)
            except ValueError:
                return None
            if self.store.update_task(record.id, record.version, cols):
                return record.updated(cols)
            record = self.get(record.id)

    def close(self) -> None:
        self.locks.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
