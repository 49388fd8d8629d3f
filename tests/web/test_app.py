"""The dashboard's ASGI application without a server: the test speaks the ASGI interface to it.

Each request is one ``asyncio.run``; the data comes from a :class:`Source` whose snapshot is given
by the test, so no database is needed, or (for the queue of waiters) from a real :class:`Source`
on an SQLite file whose locks and waiters the test takes in this process.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from tasklocks import CorruptLockTable, StoreUnavailable, current_process
from tasklocks.tasks import TaskRecord, TaskState
from tasklocks.web._source import Snapshot, Source
from tasklocks.web.app import Guard, Settings, create_app

from .conftest import LockScene, record

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class FakeSource(Source):
    """A :class:`Source` whose tasks are the test's (nothing is read from its absent database),
    and whose stop requests are only recorded."""

    def __init__(self, tmp_path: Path, records: list[TaskRecord]) -> None:
        super().__init__(f"sqlite:///{tmp_path}/absent.db", "default")
        self.records = records
        self.snapshots = 0
        self.stopped: list[int] = []

    def snapshot(self, *, max_age: float = 1.0) -> Snapshot:
        self.snapshots += 1
        return Snapshot(tasks=list(self.records), taken=time.time())

    def request_stop(self, task_id: int) -> TaskRecord:
        found = self.task(task_id)
        self.stopped.append(task_id)
        return found


class Reply:
    """A response: status, headers (lower-case names) and body text."""

    def __init__(self, status: int, headers: dict[str, str], body: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.headers} {self.body[:300]!r}>"


def call(
    app: Starlette,
    target: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str = "",
) -> Reply:
    """One HTTP request to ``app`` over ASGI, as uvicorn would make it (Host: 127.0.0.1:8765)."""
    path, _, query = target.partition("?")
    fields = {"host": "127.0.0.1:8765", **{k.lower(): v for k, v in (headers or {}).items()}}
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
    }
    pending = [{"type": "http.request", "body": body.encode(), "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, *rest = sent
    assert start["type"] == "http.response.start", sent
    names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}
    text = b"".join(m.get("body", b"") for m in rest).decode()
    return Reply(start["status"], names, text)


def running(task_id: int = 1, **fields: object) -> TaskRecord:
    """A task running on this host (so it has a stop button)."""
    now = time.time()
    values: dict[str, object] = {
        "state": TaskState.RUNNING,
        "created": now - 5,
        "started": now - 4,
        "host": current_process().host,
    }
    return record(task_id, **{**values, **fields})


def form_token(app: Starlette, page: str) -> tuple[str, str]:
    """The CSRF cookie (``name=value``) a page sets, and the form token on it."""
    reply = call(app, page)
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', reply.body)
    assert reply.status == 200 and match is not None, reply
    return reply.headers["set-cookie"].split(";", 1)[0], match.group(1)


def websocket_scope(host: str = "127.0.0.1:8765") -> Scope:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/tasks",
        "raw_path": b"/tasks",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
        "subprotocols": [],
    }


# --- the guard ----------------------------------------------------------------------------------


def test_a_websocket_is_closed_before_anything_else() -> None:
    reached: list[Scope] = []
    sent: list[Message] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    for token in (None, "s3cret"):
        for host in ("127.0.0.1:8765", "attacker.example"):
            sent.clear()
            asyncio.run(Guard(inner, token=token)(websocket_scope(host), receive, send))
            assert sent == [{"type": "websocket.close", "code": 1008}], (token, host)
    assert reached == []  # the application never saw one


# --- stopping -----------------------------------------------------------------------------------


def test_stop_goes_back_only_to_a_path_of_the_dashboard(tmp_path: Path) -> None:
    source = FakeSource(tmp_path, [running(1)])
    app = create_app(Settings(url=source.url), source)
    cookie, token = form_token(app, "/tasks/1")
    for given, expected in [
        ("/tasks?state=active", "/tasks?state=active"),
        ("/timeline?last=6h", "/timeline?last=6h"),
        ("/\t/attacker.example/", "/tasks/1"),  # a browser drops the tab: //attacker.example/
        ("/\n/attacker.example/", "/tasks/1"),
        ("/\r\n/attacker.example/", "/tasks/1"),
        ("/\x00/attacker.example/", "/tasks/1"),
        ("//attacker.example/", "/tasks/1"),
        ("/\\attacker.example/", "/tasks/1"),
        ("https://attacker.example/", "/tasks/1"),
        ("javascript:alert(1)", "/tasks/1"),
        ("tasks", "/tasks/1"),
        ("", "/tasks/1"),
    ]:
        reply = call(
            app,
            "/tasks/1/stop",
            method="POST",
            headers={**FORM, "Cookie": cookie, "Origin": "http://127.0.0.1:8765"},
            body=urllib.parse.urlencode({"csrf": token, "next": given}),
        )
        assert (reply.status, reply.headers.get("location")) == (303, expected), given
    assert source.stopped == [1] * 12


# --- who may look -------------------------------------------------------------------------------


def test_the_token_in_a_link_is_not_carried_into_the_urls_a_page_makes(tmp_path: Path) -> None:
    now = time.time()
    older = [record(n, state=TaskState.SUCCEEDED, created=now - 500 + n) for n in range(2, 102)]
    source = FakeSource(tmp_path, [running(200), *older])  # 101 tasks: a "more" link
    app = create_app(Settings(url=source.url, token="s3cret-token"), source)
    bearer = {"Authorization": "Bearer s3cret-token"}
    for target in ("/tasks?token=s3cret-token", "/tasks?token=s3cret-token&partial=1"):
        reply = call(app, target, headers=bearer)  # authorised: no redirect to drop it
        assert reply.status == 200, reply
        assert 'href="/tasks?more=1"' in reply.body, target
        assert 'name="next" value="/tasks"' in reply.body, target
        assert "token=" not in reply.body and "s3cret" not in reply.body, target
    page = call(app, "/tasks?state=active&token=s3cret-token", headers=bearer)
    assert 'data-poll="/tasks?state=active&amp;partial=1"' in page.body, page
    assert 'name="next" value="/tasks?state=active"' in page.body, page
    assert "s3cret" not in page.body


# --- pages --------------------------------------------------------------------------------------


def test_the_tasks_page_uses_the_one_task_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tasklocks.web.app.TASK_LIMIT", 120)  # the one the source reads by
    now = time.time()
    records = [record(n, state=TaskState.SUCCEEDED, created=now - n) for n in range(1, 121)]
    source = FakeSource(tmp_path, records)
    app = create_app(Settings(url=source.url), source)
    first = call(app, "/tasks")
    assert first.body.count('<tr id="task-') == 100 and "Show 20 older tasks" in first.body
    assert "Only the newest 120 tasks are read." in first.body
    assert call(app, "/tasks?more=1").body.count('<tr id="task-') == 120
    source.records = records[:119]
    assert "Only the newest" not in call(app, "/tasks").body


def test_the_page_header_never_shows_a_password_or_the_query(tmp_path: Path) -> None:
    source = FakeSource(tmp_path, [])
    url = "mysql://root:hunter2@db.example:3306/test?ssl_ca=/etc/ca.pem&password=hunter3"
    page = call(create_app(Settings(url=url), source), "/tasks")
    assert ">mysql://root@db.example:3306/test · namespace" in page.body, page
    assert "hunter" not in page.body and "ssl_ca" not in page.body
    sqlite = call(create_app(Settings(url="sqlite:////var/x.db"), source), "/locks")
    assert ">sqlite:////var/x.db · namespace" in sqlite.body, sqlite


class FailingSource(FakeSource):
    """A source whose single-task reads raise ``error``."""

    def __init__(self, tmp_path: Path, error: Exception) -> None:
        super().__init__(tmp_path, [])
        self.error = error

    def task(self, task_id: int, snapshot: Snapshot | None = None) -> TaskRecord:
        raise self.error


def test_only_a_database_that_does_not_answer_is_a_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = StoreUnavailable("postgresql://db/test did not answer\nfor 5s")
    corrupt = CorruptLockTable("x", "not\nJSON")
    for error, status, title, line in [
        (down, 503, "Database unavailable", "postgresql://db/test did not answer for 5s"),
        (corrupt, 500, "Error", "is corrupt (not JSON); inspect it, then reset it"),
    ]:
        source = FailingSource(tmp_path, error)
        page = call(create_app(Settings(url=source.url), source), "/tasks/7")
        assert page.status == status, page
        assert f"<h1>{status} · {title}</h1>" in page.body, page
        assert line in page.body, page  # the message, on one line
        assert "Traceback" not in page.body and "Traceback" not in caplog.text
    assert "error on /tasks/7: the lock document of namespace 'x' is corrupt (not JSON)" in (
        caplog.text
    )
    unexpected = FailingSource(tmp_path, KeyError("state"))
    bare = call(create_app(Settings(url=unexpected.url), unexpected), "/tasks/7")
    assert (bare.status, bare.body) == (500, "500 Internal Server Error: see the server's output\n")


def test_the_log_endpoint_answers_its_errors_as_json(tmp_path: Path) -> None:
    """(A database that did not answer, or any other failure, came back as an HTML page.)"""
    import json

    for error, status, words in [
        (StoreUnavailable("postgresql://db/test did not answer\nfor 5s"), 503, "did not answer"),
        (CorruptLockTable("x", "not JSON"), 500, "is corrupt"),
        (KeyError("state"), 500, "see the server's output"),
    ]:
        source = FailingSource(tmp_path, error)
        reply = call(create_app(Settings(url=source.url), source), "/tasks/7/log?offset=0")
        assert reply.status == status, reply
        assert reply.headers["content-type"] == "application/json", reply
        assert words in json.loads(reply.body)["error"], reply


def test_text_utf8_cannot_encode_is_shown_escaped_on_pages_and_in_json(tmp_path: Path) -> None:
    """Lone surrogates (bytes that were not UTF-8, as Python reads them) in a record or in an
    error are shown as the command line shows them, \\udce9: they made the reply a 500."""
    import json

    log_path = tmp_path / "caf\udce9" / "task-4.log"
    source = FakeSource(
        tmp_path, [running(4, kind=None, target=["echo", "caf\udce9"], log_path=str(log_path))]
    )
    app = create_app(Settings(url=source.url), source)
    for target in ("/tasks", "/tasks?partial=1", "/tasks/4", "/tasks/4?partial=1", "/timeline"):
        page = call(app, target)
        assert page.status == 200, (target, page)
        assert "echo caf\\udce9" in page.body, (target, page)
    log = call(app, "/tasks/4/log?offset=0")
    assert log.status == 200, log
    missing = f"the log {tmp_path}/caf\\udce9/task-4.log is gone"
    assert json.loads(log.body)["missing"] == missing
    down = FailingSource(tmp_path, StoreUnavailable("caf\udce9 did not answer"))
    app = create_app(Settings(url=down.url), down)
    page = call(app, "/tasks/7")
    assert page.status == 503 and "caf\\udce9 did not answer" in page.body, page
    log = call(app, "/tasks/7/log?offset=0")
    assert log.status == 503, log
    assert json.loads(log.body)["error"] == "caf\\udce9 did not answer"


def test_a_task_page_takes_one_snapshot(tmp_path: Path) -> None:
    source = FakeSource(tmp_path, [running(3)])
    app = create_app(Settings(url=source.url), source)
    for target in ("/tasks/3", "/tasks/3?partial=1"):
        before = source.snapshots
        page = call(app, target)
        assert page.status == 200 and "Task 3: task 3" in page.body, page
        assert source.snapshots - before == 1, target


def test_html_in_a_tasks_kind_and_message_is_shown_as_text(tmp_path: Path) -> None:
    payload = "<script>alert(1)</script>"
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    source = FakeSource(tmp_path, [running(9, kind=payload, message=payload, percent=50.0)])
    app = create_app(Settings(url=source.url), source)
    for target, shown in [
        ("/tasks", 2),  # the kind and the progress message
        ("/tasks?partial=1", 2),
        ("/tasks/9", 3),  # also the heading
        ("/tasks/9?partial=1", 3),
    ]:
        page = call(app, target)
        assert page.status == 200, page
        assert "<script>alert" not in page.body, target
        assert page.body.count(escaped) == shown, (target, page.body)


# --- the queue ----------------------------------------------------------------------------------

PAYLOAD = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def scene(tmp_path: Path, lock_scene: Callable[[str, str], LockScene]) -> LockScene:
    """Real locks on an SQLite file, namespace ``web``: task:11 holds "a" (a note with HTML in
    it), task:15 and task:16 share "db", worker:1 holds one of 3 "slots"; task:12 waits for "a"."""
    scene = lock_scene(f"sqlite:///{tmp_path}/locks.db", "web")
    scene.hold("a", owner="task:11", note=PAYLOAD)
    scene.hold("db", owner="task:15", shared=True)
    scene.hold("db", owner="task:16", shared=True)
    scene.hold("slots", owner="worker:1", limit=3)
    scene.wait("a", owner="task:12", note=PAYLOAD)
    return scene


@pytest.fixture
def scene_app(scene: LockScene) -> Iterator[Starlette]:
    """The dashboard over a real :class:`Source` on the scene's database."""
    source = Source(scene.url, scene.namespace)
    try:
        yield create_app(Settings(url=scene.url, namespace=scene.namespace), source)
    finally:
        source.close()


