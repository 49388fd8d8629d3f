"""One-statement acquire and release, where the store offers them (``store.FastPaths``).

Taking a free name and releasing it are the common changes. A store that can make them in the
database itself, in one statement on that name's own row (the SQL servers: see
``store/_names.py``), spares the full path's transaction over the namespace's document, and
processes on distinct names never queue on one row.
"""

from __future__ import annotations

import time

from tasklocks import _core
from tasklocks._core import Claimant
from tasklocks.store import FastPaths, OutcomeUnknown

__all__ = ["FastPath"]


class FastPath:
    """The one-statement changes of one namespace in one store."""

    def __init__(self, store: FastPaths, namespace: str) -> None:
        self.store = store
        self.namespace = namespace

    def acquire(self, names: tuple[str, ...], claimant: Claimant) -> int | None:
        """Take ``names`` if they are all free: the token. None: use the full path.
        :raises OutcomeUnknown: the reply was lost (the entry may have been written)."""
        record = _core.claim_record(claimant, time.time())
        return self.store.fast_acquire(self.namespace, names, claimant.lease, record)

    def release(self, names: tuple[str, ...], lease: str) -> bool | None:
        """Release a lease's names. True: done; False: use the full path (the document keeps
        them); None: the reply was lost, and the full path must allow for that."""
        try:
            version = self.store.fast_release(self.namespace, names, lease)
        except OutcomeUnknown:
            return None
        return version is not None
