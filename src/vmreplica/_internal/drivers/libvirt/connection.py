"""One libvirt connection per driver, and libvirt's errors as vmreplica's.

libvirt-python's calls block, so each runs in a worker thread (:func:`asyncio.to_thread`); a
connection is thread-safe. A connection that broke (libvirtd restarted, or killed and started
again) is opened anew on the next call, so the agent outlives a libvirtd restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from vmreplica.errors import ConnectionFailed, NotFound, VmrError

T = TypeVar("T")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; they are raised as exceptions anyway."""


libvirt.registerErrorHandler(_quiet, None)


def message(exc: libvirt.libvirtError) -> str:
    return " ".join(str(exc.get_error_message() or exc).split())


def is_missing(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in (
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
        libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
    )


class Connection:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The open connection (in a worker thread); opened again if it broke."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise ConnectionFailed(
                    f"cannot connect to libvirt at {self.uri}: {message(exc)}"
                ) from exc
            return self._conn

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in a worker thread; libvirt's errors as VmrError."""

        def call() -> T:
            try:
                return fn(self.get(), *args)
            except libvirt.libvirtError as exc:
                if is_missing(exc):
                    raise NotFound(f"{what}: {message(exc)}") from exc
                if exc.get_error_code() in (
                    libvirt.VIR_ERR_SYSTEM_ERROR,
                    libvirt.VIR_ERR_RPC,
                    libvirt.VIR_ERR_NO_CONNECT,
                ):
                    with self._lock:
                        self._conn = None
                raise VmrError(f"{what}: {message(exc)}") from exc

        return await asyncio.to_thread(call)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
