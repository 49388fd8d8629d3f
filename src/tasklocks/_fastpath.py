"""One-statement acquire and release, where the store offers them (``store.FastPaths``).

Taking free names and releasing a lease are the common changes. A store that can make them in the
database itself, under the row lock of one statement, spares the read-compute-CAS round trips.
With a big document the pure path, which re-encodes only what changed, is cheaper than having the
server parse it; the size is the last one seen (a one-statement change does not read it back).
"""

from __future__ import annotations

import time

from tasklocks import _core
from tasklocks._core import Claimant
from tasklocks.store import FAST_MAX_BYTES, FastPaths, OutcomeUnknown, Snapshot

__all__ = ["FastPath"]


class FastPath:
    """The one-statement changes of one namespace in one store."""

    def __init__(self, store: FastPaths, namespace: str) -> None:
        self.store = store
        self.namespace = namespace
        self.size = 0  # bytes of the document when last seen
        self.missed = False  # the last one-statement release did not apply (waiters queued)

    def _fits(self, seen: Snapshot | None) -> bool:
        if seen is not None:
            self.size = len(seen.data)
        return self.size <= FAST_MAX_BYTES

    def acquire(
        self, names: tuple[str, ...], claimant: Claimant, seen: Snapshot | None
    ) -> int | None:
        """Take ``names`` if they are all free: the new version (the token). None: use the full
        path. :raises OutcomeUnknown: the reply was lost (the entry may have been written)."""
        if not self._fits(seen):
            return None
        record = _core.claim_record(claimant, time.time())
        return self.store.fast_acquire(self.namespace, names, claimant.lease, record)

    def release(
        self, names: tuple[str, ...], lease: str, seen: Snapshot | None
    ) -> tuple[bool | None, Snapshot | None]:
        """Release a lease's names. True: done; False: use the full path; None: the reply was
        lost, and the full path must allow for that. With it, after a release that missed last
        time (waiters queue here: likely to miss again), the row as read in the same round trip
        where the store can (a hint for the full path); reading it every time would cost a
        release without waiters two more statements."""
        if not self._fits(seen):
            return False, None
        row = None
        try:
            if self.missed:
                version, row = self.store.fast_release_reading(self.namespace, names, lease)
            else:
                version = self.store.fast_release(self.namespace, names, lease)
        except OutcomeUnknown:
            return None, None
        self.missed = version is None
        return version is not None, row
