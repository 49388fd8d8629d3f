"""What the dashboard shows, as plain data: pure code, no web framework, no I/O.

Records and held locks go in; rows for the templates, the timeline's geometry and the parsed time
range come out. ``now`` is always passed in, so everything here is a function of its arguments.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tasklocks import HeldLock, Holder, QueuedWaiter, TaskRecord
from tasklocks.errors import clock, ordinal, quote

__all__ = [
    "RANGES",
    "BadRange",
    "BlockerView",
    "LockGroup",
    "LockView",
    "TaskView",
    "Timeline",
    "WaitView",
    "WaiterView",
    "WantView",
    "build_timeline",
    "duration",
    "fit_range",
    "lock_groups",
    "lock_view",
    "mode_text",
    "parse_range",
    "signal_name",
    "task_view",
    "trim_partial_utf8",
    "waiter_views",
]

# The ranges the timeline offers as links, as ``?last=`` values.
RANGES: tuple[str, ...] = ("15m", "1h", "6h", "24h", "7d", "fit")
MAX_SPAN = 31 * 86400.0  # the widest range the timeline draws, in seconds


def duration(seconds: float | None) -> str:
    """``0.4s``, ``3m02s``, ``1h05m``, or ``-`` for None (as the command line prints them)."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def signal_name(number: int) -> str:
    """``SIGKILL (9)``, or ``signal 64`` for a number with no name."""
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"


def owner_task_id(owner: str) -> int | None:
    """The task id of an owner ``task:<id>``, else None."""
    prefix, _, rest = owner.partition(":")
    return int(rest) if prefix == "task" and rest.isdigit() else None


SHARED_MODE = "s"  # Holder.mode and Want.mode of a shared (or counted) lock; "x": exclusive


def mode_text(shared: bool, limit: int | None) -> str:
    """``exclusive``, ``shared``, or ``limit 3`` for a counted name (as ``tasklocks locks``
    prints it)."""
    if limit is not None:
        return f"limit {limit}"
    return "shared" if shared else "exclusive"


@dataclass(frozen=True)
class LockView:
    """One holder of a lock as a row of the locks table (a shared name has several)."""

    name: str
    owner: str
    owner_task: int | None  # the task id when the owner is task:<id>
    pid: int | None
    host: str
    since: float
    since_text: str
    held_for: str
    token: int
    liveness: str  # whatever HeldLock.liveness.value is: alive, dead, unknown, expired
    expires_in: float | None  # seconds its holder's session has left (None: no session)
    note: str | None
    shared: bool
    limit: int | None
    mode: str  # exclusive, shared or limit N (see mode_text)

    @property
    def holder_text(self) -> str:
        """``task:12 (pid 4711 on web-1)``."""
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else f"on {self.host}"
        return f"{self.owner} ({where})"


def lock_view(held: HeldLock, now: float) -> LockView:
    """A held lock (one holder of it), ready for a template."""
    h = held.holder
    return LockView(
        name=held.name,
        owner=h.owner,
        owner_task=owner_task_id(h.owner),
        pid=h.pid,
        host=h.host,
        since=h.since,
        since_text=clock(h.since, now=now),
        held_for=duration(max(0.0, now - h.since)),
        token=h.token,
        liveness=str(held.liveness.value),
        expires_in=held.expires_in,
        note=h.note,
        shared=held.shared,
        limit=held.limit,
        mode=mode_text(held.shared, held.limit),
    )


# --- the queue ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WantView:
    """One name a waiter (or a task) asks for, and how."""

    name: str
    shared: bool
    limit: int | None

    @property
    def mode(self) -> str:
        """``exclusive``, ``shared`` or ``limit 3``."""
        return mode_text(self.shared, self.limit)

    @property
    def text(self) -> str:
        """``name``, ``name (shared)`` or ``name (limit 3)`` (as ``Want.describe()``)."""
        return self.name if self.mode == "exclusive" else f"{self.name} ({self.mode})"


@dataclass(frozen=True)
class BlockerView:
    """Who is in a waiter's way: a holder of names it wants (``position`` None), or a waiter
    ahead of it in the queue (``position`` is its place there)."""

    locks: list[WantView]  # the names in the way, each as this one holds or wants it
    owner: str
    owner_task: int | None
    pid: int | None
    host: str
    since: float
    note: str | None
    position: int | None = None

    @property
    def holder_text(self) -> str:
        """``task:12 (pid 4711 on web-1)``."""
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else f"on {self.host}"
        return f"{self.owner} ({where})"


