"""The dashboard in a real browser (headless Chromium), on every backend.

One scenario per backend, as a person would see it: a task started from the command line appears
and its progress bar moves without a reload; a second task on the same lock shows the lock and
its holder; the locks page shows the holder and the waiter in the queue; the task's log follows
live; the stop button stops the holder, so the waiter runs; the timeline draws the wait. Every
request the browser makes goes to the dashboard itself. Screenshots of each page are saved (see
the ``artifacts`` fixture). Then, on SQLite: a queue behind shared holders, the pages without
JavaScript, and a Stop click that live updates must not swallow.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasklocks.tasks import Tasks, TaskState

from .conftest import DEADLINE, Cli, LockScene, poll

MS = int(DEADLINE * 1000)


@pytest.fixture
def page(browser: Any) -> Any:
    """A page in a fresh browser context (no cookies of other tests)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def test_dashboard_follows_tasks_locks_waits_and_stop(
    cli: Cli, page: Any, artifacts: Path, db_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=MS)
    backend = db_url.split(":", 1)[0]
    server = cli.serve()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    # A task started from the command line appears, and its progress bar moves without a reload.
    page.goto(server.url + "tasks")
    page.evaluate("window.notReloaded = true")
    gates = tmp_path / "holder"
    holder = cli.start_steps("update blog", "app_task:blog", gates)
    row = page.locator(f"#task-{holder}")
    expect(row.locator("progress")).to_have_attribute("value", "10.0")
    expect(row).to_have_attribute("data-state", "running")
    expect(row.locator(".percent")).to_have_text("10%")
    (gates / "go1").touch()
    expect(row.locator("progress")).to_have_attribute("value", "40.0")
    expect(row.locator(".message")).to_have_text("step 1")

    # A task needing the same lock waits, and the page says for which lock and who holds it.
    waiter_gates = tmp_path / "waiter"
    waiter = cli.start_steps("restart blog", "app_task:blog", waiter_gates, steps=0)
    waiting = page.locator(f"#task-{waiter}")
    expect(waiting).to_have_attribute("data-state", "waiting")
    reason = waiting.locator('li.waiting-for[data-lock="app_task:blog"]')
    expect(reason).to_contain_text(f"task:{holder} (pid ")
    expect(reason).to_contain_text("update blog")
    assert page.evaluate("window.notReloaded") is True  # all of that arrived live
    page.screenshot(path=artifacts / f"tasks-{backend}.png", full_page=True)

    # The locks page: the holder, its pid and host, alive, and a fencing token; the waiter is
    # first in the queue, with the holder in its way.
    page.goto(server.url + "locks")
    lock = page.locator('tbody.lock[data-lock="app_task:blog"]')
    expect(lock.locator("tr.holder")).to_contain_text(f"task:{holder}")
    expect(lock.locator("tr.holder .liveness")).to_have_text("alive")
    queued = page.locator("tr.waiter")
    expect(queued).to_have_count(1)
    expect(queued).to_have_attribute("data-owner", f"task:{waiter}")
    expect(queued.locator(".wants")).to_contain_text("app_task:blog exclusive")
    expect(queued.locator(".way-holder")).to_contain_text(f"held by task:{holder}")
    page.screenshot(path=artifacts / f"locks-{backend}.png", full_page=True)

    # The waiter's page: its place in the queue, and its wait history names the lock and the
    # holder.
    page.goto(server.url + f"tasks/{waiter}")
    expect(page.locator("section.queue-place")).to_contain_text("#1 of 1")
    entry = page.locator("tr.wait-entry").first
    expect(entry).to_contain_text("app_task:blog")
    expect(entry).to_contain_text(f"task:{holder}")

    # The holder's page: its lock, its log following live, and the stop button.
    page.goto(server.url + f"tasks/{holder}")
    expect(page.locator("#log")).to_contain_text("step 1")
    page.evaluate("window.notReloaded = true")
    (gates / "go2").touch()
    expect(page.locator("#log")).to_contain_text("step 2")
    expect(page.locator(".detail-progress progress")).to_have_attribute("value", "70.0")
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("table.locks")).to_contain_text("app_task:blog")
    page.screenshot(path=artifacts / f"task-{backend}.png", full_page=True)
    page.locator("form.stop button").click()
    expect(page.locator(".heading .state").first).to_have_text("stopped")

    # The waiter got the lock and ran; the timeline draws its wait, with the lock it waited on.
    (waiter_gates / "done").touch()
    page.goto(server.url + "tasks")
    expect(page.locator(f"#task-{waiter}")).to_have_attribute("data-state", "succeeded")
    page.goto(server.url + "timeline?last=15m")
    wait = page.locator(f'g.row[data-task="{waiter}"] rect.seg-waiting')
    expect(wait).to_have_count(1)
    expect(wait.locator("title")).to_contain_text(f"app_task:blog held by task:{holder}")
    expect(page.locator(f'g.row[data-task="{holder}"] rect.seg-waiting')).to_have_count(0)
    ran = page.locator(f'g.row[data-task="{holder}"] rect.seg-running')
    expect(ran).to_have_class("seg seg-running state-stopped")
    page.screenshot(path=artifacts / f"timeline-{backend}.png", full_page=True)

    # Nothing was asked of any other host.
    foreign = [u for u in requests if urllib.parse.urlsplit(u).netloc != server.netloc]
    assert requests and not foreign, foreign


