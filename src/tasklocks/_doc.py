"""The lock document and its JSON: pure code, no I/O.

A namespace's document holds, per lock name, its holders, and the queue of waiters in arrival
order. A name has one *exclusive* holder, or any number of *shared* holders (at most ``limit`` of
them when the name is counted).

The stored JSON is format 3, the compact one. It keeps who holds a lease once, in ``procs``, and
per name only the lease and the token::

    {"format":3,"procs":{"9f2c...":["task:12",4711,"...",...]},
     "locks":{"backup":["9f2c...",7],"apps":[["9f2c...",7,3],["51ab...",9,3]]},"queue":[...]}

A record lists owner, pid, start, boot, host, pidns, pgid, since, note and session; its key is
the lease (an eleventh item names the lease when two records of one lease differ, which only a
hand-made document has). A name's value is ``[lease, token]`` (held exclusively) or a list of
``[lease, token, limit]`` (shared; ``limit`` null when not counted). ``queue``, when not empty,
lists the waiters. An entry costs about 30 bytes plus its name, and a lease's record about 160
bytes once (format 1: about 270 bytes an entry, record included): 1,000 locks taken 100 at a time
are a seventh of their format-1 size, 1,000 taken one at a time about three quarters. The
one-statement fast paths (``store/sql``) take only a document without a queue or a shared name,
so they never overtake a queue.

Earlier releases wrote formats 1 and 2, which are still read (and written by ``encode`` without
``compact``, for tests): format 1 maps each name to its one exclusive holder with every field
(``{"format":1,"locks":{"backup":{"owner":"task:12","pid":4711,...,"token":7,...}}}``), format 2
adds holders with a ``mode`` (and a ``limit``) and the ``queue``. A release that reads only those
refuses format 3 by its number ("upgrade tasklocks") instead of misreading it.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from tasklocks.errors import CorruptLockTable, quote

__all__ = [
    "EMPTY",
    "EXCLUSIVE",
    "FORMAT",
    "SHARED",
    "Claimant",
    "Document",
    "Encoder",
    "Holder",
    "LockDoc",
    "Process",
    "Waiter",
    "Want",
    "as_doc",
    "claim_record",
    "decode",
    "encode",
    "holder_to_json",
]

FORMAT: Final = 3  # the newest format this version reads and writes
EXCLUSIVE: Final = "x"
SHARED: Final = "s"


@dataclass(frozen=True, slots=True)
class Want:
    """One name an acquisition asks for: exclusive, or shared by any number of holders (at most
    ``limit`` of them, when given)."""

    name: str
    mode: str = EXCLUSIVE
    limit: int | None = None

    @property
    def shared(self) -> bool:
        return self.mode == SHARED

    def describe(self) -> str:
        """``name``, ``name (shared)`` or ``name (limit 3)``."""
        if self.limit is not None:
            return f"{self.name} (limit {self.limit})"
        return f"{self.name} (shared)" if self.shared else self.name


@dataclass(frozen=True, slots=True)
class Process:
    """The process behind an entry (judged alive, dead or unknown by :mod:`tasklocks.owner`),
    the owner it acts for, and since when the entry is there."""

    owner: str
    pid: int | None
    start: str | None
    boot: str | None
    host: str
    pidns: str | None
    pgid: int | None
    since: float


@dataclass(frozen=True, slots=True)
class Holder(Process):
    """One held lock: who holds it, since when, its fencing token, and how (``mode``, ``limit``)."""

    token: int
    lease: str
    note: str | None
    session: str | None = None  # the session that keeps it (None: kept until released)
    mode: str = EXCLUSIVE
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Waiter(Process):
    """One waiting acquisition in a namespace's queue: the process that waits (judged dead or
    expired as a holder is), since when, and what it wants. ``detached``: the entries it gets are
    kept until released (no process, no session), as ``acquire(process=None)`` asked."""

    lease: str
    note: str | None
    session: str | None
    wants: tuple[Want, ...]
    detached: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.wants)

    def holder(self, want: Want, token: int, since: float) -> Holder:
        """The entry this waiter gets for ``want`` when it is granted."""
        if self.detached:
            return Holder(
                self.owner, None, None, None, self.host, None, None, since, token, self.lease,
                self.note, None, want.mode, want.limit,
            )  # fmt: skip
        return Holder(
            self.owner, self.pid, self.start, self.boot, self.host, self.pidns, self.pgid, since,
            token, self.lease, self.note, self.session, want.mode, want.limit,
        )  # fmt: skip


class Claimant(NamedTuple):
    """Who asks for locks: the holder fields that do not depend on the document. ``waiter``,
    when given, is who waits in the queue instead (a claimant without a process still waits
    as the calling process, so that a crashed waiter leaves the queue). A named tuple: one is
    made for every acquisition, and a frozen dataclass's ``__init__`` costs a call per field."""

    owner: str
    pid: int | None
    start: str | None
    boot: str | None
    host: str
    pidns: str | None
    pgid: int | None
    lease: str
    note: str | None
    session: str | None = None
    waiter_as: Claimant | None = None

    def holder(self, since: float, token: int, want: Want | None = None) -> Holder:
        mode, limit = (EXCLUSIVE, None) if want is None else (want.mode, want.limit)
        return Holder(
            self.owner, self.pid, self.start, self.boot, self.host, self.pidns, self.pgid, since,
            token, self.lease, self.note, self.session, mode, limit,
        )  # fmt: skip

    def waiter(self, since: float, wants: tuple[Want, ...]) -> Waiter:
        w = self.waiter_as or self
        return Waiter(
            self.owner, w.pid, w.start, w.boot, w.host, w.pidns, w.pgid, since, self.lease,
            self.note, w.session, wants, detached=self.pid is None and w.pid is not None,
        )  # fmt: skip


