"""The lock rules: transitions of the lock document (:mod:`tasklocks._doc`), pure code, no I/O.

Theory of operation
-------------------
All locks of a namespace live in one document, stored in one database row next to an integer
``version``. A change is computed here from the document as read (the caller supplies the
version, ``now``, the claimant and an ``is_dead`` predicate) and written by the caller only if the
row still has the version the change was computed from; every write bumps the version by exactly
one.

Waiting is a FIFO queue in the document. A waiting acquisition appends a waiter; every write then
*promotes*: it walks the queue in order and grants each waiter whose names are all free for it,
where a name is free for a waiter when its holders and the waiters ahead of it that want it allow
it (an exclusive want needs nobody; a shared one needs only shared holders and shared waiters
ahead, fewer than its limit together). So a waiter is delayed only by the holders and waiters
ahead of it, a later waiter never overtakes an earlier one on a name they both want, and a try
(which never queues) is granted only if it would be granted at the end of the queue.

Invariants (checked by the Hypothesis state machine in ``tests/core``):

* a name has one exclusive holder, or only shared holders, all with the same limit, and never
  more than that limit;
* a lock is freed only by its owner (``release``/``release_owner``/``release_lease``), by an
  administrator (``release_all``), or when its holder is gone (``is_dead`` returned True: its
  process is provably dead, or its session expired by the database's clock); a waiter leaves the
  queue the same ways, or when it is granted;
* an acquisition of several names is all-or-nothing;
* after every write no waiter could be granted: promotion runs with every change;
* the fencing token of an acquisition is the version its write creates, so a name's tokens
  strictly increase (waiters granted by one write share its token);
* acquisitions are idempotent by lease id: re-running an acquisition whose write succeeded but whose
  reply was lost finds its own entries and changes nothing (kazoo's lesson);
* a waiter whose wait would close a cycle of owners waiting for each other is refused
  (:class:`Deadlocked`) instead of queued: a deadlock is always reported, to its youngest member.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tasklocks._doc import (
    EMPTY,
    EXCLUSIVE,
    FORMAT,
    SHARED,
    Claimant,
    Document,
    Encoder,
    Holder,
    Holders,
    LockDoc,
    Waiter,
    Want,
    as_doc,
    claim_record,
    decode,
    encode,
    holder_to_json,
)
from tasklocks.errors import LimitMismatch, LockHeld, NotHeld

__all__ = [
    "EMPTY",
    "EXCLUSIVE",
    "FORMAT",
    "SHARED",
    "Blocked",
    "Claimant",
    "Deadlocked",
    "Document",
    "Encoder",
    "Granted",
    "Holder",
    "LockDoc",
    "Queued",
    "Refused",
    "Waiter",
    "Want",
    "acquire",
    "as_doc",
    "blocked",
    "check_not_already_held",
    "claim_record",
    "decode",
    "encode",
    "held_token",
    "holder_to_json",
    "promote",
    "reap",
    "release",
    "release_all",
    "release_lease",
    "release_owner",
    "wants",
]

Entry = Holder | Waiter
IsDead = Callable[[Entry], bool]
Reaped = tuple[tuple[str, Holder], ...]


def wants(items: Iterable[str | Want]) -> tuple[Want, ...]:
    """The wants of an acquisition, one per name in first-seen order (a bare name is
    exclusive). :raises ValueError: a name is asked for in two different ways."""
    out: dict[str, Want] = {}
    for item in items:
        want = Want(item) if isinstance(item, str) else item
        seen = out.setdefault(want.name, want)
        if seen != want:
            raise ValueError(f"{want.name} is asked for twice, as {seen} and {want}")
    return tuple(out.values())


@dataclass(frozen=True, slots=True)
class Blocked:
    """What is in the way of an acquisition: per wanted name, the holders in its way, and the
    waiters ahead of it in the queue that want one of its names in a way that conflicts."""

    holders: Mapping[str, Holders]
    ahead: tuple[Waiter, ...]

    @property
    def blockers(self) -> dict[str, Holder]:
        """Per name in the way of a holder, its first such holder."""
        return {name: hs[0] for name, hs in self.holders.items() if hs}

    @property
    def position(self) -> int:
        """1: next in line (only holders are in the way), 2: one waiter ahead, ..."""
        return len(self.ahead) + 1


@dataclass(frozen=True, slots=True)
class Granted:
    """An acquisition succeeded. ``changed`` is False when the lease already held every name."""

    doc: LockDoc
    token: int
    reaped: Reaped
    changed: bool
    dropped: tuple[Waiter, ...] = ()


@dataclass(frozen=True, slots=True)
class _NotGranted:
    """What stands in the way (``blocked``); ``doc`` may still drop gone holders and waiters
    (and grant waiters behind them)."""

    doc: LockDoc
    blocked: Blocked
    reaped: Reaped
    changed: bool
    dropped: tuple[Waiter, ...] = ()

    @property
    def blockers(self) -> dict[str, Holder]:
        return self.blocked.blockers


@dataclass(frozen=True, slots=True)
class Refused(_NotGranted):
    """A try is blocked."""


@dataclass(frozen=True, slots=True)
class Queued(_NotGranted):
    """A waiting acquisition is in the queue (put there now, or earlier) and not granted yet."""


@dataclass(frozen=True, slots=True)
class Deadlocked:
    """Queueing would close a cycle of owners waiting for each other: the acquisition is not
    queued. ``cycle`` says it, one phrase per owner, starting with the claimant's."""

    doc: LockDoc
    cycle: tuple[str, ...]
    owners: tuple[str, ...]
    reaped: Reaped
    changed: bool
    dropped: tuple[Waiter, ...] = ()


