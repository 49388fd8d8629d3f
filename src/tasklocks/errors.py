"""The tasklocks exception tree.

Every exception carries an ``exit_code`` (the command line's documented exit status) and a message
that says what to do next.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "EXIT_FAILURE",
    "EXIT_LOCKED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "BadLockName",
    "BadURL",
    "CorruptLockTable",
    "Deadlock",
    "HolderInfo",
    "LeaseLost",
    "LimitMismatch",
    "LockHeld",
    "LockTimeout",
    "NotHeld",
    "StoreError",
    "StoreUnavailable",
    "StoreUnreachable",
    "TasklocksError",
    "clock",
    "describe_holder",
    "ordinal",
    "quote",
]

# Exit codes of the command line (sysexits.h where one fits).
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_LOCKED = 75  # EX_TEMPFAIL


class HolderInfo(Protocol):
    """What an error says of a lock's holder (a :class:`tasklocks.Holder` is one)."""

    @property
    def owner(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def host(self) -> str: ...
    @property
    def since(self) -> float: ...
    @property
    def note(self) -> str | None: ...


class TasklocksError(Exception):
    """Root of every error tasklocks raises."""

    exit_code: int = EXIT_FAILURE


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: a bad value may be huge
    (a 10,000-character lock name is not echoed whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{value[: limit - 30]!r}... ({len(value):,} characters)"
    return text[: limit - 3] + "..."


def clock(epoch: float, *, now: float | None = None) -> str:
    """Local ``HH:MM:SS``, with the date in front when it is not today."""
    when = time.localtime(epoch)
    today = time.localtime(time.time() if now is None else now)
    if when[:3] == today[:3]:
        return time.strftime("%H:%M:%S", when)
    return time.strftime("%Y-%m-%d %H:%M:%S", when)


def describe_holder(holder: HolderInfo) -> str:
    """One human phrase for who holds a lock: ``task:12 (pid 4711 on web-1) since 10:02:11``,
    plus the holder's note."""
    where = f"pid {holder.pid} on {holder.host}" if holder.pid is not None else f"on {holder.host}"
    since = clock(holder.since)
    text = f"{holder.owner} ({where}) since {since}"
    if holder.note:
        text += f", {holder.note}"
    return text


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ... ``11th``, ``21st``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_way(
    holders: Mapping[str, Sequence[HolderInfo]], queue: Sequence[HolderInfo], sep: str = "; "
) -> str:
    """Who is in the way, per name (``x is held by ...``), then the waiters ahead in the queue."""
    parts = []
    for name, hs in sorted(holders.items()):
        if not hs:
            continue
        text = f"{name} is held by {describe_holder(hs[0])}"
        if len(hs) > 1:
            text += f" and {len(hs) - 1} other{'s' if len(hs) > 2 else ''}"
        parts.append(text)
    if queue:
        first = describe_holder(queue[0])
        if len(queue) == 1:
            parts.append(f"1 waiter is ahead in the queue: {first}")
        else:
            parts.append(f"{len(queue)} waiters are ahead in the queue, first {first}")
    return sep.join(parts)


class LockHeld(TasklocksError):
    """A lock is held by someone else (or by the same owner: locks are not re-entrant), or
    others wait for it first (a try never overtakes the queue).

    ``held`` maps each name in the way of a holder to its (first) holder; ``holders`` to all of
    them (a shared name has several); ``queue`` lists the waiters ahead, in order.
    """

    exit_code = EXIT_LOCKED

    def __init__(
        self,
        held: Mapping[str, HolderInfo],
        *,
        hint: str = "wait with wait=True",
        holders: Mapping[str, Sequence[HolderInfo]] | None = None,
        queue: Sequence[HolderInfo] = (),
    ) -> None:
        self.held = dict(held)
        self.holders = (
            {n: tuple(hs) for n, hs in holders.items() if hs}
            if holders is not None
            else {n: (h,) for n, h in self.held.items()}
        )
        self.queue = tuple(queue)
        super().__init__(describe_way(self.holders, self.queue) + f"; {hint}")


class LockTimeout(TasklocksError, TimeoutError):
    """Waiting for locks took longer than the timeout."""

    exit_code = EXIT_LOCKED

    def __init__(
        self,
        timeout: float,
        held: Mapping[str, HolderInfo],
        *,
        holders: Mapping[str, Sequence[HolderInfo]] | None = None,
        queue: Sequence[HolderInfo] = (),
    ) -> None:
        self.timeout = timeout
        self.held = dict(held)
        self.holders = (
            {n: tuple(hs) for n, hs in holders.items() if hs}
            if holders is not None
            else {n: (h,) for n, h in self.held.items()}
        )
        self.queue = tuple(queue)
        way = describe_way(self.holders, self.queue, sep="; ")
        who = f" ({way})" if way else ""
        super().__init__(
            f"gave up after waiting {timeout:g}s for the locks{who}; "
            "raise the timeout or stop the holder"
        )


class Deadlock(TasklocksError):
    """Waiting would close a cycle of owners waiting for each other: the acquisition was refused
    at once instead of queued. ``cycle`` says it, one phrase per owner (the refused one first),
    ``owners`` lists them."""

    exit_code = EXIT_LOCKED

    def __init__(self, cycle: Sequence[str], owners: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        self.owners = tuple(owners)
        super().__init__(
            f"deadlock: {'; '.join(self.cycle)}; so {self.owners[0]} does not wait (it never "
            "would get them): release what it holds, then try again"
        )


class LimitMismatch(TasklocksError, ValueError):
    """A shared name was asked for with another limit than its holders' or waiters' (all who
    share a name must agree on how many may hold it)."""

    exit_code = EXIT_USAGE

    def __init__(self, name: str, asked: int | None, theirs: int | None, who: HolderInfo) -> None:
        self.name = name
        self.asked = asked
        self.theirs = theirs

        def limit(n: int | None) -> str:
            return "shared without a limit" if n is None else f"limit {n}"

        super().__init__(
            f"{name} is taken with {limit(theirs)} by {describe_holder(who)}, but this acquire "
            f"asked for {limit(asked)}; use the same limit for every holder of {name}"
        )


class LeaseLost(TasklocksError):
    """The session that kept a lease expired before it could be renewed (the holder was paused,
    hung or cut off from the database): its locks may belong to someone else now."""

    exit_code = EXIT_LOCKED

    def __init__(self, names: tuple[str, ...], owner: str, token: int, ttl: float) -> None:
        self.names = names
        self.owner = owner
        self.token = token
        super().__init__(
            f"{owner} lost {', '.join(names)} (fencing token {token}): its session was not "
            f"renewed within its ttl of {ttl:g}s, so others may hold them now; stop what they "
            "protect, and acquire them again"
        )


class NotHeld(TasklocksError):
    """A release named a lock that the owner does not hold."""

    exit_code = EXIT_FAILURE

    def __init__(
        self, name: str, owner: str, holder: HolderInfo | None, released: str | None = None
    ) -> None:
        self.name = name
        self.owner = owner
        self.holder = holder
        if released is not None:  # the lease (its names) was released already
            msg = f"this lease of {released} was released already; {owner} holds it no more"
        elif holder is not None and holder.owner == owner:  # (a release of one lease)
            msg = (
                f"this lease of {name} was released already; {owner} holds {name} under "
                "another lease, which that lease's release() gives back"
            )
        elif holder is None:
            msg = f"{name} is not held by anyone, so {owner} cannot release it"
        else:
            msg = (
                f"{name} is held by {describe_holder(holder)}, not by {owner}; "
                "release it as its owner"
            )
        super().__init__(msg)


class BadLockName(TasklocksError, ValueError):
    """A lock name (or namespace, or owner id) is not allowed."""

    exit_code = EXIT_USAGE


class BadURL(TasklocksError, ValueError):
    """A database URL is malformed (a usage error)."""

    exit_code = EXIT_USAGE


class StoreError(TasklocksError):
    """The database failed in a way tasklocks cannot hide."""

    exit_code = EXIT_FAILURE


class StoreUnavailable(StoreError):
    """The database cannot be reached, logged in to, or its driver is missing."""

    exit_code = EXIT_UNAVAILABLE


class StoreUnreachable(StoreUnavailable):
    """The database server did not answer (down, restarting, cut off): it may come back, and
    whoever can wait may try again (a waiting acquire, a task's supervisor)."""


class CorruptLockTable(StoreError):
    """A namespace's row does not hold a valid lock document; it is never overwritten silently."""

    exit_code = EXIT_FAILURE

    def __init__(self, namespace: str, problem: str) -> None:
        self.namespace = namespace
        self.problem = problem
        super().__init__(
            f"the lock document of namespace {namespace!r} is corrupt ({problem}); "
            f"inspect it, then reset it with 'tasklocks --namespace {namespace} repair --yes'"
        )