Holders = tuple[Holder, ...]


class LockDoc(Mapping[str, Holder]):
    """An immutable lock document: per name its holders (``doc[name]`` is the first, the only one
    unless the name is shared; :meth:`holders` gives all), and the queue. It keeps each name's
    encoded JSON, so that a change re-encodes only what it changed: with many locks held,
    encoding is one string join."""

    __slots__ = ("_compact", "_holders", "_parts", "_wide", "queue")

    def __init__(
        self,
        holders: Mapping[str, Holders],
        parts: dict[str, str] | None = None,
        queue: tuple[Waiter, ...] = (),
        wide: frozenset[str] | None = None,
        compact: _Compact | None = None,
    ) -> None:
        self._holders = holders if type(holders) is dict else dict(holders)  # (derive's own copy)
        self._parts = parts
        self._compact = compact  # format 3's encoded parts, computed on first use
        self.queue = queue
        # The names whose value needs format 2 (shared, or more than one holder).
        self._wide = (
            frozenset(n for n, hs in self._holders.items() if _wide(hs)) if wide is None else wide
        )

    def __getitem__(self, name: str) -> Holder:
        return self._holders[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LockDoc):
            return self._holders == other._holders and self.queue == other.queue
        if isinstance(other, Mapping):
            return not self.queue and not self._wide and dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        held = {n: hs[0] if len(hs) == 1 else hs for n, hs in self._holders.items()}
        return f"LockDoc({held!r}, queue={self.queue!r})" if self.queue else f"LockDoc({held!r})"

    def holders(self, name: str) -> Holders:
        """Every holder of ``name`` (none: it is free)."""
        return self._holders.get(name, ())

    def entries(self) -> Iterator[tuple[str, Holder]]:
        """Every (name, holder) pair: a shared name once per holder."""
        for name, holders in self._holders.items():
            for holder in holders:
                yield name, holder

    def waiter(self, lease: str) -> Waiter | None:
        """The queued waiter of ``lease``, if any."""
        return next((w for w in self.queue if w.lease == lease), None)

    @property
    def plain(self) -> bool:
        """No queue and nothing shared: what the one-statement fast paths take."""
        return not self.queue and not self._wide

    @property
    def format(self) -> int:
        """The older format that holds this document: 1 if it is plain, else 2."""
        return 1 if self.plain else 2

    def parts(self) -> dict[str, str]:
        """Each name's encoded ``"name":...`` text (computed once per name)."""
        if self._parts is None:
            self._parts = {n: _fragment(n, hs) for n, hs in self._holders.items()}
        return self._parts

    def compact(self) -> _Compact:
        """Format 3's encoded parts (computed once, then kept up to date by :meth:`derive`)."""
        if self._compact is None:
            self._compact = _Compact.of(self._holders)
        return self._compact

    def derive(
        self,
        remove: Iterable[str] = (),
        put: Mapping[str, Holders] | None = None,
        queue: tuple[Waiter, ...] | None = None,
    ) -> LockDoc:
        """A new document: without the names in ``remove``, with the holders in ``put``
        (an empty tuple frees the name), and with ``queue`` if given (keeps encoded names)."""
        holders = self._holders.copy()
        parts = None if self._parts is None else self._parts.copy()
        # (An odd cache is dropped: the next encode rebuilds it, and finds out whether it still is.)
        c = self._compact
        compact = None if c is None or c.odd else c.copy()
        wide = set(self._wide)
        for name in remove:
            old = holders.pop(name)
            if parts is not None:
                del parts[name]
            if compact is not None:
                compact.drop(name, old)
            wide.discard(name)
        for name, new in (put or {}).items():
            old = holders.get(name, ())
            if compact is not None and old:
                compact.drop(name, old)
            if new:
                holders[name] = new
                if parts is not None:
                    parts[name] = _fragment(name, new)
                if compact is not None:
                    compact.add(name, new)
                if _wide(new):
                    wide.add(name)
                else:
                    wide.discard(name)
            elif old:
                del holders[name]
                if parts is not None:
                    del parts[name]
                wide.discard(name)
        return LockDoc(
            holders, parts, self.queue if queue is None else queue, frozenset(wide), compact
        )


