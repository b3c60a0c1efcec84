"""Running under systemd: the service's notifications (sd_notify(3)) and its unit file.

The notification protocol is one datagram per message to ``$NOTIFY_SOCKET``; it is written out
here rather than taken from python3-systemd so that the agent needs no C extension to run
outside systemd, where every call is a no-op. The environment variables are taken out of the
process environment at start, so that QEMU and the other children never notify on the agent's
behalf (sd_notify's ``unset_environment``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "vmreplica.service"
TMPFILES_NAME = "vmreplica.conf"
WATCHDOG_SEC = 30


class Notifier:
    def __init__(self) -> None:
        self._address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        self.watchdog: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    @property
    def active(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram; silently nothing outside systemd."""
        if self._address is None:
            return
        address = self._address
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(address)
                s.sendall("\n".join(fields).encode())
            except OSError:
                pass  # systemd gone or restarting: the service's own state decides


@dataclass(frozen=True)
class Hardening:
    """Which of the directives that would hide paths the host uses are left out, and why."""

    protect_home: bool
    private_tmp: bool
    notes: tuple[str, ...]


def hardening_for(paths: list[Path]) -> Hardening:
    """``ProtectHome`` hides /home, /root and /run/user, and ``PrivateTmp`` gives the service
    its own /tmp and /var/tmp: each is kept only if no path of host.toml lies below them."""
    notes = []
    home = [p for p in paths if _below(p, "/home", "/root", "/run/user")]
    tmp = [p for p in paths if _below(p, "/tmp", "/var/tmp")]
    if home:
        notes.append(f"ProtectHome left out: {home[0]} is under /home, /root or /run/user")
    if tmp:
        notes.append(f"PrivateTmp left out: {tmp[0]} is under /tmp or /var/tmp")
    return Hardening(not home, not tmp, tuple(notes))


def _below(path: Path, *roots: str) -> bool:
    return any(path == Path(r) or Path(r) in path.parents for r in roots)


def unit_text(python: Path, config: Path, name: str, hardening: Hardening) -> str:
    optional = []
    if hardening.protect_home:
        optional.append("ProtectHome=yes")
    if hardening.private_tmp:
        optional.append("PrivateTmp=yes")
    return f"""\
# Written by `vmreplica host install-service` for host {name}.
[Unit]
Description=vmreplica host agent ({name}): replication of virtual machines
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m vmreplica host serve --config {config}
# Reloads the CRL named in host.toml (`systemctl reload vmreplica`).
ExecReload=/bin/kill -HUP $MAINPID
# READY=1 comes once recovery is done and the listeners and the socket answer, which can take a
# while after a crash; the watchdog is pinged from the agent's event loop, so a stuck loop
# trips it.
TimeoutStartSec=600
TimeoutStopSec=120
WatchdogSec={WATCHDOG_SEC}
Restart=on-failure
RestartSec=5
# Stopping or restarting the service stops the agent only: the VMs keep running, and the next
# agent reattaches to them.
KillMode=process
UMask=0077
# Hardening that QEMU survives. Not used, and why: MemoryDenyWriteExecute (TCG generates code),
# DevicePolicy (QEMU opens /dev/kvm and, with bridged networks, /dev/net/tun),
# RestrictAddressFamilies (NBD, QMP and the listeners use AF_UNIX, AF_INET and AF_INET6; QEMU
# may use AF_NETLINK).
NoNewPrivileges=yes
ProtectSystem=full
{chr(10).join(optional)}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_CHOWN CAP_KILL CAP_SYS_RESOURCE CAP_IPC_LOCK CAP_NET_ADMIN

[Install]
WantedBy=multi-user.target
"""


def tmpfiles_text(socket_dir: Path) -> str:
    return (
        "# Written by `vmreplica host install-service`: the management socket's directory.\n"
        f"d {socket_dir} 0700 root root -\n"
    )
