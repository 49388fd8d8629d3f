"""The dashboard's web application (Starlette and Jinja2): routes, guards and rendering.

Pages are rendered on the server and work without JavaScript; ``static/live.js`` makes them live
by fetching the same URL with ``?partial=1`` (the page's ``#live`` part only) every 0.4 s and
by following a task's log. Every asset is served from this package: no page refers to another
host, and the Content-Security-Policy forbids it.

Guards, for every request: the ``Host`` header must name this machine's loopback unless a token is
set (against DNS rebinding); with a token, the request must carry it (``Authorization: Bearer``,
the cookie set by visiting ``/?token=...``), else a bare 401. A POST must come from a page of this
dashboard: no foreign ``Origin`` or ``Sec-Fetch-Site``, and a CSRF token bound to the browser's
cookie. A websocket is closed at once: the dashboard has none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasklocks import StoreUnavailable, TasklocksError, TaskState
from tasklocks.errors import clock, quote
from tasklocks.store import default_url, parse_url
from tasklocks.tasks import TaskNotFound
from tasklocks.web import is_loopback
from tasklocks.web._source import TASK_LIMIT, CannotStop, Snapshot, Source, read_log
from tasklocks.web._view import (
    RANGES,
    BadRange,
    build_timeline,
    duration,
    fit_range,
    lock_groups,
    lock_view,
    parse_range,
    task_view,
    waiter_views,
)

__all__ = ["Settings", "create_app"]

log = logging.getLogger("tasklocks.web")
HERE = Path(__file__).resolve().parent
CSRF_COOKIE = "tasklocks_csrf"
TOKEN_COOKIE = "tasklocks_token"
STATES = tuple(s.value for s in TaskState)
MAX_FORM = 4096  # bytes of a POST body
PAGE_ROWS = 100  # tasks on the tasks page (?more=1: all that were read)
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a POST.
    "referrer-policy": "same-origin",
}


@dataclass(frozen=True)
class Settings:
    """How the dashboard runs.

    :param url: the database URL (None: ``$TASKLOCKS_DB``, else the default file).
    :param namespace: the lock namespace shown.
    :param token: required on every request when set (None: none, loopback only).
    :param stop_grace: seconds between SIGTERM and SIGKILL for the stop button.
    """

    url: str | None
    namespace: str = "default"
    token: str | None = None
    stop_grace: float = 10.0


def token_cookie_value(token: str) -> str:
    """What the token cookie holds: a digest of the token, never the token itself."""
    return hashlib.sha256(b"tasklocks-dashboard:" + token.encode()).hexdigest()


class Guard:
    """ASGI middleware: the ``Host`` check, the token check and the security headers."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.token = token
        self.cookie = None if token is None else token_cookie_value(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # start-up and shutdown: no request to check
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # The dashboard has no websocket: refuse before anything else (a close before the
            # handshake is a 403 to the client), so no check is skipped for one.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            raise RuntimeError(f"the dashboard does not serve ASGI {scope['type']!r} connections")
        headers = Headers(scope=scope)

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        if self.token is None:
            if not is_loopback(_hostname(headers.get("host", ""))):
                # Without a token only this machine may look (the addresses `serve` binds
                # without one); a page reached under another name (DNS rebinding) gets nothing.
                await _plain(400, "400 Bad Request: unknown host\n")(scope, receive, send_secured)
                return
        elif not self._authorised(scope, headers):
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0]
            if scope["method"] == "GET" and given and _same(given, self.token):
                # A link with ?token=...: remember it in a cookie, and drop it from the URL.
                rest = [(k, v) for k, vs in query.items() if k != "token" for v in vs]
                target = scope["path"] + ("?" + urllib.parse.urlencode(rest) if rest else "")
                if not _is_own_path(target):  # (//evil.example/?token=...: not another host)
                    target = "/"
                redirect = RedirectResponse(target, status_code=303)
                redirect.set_cookie(
                    TOKEN_COOKIE, self.cookie or "", httponly=True, samesite="strict", path="/"
                )
                await redirect(scope, receive, send_secured)
                return
            response = _plain(401, "401 Unauthorized\n")
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)

    def _authorised(self, scope: Scope, headers: Headers) -> bool:
        assert self.token is not None and self.cookie is not None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(_utf8(given.strip()), self.token):
            return True
        cookie = Request(scope).cookies.get(TOKEN_COOKIE, "")
        return _same(cookie, self.cookie)


