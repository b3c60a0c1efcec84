"""Errors raised by vmreplica, each carrying the operator-facing message.

Every error is a :class:`VmrError`. The class fixes two things at the edges only: the exit status
of the CLI (``exit_code``) and the HTTP status of the management API and the replication
listener (``http_status``). Engine code raises; it never exits or picks a status itself.

::

    VmrError (1, 500)                      something failed; the message says what
     ├── InvalidArgument (2, 400)          bad input; nothing was changed
     ├── NotFound (3, 404)                 no such VM, entry, recovery point, host…
     ├── InvalidState (4, 409)             the object is not in a state that allows this
     │    └── ResyncRequired (9, 409)      change tracking was lost; resynchronize
     ├── AccessDenied (5, 403)             the peer or user is not authorized
     ├── ConnectionFailed (6, 502)         a peer could not be reached or TLS failed
     ├── StorageError (7, 507)             a disk or file system failed (full, unwritable)
     ├── IntegrityError (8, 422)           a hash, size or sequence number did not match
     └── Interrupted (10, 503)             shutting down, or the operation was cancelled

Errors cross the management API as ``{"error": {"type": NAME, "message": TEXT}}``; the SDK
raises the same class again on the client side.
"""

from __future__ import annotations


class VmrError(Exception):
    """Base of every vmreplica error: a one-line message meant for the operator."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str) -> None:
        # One line, always: a name or path with a newline in it may end up in a message.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, dict[str, str]]:
        # A private subclass travels as the nearest public class, so the peer can rebuild it.
        return {"error": {"type": self.public_class().__name__, "message": self.message}}

    def public_class(self) -> type[VmrError]:
        """The nearest class of this module: one that takes just a message."""
        return next(c for c in type(self).__mro__ if c.__name__ in _BY_NAME)


class InvalidArgument(VmrError):
    exit_code = 2
    http_status = 400


class NotFound(VmrError):
    exit_code = 3
    http_status = 404


class InvalidState(VmrError):
    exit_code = 4
    http_status = 409


class ResyncRequired(InvalidState):
    exit_code = 9


class AccessDenied(VmrError):
    exit_code = 5
    http_status = 403


class ConnectionFailed(VmrError):
    exit_code = 6
    http_status = 502


class StorageError(VmrError):
    exit_code = 7
    http_status = 507


class IntegrityError(VmrError):
    exit_code = 8
    http_status = 422


class Interrupted(VmrError):
    exit_code = 10
    http_status = 503


_BY_NAME: dict[str, type[VmrError]] = {
    cls.__name__: cls
    for cls in (
        VmrError,
        InvalidArgument,
        NotFound,
        InvalidState,
        ResyncRequired,
        AccessDenied,
        ConnectionFailed,
        StorageError,
        IntegrityError,
        Interrupted,
    )
}


def error_from_json(payload: object, fallback_status: int) -> VmrError:
    """Rebuild the error a peer sent; an unknown shape becomes a plain :class:`VmrError`."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            cls = _BY_NAME.get(str(err.get("type")), VmrError)
            return cls(str(err.get("message", "unknown error")))
    return VmrError(f"unexpected answer from the agent (HTTP {fallback_status})")