def _wide(holders: Holders) -> bool:
    return len(holders) != 1 or holders[0].mode != EXCLUSIVE


Ident = tuple[Any, ...]  # a holder's record: the fields of format 3's ``procs``, in order
RECORD: Final = (
    "owner",
    "pid",
    "start",
    "boot",
    "host",
    "pidns",
    "pgid",
    "since",
    "note",
    "session",
)


_ident: Final[Callable[[Holder], Ident]] = operator.attrgetter(*RECORD)  # (a tuple, in C)


def _fragment3(name: str, holders: Holders) -> str:
    if not _wide(holders):
        return _dumps(name) + ":" + _dumps([holders[0].lease, holders[0].token])
    return _dumps(name) + ":" + _dumps([[h.lease, h.token, h.limit] for h in holders])


class _Compact:
    """Format 3's parts of one document, kept up to date change by change: each name's encoded
    text, each lease's record (and its encoded text) and how many entries use it. ``odd``: two
    entries of one lease have different records (only a hand-made document has), so the
    document is encoded the slow way, with a key per record."""

    __slots__ = ("odd", "parts", "records", "texts", "uses")

    def __init__(
        self,
        parts: dict[str, str],
        records: dict[str, Ident],
        texts: dict[str, str],
        uses: dict[str, int],
        odd: bool,
    ) -> None:
        self.parts, self.records, self.texts, self.uses, self.odd = (
            parts, records, texts, uses, odd
        )  # fmt: skip

    @classmethod
    def of(cls, holders: Mapping[str, Holders]) -> _Compact:
        compact = cls({}, {}, {}, {}, False)
        for name, hs in holders.items():
            compact.add(name, hs)
        return compact

    def copy(self) -> _Compact:
        return _Compact(
            self.parts.copy(), self.records.copy(), self.texts.copy(), self.uses.copy(), self.odd
        )

    def add(self, name: str, holders: Holders) -> None:
        self.parts[name] = _fragment3(name, holders)
        for h in holders:
            ident = _ident(h)
            known = self.records.get(h.lease)
            if known is None:
                self.records[h.lease] = ident
                self.texts[h.lease] = _dumps(h.lease) + ":" + _dumps(ident)
                self.uses[h.lease] = 1
            else:
                self.uses[h.lease] += 1
                self.odd = self.odd or known != ident

    def drop(self, name: str, holders: Holders) -> None:
        del self.parts[name]
        for h in holders:
            left = self.uses[h.lease] - 1
            if left:
                self.uses[h.lease] = left
            else:
                del self.uses[h.lease], self.records[h.lease], self.texts[h.lease]


