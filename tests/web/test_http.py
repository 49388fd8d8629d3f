"""The dashboard over plain HTTP, against a real ``tasklocks serve`` (uvicorn) in a subprocess.

Bad input and hostile requests: an unknown task is a 404 page, a missing or wrong token a bare
401, a POST without the CSRF token or from another site a 403 (and nothing is stopped), a request
under a foreign host name a 400. A database that goes away (an SQLite file moved away, a
PostgreSQL server behind a proxy the test stops) turns into a banner, and the pages recover by
themselves when it returns. The command's own refusals are one line and a documented exit code.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import delete_rows, require, server_url

from tasklocks.tasks import Tasks, TaskState

from .conftest import BLOCK_UNTIL, DEADLINE, PY, Cli, Server, environment, poll


class Reply:
    """A response: status, headers (lower-case names) and body text."""

    def __init__(self, status: int, headers: dict[str, str], body: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.headers} {self.body[:300]!r}>"


def request(
    server: Server,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | dict[str, str | bytes] | None = None,
    body: str | None = None,
) -> Reply:
    """One request, no redirects followed."""
    host, port = server.netloc.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        text = response.read().decode("utf-8", errors="replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)
    finally:
        conn.close()


def blocked_task(cli: Cli, gate: Path, *locks: str) -> int:
    """A command task that runs until ``gate`` exists (holding ``locks``)."""
    args = [a for lock in locks for a in ("--lock", lock)]
    return cli.start(*args, "--kind", "blocked", "--", "sh", "-c", BLOCK_UNTIL, "sh", str(gate))


def until_state(cli: Cli, task_id: int, state: TaskState) -> None:
    with Tasks(cli.url, cli.namespace) as tasks:
        poll(f"task {task_id} {state}", lambda: tasks.get(task_id).state is state or None)


# --- pages and bad input ------------------------------------------------------------------------


def test_pages_render_and_an_unknown_task_is_a_404_page(sqlite_cli: Cli, tmp_path: Path) -> None:
    server = sqlite_cli.serve()
    task_id = blocked_task(sqlite_cli, tmp_path / "go", "app_task:blog")
    until_state(sqlite_cli, task_id, TaskState.RUNNING)
    for path, expected in [
        ("/", f'id="task-{task_id}"'),
        ("/tasks?state=running", f'id="task-{task_id}"'),
        (f"/tasks/{task_id}", f"Task {task_id}: blocked"),
        ("/locks", 'data-lock="app_task:blog"'),
        ("/timeline", f'data-task="{task_id}"'),
        ("/timeline?last=fit", f'data-task="{task_id}"'),
        ("/static/style.css", "--waiting"),
        ("/static/live.js", "data-poll"),
    ]:
        reply = request(server, path)
        assert reply.status == 200, (path, reply)
        assert expected in reply.body, (path, reply)
    page = request(server, "/tasks")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # Every asset is the dashboard's own: no page names another host.
    assert not re.search(r'(src|href)="(https?:)?//', page.body), page.body
    done = request(server, "/tasks?state=succeeded")
    assert f'id="task-{task_id}"' not in done.body and "No succeeded tasks." in done.body

    for path in ("/tasks/999999", "/tasks/99999999999999999999999"):
        missing = request(server, path)
        assert missing.status == 404, missing
        number = path.rsplit("/", 1)[1]
        assert f"There is no task {number} in namespace {sqlite_cli.namespace}." in missing.body
        assert "Traceback" not in missing.body
    assert request(server, "/tasks/abc").status == 404
    assert request(server, "/nowhere").status == 404
    log = request(server, "/tasks/999999/log")
    assert (log.status, log.headers["content-type"]) == (404, "application/json")
    bad = request(server, "/timeline?last=forever")
    assert bad.status == 400 and "is not a range" in bad.body, bad
    reversed_range = request(server, "/timeline?from=2026-11-01T10:00&to=2026-11-01T09:00")
    assert reversed_range.status == 400 and "the range is empty" in reversed_range.body
    assert request(server, "/tasks?state=bogus").status == 400
    (tmp_path / "go").touch()


def test_the_tasks_page_shows_the_newest_hundred_then_more(sqlite_cli: Cli) -> None:
    with Tasks(sqlite_cli.url, sqlite_cli.namespace) as tasks:
        for n in range(105):  # finished records, written straight to the table
            tasks.store.create_task(
                {
                    "kind": f"old {n}",
                    "target": '["true"]',
                    "locks": "[]",
                    "namespace": sqlite_cli.namespace,
                    "state": "succeeded",
                    "created": time.time() - 500 + n,
                    "started": time.time() - 500 + n,
                    "finished": time.time() - 499 + n,
                    "exit_code": 0,
                }
            )
    server = sqlite_cli.serve()
    for path in ("/tasks", "/tasks?partial=1"):
        page = request(server, path)
        assert page.body.count('<tr id="task-') == 100, path
        assert '<a href="/tasks?more=1">Show 5 older tasks</a>' in page.body, path
    assert request(server, "/tasks?more=1").body.count('<tr id="task-') == 105
    partial = request(server, "/tasks?state=succeeded&partial=1")
    assert partial.status == 200 and "<html" not in partial.body


def test_the_log_is_read_from_an_offset(sqlite_cli: Cli, tmp_path: Path) -> None:
    server = sqlite_cli.serve()
    script = "printf 'first line\\n'; printf 'caf\\303\\251\\n'"
    task_id = sqlite_cli.start("--", "sh", "-c", script)
    until_state(sqlite_cli, task_id, TaskState.SUCCEEDED)
    whole = json.loads(request(server, f"/tasks/{task_id}/log?offset=0").body)
    assert whole["text"] == "first line\ncafé\n"
    assert whole["offset"] == len("first line\ncafé\n".encode())
    rest = json.loads(request(server, f"/tasks/{task_id}/log?offset={len('first line')}").body)
    assert rest["text"] == "\ncafé\n"
    end = json.loads(request(server, f"/tasks/{task_id}/log?offset={whole['offset']}").body)
    assert (end["text"], end["final"]) == ("", True)
    assert request(server, f"/tasks/{task_id}/log?offset=x").status == 400
    assert "café" in request(server, f"/tasks/{task_id}").body
    for value in ("0", "true"):  # only partial=1 is the live part (these were a 500)
        page = request(server, f"/tasks/{task_id}?partial={value}")
        assert page.status == 200 and "<html" in page.body and "café" in page.body, value


def test_an_argument_that_is_not_utf8_is_shown_as_the_command_line_shows_it(cli: Cli) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates (caf\\xe9 is caf\\udce9), which
    UTF-8 cannot encode: every page that showed such a task was a 500."""
    task_id = cli.start("--", "echo", "caf\udce9")
    until_state(cli, task_id, TaskState.SUCCEEDED)
    server = cli.serve()
    for path in (
        "/",
        "/?partial=1",
        "/timeline",
        "/timeline?partial=1",
        f"/tasks/{task_id}",
        f"/tasks/{task_id}?partial=1",
    ):
        reply = request(server, path)
        assert reply.status == 200, (path, reply)
        assert "echo caf\\udce9" in reply.body, (path, reply)  # as `tasklocks task` prints it
    log = request(server, f"/tasks/{task_id}/log?offset=0")
    assert log.status == 200 and json.loads(log.body)["text"] == "caf\ufffd\n", log
    assert "unexpected error" not in server.errors()


