"""The replica's side of an initial copy over NBD: a qemu-storage-daemon opens the new images
and serves them on TCP with TLS. The client certificate must chain to this host's CA (or the
PSK user name must match), and ``authz-simple`` admits only the identity of the sender the
agent authorized; the export names are random."""

from __future__ import annotations

import errno
import json
import secrets
import socket
from collections.abc import Sequence

from vmreplica._internal.drivers.qemu.blockjobs import QmpTarget
from vmreplica._internal.drivers.qemu.nbd_copy import EXPORT_PREFIX
from vmreplica._internal.drivers.qemu.tls_creds import TLS_ID, TlsCreds
from vmreplica.errors import VmrError

_AUTHZ_ID = "vmr-authz"


def listen(host: str, ports: tuple[int, int] | None) -> socket.socket:
    """A listening socket on ``host``, on the first free port of ``ports`` (None: one the kernel
    picks), with TCP_NODELAY, which the connections it accepts inherit (Linux).

    QEMU 7.2's NBD server does not set TCP_NODELAY (8.0 does): its replies of several small
    writes (the option negotiation, the final flush) then wait for the client's delayed ACK,
    40 ms each time, three times per copy (bench/README.md). So the agent opens the socket and
    the daemon inherits it (:func:`server_args`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in [0] if ports is None else range(ports[0], ports[1] + 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU's own
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise VmrError(f"cannot listen for the initial copy on {host}: {exc}") from exc
        return sock
    where = f"in initial_copy_ports {ports[0]}-{ports[1]}" if ports else "(all taken)"
    raise VmrError(f"no free port {where} on {host} to serve the initial copy")


def server_args(creds: TlsCreds, identity: str, listening: int) -> list[str]:
    """The daemon's command line for an NBD+TLS server on the inherited socket ``listening``
    (:func:`listen`), admitting ``identity`` only (an X.509 DN, or the PSK user name).

    On the command line because qemu-storage-daemon 7.2 has no ``getfd`` to take a socket
    over QMP. JSON for the objects, as a DN holds commas."""
    tls: dict[str, object] = {"qom-type": f"tls-creds-{creds.kind}", "id": TLS_ID,
                              "dir": str(creds.directory), "endpoint": "server"}  # fmt: skip
    if creds.kind == "x509":
        tls["verify-peer"] = True
    tls["priority"] = creds.priority
    authz = {"qom-type": "authz-simple", "id": _AUTHZ_ID, "identity": identity}
    server = f"addr.type=fd,addr.str={listening},tls-creds={TLS_ID},tls-authz={_AUTHZ_ID}"
    return ["--object", json.dumps(tls), "--object", json.dumps(authz), "--nbd-server", server]


async def export_nodes(target: QmpTarget, nodes: Sequence[str]) -> tuple[str, ...]:
    """Export ``nodes`` writable on the daemon's NBD server; their names are random, so that
    knowing a VM is not enough to write into its import."""
    names = tuple(f"vmr-{secrets.token_hex(12)}" for _ in nodes)
    for i, (node, name) in enumerate(zip(nodes, names, strict=True)):
        await target.execute(
            "block-export-add",
            {"type": "nbd", "id": f"{EXPORT_PREFIX}{i}", "node-name": node, "name": name,
             "writable": True},
        )  # fmt: skip
    return names