# --- who may have what -------------------------------------------------------------------------


def _in_the_way(
    holders: Holders, ahead: list[tuple[Waiter, Want]], want: Want
) -> tuple[Holders, list[Waiter]] | None:
    """None if ``want`` can be granted now, given the name's ``holders`` and the wants of the
    waiters ahead; else who is in the way."""
    if want.mode == EXCLUSIVE:
        if not holders and not ahead:
            return None
        return holders, [w for w, _ in ahead]
    xh = tuple(h for h in holders if h.mode == EXCLUSIVE)
    xa = [w for w, x in ahead if x.mode == EXCLUSIVE]
    if xh or xa:
        return xh, xa
    if want.limit is None or len(holders) + len(ahead) < want.limit:
        return None
    return holders, [w for w, _ in ahead]


def check_limits(doc: LockDoc, wanted: Iterable[Want], lease: str) -> None:
    """Every shared holder and waiter of a name must use the same limit.
    :raises LimitMismatch: one of ``wanted`` disagrees with them."""
    for want in wanted:
        if not want.shared:
            continue
        for holder in doc.holders(want.name):
            if holder.mode == SHARED and holder.limit != want.limit and holder.lease != lease:
                raise LimitMismatch(want.name, want.limit, holder.limit, holder)
        for waiter in doc.queue:
            if waiter.lease == lease:
                continue
            for other in waiter.wants:
                if other.name == want.name and other.shared and other.limit != want.limit:
                    raise LimitMismatch(want.name, want.limit, other.limit, waiter)


def held_token(doc: Document, names: Iterable[str], lease: str) -> int | None:
    """The token of ``lease`` if it holds every one of ``names`` (it was granted), else None."""
    d = as_doc(doc)
    token = None
    for name in names:
        mine = next((h for h in d.holders(name) if h.lease == lease), None)
        if mine is None:
            return None
        if token is None:
            token = mine.token
    return token


def blocked(doc: Document, lease: str) -> Blocked:
    """What is in the way of the queued waiter of ``lease`` (nothing if it is not queued)."""
    d = as_doc(doc)
    ahead: dict[str, list[tuple[Waiter, Want]]] = {}
    for waiter in d.queue:
        if waiter.lease == lease:
            return _blocked_by(d, waiter, ahead)
        for want in waiter.wants:
            ahead.setdefault(want.name, []).append((waiter, want))
    return Blocked({}, ())


def _blocked_by(
    doc: LockDoc, waiter: Waiter, ahead: dict[str, list[tuple[Waiter, Want]]]
) -> Blocked:
    holders: dict[str, Holders] = {}
    before: dict[str, Waiter] = {}
    for want in waiter.wants:
        way = _in_the_way(doc.holders(want.name), ahead.get(want.name, []), want)
        if way is not None:
            if way[0]:
                holders[want.name] = way[0]
            for w in way[1]:
                before.setdefault(w.lease, w)
    order = {w.lease: i for i, w in enumerate(doc.queue)}
    return Blocked(holders, tuple(sorted(before.values(), key=lambda w: order[w.lease])))