Document = Mapping[str, Holder]
EMPTY: Final[LockDoc] = LockDoc({})  # no encoded parts yet: the encoder computes those it uses


def as_doc(doc: Document) -> LockDoc:
    """``doc`` as a :class:`LockDoc` (a plain mapping of name to its one holder is accepted)."""
    if isinstance(doc, LockDoc):
        return doc
    return LockDoc({name: (holder,) for name, holder in doc.items()})


# --- encoding -------------------------------------------------------------------------------------

_IDENTITY: Final[Mapping[str, tuple[type, ...]]] = {
    "owner": (str,),
    "pid": (int, type(None)),
    "start": (str, type(None)),
    "boot": (str, type(None)),
    "host": (str,),
    "pidns": (str, type(None)),
    "pgid": (int, type(None)),
    "since": (float, int),
}
_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    **_IDENTITY,
    "token": (int,),
    "lease": (str,),
    "note": (str, type(None)),
    "session": (str, type(None)),
}
_FIELDS: Final = tuple(_TYPES)
_WAITER_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    k: v for k, v in _TYPES.items() if k != "token"
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def holder_to_json(holder: Holder) -> dict[str, Any]:
    """A holder as a JSON-ready dict (the stored field names; ``mode`` and ``limit`` only when
    the holder shares the name)."""
    out = {field: getattr(holder, field) for field in _FIELDS}
    if holder.mode != EXCLUSIVE:
        out["mode"] = holder.mode
        out["limit"] = holder.limit
    return out


def waiter_to_json(waiter: Waiter) -> dict[str, Any]:
    out: dict[str, Any] = {field: getattr(waiter, field) for field in _WAITER_TYPES}
    out["wants"] = [[w.name, w.mode, w.limit] for w in waiter.wants]
    if waiter.detached:
        out["detached"] = True
    return out


def claim_record(claimant: Claimant, since: float) -> str:
    """The format-3 record of ``claimant``'s lease (a JSON array), for a database that writes an
    exclusive acquisition in one statement (adding ``[lease, token]`` under each name): the same
    text as ``_dumps(_ident(holder))``, its fields around ``since`` encoded once per process."""
    c = claimant
    head, tail = _record_parts(
        c.owner, c.pid, c.start, c.boot, c.host, c.pidns, c.pgid, c.note, c.session
    )
    return head + float.__repr__(since) + tail  # (json encodes a finite float so)


@functools.lru_cache(maxsize=16)
def _record_parts(*fields: Any) -> tuple[str, str]:
    """A record's text before ``since`` and after it (RECORD's order)."""
    at = RECORD.index("since")
    return _dumps(list(fields[:at]))[:-1] + ",", "," + _dumps(list(fields[at:]))[1:]


def _fragment(name: str, holders: Holders) -> str:
    if not _wide(holders):
        return _dumps(name) + ":" + _dumps(holder_to_json(holders[0]))
    return _dumps(name) + ":" + _dumps([holder_to_json(h) for h in holders])


class Encoder:
    """Encodes documents for one store: in format 3 if ``compact``, else in the oldest of
    formats 1 and 2 that holds the document."""

    def __init__(self, compact: bool = False) -> None:
        self.compact = compact

    def encode(self, doc: Document) -> str:
        return encode(doc, compact=self.compact)


