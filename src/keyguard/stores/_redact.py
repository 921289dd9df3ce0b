"""``redact_url``: hide URL passwords in messages and reprs.

Its own module so that the stores and ``store_from_url`` (which imports the stores) can
both use it without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["redact_url"]

_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):[^@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    Works on malformed URLs and on driver error messages that quote a URL, where
    ``urlsplit`` would give up.
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)
