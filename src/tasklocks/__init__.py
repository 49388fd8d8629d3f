"""tasklocks: crash-safe locks between background tasks that run as separate processes."""

from tasklocks import names
from tasklocks._core import Holder
from tasklocks._waiting import WaitStatus
from tasklocks.errors import (
    BadLockName,
    BadURL,
    CorruptLockTable,
    Deadlock,
    LeaseLost,
    LimitMismatch,
    LockHeld,
    LockTimeout,
    NotHeld,
    StoreError,
    StoreUnavailable,
    StoreUnreachable,
    TasklocksError,
)
from tasklocks.locks import HeldLock, Lease, LockTable, QueuedWaiter, connect
from tasklocks.owner import Liveness, ProcessIdentity, current_process, process_identity
from tasklocks.store import default_url, open_store
from tasklocks.tasks import TaskRecord, Tasks, TaskState, progress

__all__ = [
    "BadLockName",
    "BadURL",
    "CorruptLockTable",
    "Deadlock",
    "HeldLock",
    "Holder",
    "Lease",
    "LeaseLost",
    "LimitMismatch",
    "Liveness",
    "LockHeld",
    "LockTable",
    "LockTimeout",
    "NotHeld",
    "ProcessIdentity",
    "QueuedWaiter",
    "StoreError",
    "StoreUnavailable",
    "StoreUnreachable",
    "TaskRecord",
    "TaskState",
    "TasklocksError",
    "Tasks",
    "WaitStatus",
    "connect",
    "current_process",
    "default_url",
    "names",
    "open_store",
    "process_identity",
    "progress",
]