# --- who may look -------------------------------------------------------------------------------


def test_a_token_is_required_on_every_request(sqlite_cli: Cli) -> None:
    server = sqlite_cli.serve("--token", "s3cret-token")
    for path, headers in [
        ("/tasks", {}),
        ("/static/style.css", {}),
        ("/locks", {"Authorization": "Bearer wrong"}),
        ("/tasks?token=wrong", {}),
        ("/tasks", {"Cookie": "tasklocks_token=s3cret-token"}),  # the cookie holds a digest
    ]:
        refused = request(server, path, headers=headers)
        assert refused.status == 401, (path, refused)
        assert refused.body == "401 Unauthorized\n"  # no detail
        assert refused.headers["www-authenticate"] == "Bearer"
    assert request(server, "/locks", headers={"Authorization": "Bearer s3cret-token"}).status == 200
    # A link with ?token= sets a cookie and sends the browser on without the token in the URL.
    link = request(server, "/timeline?last=6h&token=s3cret-token")
    assert link.status == 303 and link.headers["location"] == "/timeline?last=6h", link
    cookie = link.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "s3cret-token" not in cookie
    pair = cookie.split(";", 1)[0]
    assert request(server, "/timeline?last=6h", headers={"Cookie": pair}).status == 200
    # ...to a path of this dashboard only, never to another host.
    for path in ("//evil.example/x?token=s3cret-token", "/%2F%2Fevil.example?token=s3cret-token"):
        link = request(server, path)
        assert link.status == 303 and link.headers["location"] == "/", (path, link)


