"""psycopg connections whose every wait for the server ends after the store's ``timeout``.

psycopg waits for an answer without a deadline, so against a server that accepted the
connection and then stopped answering (a hung host, a silent proxy) every request would
hang for good. ``Connection.wait`` takes a timeout that ``execute`` never passes; these
classes pass the store's (psycopg 3.3.6 added that parameter and its private
``errors._WaitTimeout``, hence the extra's floor), and close a connection that ran out,
since its state is then unknown. The error is an ``OperationalError``, which the store
reports as :class:`~keyguard.StoreError` (a 503 for the middleware). A wait given a deadline
of its own is left to its caller: ``notifies(timeout=)`` ends that way whenever no
notification comes, and the connection is still good.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["bounded_classes"]


@functools.cache
def bounded_classes() -> tuple[type[Any], type[Any]]:
    """The sync and async connection classes; built on first use, as psycopg is optional."""
    import psycopg
    from psycopg import errors

    def expired(conn: Any) -> psycopg.OperationalError:
        conn.pgconn.finish()  # never hand a connection in an unknown state out again
        return psycopg.OperationalError(
            f"the server did not answer within {conn.wait_timeout:g} s"
        )

    class BoundedConnection(psycopg.Connection[Any]):
        #: Seconds any wait for the server may last; set by the store for each connection.
        wait_timeout: float | None = None

        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is not None or len(args) >= 2:
                return super().wait(gen, *args, **kwargs)  # its caller's deadline: notifies()
            kwargs["timeout"] = self.wait_timeout
            try:
                return super().wait(gen, *args, **kwargs)
            except errors._WaitTimeout:
                raise expired(self) from None

    class AsyncBoundedConnection(psycopg.AsyncConnection[Any]):
        #: Seconds any wait for the server may last; set by the store for each connection.
        wait_timeout: float | None = None

        async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is not None or len(args) >= 2:
                return await super().wait(gen, *args, **kwargs)
            kwargs["timeout"] = self.wait_timeout
            try:
                return await super().wait(gen, *args, **kwargs)
            except errors._WaitTimeout:
                raise expired(self) from None

    return BoundedConnection, AsyncBoundedConnection