def promote(
    doc: Document, *, version: int, now: float, is_dead: IsDead | None = None
) -> tuple[LockDoc, tuple[Waiter, ...], tuple[Waiter, ...]]:
    """Grant, in queue order, every waiter that can be granted (its token is ``version + 1``),
    dropping the waiters ``is_dead`` says are gone. Returns the new document, the waiters
    granted and the waiters dropped (the same document if there are none)."""
    d = as_doc(doc)
    if not d.queue:
        return d, (), ()
    put: dict[str, Holders] = {}
    left: list[Waiter] = []
    granted: list[Waiter] = []
    dropped: list[Waiter] = []
    ahead: dict[str, list[tuple[Waiter, Want]]] = {}
    for waiter in d.queue:
        if is_dead is not None and is_dead(waiter):
            dropped.append(waiter)
            continue
        now_held = {w.name: put.get(w.name, d.holders(w.name)) for w in waiter.wants}
        if all(
            _in_the_way(now_held[w.name], ahead.get(w.name, []), w) is None for w in waiter.wants
        ):
            for w in waiter.wants:
                put[w.name] = (*now_held[w.name], waiter.holder(w, version + 1, now))
            granted.append(waiter)
        else:
            left.append(waiter)
            for w in waiter.wants:
                ahead.setdefault(w.name, []).append((waiter, w))
    if not granted and not dropped:
        return d, (), ()
    return d.derive(put=put, queue=tuple(left)), tuple(granted), tuple(dropped)


# --- acquiring ------------------------------------------------------------------------------------


def acquire(
    doc: Document,
    names: Iterable[str | Want],
    claimant: Claimant,
    *,
    version: int,
    now: float,
    is_dead: IsDead,
    queue: bool = False,
) -> Granted | Refused | Queued | Deadlocked:
    """Take every one of ``names`` for ``claimant``, or none.

    Without ``queue`` (a try) it is granted only if it would be granted at the end of the queue,
    else :class:`Refused`. With ``queue``, it joins the queue (once: a lease already queued keeps
    its place) unless that would close a cycle of waits (:class:`Deadlocked`), and is granted
    when promotion reaches it. Holders of the names that the claimant or any waiter wants and
    waiters that ``is_dead`` proves gone are dropped in the same change. The token of a new
    acquisition is ``version + 1``: the version the caller's write creates.
    :raises LimitMismatch: a shared name is asked for with another limit than its holders'.
    """
    wanted = wants(names)
    d = as_doc(doc)
    token = held_token(d, (w.name for w in wanted), claimant.lease)
    if wanted and token is not None:
        return Granted(d, token, (), changed=False)
    check_limits(d, wanted, claimant.lease)

    if not d.queue:  # the common case, without the queue's machinery (same outcome)
        granted_now = _grant_at_once(d, wanted, claimant, version=version, now=now)
        if granted_now is not None:
            return granted_now

    # Drop the gone: waiters, and holders of every name someone wants.
    interest = {w.name for w in wanted} | {w.name for q in d.queue for w in q.wants}
    reaped = tuple((n, h) for n in sorted(interest) for h in d.holders(n) if is_dead(h))
    mine = d.waiter(claimant.lease)
    fresh = claimant.waiter(now, wanted)
    if mine is not None and (mine.session != fresh.session or mine.wants != fresh.wants):
        mine = None  # queued under a session lost since: it goes to the end of the queue
    dropped = tuple(w for w in d.queue if w.lease != claimant.lease and is_dead(w))
    gone = {w.lease for w in dropped}
    rest = [w for w in d.queue if w.lease not in gone and (w.lease != claimant.lease or mine)]
    new_entry = mine is None
    if new_entry:
        rest.append(fresh)
    put = {n: tuple(h for h in d.holders(n) if (n, h) not in reaped) for n, _ in reaped}
    tidy = d.derive(put=put, queue=tuple(rest))
    promoted, granted, _ = promote(tidy, version=version, now=now)
    if any(w.lease == claimant.lease for w in granted):
        return Granted(promoted, version + 1, reaped, True, dropped)
    way = blocked(promoted, claimant.lease)
    touched = bool(reaped or dropped or granted)
    if not queue:  # a try: its entry, last in the queue, was in nobody's way
        touched = touched or not new_entry
        without = _unqueue(promoted, claimant.lease)
        return Refused(without if touched else d, way, reaped, touched, dropped)
    if new_entry and (cycle := _deadlock(promoted, claimant.lease)) is not None:
        without = _unqueue(promoted, claimant.lease)
        owners, phrases = cycle
        return Deadlocked(without if touched else d, phrases, owners, reaped, touched, dropped)
    return Queued(promoted, way, reaped, touched or new_entry, dropped)


