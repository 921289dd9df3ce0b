"""``PerLoop``: one async client or pool per event loop.

asyncio connections belong to the loop that opened them, so a store used from two loops
(a test runner, a thread running its own loop) needs a client for each. This keeps them
apart and closes each on its own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Make an item with ``make()`` for each running loop; close it with ``close(item)``."""

    def __init__(self, make: Callable[[], T], close: Callable[[T], Awaitable[Any]]) -> None:
        self._make = make
        self._close = close
        self._items: dict[asyncio.AbstractEventLoop, T] = {}
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's item, made on first use."""
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is None:
            with self._lock:
                item = self._items.get(loop)
                if item is None:
                    item = self._make()
                    # A loop that has ended took its connections' transports with it.
                    live = {k: v for k, v in self._items.items() if not k.is_closed()}
                    self._items = {**live, loop: item}
        return item

    async def aclose(self) -> None:
        """Close the running loop's item here, and the others as :meth:`close` can."""
        loop = asyncio.get_running_loop()
        with self._lock:
            item = self._items.pop(loop, None)
        if item is not None:
            await self._close(item)
        self.close()

    def close(self) -> None:
        """Close every item on its own loop, as far as sync code can."""
        with self._lock:
            items, self._items = self._items, {}
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, item in items.items():
            if loop.is_closed():
                continue
            if loop is running:
                loop.create_task(_finish(self._close(item)))
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(_finish(self._close(item)), loop)
            elif running is None:
                loop.run_until_complete(self._close(item))
            # else this thread runs another loop: an idle loop cannot be driven from here.


async def _finish(awaitable: Awaitable[Any]) -> None:
    await awaitable