@dataclass(frozen=True)
class WaiterView:
    """One waiting acquisition as a row of the queue: its place, what it wants and how, and
    who is in its way."""

    position: int  # 1: first in the namespace's queue
    lease: str
    owner: str
    owner_task: int | None
    pid: int | None
    host: str
    wants: list[WantView]
    since: float
    since_text: str
    waited_text: str  # how long it has waited so far
    liveness: str  # as LockView.liveness
    expires_in: float | None  # seconds its session has left (None: no session)
    note: str | None
    holders: list[BlockerView]  # the holders in its way, by name
    ahead: list[BlockerView]  # the waiters before it that it waits for, in queue order

    @property
    def holder_text(self) -> str:
        """``task:12 (pid 4711 on web-1)``."""
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else f"on {self.host}"
        return f"{self.owner} ({where})"

    @property
    def line_text(self) -> str:
        """Its place among those it waits for: ``1st in line`` when no waiter is ahead of it."""
        return f"{ordinal(len(self.ahead) + 1)} in line"

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.wants]


def waiter_views(queue: Sequence[QueuedWaiter], now: float) -> list[WaiterView]:
    """The namespace's queue (``LockTable.waiting()``, in order), ready for a template."""
    positions = {q.waiter.lease: q.position for q in queue}
    views = []
    for q in queue:
        w = q.waiter
        wanted = {x.name for x in w.wants}
        # One blocker per holder in its way, with every wanted name it holds (in wanted order).
        held: dict[str, list[tuple[str, Holder]]] = {}
        for name in w.names:
            for h in q.holders.get(name, ()):
                held.setdefault(h.lease, []).append((name, h))
        holders = []
        for entries in held.values():
            h = entries[0][1]
            holders.append(
                BlockerView(
                    locks=[WantView(n, e.mode == SHARED_MODE, e.limit) for n, e in entries],
                    owner=h.owner,
                    owner_task=owner_task_id(h.owner),
                    pid=h.pid,
                    host=h.host,
                    since=h.since,
                    note=h.note,
                )
            )
        ahead = [
            BlockerView(
                locks=[WantView(x.name, x.shared, x.limit) for x in a.wants if x.name in wanted],
                owner=a.owner,
                owner_task=owner_task_id(a.owner),
                pid=a.pid,
                host=a.host,
                since=a.since,
                note=a.note,
                position=positions.get(a.lease),
            )
            for a in q.ahead
        ]
        views.append(
            WaiterView(
                position=q.position,
                lease=w.lease,
                owner=w.owner,
                owner_task=owner_task_id(w.owner),
                pid=w.pid,
                host=w.host,
                wants=[WantView(x.name, x.shared, x.limit) for x in w.wants],
                since=w.since,
                since_text=clock(w.since, now=now),
                waited_text=duration(max(0.0, now - w.since)),
                liveness=str(q.liveness.value),
                expires_in=q.expires_in,
                note=w.note,
                holders=holders,
                ahead=ahead,
            )
        )
    return views


@dataclass(frozen=True)
class LockGroup:
    """One held name on the locks page: its holders (several when it is shared) and the
    waiters that want it, in queue order."""

    name: str
    holders: list[LockView]
    waiters: list[tuple[WaiterView, WantView]]  # each waiter wanting it, and how

    @property
    def mode(self) -> str:
        """How it is held (every holder of a name holds it the same way)."""
        return self.holders[0].mode

    @property
    def count_text(self) -> str:
        """``1 holder``, ``2 holders``, or ``2 of 3`` for a counted name."""
        n = len(self.holders)
        limit = self.holders[0].limit
        if limit is not None:
            return f"{n} of {limit}"
        return f"{n} holder{'s' if n != 1 else ''}"


def lock_groups(
    locks: Sequence[HeldLock], waiters: Sequence[WaiterView], now: float
) -> list[LockGroup]:
    """The held locks grouped by name (in the order ``LockTable.held()`` gives them), each
    with the waiters that want it."""
    holders: dict[str, list[LockView]] = {}
    for held in locks:
        holders.setdefault(held.name, []).append(lock_view(held, now))
    return [
        LockGroup(
            name=name,
            holders=views,
            waiters=[(w, x) for w in waiters for x in w.wants if x.name == name],
        )
        for name, views in holders.items()
    ]


