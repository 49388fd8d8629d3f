"""A small TCP proxy for the tests: forwards 127.0.0.1:<port> to a server, and on request cuts
every connection it carries or refuses new ones for a while (a network fault, in the test), or
stops forwarding while keeping every connection open (a server that hangs)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class Proxy:
    """Forwards connections to ``(host, port)``; :meth:`cut` and :meth:`down` make faults."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._frozen = threading.Event()  # set: nothing is forwarded (the kernel still acks)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                _reset(client)  # the server "is not there"
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                if self._frozen.is_set():
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # cut meanwhile (a closed socket's fd is -1)
            return
        finally:
            for sock in (a, b):
                _reset(sock)
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))

    def cut(self) -> int:
        """Cut every connection now (as a failing network would, both ways); how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def down(self, seconds: float) -> None:
        """Cut everything, and refuse new connections for ``seconds``."""
        self._down_until = time.monotonic() + seconds
        self.cut()

    def freeze(self) -> None:
        """Stop forwarding, both ways, and keep every connection open (see :meth:`thaw`)."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def close(self) -> None:
        self._closed = True
        self.server.close()
        self.cut()


def _reset(sock: socket.socket) -> None:
    """Close with a RST, not a FIN: the peer learns at once that the connection is gone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()
