"""``RedactingFilter``: a logging filter that masks every API key in a log record.

keyguard never logs a key itself, but apps do by accident (an access log line, a request
repr in a traceback, a Sentry breadcrumb). Attach the filter to a handler to mask every
key-shaped string in whatever reaches it::

    handler.addFilter(keyguard.RedactingFilter())

keyguard's own ``keyguard`` logger carries one already.
"""

from __future__ import annotations

import logging

from .keys import redact_keys

__all__ = ["RedactingFilter"]


class RedactingFilter(logging.Filter):
    """Mask keys (see :func:`keyguard.keys.redact_keys`) in a record's message, traceback
    and stack; the record is changed in place and always let through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_keys(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_keys(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_keys(record.stack_info)
        return True
