"""A TCP proxy that counts network round trips, so tests can say what a store call costs.

A round trip is counted each time a client sends after the server last spoke (or first
speaks on a new connection): several requests written back to back without waiting for a
reply, as a pipeline does, count once. This measures the wire, not the driver's API.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = ["RoundTripProxy", "round_trip_proxy"]


class RoundTripProxy:
    """Forward 127.0.0.1:``port`` to ``target`` and count round trips over all connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._count = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        #: While True, bytes are swallowed instead of forwarded: the server seems hung.
        self.silent = False
        self._start(self._accept_loop)

    @property
    def round_trips(self) -> int:
        with self._lock:
            return self._count

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            # The client speaks first: a round trip starts when it sends after a reply.
            turn = {"client_waiting": False}
            self._start(self._pipe, client, server, turn, True)
            self._start(self._pipe, server, client, turn, False)

    def _pipe(
        self, source: socket.socket, sink: socket.socket, turn: dict[str, bool], upstream: bool
    ) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (source, sink):
                    with suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
            if self.silent:
                continue
            with self._lock:
                if upstream and not turn["client_waiting"]:
                    self._count += 1
                turn["client_waiting"] = upstream
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        # shutdown (not close) is what wakes a thread blocked in accept() on Linux.
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for thread in self._threads:
            thread.join(timeout=5)


@contextmanager
def round_trip_proxy(host: str, port: int) -> Iterator[RoundTripProxy]:
    """A :class:`RoundTripProxy` to ``host:port``, closed on exit."""
    proxy = RoundTripProxy((host, port))
    try:
        yield proxy
    finally:
        proxy.close()
