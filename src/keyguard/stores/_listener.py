"""A daemon thread that keeps one push-invalidation session alive, reconnecting on failure.

The Redis and PostgreSQL stores each supply a *session*: a function that connects,
subscribes, reports ``None`` once the subscription is live (anything cached before may be
stale), then reports digests until asked to stop. This module owns the thread, the
reconnect back-off and a clean shutdown, so neither store repeats them.
"""

from __future__ import annotations

# A session's first connect resolves a host name, which needs the "idna" codec. Loaded
# lazily, from this thread in a freshly forked worker (gunicorn --preload), it failed with
# "LookupError: unknown encoding: idna" until the worker's other imports were done, so the
# worker missed pushes for seconds; loading it with this module removes that race.
import encodings.idna  # noqa: F401
import logging
import threading
from collections.abc import Callable

__all__ = ["POLL_SECONDS", "Listener", "Session"]

logger = logging.getLogger("keyguard")

#: How often a session wakes to check whether it should stop; bounds close() latency.
POLL_SECONDS = 0.1
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0

#: ``session(stop, emit)``: connect, subscribe, ``emit(None)``, then ``emit(digest)`` per
#: message until ``stop`` is set; raise on connection failure.
Session = Callable[[threading.Event, Callable[[str | None], None]], None]


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
