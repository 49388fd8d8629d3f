"""What the dashboard computes, without a server: timeline geometry, ranges, rows, log reading,
and the checks of ``serve``'s options. Pure functions of their arguments (``now`` is given)."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tasklocks import HeldLock, Holder, Liveness, QueuedWaiter
from tasklocks._core import Waiter, Want
from tasklocks.tasks import TaskState
from tasklocks.web import BadBind, check_bind, is_loopback
from tasklocks.web._source import LogChunk, read_log
from tasklocks.web._view import (
    BadRange,
    build_timeline,
    duration,
    fit_range,
    lock_groups,
    lock_view,
    mode_text,
    parse_range,
    signal_name,
    task_view,
    trim_partial_utf8,
    waiter_views,
)

from .conftest import DEADLINE, NOW, record


def holder(
    owner: str = "task:1",
    since: float = NOW - 50,
    *,
    mode: str = "x",
    limit: int | None = None,
    lease: str = "lease",
    token: int = 7,
) -> Holder:
    return Holder(
        owner, 4711, "s", "b", "web-1", None, 4711, since, token, lease, "update blog", None,
        mode, limit,
    )  # fmt: skip


def waiter(owner: str, *wants: Want, since: float = NOW - 10, note: str | None = None) -> Waiter:
    lease = f"lease-{owner}"
    return Waiter(owner, 4712, "s", "b", "web-1", None, None, since, lease, note, "sess", wants)


def queued(
    position: int,
    w: Waiter,
    holders: dict[str, tuple[Holder, ...]] | None = None,
    ahead: tuple[Waiter, ...] = (),
) -> QueuedWaiter:
    return QueuedWaiter(position, w, Liveness.ALIVE, 25.0, holders or {}, ahead)


def waited(since: float, lock: str = "app_task:blog", owner: str = "task:1") -> dict[str, Any]:
    return {"lock": lock, "owner": owner, "note": "update blog", "since": since}


# --- the wait time in rows -----------------------------------------------------------------------


def test_a_task_whose_locks_were_free_waited_nothing() -> None:
    view = task_view(
        record(state=TaskState.RUNNING, started=NOW - 30), [], NOW
    )  # 30 s of start-up: not waiting
    assert (view.waited, view.waited_text, view.waits, view.waiting_for) == (0.0, "-", [], [])
    assert view.duration_text == "30.0s"


def test_a_waiting_task_names_the_lock_and_its_holder_now() -> None:
    rec = record(2, state=TaskState.WAITING, waited_for=[waited(NOW - 20)])
    held = [HeldLock("app_task:blog", holder(), Liveness.ALIVE)]
    view = task_view(rec, held, NOW)
    assert view.waited == 20.0 and view.waited_text == "20.0s"
    [reason] = view.waiting_for
    assert (reason.lock, reason.owner_task, reason.until) == ("app_task:blog", 1, None)
    assert reason.holder is not None and reason.holder.holder_text == "task:1 (pid 4711 on web-1)"


def test_a_finished_wait_counts_from_the_refusal_to_the_start() -> None:
    rec = record(
        2,
        state=TaskState.SUCCEEDED,
        waited_for=[waited(NOW - 40)],
        started=NOW - 25,
        finished=NOW - 5,
        exit_code=0,
    )
    view = task_view(rec, [], NOW)
    assert (view.waited, view.waited_locks, view.waiting_for) == (15.0, ["app_task:blog"], [])
    assert view.exit_text == "exit 0" and view.duration_text == "20.0s"


def test_exit_by_signal_and_stop_requests() -> None:
    rec = record(state=TaskState.RUNNING, started=NOW - 5, stop_requested=NOW - 1)
    assert task_view(rec, [], NOW).stopping
    killed = record(state=TaskState.STOPPED, started=NOW - 5, finished=NOW, signal=9)
    assert task_view(killed, [], NOW).exit_text == "SIGKILL (9)"
    assert signal_name(200) == "signal 200"
    assert [duration(s) for s in (None, 0.42, 62, 3700)] == ["-", "0.4s", "1m02s", "1h01m"]


def test_a_lock_row_shows_whatever_liveness_it_has() -> None:
    for liveness in Liveness:
        view = lock_view(HeldLock("db", holder("pid:web-1:9"), liveness), NOW)
        assert view.liveness == liveness.value and view.owner_task is None
    view = lock_view(HeldLock("db", holder("task:12"), Liveness.DEAD), NOW)
    assert (view.owner_task, view.held_for, view.token) == (12, "50.0s", 7)


# --- modes and the queue -------------------------------------------------------------------------


def test_a_lock_row_says_how_it_is_held() -> None:
    assert [mode_text(False, None), mode_text(True, None), mode_text(True, 3)] == [
        "exclusive",
        "shared",
        "limit 3",
    ]
    for h, expected in [
        (holder(), "exclusive"),
        (holder(mode="s"), "shared"),
        (holder(mode="s", limit=3), "limit 3"),
    ]:
        view = lock_view(HeldLock("db", h, Liveness.ALIVE), NOW)
        assert view.mode == expected


# A namespace as LockTable.held() and .waiting() report it: task:1 holds "a"; task:5 and task:6
# share "db"; task:7 holds one of 3 "slots". In the queue: task:2 wants "a"; task:3 wants "db"
# exclusively; task:4 wants "a" and a slot, behind task:2.
A = holder("task:1", NOW - 60, lease="l1", token=1)
DB5 = holder("task:5", NOW - 50, mode="s", lease="l5", token=2)
DB6 = holder("task:6", NOW - 40, mode="s", lease="l6", token=3)
SLOT7 = holder("task:7", NOW - 30, mode="s", limit=3, lease="l7", token=4)
HELD = [
    HeldLock("a", A, Liveness.ALIVE),
    HeldLock("db", DB5, Liveness.ALIVE),
    HeldLock("db", DB6, Liveness.EXPIRED, 0.0),
    HeldLock("slots", SLOT7, Liveness.ALIVE),
]
W2 = waiter("task:2", Want("a"), since=NOW - 20, note="<b>restore</b>")
W3 = waiter("task:3", Want("db"), since=NOW - 15)
W4 = waiter("task:4", Want("a"), Want("slots", "s", 3), since=NOW - 5)
QUEUE = [
    queued(1, W2, {"a": (A,)}),
    queued(2, W3, {"db": (DB5, DB6)}),
    queued(3, W4, {"a": (A,), "slots": ()}, ahead=(W2,)),
]


def test_the_queue_in_order_with_what_each_wants_and_who_is_in_its_way() -> None:
    views = waiter_views(QUEUE, NOW)
    assert [(v.position, v.owner, v.owner_task) for v in views] == [
        (1, "task:2", 2),
        (2, "task:3", 3),
        (3, "task:4", 4),
    ]
    first, second, third = views
    assert (first.waited_text, first.liveness, first.expires_in) == ("20.0s", "alive", 25.0)
    assert first.note == "<b>restore</b>"  # escaped by the template, not here
    assert [h.owner for h in first.holders] == ["task:1"] and first.ahead == []
    assert first.line_text == "1st in line"
    # Both shared holders of "db" are in task:3's way, each with how it holds it.
    assert [(h.owner, [x.text for x in h.locks]) for h in second.holders] == [
        ("task:5", ["db (shared)"]),
        ("task:6", ["db (shared)"]),
    ]
    assert [x.text for x in third.wants] == ["a", "slots (limit 3)"]
    assert [x.mode for x in third.wants] == ["exclusive", "limit 3"]
    assert [h.owner for h in third.holders] == ["task:1"]  # a slot is free: only "a" blocks
    [ahead] = third.ahead
    assert (ahead.position, ahead.owner, ahead.owner_task) == (1, "task:2", 2)
    assert [x.name for x in ahead.locks] == ["a"]
    assert third.line_text == "2nd in line"


def test_a_holder_in_the_way_of_two_names_is_named_once() -> None:
    both = holder("pid:web-1:9", lease="l9")
    w = waiter("task:8", Want("a"), Want("b"))
    [view] = waiter_views([queued(1, w, {"a": (both,), "b": (both,)})], NOW)
    [h] = view.holders
    assert (h.owner, h.owner_task, [x.name for x in h.locks]) == ("pid:web-1:9", None, ["a", "b"])


def test_shared_holders_are_grouped_under_their_lock_with_its_waiters() -> None:
    groups = lock_groups(HELD, waiter_views(QUEUE, NOW), NOW)
    assert [(g.name, g.mode, g.count_text) for g in groups] == [
        ("a", "exclusive", "1 holder"),
        ("db", "shared", "2 holders"),
        ("slots", "limit 3", "1 of 3"),
    ]
    a, db, slots = groups
    assert [h.owner for h in db.holders] == ["task:5", "task:6"]
    assert [h.liveness for h in db.holders] == ["alive", "expired"]
    assert [(w.position, want.mode) for w, want in a.waiters] == [
        (1, "exclusive"),
        (3, "exclusive"),
    ]
    assert [(w.position, want.mode) for w, want in db.waiters] == [(2, "exclusive")]
    assert [(w.position, want.mode) for w, want in slots.waiters] == [(3, "limit 3")]
    assert lock_groups([], [], NOW) == []


def test_a_waiting_task_knows_its_place_and_its_locks_modes() -> None:
    rec = record(
        4,
        state=TaskState.WAITING,
        locks=["a", "slots", "db"],
        shared={"slots": 3, "db": None},
        waited_for=[waited(NOW - 5, "a", "task:1"), waited(NOW - 5, "a", "task:2")],
    )
    view = task_view(rec, HELD, NOW, waiter_views(QUEUE, NOW))
    assert [(x.name, x.mode) for x in view.wants] == [
        ("a", "exclusive"),
        ("slots", "limit 3"),
        ("db", "shared"),
    ]
    [place] = view.queued
    assert (place.position, place.line_text) == (3, "2nd in line")
    holder_entry, ahead_entry = view.waiting_for
    assert holder_entry.holder is not None and holder_entry.holder.owner == "task:1"
    assert holder_entry.ahead is None
    assert ahead_entry.holder is None  # task:2 does not hold "a": it waits ahead for it
    assert ahead_entry.ahead is not None and ahead_entry.ahead.position == 1
    # Not in the queue (another task), or not waiting: no place.
    assert task_view(record(9), HELD, NOW, waiter_views(QUEUE, NOW)).queued == []


def test_a_waiting_task_names_each_holder_of_a_shared_lock() -> None:
    rec = record(
        3,
        state=TaskState.WAITING,
        locks=["db"],
        waited_for=[waited(NOW - 9, "db", "task:5"), waited(NOW - 9, "db", "task:6")],
    )
    view = task_view(rec, HELD, NOW, waiter_views(QUEUE, NOW))
    assert [w.holder.owner if w.holder else None for w in view.waiting_for] == [
        "task:5",
        "task:6",
    ]
    assert [w.holder.mode if w.holder else None for w in view.waiting_for] == ["shared"] * 2


def test_a_blocker_that_left_is_no_longer_shown_while_others_remain() -> None:
    # task:3 began waiting for "db" when task:0 and task:5 shared it; task:0 has released it.
    rec = record(
        3,
        state=TaskState.WAITING,
        locks=["db"],
        waited_for=[waited(NOW - 9, "db", "task:0"), waited(NOW - 9, "db", "task:5")],
    )
    view = task_view(rec, HELD, NOW, waiter_views(QUEUE, NOW))
    assert [w.owner for w in view.waiting_for] == ["task:5"]
    assert [w.owner for w in view.waits] == ["task:0", "task:5"]  # the history keeps both
    # With nobody of the record in its way any more (the history lags), it shows them all.
    alone = task_view(rec, [], NOW)
    assert [w.owner for w in alone.waiting_for] == ["task:0", "task:5"]


# --- the timeline --------------------------------------------------------------------------------


def test_the_timeline_draws_waits_and_runs_as_different_segments() -> None:
    holder_task = record(
        1, state=TaskState.SUCCEEDED, created=NOW - 600, started=NOW - 599, finished=NOW - 300
    )
    waiter = record(
        2,
        state=TaskState.SUCCEEDED,
        created=NOW - 500,
        waited_for=[waited(NOW - 499)],
        started=NOW - 300,
        finished=NOW - 200,
    )
    chart = build_timeline([waiter, holder_task], NOW - 1000, NOW, NOW, width=1010, left=0)
    scale = 1.0  # (1010 - 0 - 10) user units for 1000 s
    assert [row.task_id for row in chart.rows] == [1, 2]
    first, second = chart.rows
    assert [s.kind for s in first.segments] == ["running"]
    assert [s.kind for s in second.segments] == ["waiting", "running"]
    wait, run = second.segments
    assert wait.x == pytest.approx(501 * scale) and wait.width == pytest.approx(199 * scale)
    assert wait.label == "app_task:blog"
    assert wait.title == "task 2 waited 3m19s for app_task:blog held by task:1 (update blog)"
    assert run.x == pytest.approx(700 * scale) and run.state == "succeeded"
    assert chart.waits[0]["seconds"] == pytest.approx(199)
    assert chart.now_x == pytest.approx(1000)
    assert chart.ticks and all(0 <= t.x <= 1000 for t in chart.ticks)


def test_the_timeline_leaves_out_tasks_outside_the_range_and_marks_crashes() -> None:
    old = record(1, state=TaskState.SUCCEEDED, created=NOW - 7200, started=NOW - 7200)
    old = record(**{**old.__dict__, "finished": NOW - 7000})
    crashed = record(
        2, state=TaskState.CRASHED, created=NOW - 100, started=NOW - 90, finished=NOW - 10
    )
    running = record(3, state=TaskState.RUNNING, created=NOW - 50, started=NOW - 50)
    chart = build_timeline([old, crashed, running], NOW - 3600, NOW, NOW)
    assert [row.task_id for row in chart.rows] == [2, 3]
    assert chart.rows[0].crash_x is not None and chart.rows[1].crash_x is None
    assert chart.rows[1].segments[0].title == "task 3 ran 50.0s, running"


def test_the_waits_table_lists_only_waits_in_the_range() -> None:
    # Both run in the last hour; the first did its waiting before it, the second in it.
    early = record(
        4,
        state=TaskState.RUNNING,
        created=NOW - 5000,
        waited_for=[waited(NOW - 4900), waited(NOW - 4500, lock="app_task:wiki")],
        started=NOW - 4000,
    )
    late = record(
        5,
        state=TaskState.RUNNING,
        created=NOW - 700,
        waited_for=[waited(NOW - 600)],
        started=NOW - 500,
    )
    chart = build_timeline([early, late], NOW - 3600, NOW, NOW)
    assert [(w["task_id"], w["since"]) for w in chart.waits] == [(5, NOW - 600)]
    assert [[s.kind for s in row.segments] for row in chart.rows] == [
        ["running"],
        ["waiting", "running"],
    ]


def test_a_short_wait_keeps_its_lock_in_the_tooltip_only() -> None:
    waiter = record(2, state=TaskState.RUNNING, waited_for=[waited(NOW - 3.0)], started=NOW - 2.9)
    chart = build_timeline([waiter], NOW - 3600, NOW, NOW)
    wait = chart.rows[0].segments[0]
    assert wait.kind == "waiting" and wait.label is None and "app_task:blog" in wait.title
    assert wait.width >= 1.5  # still visible


def test_ranges() -> None:
    assert parse_range({}, NOW) == (NOW - 3600, NOW)
    assert parse_range({"last": "15m"}, NOW) == (NOW - 900, NOW)
    assert parse_range({"last": "7d"}, NOW) == (NOW - 7 * 86400, NOW)
    assert parse_range({"from": str(NOW - 10), "to": str(NOW - 5)}, NOW) == (NOW - 10, NOW - 5)
    local = dt.datetime.fromtimestamp(NOW - 7200).replace(second=0, microsecond=0)
    text = local.strftime("%Y-%m-%dT%H:%M")  # as <input type="datetime-local"> sends it
    assert parse_range({"from": text}, NOW) == (local.timestamp(), NOW)
    for params, message in [
        ({"last": "1y"}, "is not a range"),
        ({"from": "yesterday"}, "is not a time"),
        ({"to": str(NOW)}, "needs a from"),
        ({"from": str(NOW), "to": str(NOW - 1)}, "the range is empty"),
        ({"last": "60d"}, "wider than 31 days"),
        ({"from": "nan"}, "the range is empty"),
        ({"from": "0001-01-01T00:00"}, "out of range: use times from 1970 to 9999"),
        ({"from": "1e15", "to": "1000000000001000"}, "outside what can be shown"),
        ({"from": "253402300800", "to": "253402301800"}, "outside what can be shown"),
        ({"from": "-1e12", "to": "-999999999000"}, "outside what can be shown"),
    ]:
        with pytest.raises(BadRange, match=message):
            parse_range(params, NOW)


def test_fit_range_spans_the_recent_tasks() -> None:
    assert fit_range([], NOW) == (NOW - 3600, NOW)
    done = record(1, state=TaskState.SUCCEEDED, created=NOW - 100, finished=NOW - 40)
    start, end = fit_range([done], NOW)
    assert start < NOW - 100 and NOW - 40 < end < NOW
    active = record(2, state=TaskState.RUNNING, created=NOW - 10)
    assert fit_range([done, active], NOW)[1] == NOW


# --- logs ----------------------------------------------------------------------------------------


def test_utf8_cut_short_at_the_end_waits_for_the_next_read() -> None:
    text = "café €𝄞".encode()
    for cut in range(len(text) + 1):
        head = trim_partial_utf8(text[:cut])
        head.decode("utf-8")  # never a broken character
        assert len(text[:cut]) - len(head) <= 3


def test_read_log_from_the_tail_starts_at_a_line(tmp_path: Path) -> None:
    path = tmp_path / "task-5.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    rec = record(5, log_path=str(path))
    tail = read_log(rec, None, limit=50)
    assert tail.text.startswith("line ") and tail.text.endswith("line 99\n")
    assert tail.offset == path.stat().st_size
    assert read_log(rec, 0, limit=7).text == "line 0\n"


def test_read_log_reads_only_that_tasks_log(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("nope")
    assert read_log(record(5, log_path=str(secret)), 0).missing is not None
    link = tmp_path / "task-5.log"
    os.symlink(secret, link)
    chunk = read_log(record(5, log_path=str(link)), 0)
    assert chunk.text == "" and chunk.missing is not None
    assert read_log(record(6, log_path=str(link)), 0).missing is not None  # another task's name
    assert read_log(record(5, log_path=str(tmp_path / "x" / "task-5.log")), 0).missing
    again = tmp_path / "task-5-2.log"  # task 5, task-5.log taken (its table was made again)
    again.write_text("five again\n")
    assert read_log(record(5, log_path=str(again)), 0).text == "five again\n"
    for name in ("task-55.log", "task-5-0.log", "task-5-x.log", "task-5-2.log.old"):
        (tmp_path / name).write_text("not task 5's")
        assert read_log(record(5, log_path=str(tmp_path / name)), 0).missing is not None, name


def test_read_log_reads_only_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "task-5.log"
    os.mkfifo(fifo)
    chunks: list[LogChunk] = []
    reader = threading.Thread(
        target=lambda: chunks.append(read_log(record(5, log_path=str(fifo)), None)), daemon=True
    )
    reader.start()
    reader.join(timeout=DEADLINE)
    if reader.is_alive():
        with fifo.open("wb"):  # a writer lets the blocked open return
            pass
        pytest.fail("reading a FIFO named like a log blocked")
    [chunk] = chunks
    assert (chunk.text, chunk.missing) == ("", f"the log {fifo} is not a regular file")
    directory = tmp_path / "logs" / "task-6.log"
    directory.mkdir(parents=True)
    for offset in (None, 0):
        chunk = read_log(record(6, log_path=str(directory)), offset)
        assert (chunk.text, chunk.missing) == ("", f"the log {directory} is not a regular file")


# --- serve's options -----------------------------------------------------------------------------


def test_loopback_hosts_need_no_token_and_others_do() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.0.2.1", "::", "example.org"))
    check_bind("127.0.0.1", 8765, None)
    check_bind("0.0.0.0", 8765, "t")
    with pytest.raises(BadBind, match="lets other machines in: add --token"):
        check_bind("0.0.0.0", 8765, None)
    with pytest.raises(BadBind, match="empty"):
        check_bind("0.0.0.0", 8765, " ")
    with pytest.raises(BadBind, match="not a port"):
        check_bind("127.0.0.1", 65536, None)