def tbody(body: str, lock: str) -> str:
    """The ``<tbody>`` of one lock on the locks page."""
    match = re.search(
        rf'<tbody class="lock"[^>]* data-lock="{re.escape(lock)}".*?</tbody>', body, re.S
    )
    assert match is not None, body
    return match.group(0)


def row(body: str, row_id: str) -> str:
    """The table row with that id."""
    match = re.search(rf'<tr [^>]*id="{row_id}".*?</tr>', body, re.S)
    assert match is not None, body
    return match.group(0)


def test_the_locks_page_shows_each_holder_with_its_mode_and_the_queue_in_order(
    scene: LockScene, scene_app: Starlette
) -> None:
    scene.wait("db", owner="task:13")  # exclusive: behind both shared holders
    scene.wait("a", "slots", owner="task:14", limit={"slots": 3})  # behind task:12 for "a"
    for target in ("/locks", "/locks?partial=1"):
        page = call(scene_app, target)
        assert page.status == 200, page
        body = page.body
        assert "3 held (4 holders) · 3 waiting" in body, body
        # The holders, by lock: a shared name has one row per holder.
        db = tbody(body, "db")
        assert 'data-mode="shared"' in db and "2 holders" in db
        assert re.findall(r'<tr class="holder" data-owner="([^"]+)"', db) == ["task:15", "task:16"]
        assert db.count('<span class="mode mode-shared">shared</span>') == 2
        slots = tbody(body, "slots")
        assert 'data-mode="limit 3"' in slots and "1 of 3" in slots and "worker:1" in slots
        a = tbody(body, "a")
        assert '<span class="mode mode-exclusive">exclusive</span>' in a
        assert re.sub(r"\s+", " ", a).count('class="queue-ref"') == 2  # task:12 and task:14 want it
        assert '<a href="#waiter-1" class="queue-ref">#1</a> <a href="/tasks/12">task:12</a>' in a
        # The queue, in order, each with what it wants and how.
        assert re.findall(
            r'<tr class="waiter" id="waiter-(\d+)" [^>]*data-owner="([^"]+)"', body
        ) == [
            ("1", "task:12"),
            ("2", "task:13"),
            ("3", "task:14"),
        ]
        third = row(body, "waiter-3")
        assert re.findall(r'<li data-lock="([^"]+)" data-mode="([^"]+)">', third) == [
            ("a", "exclusive"),
            ("slots", "limit 3"),
        ]
        assert '<a href="/tasks/14">task:14</a>' in third and "alive" in third
        # Who is in its way: the holder of "a", and task:12 ahead of it (not the free slot).
        assert 'held by <a href="/tasks/11">task:11</a>' in third
        assert (
            '<a href="#waiter-1" class="queue-ref">#1</a> <a href="/tasks/12">task:12</a> ahead'
            in third
        )
        assert "worker:1" not in third
        second = row(body, "waiter-2")
        assert second.count("held by") == 2 and "task:15" in second and "task:16" in second
        assert "<code>db</code> (shared)" in second
        # Notes with HTML in them are text: the holder's (in its row and in two waiters' way)
        # and task:12's (in its row and in task:14's way).
        assert "<script>alert" not in body
        assert body.count(ESCAPED) == 5, body