def _grant_at_once(
    d: LockDoc, wanted: tuple[Want, ...], claimant: Claimant, *, version: int, now: float
) -> Granted | None:
    """With nobody queued and none of the names held, what queueing and promoting would do:
    the grant. None: otherwise (the full path decides)."""
    if any(d.holders(w.name) for w in wanted):
        return None
    entry = claimant.waiter(now, wanted)
    put = {w.name: (entry.holder(w, version + 1, now),) for w in wanted}
    return Granted(d.derive(put=put), version + 1, (), True)


def _unqueue(doc: LockDoc, lease: str) -> LockDoc:
    if doc.waiter(lease) is None:
        return doc
    return doc.derive(queue=tuple(w for w in doc.queue if w.lease != lease))


def check_not_already_held(
    doc: Document,
    names: Iterable[str],
    owner: str,
    *,
    lease: str | None = None,
    is_dead: IsDead = lambda entry: False,
) -> None:
    """Locks are not re-entrant: raise :class:`LockHeld` if ``owner`` holds one of ``names``
    (under another lease than ``lease``: a retried acquisition may find its own entries; an
    entry ``is_dead`` says is gone does not count)."""
    d = as_doc(doc)
    mine = {}
    for name in names:
        for h in d.holders(name):
            if h.owner == owner and h.lease != lease and not is_dead(h):
                mine[name] = h
                break
    if mine:
        raise LockHeld(mine, hint="locks are not re-entrant; release it first")


# --- deadlocks ------------------------------------------------------------------------------------


def _stuck(doc: LockDoc) -> list[Waiter]:
    """The waiters that would never be granted even if every owner that waits for nothing
    released all it holds, and every waiter granted meanwhile did the same once it waits for
    nothing more (Holt's graph reduction): the members of a deadlock and whoever queues behind
    one. A waiter is never in its own owner's way (an owner's threads sort that out)."""
    holders = {n: doc.holders(n) for n in doc}
    queue = list(doc.queue)
    while True:
        waiting = {w.owner for w in queue}
        moved = False
        for name, hs in list(holders.items()):
            keep = tuple(h for h in hs if h.owner in waiting)
            if len(keep) != len(hs):
                holders[name], moved = keep, True
        left: list[Waiter] = []
        ahead: dict[str, list[tuple[Waiter, Want]]] = {}
        for waiter in queue:
            if all(
                _in_the_way(
                    tuple(h for h in holders.get(w.name, ()) if h.owner != waiter.owner),
                    [(e, x) for e, x in ahead.get(w.name, []) if e.owner != waiter.owner],
                    w,
                )
                is None
                for w in waiter.wants
            ):
                for w in waiter.wants:
                    holders[w.name] = (*holders.get(w.name, ()), waiter.holder(w, 0, 0.0))
                moved = True
            else:
                left.append(waiter)
                for w in waiter.wants:
                    ahead.setdefault(w.name, []).append((waiter, w))
        queue = left
        if not moved:
            return queue


