"""The lock document and its transitions: pure code, no I/O.

Theory of operation
-------------------
All locks of a namespace live in one document, stored in one database row next to an integer
``version``. A change is computed here from the document as read (the caller supplies the
version, ``now``, the claimant and an ``is_dead`` predicate) and written by the caller only if the
row still has the version the change was computed from; every write bumps the version by exactly
one.

Invariants (checked by the Hypothesis state machine in ``tests/core``):

* at most one holder per lock name;
* a lock is freed only by its owner (``release``/``release_owner``/``release_lease``), by an
  administrator (``release_all``), or when its holder is gone (``is_dead`` returned True: its
  process is provably dead, or its session expired by the database's clock);
* an acquisition of several names is all-or-nothing;
* the fencing token of an acquisition is the version its write creates, so tokens strictly increase
  across all acquisitions in a namespace;
* acquisitions are idempotent by lease id: re-running an acquisition whose write succeeded but whose
  reply was lost finds its own entries and changes nothing (kazoo's lesson).

Documents are immutable mappings from name to :class:`Holder`; transitions return new ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tasklocks.errors import CorruptLockTable, LockHeld, NotHeld, quote

__all__ = [
    "EMPTY",
    "FORMAT",
    "Claimant",
    "Document",
    "Granted",
    "Holder",
    "LockDoc",
    "Refused",
    "acquire",
    "decode",
    "encode",
    "reap",
    "release",
    "release_all",
    "release_lease",
    "release_owner",
]

FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class Holder:
    """One held lock: who holds it, since when, and its fencing token."""

    owner: str
    pid: int | None
    start: str | None
    boot: str | None
    host: str
    pidns: str | None
    pgid: int | None
    since: float
    token: int
    lease: str
    note: str | None
    session: str | None = None  # the session that keeps it (None: kept until released)


@dataclass(frozen=True, slots=True)
class Claimant:
    """Who asks for locks: the holder fields that do not depend on the document."""

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

    def holder(self, since: float, token: int) -> Holder:
        return Holder(
            self.owner,
            self.pid,
            self.start,
            self.boot,
            self.host,
            self.pidns,
            self.pgid,
            since,
            token,
            self.lease,
            self.note,
            self.session,
        )


class LockDoc(Mapping[str, Holder]):
    """An immutable lock document that also keeps each entry's encoded JSON, so that a change
    re-encodes only what it changed: with many locks held, encoding is one string join."""

    __slots__ = ("_holders", "_parts")

    def __init__(self, holders: dict[str, Holder], parts: dict[str, str] | None = None) -> None:
        self._holders = holders
        self._parts = parts

    def __getitem__(self, name: str) -> Holder:
        return self._holders[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

    def __repr__(self) -> str:
        return f"LockDoc({self._holders!r})"

    def parts(self) -> dict[str, str]:
        """Each entry's encoded ``"name":{...}`` text (computed once per entry)."""
        if self._parts is None:
            self._parts = {n: _fragment(n, h) for n, h in self._holders.items()}
        return self._parts


Document = Mapping[str, Holder]
EMPTY: Final[LockDoc] = LockDoc({}, {})


def _derive(
    doc: Document, remove: Iterable[str] = (), add: Mapping[str, Holder] | None = None
) -> LockDoc:
    """A new document: ``doc`` without ``remove``, plus ``add`` (keeping encoded entries)."""
    if isinstance(doc, LockDoc):
        holders = doc._holders.copy()
        parts = None if doc._parts is None else doc._parts.copy()
    else:
        holders, parts = dict(doc), None
    for name in remove:
        del holders[name]
        if parts is not None:
            del parts[name]
    for name, holder in (add or {}).items():
        holders[name] = holder
        if parts is not None:
            parts[name] = _fragment(name, holder)
    return LockDoc(holders, parts)