def test_the_locks_page_shows_shared_holders_and_the_queue_live(
    sqlite_cli: Cli,
    page: Any,
    artifacts: Path,
    lock_scene: Callable[[str, str], LockScene],
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=MS)
    # Two holders share "db", and one of 2 "slots" is taken (locks of this process).
    scene = lock_scene(sqlite_cli.url, sqlite_cli.namespace)
    backup = scene.hold("db", owner="backup", shared=True, note="nightly backup")
    report = scene.hold("db", owner="report", shared=True)
    scene.hold("slots", owner="worker:1", limit=2)
    server = sqlite_cli.serve()
    # A task wants "db" exclusively: it waits for both. A reader that comes later waits behind
    # it (first come, first served), though it could share "db" with the holders.
    migrate = sqlite_cli.start("--lock", "db", "--kind", "migrate db", "--", "true")
    poll(
        "the task to queue up",
        lambda: any(q.owner == f"task:{migrate}" for q in scene.table.waiting()) or None,
    )
    scene.wait("db", "slots", owner="reader:late", shared=["db"], limit={"slots": 2})

    page.goto(server.url + "locks")
    db = page.locator('tbody.lock[data-lock="db"]')
    expect(db.locator("tr.holder")).to_have_count(2)
    expect(db.locator("tr.holder .mode")).to_have_text(["shared", "shared"])
    expect(db.locator("tr.queued")).to_contain_text(f"#1 task:{migrate} (exclusive)")
    expect(page.locator('tbody.lock[data-lock="slots"]')).to_contain_text("1 of 2")
    waiters = page.locator("tr.waiter")
    expect(waiters).to_have_count(2)
    first, second = waiters.nth(0), waiters.nth(1)
    expect(first).to_have_attribute("data-owner", f"task:{migrate}")
    expect(first.locator(".way-holder")).to_have_count(2)  # both shared holders
    expect(second).to_have_attribute("data-owner", "reader:late")
    expect(second.locator(".wants")).to_contain_text("db shared")
    expect(second.locator(".wants")).to_contain_text("slots limit 2")
    expect(second.locator(".way-ahead")).to_contain_text(f"#1 task:{migrate} ahead")
    page.screenshot(path=artifacts / "locks-queue.png", full_page=True)

    # The task's page: its place in the queue and how it wants its lock.
    first.get_by_role("link", name=f"task:{migrate}").click()
    expect(page.locator("section.queue-place")).to_contain_text("#1 of 2")
    expect(page.locator('.want[data-lock="db"]')).to_contain_text("exclusive")
    expect(page.locator(".detail-progress .message")).to_contain_text("Waiting for db")
    page.screenshot(path=artifacts / "task-queued.png", full_page=True)

    # The holders let go: the task runs, then the reader gets its turn; the page follows live.
    page.goto(server.url + "locks")
    page.evaluate("window.notReloaded = true")
    scene.release(backup)
    scene.release(report)
    expect(page.locator("#nobody-waits")).to_be_visible()
    expect(page.locator('tbody.lock[data-lock="db"]')).to_have_count(0)
    assert page.evaluate("window.notReloaded") is True
    with Tasks(sqlite_cli.url, sqlite_cli.namespace) as tasks:
        assert tasks.wait(migrate, timeout=DEADLINE).state is TaskState.SUCCEEDED