def encode(doc: Document, *, compact: bool = False) -> str:
    """Serialize a document (stable, compact JSON): in format 3 if ``compact``, else in the
    oldest of formats 1 and 2 that holds it. A :class:`LockDoc` reuses the encoded text of
    every name it did not change."""
    d = as_doc(doc)
    # Only the parts of the format written are kept up to date by the changes that follow.
    if compact:
        d._parts = None
        return _encode3(d)
    d._compact = None
    body = ",".join(d.parts().values())
    if d.format == 1:
        return '{"format":1,"locks":{' + body + "}}"
    return '{"format":2,"locks":{' + body + '},"queue":[' + _queue(d) + "]}"


def _queue(d: LockDoc) -> str:
    return ",".join(_dumps(waiter_to_json(w)) for w in d.queue)


def _encode3(d: LockDoc) -> str:
    c = d.compact()
    if c.odd:
        return _encode3_keyed(d)
    queue = ',"queue":[' + _queue(d) + "]" if d.queue else ""
    procs = ",".join(c.texts.values())
    return (
        '{"format":3,"procs":{'
        + procs
        + '},"locks":{'
        + ",".join(c.parts.values())
        + "}"
        + (queue + "}")
    )


def _encode3_keyed(d: LockDoc) -> str:
    """Format 3 for a document where one lease has several records: the first keeps the lease
    as its key, the others get keys no lease has, and name their lease."""
    first: dict[str, Ident] = {}
    for _, h in d.entries():
        first.setdefault(h.lease, _ident(h))
    procs: dict[str, list[Any]] = {lease: list(ident) for lease, ident in first.items()}
    keys: dict[tuple[str, Ident], str] = {(lease, i): lease for lease, i in first.items()}
    locks: dict[str, Any] = {}
    for name, holders in d._holders.items():
        entries = []
        for h in holders:
            ident = _ident(h)
            key = keys.get((h.lease, ident))
            if key is None:
                n = len(keys)
                while f"{h.lease}~{n}" in procs:
                    n += 1
                key = keys[h.lease, ident] = f"{h.lease}~{n}"
                procs[key] = [*ident, h.lease]
            entries.append([key, h.token, h.limit])
        locks[name] = entries[0][:2] if not _wide(holders) else entries
    out: dict[str, Any] = {"format": 3, "procs": procs, "locks": locks}
    if d.queue:
        out["queue"] = [waiter_to_json(w) for w in d.queue]
    return _dumps(out)


def _checked(namespace: str, what: str, raw: Any, types: Mapping[str, tuple[type, ...]]) -> None:
    if not isinstance(raw, dict):
        raise CorruptLockTable(namespace, f"{what} is not an object")
    for field, allowed in types.items():
        value = raw.get(field)
        if not isinstance(value, allowed) or isinstance(value, bool):
            raise CorruptLockTable(namespace, f"{what} has a bad {field!r}")


def _mode(namespace: str, what: str, mode: Any, limit: Any) -> tuple[str, int | None]:
    if mode not in (EXCLUSIVE, SHARED):
        raise CorruptLockTable(namespace, f"{what} has a bad 'mode'")
    if limit is not None and (type(limit) is not int or limit < 1 or mode != SHARED):
        raise CorruptLockTable(namespace, f"{what} has a bad 'limit'")
    return mode, limit


def _holder_from_json(namespace: str, name: str, raw: Any, fmt: int) -> Holder:
    what = f"entry {quote(name)}"
    _checked(namespace, what, raw, _TYPES)
    mode, limit = EXCLUSIVE, None
    if fmt >= 2 and "mode" in raw:
        mode, limit = _mode(namespace, what, raw["mode"], raw.get("limit"))
    return Holder(
        raw["owner"], raw["pid"], raw["start"], raw["boot"], raw["host"], raw["pidns"],
        raw["pgid"], float(raw["since"]), raw["token"], raw["lease"], raw["note"],
        raw.get("session"), mode, limit,
    )  # fmt: skip