def _deadlock(doc: LockDoc, lease: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """If the waiter of ``lease`` is in a deadlock: the owners of a cycle through it (its own
    first) and a phrase for each ("task:12 holds x and waits for y")."""
    stuck = _stuck(doc)
    me = next((w for w in stuck if w.lease == lease), None)
    if me is None:
        return None
    stuck_owners = {w.owner for w in stuck}
    # Who each stuck owner waits for, and for which names, in the real document. Only the stuck
    # count: the others finish, and one of them in the way may hide a stuck one (an exclusive
    # holder of a counted name hides the waiters ahead that will fill its places).
    edges: dict[str, dict[str, set[str]]] = {}
    ahead: dict[str, list[tuple[Waiter, Want]]] = {}
    for waiter in doc.queue:
        if waiter in stuck:
            for want in waiter.wants:
                way = _in_the_way(
                    tuple(
                        h
                        for h in doc.holders(want.name)
                        if h.owner != waiter.owner and h.owner in stuck_owners
                    ),
                    [
                        (e, x)
                        for e, x in ahead.get(want.name, [])
                        if e.owner != waiter.owner and e.owner in stuck_owners
                    ],
                    want,
                )
                if way is None:
                    continue
                for other in {h.owner for h in way[0]} | {w.owner for w in way[1]}:
                    if other in stuck_owners:
                        edges.setdefault(waiter.owner, {}).setdefault(other, set()).add(want.name)
        for want in waiter.wants:
            ahead.setdefault(want.name, []).append((waiter, want))
    # The shortest cycle back to me (breadth first).
    back: dict[str, str] = {}
    todo = deque([me.owner])
    path: list[str] | None = None
    while todo and path is None:
        at = todo.popleft()
        for nxt in sorted(edges.get(at, {})):
            if nxt == me.owner:
                path = [at]
                while path[-1] != me.owner:
                    path.append(back[path[-1]])
                path.reverse()
                break
            if nxt not in back:
                back[nxt] = at
                todo.append(nxt)
    if path is None:
        return None  # stuck behind a deadlock of others: theirs to report
    phrases = []
    for i, owner in enumerate(path):
        prev, nxt = path[i - 1], path[(i + 1) % len(path)]
        needed = sorted(edges[prev][owner])
        held = [n for n in needed if any(h.owner == owner for h in doc.holders(n))]
        queued = [n for n in needed if n not in held]
        parts = []
        if held:
            parts.append(f"holds {', '.join(held)}")
        if queued:
            parts.append(f"is in line for {', '.join(queued)} first")
        waits = ", ".join(sorted(edges[owner][nxt]))
        phrases.append(f"{owner} {' and '.join(parts)} and waits for {waits}")
    return tuple(path), tuple(phrases)


# --- releasing ------------------------------------------------------------------------------------


def release(
    doc: Document, names: Iterable[str], owner: str, *, lease: str | None = None
) -> LockDoc:
    """Free ``names`` held by ``owner`` (and by ``lease``, when given); all or none.

    Raises :class:`NotHeld` naming the first lock that ``owner`` does not hold.
    """
    d = as_doc(doc)
    put: dict[str, Holders] = {}
    for name in dict.fromkeys(names):
        holders = d.holders(name)
        keep = tuple(
            h for h in holders if h.owner != owner or (lease is not None and h.lease != lease)
        )
        if len(keep) == len(holders):  # (owner's other lease first: the message says so)
            first = next((h for h in holders if h.owner == owner), holders[0] if holders else None)
            raise NotHeld(name, owner, first)
        put[name] = keep
    return d.derive(put=put)


def _without(
    doc: LockDoc, holder_gone: Callable[[Holder], bool], waiter_gone: Callable[[Waiter], bool]
) -> tuple[LockDoc, Reaped, tuple[Waiter, ...]]:
    freed: list[tuple[str, Holder]] = []
    put: dict[str, Holders] = {}
    for name, holders in doc._holders.items():
        gone = [h for h in holders if holder_gone(h)]
        if gone:
            freed.extend((name, h) for h in gone)
            put[name] = tuple(h for h in holders if not holder_gone(h))
    dropped = tuple(w for w in doc.queue if waiter_gone(w))
    if not freed and not dropped:
        return doc, (), ()
    queue = tuple(w for w in doc.queue if w not in dropped) if dropped else None
    return doc.derive(put=put, queue=queue), tuple(freed), dropped


def release_owner(doc: Document, owner: str) -> tuple[LockDoc, list[str]]:
    """Free every lock ``owner`` holds, and take its waiters out of the queue; return the new
    document and the freed names."""
    new, freed, _ = _without(as_doc(doc), lambda h: h.owner == owner, lambda w: w.owner == owner)
    return new, list(dict.fromkeys(n for n, _ in freed))


def release_all(doc: Document) -> tuple[LockDoc, list[str]]:
    """Free every lock and empty the queue (an administrator's reset)."""
    return EMPTY, list(doc)


def reap(doc: Document, is_dead: IsDead) -> tuple[LockDoc, Reaped]:
    """Drop every holder and waiter that ``is_dead`` proves gone; return the new document and the
    (name, holder) pairs dropped."""
    new, freed, _ = _without(as_doc(doc), is_dead, is_dead)
    return new, freed


def release_lease(doc: Document, lease: str) -> tuple[LockDoc, list[str]]:
    """Free every lock of one lease and take it out of the queue (an acquisition undone, or a
    lost lease given back)."""
    new, freed, _ = _without(as_doc(doc), lambda h: h.lease == lease, lambda w: w.lease == lease)
    return new, list(dict.fromkeys(n for n, _ in freed))
