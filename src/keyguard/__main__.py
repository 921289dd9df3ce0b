"""``python -m keyguard``: the same as the ``keyguard`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