@dataclass(frozen=True)
class WaitView:
    """One entry of a task's wait history: a lock, who held it, and for how long it waited."""

    lock: str
    owner: str
    owner_task: int | None
    note: str | None
    since: float
    until: float | None  # None: it still waits
    seconds: float
    # While the task still waits: the entry's owner as it holds the lock now, or as a waiter
    # ahead of the task in the queue (None: it is no longer in the way, or the wait ended).
    holder: LockView | None
    ahead: BlockerView | None = None

    @property
    def since_text(self) -> str:
        """When it began waiting for this holder, as a clock time."""
        return clock(self.since)

    @property
    def until_text(self) -> str:
        """When that wait ended, or ``now``."""
        return "now" if self.until is None else clock(self.until)


@dataclass(frozen=True)
class TaskView:
    """One task as a row of the tasks table (and the head of its detail page)."""

    id: int
    title: str
    kind: str | None
    target: str
    state: str
    stopping: bool  # a stop was requested and the task has not ended yet
    active: bool
    percent: float | None
    message: str | None
    waited: float
    waited_text: str
    waits: list[WaitView]
    waiting_for: list[WaitView]  # the entries it still waits for (only while waiting)
    wants: list[WantView]  # the locks it asked for, and how
    queued: list[WaiterView]  # its entries in the namespace's queue (one while it waits)
    created_text: str
    started_text: str
    finished_text: str
    duration_text: str
    exit_text: str
    host: str | None
    error: str | None

    @property
    def percent_text(self) -> str:
        """``40%``, or ``-`` before the task reported any progress."""
        return "-" if self.percent is None else f"{self.percent:.0f}%"

    @property
    def waited_locks(self) -> list[str]:
        """The locks it waited for, each once, in order."""
        return list(dict.fromkeys(w.lock for w in self.waits))


def _target_text(target: str | list[str]) -> str:
    return target if isinstance(target, str) else " ".join(target)


def _exit_text(record: TaskRecord) -> str:
    if record.signal is not None:
        return signal_name(record.signal)
    if record.exit_code is not None:
        return f"exit {record.exit_code}"
    return "-"


def task_wants(record: TaskRecord) -> list[WantView]:
    """The locks a task asked for, with how: ``record.shared`` names the shared ones (with
    their limit, or None); the others are exclusive."""
    return [WantView(name, name in record.shared, record.shared.get(name)) for name in record.locks]


def task_view(
    record: TaskRecord,
    locks: Sequence[HeldLock],
    now: float,
    waiters: Sequence[WaiterView] = (),
) -> TaskView:
    """A task, ready for a template. ``locks`` (``LockTable.held()``) and ``waiters`` (the
    queue, see :func:`waiter_views`) say who is in its way now and its place in the queue."""
    owner_name = f"task:{record.id}"
    queued = [w for w in waiters if w.owner == owner_name]
    holders: dict[tuple[str, str], HeldLock] = {}
    for held in locks:
        holders.setdefault((held.name, held.holder.owner), held)
    ahead = {(lock.name, a.owner): a for q in queued for a in q.ahead for lock in a.locks}
    waits = []
    for entry in record.wait_history():
        since = float(entry["since"])
        until = entry["until"]
        lock = str(entry["lock"])
        owner = str(entry.get("owner") or "?")
        # While it waits: is whom the entry names still in its way, as a holder of that lock or
        # as a waiter ahead of it that wants it too?
        holder = holders.get((lock, owner)) if until is None else None
        waits.append(
            WaitView(
                lock=lock,
                owner=owner,
                owner_task=owner_task_id(owner),
                note=entry.get("note"),
                since=since,
                until=until,
                seconds=max(0.0, (now if until is None else float(until)) - since),
                holder=None if holder is None else lock_view(holder, now),
                ahead=ahead.get((lock, owner)) if until is None else None,
            )
        )
    waiting_for: list[WaitView] = []
    if record.state.value == "waiting":
        waiting_for = [w for w in waits if w.until is None]
        # An entry whose holder or waiter has left its way since stays open in the record
        # until someone new comes in the way: show only those still there, if any are.
        current = [w for w in waiting_for if w.holder is not None or w.ahead is not None]
        waiting_for = current or waiting_for
    end = record.finished if record.finished is not None else now
    if record.wait_started is None:
        waited = 0.0
    else:  # until it got its locks or ended; while it still waits, until now
        wait_end = record.wait_ended
        waited = max(0.0, (now if wait_end is None else wait_end) - record.wait_started)
    return TaskView(
        id=record.id,
        title=record.title,
        kind=record.kind,
        target=_target_text(record.target),
        state=record.state.value,
        stopping=record.stop_requested is not None and not record.state.is_final,
        active=not record.state.is_final,
        percent=record.percent,
        message=record.message,
        waited=waited,
        waited_text=duration(waited) if waits else "-",
        waits=waits,
        waiting_for=waiting_for,
        wants=task_wants(record),
        queued=queued,
        created_text=clock(record.created, now=now),
        started_text="-" if record.started is None else clock(record.started, now=now),
        finished_text="-" if record.finished is None else clock(record.finished, now=now),
        duration_text="-" if record.started is None else duration(max(0.0, end - record.started)),
        exit_text=_exit_text(record),
        host=record.host,
        error=None
        if record.error_code is None
        else f"{record.error_code}: {record.error_message or ''}",
    )