@dataclass(frozen=True, slots=True)
class Granted:
    """An acquisition succeeded. ``changed`` is False when the lease already held every name."""

    doc: Document
    token: int
    reaped: Mapping[str, Holder]
    changed: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """An acquisition is blocked by live (or unknown) holders; ``doc`` may still drop dead ones."""

    doc: Document
    blockers: Mapping[str, Holder]
    reaped: Mapping[str, Holder]

    @property
    def changed(self) -> bool:
        return bool(self.reaped)


def _dead(
    doc: Document, names: Iterable[str], is_dead: Callable[[Holder], bool]
) -> dict[str, Holder]:
    reaped = {}
    for name in names:
        holder = doc.get(name)
        if holder is not None and is_dead(holder):
            reaped[name] = holder
    return reaped


def acquire(
    doc: Document,
    names: Iterable[str],
    claimant: Claimant,
    *,
    version: int,
    now: float,
    is_dead: Callable[[Holder], bool],
) -> Granted | Refused:
    """Take every name for ``claimant``, or none.

    Holders of the wanted names that ``is_dead`` proves dead are dropped in the same change.
    The token of a new acquisition is ``version + 1``: the version the caller's write creates.
    """
    wanted = list(dict.fromkeys(names))
    if wanted and all((h := doc.get(n)) is not None and h.lease == claimant.lease for n in wanted):
        return Granted(doc, doc[wanted[0]].token, {}, changed=False)
    reaped = _dead(doc, wanted, is_dead)
    blockers = {n: doc[n] for n in wanted if n in doc and n not in reaped}
    if blockers:
        return Refused(_derive(doc, reaped) if reaped else doc, blockers, reaped)
    token = version + 1
    holder = claimant.holder(now, token)
    return Granted(_derive(doc, reaped, dict.fromkeys(wanted, holder)), token, reaped, True)


def release(
    doc: Document, names: Iterable[str], owner: str, *, lease: str | None = None
) -> Document:
    """Free ``names`` held by ``owner`` (and by ``lease``, when given); all or none.

    Raises :class:`NotHeld` naming the first lock that ``owner`` does not hold.
    """
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        holder = doc.get(name)
        if holder is None or holder.owner != owner or (lease is not None and holder.lease != lease):
            raise NotHeld(name, owner, holder)
    return _derive(doc, wanted)


def release_owner(doc: Document, owner: str) -> tuple[Document, list[str]]:
    """Free every lock ``owner`` holds; return the new document and the freed names."""
    freed = [name for name, h in doc.items() if h.owner == owner]
    if not freed:
        return doc, []
    return _derive(doc, freed), freed


def release_all(doc: Document) -> tuple[Document, list[str]]:
    """Free every lock (an administrator's reset)."""
    return EMPTY, list(doc)


def reap(doc: Document, is_dead: Callable[[Holder], bool]) -> tuple[Document, dict[str, Holder]]:
    """Drop every holder that ``is_dead`` proves dead."""
    reaped = _dead(doc, list(doc), is_dead)
    return (_derive(doc, reaped) if reaped else doc), reaped


def release_lease(doc: Document, lease: str) -> tuple[Document, list[str]]:
    """Free every lock of one lease (an acquisition undone, or a lost lease given back)."""
    freed = [name for name, h in doc.items() if h.lease == lease]
    return (_derive(doc, freed) if freed else doc), freed


def check_not_already_held(
    doc: Document,
    names: Iterable[str],
    owner: str,
    *,
    lease: str | None = None,
    is_dead: Callable[[Holder], bool] = lambda holder: False,
) -> None:
    """Locks are not re-entrant: raise :class:`LockHeld` if ``owner`` holds one of ``names``
    (under another lease than ``lease``: a retried acquisition may find its own entries; an
    entry ``is_dead`` says is gone does not count)."""
    mine = {
        n: doc[n]
        for n in names
        if n in doc and doc[n].owner == owner and doc[n].lease != lease and not is_dead(doc[n])
    }
    if mine:
        raise LockHeld(mine, hint="locks are not re-entrant; release it first")


# --- encoding -------------------------------------------------------------------------------------

