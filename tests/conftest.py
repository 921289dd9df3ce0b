"""Shared test helpers: services that may be missing skip, unless CI requires them; and
the suite-wide guarantee that keyguard never emits a whole key.

No key leaves keyguard, in any test. Every key issued in this process during the session
is remembered (``KeyFormat.generate`` is wrapped, see ``tests/leaks.py``), and a test fails
if the whole body (32 hex) of one of them appears in:

- a log record from any logger, rendered with its traceback (log records are held to a
  stricter rule still: no key-shaped 32-hex body at all, issued or not);
- the test's captured stdout or stderr (what a server subprocess writes to them included);
- a refusal keyguard builds: the body and headers of every ``Problem``;
- the message of every ``KeyguardError`` constructed, and of every exception that
  keyguard's code raises and a test catches with ``pytest.raises``;
- the ``repr()`` of any keyguard object computed during the test.

What a test does with a key itself is no emission: holding it, asserting on it, sending it
to an app, an app or ``error_responder`` of the test's own that echoes it. The one output
that shows a key by design, the new key that the CLI's ``create`` and ``rotate`` print
once, comes from a subprocess through a pipe the CLI tests read: it never reaches the
captured output, its keys are issued in that process (unknown here), and the CLI tests'
own assertions say exactly what it prints. A test that printed a key itself would fail:
print ``mask_key(key)`` instead.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Generator, Iterator
from typing import NoReturn

import pytest
from hypothesis import settings

from keyguard.keys import redact_keys
from tests.leaks import LeakDetector, RecordKeeper

# Fuzzed properties: a modest run by default, many examples under `make fuzz`; no deadline,
# since a loaded CI machine is slow.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Set by .ci/run: a test that needs PostgreSQL or Redis fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("KEYGUARD_REQUIRE_SERVICES") == "1"


def service_unavailable(reason: str) -> NoReturn:
    """Skip the current test because a server is unreachable, or fail in CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (KEYGUARD_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)


# A key's body: exactly 32 lowercase hex (a 64-hex digest is not one).
_KEY_BODY = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")

LEAKS = LeakDetector()


_PROBES = pytest.MonkeyPatch()


def pytest_configure(config: pytest.Config) -> None:
    """Install the probes of ``tests/leaks.py`` before collection (test modules and
    parameter lists issue keys too) until the end of the run."""
    LEAKS.tap(_PROBES)


def pytest_unconfigure(config: pytest.Config) -> None:
    _PROBES.undo()


@pytest.fixture(autouse=True)
def no_key_is_ever_logged() -> Iterator[None]:
    """Fail any test during which a log record, traceback included, holds a key's body, or
    keyguard emits an issued key in a message, a refusal or a repr."""
    LEAKS.tap_reprs()
    LEAKS.reset()
    keeper = RecordKeeper()
    root = logging.getLogger()
    root.addHandler(keeper)
    try:
        yield
    finally:
        root.removeHandler(keeper)
    leaked = [text for text in keeper.texts if _KEY_BODY.search(text) or LEAKS.holds_key(text)]
    assert leaked == [], f"a log record holds a whole key (masked here): {redact_keys(leaked[0])}"
    found = LEAKS.reset()
    assert found == [], "keyguard emitted a whole key (masked here):\n" + "\n".join(found)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail a test phase whose captured stdout or stderr holds an issued key, and mask
    every key in the captured output the report shows (of a failed test too)."""
    report: pytest.TestReport = yield
    for n, (title, text) in enumerate(report.sections):
        if title.startswith("Captured std") and LEAKS.holds_key(text):
            report.sections[n] = (title, redact_keys(text))  # no key in the test log
            if title.endswith(f" {report.when}") and report.passed:
                report.outcome = "failed"
                report.longrepr = f"{title.lower()} holds a whole key (masked below)"
    return report
