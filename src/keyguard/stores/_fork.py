"""Reset a store's connections in a forked child (gunicorn ``--preload`` forks workers).

Sockets and SQLite handles must not be shared across ``fork()``; each store registers a
reset that runs in the child, through a weak reference so the registration (which cannot
be undone) never keeps a closed store alive.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TypeVar

__all__ = ["reset_after_fork"]

_Store = TypeVar("_Store")


def reset_after_fork(store: _Store, reset: Callable[[_Store], None]) -> None:
    """Call ``reset(store)`` in every child forked later, while ``store`` is alive."""
    ref = weakref.ref(store)

    def reset_in_child() -> None:
        alive = ref()
        if alive is not None:
            reset(alive)

    os.register_at_fork(after_in_child=reset_in_child)