def test_the_locks_page_says_nobody_waits(tmp_path: Path) -> None:
    source = FakeSource(tmp_path, [])
    page = call(create_app(Settings(url=source.url), source), "/locks")
    assert page.status == 200, page
    assert "No lock is held in namespace default." in page.body
    assert (
        '<p class="empty" id="nobody-waits">Nobody waits for a lock in namespace default.</p>'
        in page.body
    )
    assert "0 held · 0 waiting" in page.body


def test_a_waiting_task_shows_its_place_in_the_queue_and_its_locks_modes(
    scene: LockScene, scene_app: Starlette
) -> None:
    now = time.time()
    message = f"Waiting for a (held by task 11, {PAYLOAD}), 2nd in line after task 12"
    task_id = scene.create_task(
        TaskState.WAITING,
        ["a", {"name": "db", "limit": None}, {"name": "slots", "limit": 3}],
        message=message,
        waited_for=[
            {"lock": "a", "owner": "task:11", "note": PAYLOAD, "since": now},
            {"lock": "a", "owner": "task:12", "note": PAYLOAD, "since": now},
        ],
    )
    scene.wait("a", "db", "slots", owner=f"task:{task_id}", shared=["db"], limit={"slots": 3})
    for target in (f"/tasks/{task_id}", f"/tasks/{task_id}?partial=1"):
        page = call(scene_app, target)
        assert page.status == 200, page
        body = page.body
        assert re.findall(r'<span class="want" data-lock="([^"]+)" data-mode="([^"]+)">', body) == [
            ("a", "exclusive"),
            ("db", "shared"),
            ("slots", "limit 3"),
        ]
        place = re.search(r'<section class="queue-place".*?</section>', body, re.S)
        assert place is not None, body
        text = place.group(0)
        assert 'data-position="2"' in text and "<strong>#2</strong> of 2</a>" in text
        assert "2nd in line for its locks" in text
        assert 'held by <a href="/tasks/11">task:11</a>' in text
        ahead = '<a href="/tasks/12">task:12</a> ahead'
        assert f'<a href="/locks#waiter-1" class="queue-ref">#1</a> {ahead}' in text
        assert "task:15" not in text  # sharing "db" with them is no wait
        # The wait history: task:11 holds "a"; task:12 waits ahead of it.
        assert "(waiting ahead, #1 in the queue)" in body
        assert "2nd in line after task 12" in body  # the supervisor's message, as written
        assert "<script>alert" not in body
    tasks = call(scene_app, "/tasks").body
    task_row = row(tasks, f"task-{task_id}")
    assert '<a href="/locks#waiter-2">#2 in the queue</a>, 2nd in line' in task_row
    assert 'held by <a href="/tasks/11">task:11</a> (pid ' in task_row
    assert 'behind <a href="/tasks/12">task:12</a> (#1 in the queue)' in task_row
    assert "<script>alert" not in tasks