def _hostname(host: str) -> str:
    """The name in a ``Host`` header, without the port: ``[::1]:8765`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0]


def _utf8(header: str) -> str:
    """A header's text as the client wrote it: ASGI servers decode header bytes as latin-1, and
    clients send a token's non-ASCII letters as UTF-8 (as in the link and the cookie)."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain; charset=utf-8")


def _encoded(text: str) -> bytes:
    """``text`` in UTF-8, a lone surrogate as the text ``\\udce9``, as the command line's
    ``printable()`` shows it. Text from the database may hold them: a command's argument that
    was not UTF-8 (``echo $'caf\\xe9'``) reaches Python as ``caf\\udce9``, and the record's JSON
    keeps it so; encoded strictly, it made the whole page a 500."""
    return text.encode("utf-8", "backslashreplace")


def _shown(value: Any) -> Any:
    """``value`` (JSON data) with every string :func:`_encoded` and decoded again."""
    if isinstance(value, str):
        return _encoded(value).decode("utf-8")
    if isinstance(value, dict):
        return {_shown(k): _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


class JSONText(JSONResponse):
    """A JSON reply whose strings are shown as the pages show them (see :func:`_encoded`)."""

    def render(self, content: Any) -> bytes:
        return super().render(_shown(content))


# --- the application ----------------------------------------------------------------------------


Endpoint = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The routes over one :class:`Source`."""

    def __init__(self, settings: Settings, source: Source) -> None:
        self.settings = settings
        self.source = source
        self.secret = secrets.token_bytes(32)  # CSRF tokens die with the server
        # The page header's database: no password, no query string (as error messages show it).
        self.db_label = parse_url(default_url() if settings.url is None else settings.url).display()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            duration=duration, states=STATES, ranges=RANGES, task_limit=TASK_LIMIT
        )
        self.env.filters["clock"] = clock

    # --- rendering -------------------------------------------------------------------------------

    def _csrf(self, request: Request) -> tuple[str, str | None]:
        """The browser's CSRF cookie (a new one if it has none) and the form token bound to it;
        the second value is the cookie to set, if new."""
        cookie = request.cookies.get(CSRF_COOKIE)
        new = None
        if not cookie or len(cookie) > 100:
            cookie = new = secrets.token_urlsafe(24)
        return self._form_token(cookie), new

    def _form_token(self, cookie: str) -> str:
        return hmac.new(self.secret, cookie.encode(), hashlib.sha256).hexdigest()

    def render(
        self,
        request: Request,
        page: str,
        context: Mapping[str, Any],
        *,
        status: int = 200,
        snapshot: Snapshot | None = None,
        live: bool = True,
        reload: bool = False,
    ) -> Response:
        """The page ``page`` (``<page>.html``), or only its live part (``<page>_live.html``) for
        ``?partial=1``. A ``live`` page is polled by ``live.js``; a ``reload`` page is reloaded
        by it once the same URL answers 200 (an error that may pass, such as a 503)."""
        token, new_cookie = self._csrf(request)
        partial = _is_partial(request)
        now = time.time()
        values = {
            "request": request,
            "page": page,
            "csrf": token,
            "snapshot": snapshot,
            "now": now,
            "namespace": self.settings.namespace,
            "db_label": self.db_label,
            "here": _here(request),
            "partial_url": _with_query(request, partial="1"),
            "live": live or reload,
            "reload": reload,
            **context,
        }
        template = f"{page}_live.html" if partial else f"{page}.html"
        body = _encoded(self.env.get_template(template).render(values))
        response = Response(body, status_code=status, media_type="text/html; charset=utf-8")
        response.headers["cache-control"] = "no-cache"
        if new_cookie is not None:
            response.set_cookie(CSRF_COOKIE, new_cookie, httponly=True, samesite="strict", path="/")
        return response

    def error(self, request: Request, status: int, title: str, message: str) -> Response:
        """An error page (or, for ``?partial=1``, its live part)."""
        context = {"status": status, "title": title, "message": message}
        passing = status == 503 and request.method == "GET"
        return self.render(request, "error", context, status=status, live=False, reload=passing)

    # --- pages -----------------------------------------------------------------------------------

    async def tasks(self, request: Request) -> Response:
        """The tasks page: newest first, ``?state=`` filters, ``?more=1`` shows all read."""
        snapshot = await run_in_threadpool(self.source.snapshot)
        wanted = request.query_params.get("state", "")
        if wanted not in ("", "active", *STATES):
            return self.error(
                request,
                400,
                "No such state",
                f"state={quote(wanted)} is not a task state; use one of: active, "
                + ", ".join(STATES),
            )
        now = time.time()
        waiters = waiter_views(snapshot.waiters, now)
        records = [
            r
            for r in snapshot.tasks
            if wanted == ""
            or (wanted == "active" and not r.state.is_final)
            or r.state.value == wanted
        ]
        counts: dict[str, int] = {}
        for r in snapshot.tasks:
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        shown = records[: TASK_LIMIT if request.query_params.get("more") else PAGE_ROWS]
        rows = [
            (task_view(r, snapshot.locks, now, waiters), self.source.can_stop(r)) for r in shown
        ]
        context = {
            "rows": rows,
            "wanted": wanted,
            "counts": counts,
            "total": len(snapshot.tasks),
            "more": len(records) - len(shown),
            "more_url": _with_query(request, more="1"),
        }
        return self.render(request, "tasks", context, snapshot=snapshot)

    async def task(self, request: Request) -> Response:
        """One task's page: record, locks, wait history and log; a 404 page if unknown."""
        task_id: int = request.path_params["task_id"]
        snapshot = await run_in_threadpool(self.source.snapshot)
        try:
            record = await run_in_threadpool(self.source.task, task_id, snapshot)
        except TaskNotFound:
            return self.error(
                request,
                404,
                "No such task",
                f"There is no task {task_id} in namespace {self.settings.namespace}.",
            )
        now = time.time()
        owner = f"task:{task_id}"
        locks = [lock_view(h, now) for h in snapshot.locks if h.holder.owner == owner]
        log_chunk = None
        if not _is_partial(request):  # (the live part has no log)
            log_chunk = await run_in_threadpool(read_log, record, None)
        context = {
            "task": task_view(record, snapshot.locks, now, waiter_views(snapshot.waiters, now)),
            "record": record,
            "args": None if record.args is None else json.dumps(record.args, indent=1),
            "result": None if record.result is None else json.dumps(record.result, indent=1),
            "locks": locks,
            "queue_length": len(snapshot.waiters),
            "can_stop": self.source.can_stop(record),
            "stop_error": self.source.stop_errors.get(task_id),
            "log": log_chunk,
        }
        return self.render(request, "task", context, snapshot=snapshot)

    async def task_log(self, request: Request) -> Response:
        """A task's log from ``?offset=`` (bytes), as JSON ``{text, offset, final, missing}``."""
        task_id: int = request.path_params["task_id"]
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return JSONText({"error": "offset must be a whole number"}, status_code=400)
        try:
            record = await run_in_threadpool(self.source.task, task_id)
        except TaskNotFound:
            return JSONText({"error": f"there is no task {task_id}"}, status_code=404)
        chunk = await run_in_threadpool(read_log, record, max(0, offset))
        final = record.state.is_final and chunk.text == ""
        return JSONText(
            {"text": chunk.text, "offset": chunk.offset, "final": final, "missing": chunk.missing},
            headers={"cache-control": "no-store"},
        )

    async def locks(self, request: Request) -> Response:
        """The locks page: every held lock of the namespace with its holders, and the queue."""
        snapshot = await run_in_threadpool(self.source.snapshot)
        now = time.time()
        waiters = waiter_views(snapshot.waiters, now)
        context = {
            "groups": lock_groups(snapshot.locks, waiters, now),
            "holders": len(snapshot.locks),
            "waiters": waiters,
        }
        return self.render(request, "locks", context, snapshot=snapshot)

    async def timeline(self, request: Request) -> Response:
        """The timeline page over ``?last=``, ``?from=&to=`` or ``?last=fit``."""
        now = time.time()
        fit = request.query_params.get("last") == "fit" and "from" not in request.query_params
        try:
            start, end = (now - 3600, now) if fit else parse_range(request.query_params, now)
        except BadRange as exc:
            return self.error(request, 400, "Bad time range", str(exc))
        snapshot = await run_in_threadpool(self.source.snapshot)
        if fit:  # from the first task of the last day to the end of the last one
            start, end = fit_range(snapshot.tasks, now)
        chart = build_timeline(snapshot.tasks, start, end, now)
        has_from = "from" in request.query_params
        context = {
            "chart": chart,
            "last": request.query_params.get("last") or ("" if has_from else "1h"),
            "from_value": _local_input(start),
            "to_value": _local_input(end),
        }
        return self.render(request, "timeline", context, snapshot=snapshot)

    async def stop(self, request: Request) -> Response:
        """Stop a task (POST from the dashboard's own page only), then go back to ``next``."""
        task_id: int = request.path_params["task_id"]
        refusal = _cross_site(request)
        body = b""
        async for chunk in request.stream():  # a stop form is a few hundred bytes
            body += chunk
            if len(body) > MAX_FORM:
                return _plain(413, "413 Content Too Large\n")
        form = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"))
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = form.get("csrf", [""])[0]
        if refusal is None and not (cookie and given and _same(given, self._form_token(cookie))):
            refusal = "the form did not come from this dashboard (no valid CSRF token)"
        if refusal is not None:
            return self.error(
                request,
                403,
                "Refused",
                f"Nothing was stopped: {refusal}. Reload the dashboard and use its button.",
            )
        try:
            await run_in_threadpool(self.source.request_stop, task_id)
        except TaskNotFound:
            return self.error(
                request,
                404,
                "No such task",
                f"There is no task {task_id} in namespace {self.settings.namespace}.",
            )
        except CannotStop as exc:
            return self.error(request, 409, "Cannot stop it here", str(exc))
        target = form.get("next", [""])[0]
        if not _is_own_path(target):
            target = f"/tasks/{task_id}"
        return RedirectResponse(target, status_code=303)

    async def favicon(self, request: Request) -> Response:
        """The icon, also where browsers look for it unasked."""
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    # --- errors ----------------------------------------------------------------------------------

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's HTTP errors (no route, wrong method) as error pages."""
        assert isinstance(exc, HTTPException)
        titles = {404: "Not found", 405: "Method not allowed"}
        messages = {404: f"There is no page at {request.url.path}."}
        title = titles.get(exc.status_code, "Error")
        message = messages.get(exc.status_code, str(exc.detail))
        response = self.error(request, exc.status_code, title, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    def guarded(self, endpoint: Endpoint, *, as_json: bool = False) -> Endpoint:
        """``endpoint``, answering a database that does not answer with a 503 page, another
        error of tasklocks with a 500 page saying it in one line, and anything unexpected with a
        bare 500; those two also with one line in the server's output. Never a traceback.
        ``as_json``: the errors as ``{"error": ...}``, as the endpoint's own are."""

        def error(request: Request, status: int, title: str, text: str) -> Response:
            if as_json:
                return JSONText({"error": text}, status_code=status)
            return self.error(request, status, title, text)

        async def call(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HTTPException:
                raise
            except StoreUnavailable as exc:  # the database failed under a single read
                text = " ".join(str(exc).split())
                return error(request, 503, "Database unavailable", text)
            except TasklocksError as exc:  # such as a corrupt lock table: it will not pass
                text = " ".join(str(exc).split())
                log.error("tasklocks serve: error on %s: %s", request.url.path, text)
                return error(request, 500, "Error", text)
            except Exception as exc:
                log.error(
                    "tasklocks serve: unexpected error on %s: %s: %s",
                    request.url.path,
                    type(exc).__name__,
                    " ".join(str(exc).split()),
                )
                if as_json:
                    return JSONText({"error": "see the server's output"}, status_code=500)
                return _plain(500, "500 Internal Server Error: see the server's output\n")

        return call


# Query parameters the URLs a page makes do not carry over: ``partial`` is the poll's own, and
# ``token`` has done its work once it is a cookie (or a header) and must not spread into links.
NOT_CARRIED = frozenset({"partial", "token"})


def _here(request: Request) -> str:
    """This page's path and query, without ``partial`` or ``token`` (a safe ``next`` for forms)."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in NOT_CARRIED]
    return request.url.path + ("?" + urllib.parse.urlencode(query) if query else "")


def _with_query(request: Request, **extra: str) -> str:
    """This page's URL with ``extra`` query parameters, without ``token``, and without
    ``partial`` unless given."""
    drop = {*NOT_CARRIED, *extra}
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in drop]
    query.extend(extra.items())
    return request.url.path + "?" + urllib.parse.urlencode(query)


def _is_partial(request: Request) -> bool:
    """Does ``request`` ask for the page's live part only (``live.js``'s poll)?"""
    return request.query_params.get("partial") == "1"


def _is_own_path(target: str) -> bool:
    """Whether ``target`` (a form's ``next``) is a path of this dashboard, safe to redirect to: one
    ``/`` first, no scheme, host, backslash or control character (browsers drop tabs and newlines
    from a URL, so ``/``, a tab and ``/evil.example`` lead to another host)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return False
    parts = urllib.parse.urlsplit(target)
    return target.isprintable() and not parts.scheme and not parts.netloc


def _local_input(epoch: float) -> str:
    """A value for ``<input type="datetime-local">``."""
    return time.strftime("%Y-%m-%dT%H:%M", time.localtime(epoch))


def _cross_site(request: Request) -> str | None:
    """Why a POST looks cross-site, or None: a foreign ``Origin`` or ``Sec-Fetch-Site``."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"the request came from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            return "the request came from another site (Origin does not match)"
    return None


def create_app(settings: Settings, source: Source | None = None) -> Starlette:
    """The dashboard as an ASGI application (wrapped in the :class:`Guard`).

    :param settings: what to show and who may look.
    :param source: where the data comes from (default: a :class:`Source` on ``settings.url``).
    """
    source = source or Source(settings.url, settings.namespace, stop_grace=settings.stop_grace)
    board = Dashboard(settings, source)
    guard = board.guarded
    routes = [
        Route("/", guard(board.tasks), methods=["GET"]),
        Route("/tasks", guard(board.tasks), methods=["GET"]),
        Route("/tasks/{task_id:int}", guard(board.task), methods=["GET"]),
        Route("/tasks/{task_id:int}/log", guard(board.task_log, as_json=True), methods=["GET"]),
        Route("/tasks/{task_id:int}/stop", guard(board.stop), methods=["POST"]),
        Route("/locks", guard(board.locks), methods=["GET"]),
        Route("/timeline", guard(board.timeline), methods=["GET"]),
        Route("/favicon.ico", board.favicon, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: board.http_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.source = source
    app.add_middleware(Guard, token=settings.token)
    return app