def test_a_token_beyond_ascii_works_in_the_header_as_in_the_link(sqlite_cli: Cli) -> None:
    """(Headers arrive decoded as latin-1: a UTF-8 token in ``Authorization: Bearer`` was
    refused while the same token in the link and the cookie worked.)"""
    token = "s3cret-t\u00f6k\u20acn"
    server = sqlite_cli.serve("--token", token)
    bearer: dict[str, str | bytes] = {"Authorization": f"Bearer {token}".encode()}
    assert request(server, "/locks", headers=bearer).status == 200
    wrong: dict[str, str | bytes] = {"Authorization": "Bearer s3cret-t\u00f6ken".encode()}
    assert request(server, "/locks", headers=wrong).status == 401
    not_utf8: dict[str, str | bytes] = {"Authorization": b"Bearer s3cret-t\xf6k"}
    assert request(server, "/locks", headers=not_utf8).status == 401  # (compared as it came)
    link = request(server, f"/locks?token={urllib.parse.quote(token)}")
    assert link.status == 303 and link.headers["location"] == "/locks", link
    pair = link.headers["set-cookie"].split(";", 1)[0]
    assert request(server, "/locks", headers={"Cookie": pair}).status == 200


def test_the_token_may_come_from_the_environment(sqlite_cli: Cli) -> None:
    env = dict(sqlite_cli.env, TASKLOCKS_TOKEN="from-env")
    server = sqlite_cli.serve(env=env)
    assert request(server, "/tasks").status == 401
    assert request(server, "/tasks", headers={"Authorization": "Bearer from-env"}).status == 200


