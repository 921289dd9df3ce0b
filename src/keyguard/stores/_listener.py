"""A daemon thread that keeps one push-invalidation session alive, reconnecting on failure.

The Redis and PostgreSQL stores each supply a *session*: a function that connects,
subscribes, reports ``None`` once the subscription is live (anything cached before may be
stale), then reports digests until asked to stop. This module owns the thread, the
reconnect back-off and a clean shutdown, so neither store repeats them.

A connection can also die without a word: a firewall that drops it, a paused host, a proxy
that hangs. Then no error ever comes and the session would wait for pushes for good while
``ready`` says it is live. So each session pings its server through a :class:`Heartbeat`
every ``HEARTBEAT_SECONDS`` and raises when a ping goes ``HEARTBEAT_TIMEOUT`` unanswered:
a connection that stops answering is noticed (``ready`` cleared, a reconnect begun) within
``HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT + POLL_SECONDS``, about 10 s.
"""

from __future__ import annotations

# A session's first connect resolves a host name, which needs the "idna" codec. Loaded
# lazily, from this thread in a freshly forked worker (gunicorn --preload), it failed with
# "LookupError: unknown encoding: idna" until the worker's other imports were done, so the
# worker missed pushes for seconds; loading it with this module removes that race.
import encodings.idna  # noqa: F401
import logging
import threading
import time
from collections.abc import Callable

__all__ = [
    "HEARTBEAT_SECONDS",
    "HEARTBEAT_TIMEOUT",
    "POLL_SECONDS",
    "Heartbeat",
    "Listener",
    "Session",
]

logger = logging.getLogger("keyguard")

#: How often a session wakes to check whether it should stop; bounds close() latency.
POLL_SECONDS = 0.1
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
#: Seconds between a session's pings once its server last answered one.
HEARTBEAT_SECONDS = 5.0
#: Seconds a ping may go unanswered before the connection counts as dead. Generous, as
#: a loaded host may be slow to answer, and a false alarm costs a reconnect and a reload.
HEARTBEAT_TIMEOUT = 5.0

#: ``session(stop, emit)``: connect, subscribe, ``emit(None)``, then ``emit(digest)`` per
#: message until ``stop`` is set; raise on connection failure or an unanswered heartbeat.
Session = Callable[[threading.Event, Callable[[str | None], None]], None]


class Heartbeat:
    """Paces a session's pings and says when an unanswered one means the connection is dead.

    The session calls :meth:`answered` for anything it hears from the server (a pong, a
    push), so pings go only over a quiet connection. Its opening request (the
    subscription) counts as the first ping, so a connection that never confirms it is
    given up too. ``HEARTBEAT_SECONDS`` and ``HEARTBEAT_TIMEOUT`` are read when a heartbeat
    is made, so tests may patch them.
    """

    __slots__ = ("_answered", "_clock", "_sent", "interval", "timeout")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = HEARTBEAT_SECONDS
        self.timeout = HEARTBEAT_TIMEOUT
        self._clock = clock
        self._answered = clock()
        self._sent: float | None = self._answered

    def ping_due(self) -> bool:
        """Whether to ping now (the ping then counts as sent).

        :raises TimeoutError: the last ping has gone unanswered for ``timeout`` seconds.
        """
        now = self._clock()
        if self._sent is not None:
            if now - self._sent > self.timeout:
                raise TimeoutError(f"no answer from the server within {self.timeout:g} s")
            return False
        if now - self._answered < self.interval:
            return False
        self._sent = now
        return True

    def answered(self) -> None:
        """The server was heard from: the next ping is due ``interval`` from now."""
        self._answered = self._clock()
        self._sent = None


class Listener:
    """Run ``session`` on a daemon thread until :meth:`close`, reconnecting after errors."""

    def __init__(self, name: str, session: Session, callback: Callable[[str | None], None]):
        self._session = session
        self._callback = callback
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _emit(self, digest: str | None) -> None:
        try:
            self._callback(digest)
        finally:
            if digest is None:
                self.ready.set()

    def _run(self) -> None:
        backoff = _MIN_BACKOFF
        while not self._stop.is_set():
            try:
                self._session(self._stop, self._emit)
                backoff = _MIN_BACKOFF
            except Exception as e:
                # Until the next subscription is live, staleness is bounded by the cache ttl.
                self.ready.clear()
                logger.warning(
                    "keyguard invalidation listener lost its connection (%s: %s);"
                    " retrying in %.2fs",
                    type(e).__name__,
                    e,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def close(self) -> None:
        """Stop the session and wait (about ``POLL_SECONDS``) for its thread to end."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * POLL_SECONDS + 5)
