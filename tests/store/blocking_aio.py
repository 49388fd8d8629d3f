"""The async API driven from blocking code, so that the contract suites run over it too.

:class:`BlockingAio` has :class:`tasklocks.LockTable`'s methods; each one runs the
:class:`tasklocks.aio.AsyncLockTable` coroutine of the same name on an event loop in a thread of
its own and waits for it. Only the default owner differs from the async API's (the process's, as
a blocking table's, not the calling task's): the contract suites are written for that.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import tasklocks.aio
from tasklocks import HeldLock, QueuedWaiter, current_process
from tasklocks._core import Holder
from tasklocks.owner import default_owner
from tasklocks.store import Snapshot

T = TypeVar("T")


class BlockingLease:
    def __init__(self, table: BlockingAio, lease: tasklocks.aio.AsyncLease) -> None:
        self.table, self.aio = table, lease

    def __getattr__(self, name: str) -> Any:  # names, token, lost, check, ...
        return getattr(self.aio, name)

    def release(self) -> None:
        self.table.run(self.aio.release())

    def __enter__(self) -> BlockingLease:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.aio.released:
            self.release()

    def __repr__(self) -> str:
        return repr(self.aio)


class BlockingAio:
    def __init__(self, url: str, namespace: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.aio = self.run(tasklocks.aio.connect(url, namespace, **kwargs))
        self.namespace = namespace

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def acquire(self, *names: str, owner: str | None = None, **kwargs: Any) -> BlockingLease:
        if owner is None and "process" not in kwargs:
            owner = default_owner(current_process())
        return BlockingLease(self, self.run(self.aio.acquire(*names, owner=owner, **kwargs)))

    @contextmanager
    def hold(self, *names: str, **kwargs: Any) -> Iterator[BlockingLease]:
        with self.acquire(*names, wait=True, **kwargs) as lease:
            yield lease

    def release(self, *names: str, owner: str | None = None) -> None:
        owner = default_owner(current_process()) if owner is None else owner
        self.run(self.aio.release(*names, owner=owner))

    def release_owner(self, owner: str) -> list[str]:
        return self.run(self.aio.release_owner(owner))

    def release_all(self) -> list[str]:
        return self.run(self.aio.release_all())

    def reap(self, *, owner: str | None = None) -> list[tuple[str, Holder]]:
        return self.run(self.aio.reap(owner=owner))

    def held(self) -> list[HeldLock]:
        return self.run(self.aio.held())

    def waiting(self) -> list[QueuedWaiter]:
        return self.run(self.aio.waiting())

    def raw(self) -> Snapshot:
        return self.run(self.aio.raw())

    def repair(self) -> Snapshot:
        return self.run(self.aio.repair())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self.aio.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def __enter__(self) -> BlockingAio:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
