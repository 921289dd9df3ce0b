"""The ``keyguard`` command: manage keys from a terminal or a script, and scan for leaks.

Exit codes: 0 success, 1 "not found / invalid / live key found", 2 usage or store errors.
Errors are one line on stderr. A key is printed in full only by ``create`` and ``rotate``.

The package holds the parser (``_parser``), the session every command runs in
(``_session``), the key commands (``_commands``), the ``scan`` command (``_scan``, around
the public :mod:`keyguard.scan` library), the ``usage`` command (``_usage``), the ``events``
command (``_events``) and what they print (``_output``).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from ..exceptions import KeyguardError
from ._output import print_error, redact
from ._parser import build_parser
from ._session import EXIT_INVALID, EXIT_USAGE, CLIError, Session

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``keyguard`` command line and return its exit code."""
    session: Session | None = None
    try:
        args = build_parser().parse_args(argv)
        session = Session(args)
        code: int = args.handler(session)
        sys.stdout.flush()
        return code
    except CLIError as e:
        print_error(str(e))
        return e.code
    except KeyguardError as e:  # StoreError and friends: the store cannot be used
        print_error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; point stdout at devnull so exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INVALID
    except Exception:  # a bug: keep the traceback for the report, but never a key in it
        sys.stderr.write(redact(traceback.format_exc()))
        return EXIT_INVALID
    finally:
        if session is not None:
            session.close()