def _holders_from_json(namespace: str, name: str, raw: Any, fmt: int) -> Holders:
    if fmt < 2 or not isinstance(raw, list):
        return (_holder_from_json(namespace, name, raw, fmt),)
    holders = tuple(_holder_from_json(namespace, name, h, fmt) for h in raw)
    if not holders:
        raise CorruptLockTable(namespace, f"entry {quote(name)} is an empty list")
    _check_shared(namespace, name, holders)
    return holders


def _check_shared(namespace: str, name: str, holders: Holders) -> None:
    if len(holders) > 1 and any(h.mode == EXCLUSIVE for h in holders):
        raise CorruptLockTable(namespace, f"entry {quote(name)} is exclusive but shared")
    if len({h.limit for h in holders}) > 1:
        raise CorruptLockTable(namespace, f"entry {quote(name)} has holders of different limits")
    limit = holders[0].limit
    if limit is not None and len(holders) > limit:
        raise CorruptLockTable(namespace, f"entry {quote(name)} has more holders than its limit")


def _waiter_from_json(namespace: str, i: int, raw: Any) -> Waiter:
    what = f"waiter {i + 1}"
    _checked(namespace, what, raw, _WAITER_TYPES)
    wants_raw = raw.get("wants")
    if not isinstance(wants_raw, list) or not wants_raw:
        raise CorruptLockTable(namespace, f"{what} has a bad 'wants'")
    wants = []
    for item in wants_raw:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
            raise CorruptLockTable(namespace, f"{what} has a bad 'wants'")
        mode, limit = _mode(namespace, what, item[1], item[2])
        wants.append(Want(item[0], mode, limit))
    detached = raw.get("detached", False)
    if type(detached) is not bool:
        raise CorruptLockTable(namespace, f"{what} has a bad 'detached'")
    return Waiter(
        raw["owner"], raw["pid"], raw["start"], raw["boot"], raw["host"], raw["pidns"],
        raw["pgid"], float(raw["since"]), raw["lease"], raw["note"], raw["session"],
        tuple(wants), detached,
    )  # fmt: skip