def test_a_database_that_never_answered_has_not_answered_since_the_dashboard_started(
    tmp_path: Path,
) -> None:
    """(Before its first read ended, the banner said the database "has not answered for" as many
    seconds as the machine had been up, and "failing since" moved with each request.)"""
    release = threading.Event()

    class Hanging(Source):
        def call(self, body: Any, *, timeout: float = 2.0) -> Any:
            release.wait(timeout=20)
            raise StoreUnavailable("the database did not answer")

    began = time.time()
    source = Hanging(f"sqlite:///{tmp_path}/absent.db", "default")
    try:
        time.sleep(0.5)
        stale = source.snapshot(max_age=0.1)  # (waits up to FRESH_WAIT for a fresh one)
        assert stale.error is not None and stale.unavailable
        seconds = int(stale.error.rsplit(" for ", 1)[1].rstrip("s"))
        assert 1 <= seconds <= time.time() - began + 1, stale.error
        assert stale.error_since is not None and abs(stale.error_since - began) < 0.5
        again = source.snapshot(max_age=0.1)
        assert again.error_since == pytest.approx(stale.error_since, abs=0.3)
    finally:
        release.set()
        source.close()


def test_a_database_that_hangs_is_failing_since_its_last_answer(tmp_path: Path) -> None:
    """(While the refresher's read hung, "failing since" was the time of each request.)"""
    answering = threading.Event()
    answering.set()

    class Hanging(Source):
        def call(self, body: Any, *, timeout: float = 2.0) -> Any:
            if not answering.wait(timeout=20):
                raise StoreUnavailable("the database did not answer")
            return [], ([], [])

    source = Hanging(f"sqlite:///{tmp_path}/absent.db", "default")
    try:
        first = source.snapshot()
        assert first.error is None and first.taken is not None
        answering.clear()
        time.sleep(1.5)
        stale = source.snapshot(max_age=1.0)  # (waits up to FRESH_WAIT for a fresh one)
        assert stale.error is not None and "has not answered" in stale.error
        assert stale.error_since is not None and abs(stale.error_since - first.taken) < 0.6
        again = source.snapshot(max_age=1.0)
        assert again.error_since == pytest.approx(stale.error_since, abs=0.3)
    finally:
        answering.set()
        source.close()
