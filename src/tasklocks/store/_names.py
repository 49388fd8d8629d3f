"""A row per lock name beside a namespace's document (the SQL servers' layout): pure code.

The servers keep a table ``<table>_names`` of ``(namespace, name, version, lease, record,
mark)`` beside the documents. A name is in one of three states:

* **free**: no row, or a row with neither a lease nor the mark;
* **held in its row**: ``lease`` and the lease's ``record`` (its format-3 record, a JSON array)
  are set, and ``version`` is the holder's fencing token. Taking a free name exclusively and
  releasing it are one small statement on that row alone (``name_acquire``, ``name_release``;
  ``name_retake``, the row's UPDATE alone, for a name whose row the process has taken before:
  rows are never deleted): no two processes on distinct names queue on one row, and the cost
  does not grow with the number of locks held;
* **kept by the document** (``mark`` set): the name has entries or waiters in the document, and
  every change of it goes through the document (the full path: queues, shared and counted
  names, several names at once, deadlock detection).

A change through the document locks the document's row, then every name held in its row in the
namespace, and hands the compute the document with those holders written into it (:func:`absorb`,
the version being the highest of them all); what it writes moves them into the document for good.
The rows of every name whose entries or waiters changed are then set (:func:`changes`): marked
while the document keeps the name, free when it leaves, and their version raised to the new
document version, so that a name's token only grows whichever path grants it.

A document kept so is stored as **format 4**: format 3 with ``"format":4``, which a tasklocks that
knows only the document refuses ("upgrade tasklocks"), and whose one-statement changes take only
format 3. The core reads and writes format 3; the store translates (:func:`stored`,
:func:`shown`). A new namespace, or a format-3 document (written before this layout), moves at
the first change through it: the names it keeps are all marked then, and so is the namespace's
row named ``""`` (:data:`LAYOUT`, no lock's name), which the one-statement acquisition asks for
(the document itself may be large: it is not read there).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["LAYOUT", "HeldRow", "absorb", "changes", "is_kept", "kept", "shown", "stored"]

LAYOUT = ""  # the name of the row marked once the namespace's document moved (format 4)
_OLD, _NEW = '{"format":3,', '{"format":4,'
HeldRow = tuple[str, int, str, str]  # (name, version, lease, record): a name held in its row
Kept = Mapping[str, str]  # name -> what the document holds of it (entries and waits)


def stored(text: str) -> str:
    """The core's format-3 text as the store writes it (format 4). Any other text (a hand-made
    one, with spaces, say) is written as it is: the namespace then takes the full path alone."""
    return _NEW + text[len(_OLD) :] if text.startswith(_OLD) else text


def shown(text: str) -> str:
    """A stored text as the core reads it (format 3)."""
    return _OLD + text[len(_NEW) :] if text.startswith(_NEW) else text


def is_kept(text: str) -> bool:
    """Is the stored document one of this layout (format 4)?"""
    return text.startswith(_NEW)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def absorb(text: str, rows: Sequence[HeldRow]) -> str:
    """The document ``text`` (as shown) with the holders of ``rows`` written into it: a record
    per lease, ``[lease, token]`` per name. A document that is not a format-3 object stays as it
    is (the core reports it; ``repair`` overwrites it, and frees the rows with it)."""
    if not rows:
        return text
    doc = _parse(text)
    if doc is None or doc.get("format") != 3:
        return text
    procs, locks = doc.get("procs"), doc.get("locks")
    if not isinstance(procs, dict) or not isinstance(locks, dict):
        return text
    for name, version, lease, record in rows:
        try:
            procs.setdefault(lease, json.loads(record))
        except ValueError:
            procs.setdefault(lease, record)  # the core reports the bad record
        locks[name] = [lease, int(version)]
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=4)
def kept(text: str) -> Mapping[str, str]:
    """The names a document (as shown) keeps, each with its entries and waits as text: what
    must change in their rows when it changes. A document that is not an object keeps none.
    Remembered for a few texts (read only): what one change writes is what the next one reads,
    and a big document is not parsed twice."""
    doc = _parse(text)
    if doc is None:
        return {}
    out: dict[str, str] = {}
    locks = doc.get("locks")
    if isinstance(locks, dict):
        for name, entry in locks.items():
            out[str(name)] = json.dumps(entry, separators=(",", ":"))
    queue = doc.get("queue")
    for i, waiter in enumerate(queue if isinstance(queue, list) else ()):
        wants = waiter.get("wants") if isinstance(waiter, dict) else None
        for want in wants if isinstance(wants, list) else ():
            if isinstance(want, list) and want and isinstance(want[0], str):
                out[want[0]] = out.get(want[0], "") + f"|{i}:{waiter.get('lease')}"
    return out


def changes(before: Kept, after: Kept, absorbed: Iterable[str]) -> dict[str, bool]:
    """The rows a change must set, each with its mark: every name absorbed, and every name whose
    entries or waits differ between the documents ``before`` and ``after`` (see :func:`kept`)."""
    out = {name: name in after for name in absorbed}
    for name in before.keys() | after.keys():
        if before.get(name) != after.get(name):
            out[name] = name in after
    return out