def decode(text: str | bytes | None, namespace: str, previous: Document | None = None) -> LockDoc:
    """Parse a stored document; raise :class:`CorruptLockTable` if it is not a valid one.

    ``previous`` (the document this process saw last) saves work: a name held by one holder with
    the same lease and token is the same acquisition, written once and never changed, so its
    holder is reused instead of being checked and built again.
    """
    if text is None or text in ("", b""):
        return EMPTY
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptLockTable(namespace, f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CorruptLockTable(namespace, "not a JSON object")
    fmt = raw.get("format")
    if type(fmt) is not int or not 1 <= fmt <= FORMAT:
        if type(fmt) is int and fmt > FORMAT:
            raise CorruptLockTable(
                namespace, f"format {fmt} was written by a newer tasklocks; upgrade tasklocks"
            )
        raise CorruptLockTable(namespace, f"unknown format {quote(fmt)}")
    if not isinstance(raw.get("locks"), dict):
        raise CorruptLockTable(namespace, "no 'locks' object")
    known = as_doc(previous) if previous is not None else EMPTY
    if fmt == 3:
        return _decode3(namespace, raw, known)
    known_parts = known.parts() if known._parts is not None else {}
    out: dict[str, Holders] = {}
    parts: dict[str, str] = {}
    for name, entry in raw["locks"].items():
        old = known._holders.get(name)
        if (
            old is None
            or len(old) != 1
            or type(entry) is not dict
            or entry.get("lease") != old[0].lease
            or entry.get("token") != old[0].token
            or type(entry.get("token")) is not int
            or "mode" in entry
        ):
            old = _holders_from_json(namespace, name, entry, fmt)
            parts[name] = _fragment(name, old)
        else:
            parts[name] = known_parts.get(name) or _fragment(name, old)
        out[name] = old
    return LockDoc(
        out, parts, _queue_from_json(namespace, raw.get("queue", []) if fmt >= 2 else [])
    )


def _queue_from_json(namespace: str, raw: Any) -> tuple[Waiter, ...]:
    if not isinstance(raw, list):
        raise CorruptLockTable(namespace, "'queue' is not a list")
    queue = tuple(_waiter_from_json(namespace, i, w) for i, w in enumerate(raw))
    if len({w.lease for w in queue}) != len(queue):
        raise CorruptLockTable(namespace, "a lease waits twice in the queue")
    return queue


_RECORD: Final = tuple((field, _TYPES[field]) for field in RECORD)


class _Records:
    """Format 3's ``procs``, each record checked once, on first use."""

    def __init__(self, namespace: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise CorruptLockTable(namespace, "no 'procs' object")
        self.namespace, self.raw = namespace, raw
        self.checked: dict[str, tuple[str, Ident]] = {}  # key: (lease, record)

    def __getitem__(self, key: Any) -> tuple[str, Ident]:
        found = self.checked.get(key) if type(key) is str else None
        if found is not None:
            return found
        rec = self.raw.get(key) if type(key) is str else None
        what = f"record {quote(key)}"
        if rec is None:
            raise CorruptLockTable(self.namespace, f"{what} is missing from 'procs'")
        if not isinstance(rec, list) or len(rec) not in (10, 11):
            raise CorruptLockTable(self.namespace, f"{what} is not a list of 10 or 11 items")
        for value, (field, allowed) in zip(rec, _RECORD, strict=False):
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise CorruptLockTable(self.namespace, f"{what} has a bad {field!r}")
        lease = key if len(rec) == 10 else rec[10]
        if type(lease) is not str:
            raise CorruptLockTable(self.namespace, f"{what} has a bad 'lease'")
        ident = (*rec[:7], float(rec[7]), rec[8], rec[9])
        self.checked[key] = found = (lease, ident)
        return found


def _holder3(records: _Records, name: str, item: Any, shared: bool) -> Holder:
    what = f"entry {quote(name)}"
    size = 3 if shared else 2
    if not isinstance(item, list) or len(item) != size:
        raise CorruptLockTable(records.namespace, f"{what} is not a list of {size} items")
    lease, ident = records[item[0]]
    token = item[1]
    if type(token) is not int:
        raise CorruptLockTable(records.namespace, f"{what} has a bad 'token'")
    mode, limit = _mode(records.namespace, what, SHARED, item[2]) if shared else (EXCLUSIVE, None)
    owner, pid, start, boot, host, pidns, pgid, since, note, session = ident
    return Holder(
        owner, pid, start, boot, host, pidns, pgid, since, token, lease, note, session, mode, limit
    )


def _decode3(namespace: str, raw: dict[str, Any], known: LockDoc) -> LockDoc:
    records = _Records(namespace, raw.get("procs"))
    out: dict[str, Holders] = {}
    for name, value in raw["locks"].items():
        if not isinstance(value, list) or not value:
            raise CorruptLockTable(namespace, f"entry {quote(name)} is not a non-empty list")
        if type(value[0]) is not list:  # one exclusive holder: [lease, token]
            old = known._holders.get(name)
            if (
                old is not None
                and len(old) == 1
                and old[0].mode == EXCLUSIVE
                and len(value) == 2
                and value[0] == old[0].lease
                and value[1] == old[0].token
                and type(value[1]) is int
                and len(records.raw.get(value[0]) or ()) == 10
            ):
                out[name] = old  # the same acquisition, written once and never changed
            else:
                out[name] = (_holder3(records, name, value, False),)
            continue
        holders = tuple(_holder3(records, name, item, True) for item in value)
        _check_shared(namespace, name, holders)
        out[name] = holders
    queue = _queue_from_json(namespace, raw.get("queue", []))
    # The encoded parts: those of the document before, changed where this one differs (a
    # namespace of many locks re-encodes only what another process changed).
    c = known._compact
    compact = None if c is None or c.odd else c.copy()
    if compact is not None:
        for name, holders in known._holders.items():
            if out.get(name) is not holders:
                compact.drop(name, holders)
        for name, holders in out.items():
            if known._holders.get(name) is not holders:
                compact.add(name, holders)
    return LockDoc(out, None, queue, None, compact)