def test_without_a_token_only_loopback_host_names_are_served(sqlite_cli: Cli) -> None:
    server = sqlite_cli.serve()
    port = server.netloc.rsplit(":", 1)[1]
    assert request(server, "/tasks", headers={"Host": f"localhost:{port}"}).status == 200
    rebound = request(server, "/tasks", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status == 400 and "tasks" not in rebound.body.lower(), rebound


def test_any_loopback_address_is_served_without_a_token(sqlite_cli: Cli) -> None:
    # All of 127.0.0.0/8 is loopback: serve binds it without a token, so pages answer there.
    server = sqlite_cli.serve("--host", "127.0.0.2")
    assert server.netloc.startswith("127.0.0.2:"), server.url
    page = request(server, "/tasks")  # Host: 127.0.0.2:PORT
    assert page.status == 200 and "<h1>Tasks</h1>" in page.body, page
    port = server.netloc.rsplit(":", 1)[1]
    rebound = request(server, "/tasks", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status == 400, rebound


def test_serving_beyond_loopback_needs_a_token(sqlite_cli: Cli) -> None:
    for host in ("0.0.0.0", "192.0.2.10", "example.org"):
        result = sqlite_cli.run("serve", "--host", host, "--port", "0")
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"tasklocks: serving on {host} lets other machines in")
        assert "--token" in result.stderr
    bad_port = sqlite_cli.run("serve", "--port", "70000")
    assert bad_port.returncode == 2 and bad_port.stderr.startswith("tasklocks: --port 70000")
    bad_url = subprocess.run(
        [PY, "-m", "tasklocks", "--db", "nonsense", "serve", "--port", "0"],
        env=sqlite_cli.env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert bad_url.returncode == 2 and bad_url.stderr.startswith("tasklocks: bad database URL")
    # A bad namespace, also on an SQLite file that does not exist yet (it was served, with a
    # banner "Database unavailable. bad namespace ..." once the file came).
    missing = f"sqlite:///{sqlite_cli.tmp_path}/none-yet.db"
    bad_namespace = subprocess.run(
        [PY, "-m", "tasklocks", "--db", missing, "--namespace", "bad ns", "serve", "--port", "0"],
        env=sqlite_cli.env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert bad_namespace.returncode == 2, bad_namespace
    assert bad_namespace.stderr.startswith("tasklocks: bad namespace 'bad ns'")


def test_serve_without_the_web_extra_says_how_to_get_it(tmp_path: Path) -> None:
    # None in sys.modules makes an import fail as if the package were not installed.
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None; "
        "from tasklocks.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [PY, "-c", code, "--db", f"sqlite:///{tmp_path}/x.db", "serve"],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 69, result
    assert result.stderr == (
        "tasklocks: the dashboard needs the web extra (starlette, uvicorn missing): "
        "pip install 'tasklocks[web]'\n"
    )


def test_the_core_and_the_command_line_import_no_web_framework(tmp_path: Path) -> None:
    code = (
        "import sys, tasklocks, tasklocks.cli, tasklocks.web, tasklocks.demo; "
        "tasklocks.cli.build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'starlette', 'uvicorn', 'jinja2', 'anyio'}))"
    )
    result = subprocess.run(
        [PY, "-c", code], env=environment(tmp_path), capture_output=True, text=True
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


# --- stopping: only from the dashboard's own pages -----------------------------------------------


def test_stop_needs_the_csrf_token_and_a_same_site_request(sqlite_cli: Cli, tmp_path: Path) -> None:
    server = sqlite_cli.serve()
    task_id = blocked_task(sqlite_cli, tmp_path / "go")
    until_state(sqlite_cli, task_id, TaskState.RUNNING)
    page = request(server, f"/tasks/{task_id}")
    cookie = page.headers["set-cookie"].split(";", 1)[0]
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.body)
    assert match is not None, page.body
    token = match.group(1)
    form = "application/x-www-form-urlencoded"
    own = f"http://{server.netloc}"
    path = f"/tasks/{task_id}/stop"
    for headers, body in [
        ({"Cookie": cookie, "Origin": own}, "next=/tasks"),  # no token
        ({"Cookie": cookie, "Origin": own}, "csrf=0123abcd"),  # a wrong one
        ({"Origin": own}, f"csrf={token}"),  # no cookie it is bound to
        ({"Cookie": "tasklocks_csrf=other", "Origin": own}, f"csrf={token}"),  # another's
        ({"Cookie": cookie, "Origin": "http://attacker.example"}, f"csrf={token}"),
        ({"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}, f"csrf={token}"),
    ]:
        refused = request(
            server, path, method="POST", headers={**headers, "Content-Type": form}, body=body
        )
        assert refused.status == 403, (headers, body, refused)
        assert "Nothing was stopped" in refused.body
    with Tasks(sqlite_cli.url, sqlite_cli.namespace) as tasks:
        record = tasks.get(task_id)
        assert (record.state, record.stop_requested) == (TaskState.RUNNING, None)
    assert request(server, path, method="GET").status == 405

    headers = {"Cookie": cookie, "Origin": own, "Sec-Fetch-Site": "same-origin"}
    missing = request(
        server,
        "/tasks/999999/stop",
        method="POST",
        headers={**headers, "Content-Type": form},
        body=f"csrf={token}",
    )
    assert missing.status == 404
    stopped = request(
        server,
        path,
        method="POST",
        headers={**headers, "Content-Type": form},
        body=urllib.parse.urlencode({"csrf": token, "next": "/tasks?state=stopped"}),
    )
    assert stopped.status == 303 and stopped.headers["location"] == "/tasks?state=stopped"
    until_state(sqlite_cli, task_id, TaskState.STOPPED)
    # A `next` that leaves the dashboard is not followed.
    again = request(
        server,
        path,
        method="POST",
        headers={**headers, "Content-Type": form},
        body=urllib.parse.urlencode({"csrf": token, "next": "//attacker.example/"}),
    )
    assert again.status == 303 and again.headers["location"] == f"/tasks/{task_id}"


# --- a database that goes away ------------------------------------------------------------------


def _banner(server: Server, path: str) -> Callable[[], Reply | None]:
    def probe() -> Reply | None:
        reply = request(server, path)
        return reply if 'id="db-banner"' in reply.body else None

    return probe


def _recovered(server: Server, path: str, needle: str) -> Callable[[], Reply | None]:
    def probe() -> Reply | None:
        reply = request(server, path)
        ok = reply.status == 200 and 'id="db-banner"' not in reply.body and needle in reply.body
        return reply if ok else None

    return probe


def test_a_missing_sqlite_file_shows_a_banner_until_it_returns(
    sqlite_cli: Cli, tmp_path: Path
) -> None:
    result = sqlite_cli.run("acquire", "app_task:wiki", "--owner", "admin:web-test")
    assert result.returncode == 0, result
    server = sqlite_cli.serve()
    assert 'data-lock="app_task:wiki"' in request(server, "/locks").body
    db = tmp_path / "locks.db"
    db.rename(tmp_path / "away.db")
    try:
        gone = poll("the banner", _banner(server, "/locks"))
        assert f"the database file {db} is missing" in gone.body
        assert "Database unavailable." in gone.body
        assert 'data-lock="app_task:wiki"' in gone.body  # the last known state, marked so
        assert "Showing what it said at" in gone.body
        assert not db.exists()  # the dashboard never creates a database
    finally:
        (tmp_path / "away.db").rename(db)
    poll("the pages to recover", _recovered(server, "/locks", 'data-lock="app_task:wiki"'))
    assert "the database is unavailable" in server.errors()
    assert "the database is back" in server.errors()


def test_a_missing_sqlite_file_is_never_created(tmp_path: Path, namespace: str) -> None:
    db = tmp_path / "nowhere" / "locks.db"
    cli = Cli(f"sqlite:///{db}", namespace, tmp_path)
    try:
        server = cli.serve()
        page = request(server, "/tasks")
        assert page.status == 200 and f"the database file {db} is missing" in page.body
        assert "Nothing could be read yet." in page.body
        assert request(server, "/tasks/1").status == 503
        assert "the database file" in server.errors() and "does not exist" in server.errors()
        assert not db.exists() and not db.parent.exists()
    finally:
        cli.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target``; ``stop()`` closes it and every connection through
    it, ``start()`` opens it again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._running = True
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._running:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                client.settimeout(None)
                upstream.settimeout(None)
                with self._lock:
                    self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    require("postgresql")
    parts = urllib.parse.urlsplit(server_url("postgresql"))
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_a_postgresql_server_that_goes_away_shows_a_banner_until_it_returns(
    proxy: Proxy, namespace: str, cli_factory: Callable[[str, str], Cli]
) -> None:
    real = server_url("postgresql")
    parts = urllib.parse.urlsplit(real)
    login, at, _ = parts.netloc.rpartition("@")  # user and password as configured, if any
    query = [*urllib.parse.parse_qsl(parts.query), ("connect_timeout", "2")]
    through = parts._replace(
        netloc=f"{login if at else 'postgres'}@127.0.0.1:{proxy.port}",
        query=urllib.parse.urlencode(query),
    ).geturl()
    cli = cli_factory(real, namespace)
    try:
        assert cli.run("acquire", "app_task:mail", "--owner", "admin:web-test").returncode == 0
        server = cli_factory(through, namespace).serve()
        assert 'data-lock="app_task:mail"' in request(server, "/locks").body
        proxy.stop()
        started = time.monotonic()
        gone = poll("the banner", _banner(server, "/locks"))
        assert "PostgreSQL" in gone.body and "Database unavailable." in gone.body, gone
        # A single task's page that is not in the last snapshot fails alone, with a 503 page.
        fails = request(server, "/tasks/987654321")
        assert fails.status == 503 and "Database unavailable" in fails.body, fails
        proxy.start()
        poll("the pages to recover", _recovered(server, "/locks", 'data-lock="app_task:mail"'))
        assert time.monotonic() - started < DEADLINE
    finally:
        cli.run("release", "--owner", "admin:web-test")
        delete_rows(real, namespace)
