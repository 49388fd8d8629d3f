"""The dashboard: ``tasklocks serve`` shows tasks, progress, locks and a timeline in a browser.

It needs the ``web`` extra (``pip install 'tasklocks[web]'``: Starlette, uvicorn and Jinja2).
This module imports none of them until :func:`serve` runs, so ``import tasklocks`` and the rest
of the command line work without the extra. The dashboard sits on top, like the command line: it
uses only the public API (:class:`~tasklocks.tasks.Tasks`), and nothing below imports it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from typing import TextIO

from tasklocks.errors import EXIT_UNAVAILABLE, EXIT_USAGE, TasklocksError
from tasklocks.names import validate_namespace

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "BadBind",
    "MissingExtra",
    "check_bind",
    "is_loopback",
    "serve",
    "token_from_env",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_NEEDED = ("starlette", "uvicorn", "jinja2")


class MissingExtra(TasklocksError):
    """The web extra is not installed (exit 69, as for a missing database driver)."""

    exit_code = EXIT_UNAVAILABLE


class BadBind(TasklocksError, ValueError):
    """An address the dashboard refuses to serve on as asked (a usage error, exit 2)."""

    exit_code = EXIT_USAGE


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, port: int, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token.

    :raises BadBind: ``host`` is not loopback and there is no token, or the port is invalid.
    """
    if not 0 <= port <= 65535:
        raise BadBind(f"--port {port} is not a port: use 0 to 65535 (0: any free port)")
    if token is not None and not token.strip():
        raise BadBind("the token is empty: give --token TOKEN (or $TASKLOCKS_TOKEN) a value")
    if not is_loopback(host) and token is None:
        raise BadBind(
            f"serving on {host} lets other machines in: add --token TOKEN (or set "
            f"TASKLOCKS_TOKEN), or serve on {DEFAULT_HOST}"
        )


def _require_extra() -> None:
    missing = []
    for name in _NEEDED:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(
            f"the dashboard needs the web extra ({', '.join(missing)} missing): "
            "pip install 'tasklocks[web]'"
        )


def serve(
    url: str | None,
    namespace: str = "default",
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Serve the dashboard until stopped; return the exit status (0).

    uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again: Ctrl-C
    ends in ``KeyboardInterrupt`` (the command line exits 130) and SIGTERM ends the process.

    Prints one line with the address once the socket listens (``--port 0`` picks a free port).

    :param url: the database (None: ``$TASKLOCKS_DB``, else the default file).
    :param namespace: the lock namespace shown.
    :param host: the address to bind (loopback unless a token is given).
    :param token: required on every request when set.
    :raises BadBind: a non-loopback host without a token, or a bad port.
    :raises MissingExtra: Starlette, uvicorn or Jinja2 is not installed.
    :raises BadURL: the database URL is malformed.
    :raises BadLockName: the namespace is not allowed.
    """
    check_bind(host, port, token)
    validate_namespace(namespace)  # (here too: a missing SQLite file is not opened below)
    _require_extra()
    import uvicorn

    from tasklocks import StoreUnavailable, Tasks, default_url
    from tasklocks.web._source import sqlite_file
    from tasklocks.web.app import Settings, create_app

    out = out or sys.stdout
    url = default_url() if url is None else url
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    missing = sqlite_file(url)
    if missing is not None and not missing.exists():  # opening it would create it: not ours to do
        _warn(f"the database file {missing} does not exist")
    else:
        try:  # a malformed URL is a usage error now; an unreachable database is only a banner
            Tasks(url, namespace).close()
        except StoreUnavailable as exc:
            _warn(" ".join(str(exc).split()))
    settings = Settings(url=url, namespace=namespace, token=token)
    app = create_app(settings)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise BadBind(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    print(f"tasklocks dashboard on http://{shown}:{bound}/ (Ctrl-C stops it)", file=out, flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.source.close()
    return 0


def _warn(problem: str) -> None:
    print(
        f"tasklocks: warning: {problem}; serving anyway, the pages say so until that changes",
        file=sys.stderr,
        flush=True,
    )


def token_from_env(given: str | None) -> str | None:
    """``given``, else ``$TASKLOCKS_TOKEN`` (None when neither is set)."""
    return given if given is not None else (os.environ.get("TASKLOCKS_TOKEN") or None)
