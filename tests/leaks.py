"""The suite-wide check that keyguard never emits a whole key (see ``tests/conftest.py``).

``LeakDetector`` remembers the body (32 hex) of every key issued in this process and
records each place a whole one turns up in what keyguard emits. ``tap`` installs the
probes for the session, on a ``pytest.MonkeyPatch`` that undoes them at its end: none
changes what it wraps, each only reads the text on its way out.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import keyguard
from keyguard.exceptions import KeyguardError
from keyguard.keys import KEY_BODY_LENGTH, KeyFormat, redact_keys
from keyguard.problems import Problem

_HEX_RUN = re.compile(f"[0-9a-f]{{{KEY_BODY_LENGTH},}}")
_KEYGUARD_DIR = str(Path(keyguard.__file__).parent)
_TESTS_DIR = str(Path(__file__).parent)


class LeakDetector:
    """Keys issued in this process, and the places a whole one was found since :meth:`reset`."""

    def __init__(self) -> None:
        self.issued: set[str] = set()
        self.found: list[str] = []
        self._tapped: set[type] = set()
        self._patch: pytest.MonkeyPatch | None = None

    def holds_key(self, text: str) -> bool:
        """Whether ``text`` holds the whole body of an issued key, whatever surrounds it.

        Only runs of 32+ hex can, so other text costs one regex scan; a digest (64 hex) or
        a random id is not a key unless a key's body is inside it.
        """
        issued = self.issued
        for run in _HEX_RUN.findall(text):
            for start in range(len(run) - KEY_BODY_LENGTH + 1):
                if run[start : start + KEY_BODY_LENGTH] in issued:
                    return True
        return False

    def check(self, where: str, text: str | bytes) -> None:
        """Record ``where`` (with ``text``, masked) if ``text`` holds an issued key."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        if self.holds_key(text):
            self.found.append(f"{where}: {redact_keys(text)[:300]}")

    def reset(self) -> list[str]:
        """The places found so far, forgotten for the next test."""
        found, self.found = self.found, []
        return found

    # -- the probes ----------------------------------------------------------------------

    def tap(self, patch: pytest.MonkeyPatch) -> None:
        """Install the probes; :meth:`tap_reprs` adds modules imported later."""
        self._patch = patch
        generate = KeyFormat.generate

        @functools.wraps(generate)
        def remembered(fmt: KeyFormat) -> str:
            key = generate(fmt)
            self.issued.add(key[-KEY_BODY_LENGTH:])
            return key

        patch.setattr(KeyFormat, "generate", remembered)

        error_init = KeyguardError.__init__

        @functools.wraps(error_init)
        def checked_error(error: KeyguardError, *args: Any) -> None:
            error_init(error, *args)
            self.check(f"{type(error).__name__} message", str(error))

        patch.setattr(KeyguardError, "__init__", checked_error)

        post_init = Problem.__post_init__

        @functools.wraps(post_init)
        def checked_problem(problem: Problem) -> None:
            post_init(problem)
            self.check(f"{problem.code} response body", problem.body)
            self.check(f"{problem.code} response headers", repr(problem.headers))

        patch.setattr(Problem, "__post_init__", checked_problem)

        fill = pytest.ExceptionInfo.fill_unfilled

        @functools.wraps(fill)
        def checked_raise(
            info: pytest.ExceptionInfo[Any],
            exc_info: tuple[type[BaseException], BaseException, TracebackType],
        ) -> None:
            fill(info, exc_info)
            if raised_by_keyguard(exc_info[2]):
                self.check(f"{exc_info[0].__name__} raised by keyguard", str(exc_info[1]))

        patch.setattr(pytest.ExceptionInfo, "fill_unfilled", checked_raise)
        self.tap_reprs()

    def tap_reprs(self) -> None:
        """Check the ``repr`` of every keyguard class that defines one, in every keyguard
        module imported so far (framework glue is imported by the tests that use it)."""
        patch = self._patch
        if patch is None:
            return
        for name, module in list(sys.modules.items()):
            if name != "keyguard" and not name.startswith("keyguard."):
                continue
            for cls in list(vars(module).values()):
                if (
                    isinstance(cls, type)
                    and cls.__module__ == name
                    and "__repr__" in vars(cls)
                    and cls not in self._tapped
                ):
                    self._tapped.add(cls)
                    patch.setattr(cls, "__repr__", self._checked_repr(vars(cls)["__repr__"]))

    def _checked_repr(self, original: Callable[[Any], str]) -> Callable[[Any], str]:
        @functools.wraps(original)
        def checked(obj: Any) -> str:
            text = original(obj)
            self.check(f"repr of a {type(obj).__name__}", text)
            return text

        return checked


def raised_by_keyguard(tb: TracebackType | None) -> bool:
    """Whether keyguard's code raised the exception: of the frames it passed through in
    keyguard or the tests, the innermost is keyguard's (a test's own exception that merely
    crossed keyguard, from a callback, is the test's)."""
    owner = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(_KEYGUARD_DIR):
            owner = "keyguard"
        elif filename.startswith(_TESTS_DIR):
            owner = "tests"
        tb = tb.tb_next
    return owner == "keyguard"


class RecordKeeper(logging.Handler):
    """Keeps every record logged during a test, rendered as a handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record))