def test_pages_work_without_javascript(
    sqlite_cli: Cli, browser: Any, artifacts: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=MS)
    server = sqlite_cli.serve()
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1400, "height": 900}
    )
    try:
        page = context.new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        task_id = sqlite_cli.start("--lock", "db", "--kind", "no js", "--", "sh", "-c", "sleep 30")
        page.goto(server.url + "tasks?state=active")
        row = page.locator(f"#task-{task_id}")
        expect(row).to_have_attribute("data-state", "running")  # the page reloads itself
        row.locator("form.stop button").click()  # a plain form POST, then back to the list
        expect(page).to_have_url(server.url + "tasks?state=active")
        page.goto(server.url + f"tasks/{task_id}")
        expect(page.locator(".heading .state").first).to_have_text("stopped")
        page.goto(server.url + "timeline?last=fit")
        expect(page.locator(f'g.row[data-task="{task_id}"] rect.seg-running')).to_have_count(1)
        page.screenshot(path=artifacts / "timeline-no-javascript.png", full_page=True)
        foreign = [u for u in requests if urllib.parse.urlsplit(u).netloc != server.netloc]
        assert requests and not foreign, foreign
    finally:
        context.close()


def test_a_stop_click_is_not_lost_to_a_live_update(
    sqlite_cli: Cli, page: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=MS)
    server = sqlite_cli.serve()
    gates = tmp_path / "gates"
    task_id = sqlite_cli.start_steps("click me", "app_task:click", gates)
    page.goto(server.url + "tasks?state=active")
    row = page.locator(f"#task-{task_id}")
    expect(row.locator("progress")).to_have_attribute("value", "10.0")

    # Press the Stop button, and keep it pressed while the task's row changes on the server.
    button = row.locator("form.stop button")
    box = button.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    button.evaluate("b => { b.dataset.pressed = '1'; }")  # the element the press began on
    (gates / "go1").touch()
    partial = server.url + "tasks?state=active&partial=1"

    def changed() -> bool | None:
        with urllib.request.urlopen(partial, timeout=DEADLINE) as reply:
            return 'value="40.0"' in reply.read().decode() or None

    poll("the row to change on the server", changed)
    # Polls run one after another: the second request starts after the check above, and the third
    # only after the page handled the second's (changed) fragment.
    for _ in range(3):
        with page.expect_response(lambda r: "partial=1" in r.url):
            pass
    assert row.locator("progress").get_attribute("value") == "10.0"  # held back, not swapped
    assert button.get_attribute("data-pressed") == "1"  # the very button that was pressed

    # Releasing it clicks it: the form is sent, the task stops, and the page is live again.
    with page.expect_navigation():
        page.mouse.up()
    with Tasks(sqlite_cli.url, sqlite_cli.namespace) as tasks:
        poll("the task to stop", lambda: tasks.get(task_id).state is TaskState.STOPPED or None)
    expect(page.locator(f"#task-{task_id}")).to_have_count(0)  # no longer active