# --- the timeline -------------------------------------------------------------------------------


class BadRange(ValueError):
    """A timeline range that cannot be read (the message says what is expected)."""


_LAST = re.compile(r"(\d{1,4})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_LATEST = 253_402_128_000.0  # 9999-12-30T00:00Z: the last day shown in every time zone
_SPAN_OF_TIMES = "use times from 1970 to 9999"


def _instant(text: str, name: str) -> float:
    """Seconds since the epoch, or a local date and time (``2026-11-01T10:00``)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRange(
            f"{name}={quote(text)} is not a time: use 2026-11-01T10:00 (local time) or seconds "
            "since the epoch"
        ) from None
    try:
        return when.timestamp()  # a naive time is local time
    except (ValueError, OverflowError, OSError):  # (year 1 or 9999 in a local time zone)
        raise BadRange(f"{name}={quote(text)} is out of range: {_SPAN_OF_TIMES}") from None


def parse_range(params: Mapping[str, str], now: float) -> tuple[float, float]:
    """The timeline's ``(start, end)`` from query parameters: ``last=1h`` (s, m, h or d), or
    ``from=`` and optionally ``to=`` (local ``2026-11-01T10:00`` or epoch seconds). Default: the
    last hour. (``last=fit`` is the caller's: see :func:`fit_range`.)

    :raises BadRange: unreadable, empty, reversed or wider than 31 days."""
    last = params.get("last")
    start_text, end_text = params.get("from") or None, params.get("to") or None
    if start_text is not None:
        start = _instant(start_text, "from")
        end = now if end_text is None else _instant(end_text, "to")
    elif end_text is not None:
        raise BadRange("to= needs a from= as well")
    else:
        match = _LAST.fullmatch(last or "1h")
        if match is None:
            raise BadRange(f"last={quote(last)} is not a range: use 15m, 1h, 6h, 24h, 7d or fit")
        end = now
        start = now - int(match.group(1)) * _UNIT[match.group(2)]
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        raise BadRange("the range is empty: from= must come before to=")
    if start < 0 or end > _LATEST:  # (dates outside these cannot be shown, nor reached)
        raise BadRange(f"the range is outside what can be shown: {_SPAN_OF_TIMES}")
    if end - start > MAX_SPAN:
        raise BadRange("the range is wider than 31 days: choose a shorter one")
    return start, end


def fit_range(records: Sequence[TaskRecord], now: float) -> tuple[float, float]:
    """A range that shows the tasks of the last 24 hours from the first one's creation to the
    last one's end (now, while one is active), with a small margin; else the last hour."""
    recent = [r for r in records if r.created >= now - 86400]
    if not recent:
        return now - 3600, now
    start = min(r.created for r in recent)
    active = any(not r.state.is_final for r in recent)
    end = now if active else max(r.finished or r.created for r in recent)
    margin = max(1.0, (end - start) * 0.03)
    return start - margin, end + (0.0 if active else margin)


@dataclass(frozen=True)
class Segment:
    """A bar in a timeline row: ``waiting`` (blocked on held locks) or ``running``."""

    kind: str
    state: str  # the task's state, for the colour of a running segment
    x: float
    width: float
    title: str  # the tooltip, and the accessible text
    label: str | None = None  # drawn in the bar when it fits (the locks it waited for)


@dataclass(frozen=True)
class Row:
    """One task in the timeline."""

    task_id: int
    title: str
    state: str
    y: float
    segments: list[Segment]
    crash_x: float | None = None


@dataclass(frozen=True)
class Tick:
    """A time on the timeline's axis."""

    x: float
    label: str


@dataclass
class Timeline:
    """The timeline's geometry, in SVG user units."""

    start: float
    end: float
    width: float
    height: float
    left: float  # where the time axis starts (task labels are to its left)
    axis_y: float
    row_height: float
    rows: list[Row] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    now_x: float | None = None
    waits: list[dict[str, Any]] = field(default_factory=list)  # the table under the drawing
    hidden: int = 0  # tasks in range that were left out (too many rows)


_TICK_STEPS: tuple[int, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
_TICK_STEPS += (10800, 21600, 43200, 86400, 172800, 604800)
CHAR_WIDTH = 6.6  # an estimate of one character of the labels, in user units


def _tick_label(epoch: float, step: float, span: float) -> str:
    when = dt.datetime.fromtimestamp(epoch)
    if span > 86400:
        return when.strftime("%m-%d %H:%M")
    return when.strftime("%H:%M:%S" if step < 60 else "%H:%M")


def build_timeline(
    records: Sequence[TaskRecord],
    start: float,
    end: float,
    now: float,
    *,
    width: float = 1000.0,
    left: float = 230.0,
    row_height: float = 24.0,
    max_rows: int = 200,
) -> Timeline:
    """One row per task whose life (created..finished, or now) overlaps ``start..end``, oldest
    first; its waits (only the time blocked on held locks) and its run as segments."""
    axis_y = 28.0
    span = end - start
    scale = (width - left - 10.0) / span

    def x(t: float) -> float:
        return left + (min(max(t, start), end) - start) * scale

    chosen = [
        r
        for r in records
        if r.created <= end and (r.finished if r.finished is not None else now) >= start
    ]
    chosen.sort(key=lambda r: r.id)
    hidden = max(0, len(chosen) - max_rows)
    chosen = chosen[hidden:]  # the newest max_rows
    timeline = Timeline(
        start=start,
        end=end,
        width=width,
        height=axis_y + row_height * max(1, len(chosen)) + 8.0,
        left=left,
        axis_y=axis_y,
        row_height=row_height,
        hidden=hidden,
    )
    step = next((s for s in _TICK_STEPS if span / s <= 8), _TICK_STEPS[-1])
    first = float(math.ceil(start / step) * step)
    if step >= 3600:  # whole local hours and days, not UTC ones
        offset = dt.datetime.fromtimestamp(first).astimezone().utcoffset() or dt.timedelta()
        first -= offset.total_seconds() % step
        while first < start:
            first += step
    t = first
    while t <= end:
        timeline.ticks.append(Tick(x(t), _tick_label(t, step, span)))
        t += step
    if start <= now <= end:
        timeline.now_x = x(now)
    for index, r in enumerate(chosen):
        y = axis_y + index * row_height
        segments: list[Segment] = []
        groups: dict[tuple[float, float | None], list[dict[str, Any]]] = {}
        for entry in r.wait_history():
            groups.setdefault((float(entry["since"]), entry["until"]), []).append(entry)
        for (since, until), entries in groups.items():
            stop = now if until is None else float(until)
            if stop < start or since > end:  # neither drawn nor listed
                continue
            timeline.waits.append(
                {
                    "task_id": r.id,
                    "title": r.title,
                    "entries": entries,
                    "since": since,
                    "until": until,
                    "seconds": stop - since,
                }
            )
            held_by = "; ".join(
                f"{e['lock']} held by {e.get('owner')}"
                + (f" ({e['note']})" if e.get("note") else "")
                for e in entries
            )
            locks = ", ".join(str(e["lock"]) for e in entries)
            bar = Segment(
                kind="waiting",
                state=r.state.value,
                x=x(since),
                width=max(1.5, x(stop) - x(since)),
                title=f"task {r.id} waited {duration(stop - since)} for {held_by}",
                label=locks,
            )
            fits = len(locks) * CHAR_WIDTH + 8 <= bar.width
            segments.append(bar if fits else replace(bar, label=None))
        if r.started is not None:
            stop = r.finished if r.finished is not None else now
            if stop >= start and r.started <= end:
                how = r.state.value if r.state.is_final else "running"
                segments.append(
                    Segment(
                        kind="running",
                        state=r.state.value,
                        x=x(r.started),
                        width=max(1.5, x(stop) - x(r.started)),
                        title=f"task {r.id} ran {duration(stop - r.started)}, {how}",
                    )
                )
        crash = None
        if r.state.value == "crashed" and r.finished is not None and start <= r.finished <= end:
            crash = x(r.finished)
        timeline.rows.append(Row(r.id, r.title, r.state.value, y, segments, crash))
    return timeline


def trim_partial_utf8(data: bytes) -> bytes:
    """``data`` without a UTF-8 sequence cut short at its end (it comes with the next read)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        if byte & 0x80 == 0:  # ASCII: complete
            return data
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return data if back >= need else data[:-back]
    return data
