"""The public API is exactly what ``keyguard.__all__`` lists (as httpx checks its own)."""

from __future__ import annotations
import __future__

import types

import keyguard


def test_all_is_sorted_and_unique() -> None:
    assert keyguard.__all__ == sorted(set(keyguard.__all__))


def test_every_name_in_all_is_importable() -> None:
    for name in keyguard.__all__:
        # getattr is what `from keyguard import name` does, lazy names included.
        value = getattr(keyguard, name)
        assert value.__module__.startswith("keyguard."), name


def test_every_public_name_is_in_all() -> None:
    public = {
        name
        for name, value in vars(keyguard).items()
        if not name.startswith("_")
        # Submodules become attributes once imported, and `annotations` is the __future__
        # flag; neither is API.
        and not isinstance(value, types.ModuleType)
        and value is not __future__.annotations
    }

    # A helper imported at module level is public too: import it under a _private name.
    assert sorted(public - set(keyguard.__all__)) == []
    # Names loaded lazily (through the module's __getattr__) are checked by the test above.
    assert sorted(public) == [name for name in keyguard.__all__ if name in vars(keyguard)]
