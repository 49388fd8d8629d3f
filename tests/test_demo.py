"""The demo (make demo), shortened, and its timeline checked for parallelism, waits and cleanup."""

from __future__ import annotations

import io
from pathlib import Path

from tasklocks.demo import run
from tasklocks.tasks import TaskRecord, Tasks, TaskState


def _overlap(a: TaskRecord, b: TaskRecord) -> bool:
    assert a.started and a.finished and b.started and b.finished
    return a.started < b.finished and b.started < a.finished


def test_demo_runs_the_seed_scenario(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    out = io.StringIO()
    records = run(url, speed=0.4, out=out)
    by_kind: dict[str, list[TaskRecord]] = {}
    for record in records:
        by_kind.setdefault(record.title, []).append(record)
    blog = by_kind["update blog"][0]
    wiki = by_kind["update wiki"][0]
    chat = by_kind["update chat"][0]
    again = by_kind["restart blog"][0]
    backup = by_kind["full backup"][0]
    configure = by_kind["configure chat"][0]
    platform, platform2 = by_kind["update platform"]
    mail = by_kind["restart mail"][0]

    # Everything but the killed task succeeded.
    assert chat.state is TaskState.CRASHED
    failed = [r for r in records if r is not chat and r.state is not TaskState.SUCCEEDED]
    assert not failed, "\n".join(
        f"task {r.id} {r.title}: {r.state} {r.error_code} {r.error_message} {r.message} "
        f"pid {r.pid} start {r.start_token} pgid {r.pgid} exit {r.exit_code} signal {r.signal} "
        f"started {r.started} finished {r.finished}\n"
        + (Path(r.log_path).read_text(errors="replace")[-1500:] if r.log_path else "")
        for r in failed
    )
    # Different apps ran in parallel; so did the platform update and the mail restart.
    assert _overlap(blog, wiki)
    assert _overlap(platform, mail) and _overlap(blog, mail)
    # The second task on the blog waited for the first, and says so.
    assert again.started is not None and blog.finished is not None
    assert again.started >= blog.finished
    assert again.waited_for is not None
    assert [{k: w[k] for k in ("lock", "owner", "note")} for w in again.waited_for] == [
        {"lock": "app_task:blog", "owner": f"task:{blog.id}", "note": "update blog"}
    ]
    # Its wait began when it found the lock held and ended when it got it: no start-up in it.
    assert again.wait_started is not None and again.wait_ended == again.started
    assert again.created <= again.wait_started <= blog.finished <= again.started
    assert again.waited == again.started - again.wait_started
    # The first tasks found their locks free: they waited for nothing, and the timeline says so.
    for record in (blog, wiki, chat, platform, mail):
        assert (record.waited_for, record.wait_started, record.waited) == (None, None, 0.0)
        lines = out.getvalue().splitlines()
        row = next(line for line in lines if line.startswith(f"{record.id:>3}  "))
        assert f" {0.0:6.2f}s " in row and "." not in row.split("|")[1], row
    assert platform2.started is not None and platform.finished is not None
    assert platform2.started >= platform.finished
    # The backup ran beside the app tasks, took each app's lock in turn, and waited for wiki.
    assert _overlap(backup, blog)
    assert [step["app"] for step in backup.result] == ["wiki", "mail-ui", "chat", "blog"]
    wiki_step = backup.result[0]
    assert wiki_step["waited_for"] and f"task:{wiki.id}" in wiki_step["waited_for"][0]
    assert wiki.started is not None
    assert wiki_step["got"] >= wiki.started + 0.7  # the update of wiki ran 0.8 s first
    # The killed task's lock went to the next contender, and nothing is left held.
    assert configure.waited_for is not None
    assert configure.waited_for[0]["owner"] == f"task:{chat.id}"
    with Tasks(url, records[0].namespace) as tasks:
        assert tasks.locks.held() == []
    text = out.getvalue()
    assert "who waited for whom:" in text
    assert f"task {again.id} (restart blog) waited" in text
    assert f"task {chat.id} (update chat) crashed" in text
    assert "locks held at the end: none" in text
    # It ends with the command that opens this run in the dashboard.
    *_, serve, address = text.rstrip("\n").splitlines()
    assert serve.endswith(f" --db {url} --namespace {records[0].namespace} serve"), serve
    assert address.startswith("  then open http://127.0.0.1:8765/timeline?from="), address
    assert len([line for line in text.splitlines() if line.strip().startswith(str(blog.id))]) >= 1
