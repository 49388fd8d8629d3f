"""The dashboard's ASGI application without a server: the test speaks the ASGI interface to it.

Each request is one ``asyncio.run``; the data comes from a :class:`Source` whose snapshot is given
by the test, so no database is needed.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope, Send

from tasklocks.web.app import Guard


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