_FIELDS: Final = (
    "owner",
    "pid",
    "start",
    "boot",
    "host",
    "pidns",
    "pgid",
    "since",
    "token",
    "lease",
    "note",
    "session",
)
_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "owner": (str,),
    "pid": (int, type(None)),
    "start": (str, type(None)),
    "boot": (str, type(None)),
    "host": (str,),
    "pidns": (str, type(None)),
    "pgid": (int, type(None)),
    "since": (float, int),
    "token": (int,),
    "lease": (str,),
    "note": (str, type(None)),
    "session": (str, type(None)),
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _holder_from_json(namespace: str, name: str, raw: Any) -> Holder:
    if not isinstance(raw, dict):
        raise CorruptLockTable(namespace, f"entry {quote(name)} is not an object")
    for field in _FIELDS:
        value = raw.get(field)
        if not isinstance(value, _TYPES[field]) or isinstance(value, bool):
            raise CorruptLockTable(namespace, f"entry {quote(name)} has a bad {field!r}")
    return Holder(
        raw["owner"],
        raw["pid"],
        raw["start"],
        raw["boot"],
        raw["host"],
        raw["pidns"],
        raw["pgid"],
        float(raw["since"]),
        raw["token"],
        raw["lease"],
        raw["note"],
        raw.get("session"),
    )


def decode(text: str | bytes | None, namespace: str, previous: Document | None = None) -> Document:
    """Parse a stored document; raise :class:`CorruptLockTable` if it is not a valid one.

    ``previous`` (the document this process saw last) saves work: an entry with the same name,
    lease and token is the same acquisition, written once and never changed, so its holder is
    reused instead of being checked and built again.
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
    if type(fmt) is not int or fmt != FORMAT:
        if type(fmt) is int and fmt > FORMAT:
            raise CorruptLockTable(
                namespace, f"format {fmt} was written by a newer tasklocks; upgrade tasklocks"
            )
        raise CorruptLockTable(namespace, f"unknown format {quote(fmt)}")
    if not isinstance(raw.get("locks"), dict):
        raise CorruptLockTable(namespace, "no 'locks' object")
    known = previous or {}
    known_parts = previous.parts() if isinstance(previous, LockDoc) else {}
    out: dict[str, Holder] = {}
    parts: dict[str, str] = {}
    for name, entry in raw["locks"].items():
        old = known.get(name)
        if (
            old is None
            or type(entry) is not dict
            or entry.get("lease") != old.lease
            or entry.get("token") != old.token
            or type(entry.get("token")) is not int
        ):
            old = _holder_from_json(namespace, name, entry)
            parts[name] = _fragment(name, old)
        else:
            parts[name] = known_parts.get(name) or _fragment(name, old)
        out[name] = old
    return LockDoc(out, parts)


def holder_to_json(holder: Holder) -> dict[str, Any]:
    """A holder as a JSON-ready dict (the stored field names)."""
    return {field: getattr(holder, field) for field in _FIELDS}


def claim_json(claimant: Claimant, since: float) -> str:
    """An entry for ``claimant`` without its token, for a database that adds the token itself
    (the new version) in a one-statement acquisition."""
    entry = holder_to_json(claimant.holder(since, 0))
    del entry["token"]
    return _dumps(entry)


def _fragment(name: str, holder: Holder) -> str:
    return _dumps(name) + ":" + _dumps(holder_to_json(holder))


class Encoder:
    """Encodes documents (kept for callers that hold one; :func:`encode` is the same)."""

    def encode(self, doc: Document) -> str:
        return encode(doc)


def encode(doc: Document) -> str:
    """Serialize a document (stable, compact JSON). A :class:`LockDoc` reuses the encoded
    text of every entry it did not change."""
    parts = (
        doc.parts() if isinstance(doc, LockDoc) else {n: _fragment(n, h) for n, h in doc.items()}
    )
    return '{"format":1,"locks":{' + ",".join(parts.values()) + "}}"
