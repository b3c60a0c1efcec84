"""The replica's side of an initial copy over NBD: a qemu-storage-daemon opens the new images
and serves them on TCP with TLS. The client certificate must chain to this host's CA (or the
PSK user name must match), and ``authz-simple`` admits only the identity of the sender the
agent authorized; the export names are random."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence

from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.nbd_copy import EXPORT_PREFIX
from vmreplica._internal.drivers.qemu.qmp import QmpCommandError
from vmreplica._internal.drivers.qemu.tls_creds import TLS_ID, TlsCreds
from vmreplica.errors import VmrError

_AUTHZ_ID = "vmr-authz"


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _candidates(host: str, ports: tuple[int, int] | None) -> list[int]:
    """Ports to try in turn: the configured range, else five free ones the kernel picks."""
    if ports is not None:
        return [p for p in range(ports[0], ports[1] + 1) if _bindable(host, p)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    picked = []
    for _ in range(5):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            picked.append(int(s.getsockname()[1]))
    return picked


async def serve_import(
    target: QmpTarget,
    nodes: Sequence[str],
    creds: TlsCreds,
    identity: str,
    host: str,
    ports: tuple[int, int] | None = None,
) -> tuple[int, tuple[str, ...]]:
    """Export ``nodes`` writable over NBD+TLS on ``host``, to ``identity`` (an X.509 DN, or the
    PSK user name) only.

    Returns the port (from ``ports`` if given) and the export names; the names are random, so
    that knowing a VM is not enough to write into its import.
    """
    tls_object: dict[str, object] = {"qom-type": f"tls-creds-{creds.kind}", "id": TLS_ID,
                                     "dir": str(creds.directory), "endpoint": "server"}  # fmt: skip
    if creds.kind == "x509":
        tls_object["verify-peer"] = True
    if creds.priority:
        tls_object["priority"] = creds.priority
    await target.execute("object-add", tls_object)
    await target.execute(
        "object-add", {"qom-type": "authz-simple", "id": _AUTHZ_ID, "identity": identity}
    )
    listening = None
    for port in _candidates(host, ports):
        address = {"type": "inet", "data": {"host": host, "port": str(port)}}
        try:
            await target.execute(
                "nbd-server-start", {"addr": address, "tls-creds": TLS_ID, "tls-authz": _AUTHZ_ID}
            )
        except QmpCommandError as exc:
            if "in use" not in exc.desc.lower():
                raise VmrError(f"cannot listen for the initial copy on {host}: {exc.desc}") from exc
            continue  # taken meanwhile
        listening = port
        break
    if listening is None:
        where = f"in initial_copy_ports {ports[0]}-{ports[1]}" if ports else "(all taken)"
        raise VmrError(f"no free port {where} on {host} to serve the initial copy")
    names = tuple(f"vmr-{secrets.token_hex(12)}" for _ in nodes)
    for i, (node, name) in enumerate(zip(nodes, names, strict=True)):
        await target.execute(
            "block-export-add",
            {"type": "nbd", "id": f"{EXPORT_PREFIX}{i}", "node-name": node, "name": name,
             "writable": True},
        )  # fmt: skip
    return listening, names
