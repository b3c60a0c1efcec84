"""A private libvirtd per simulated host, for tests.

One root libvirtd cannot hold a primary's domain and its replica with the same UUID, and the
tests simulate two hosts on one machine; nor may tests disturb a libvirtd someone else runs. So
each simulated host gets its own libvirtd in its own mount namespace (``unshare --mount
--propagation private``), with directories of the test bind-mounted over every path libvirt
keeps state in (/run/libvirt, /var/run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt, /etc/libvirt with a config of its own). Clients connect from outside with
``qemu+unix:///system?socket=DIR/run/libvirt/libvirt-sock``; disk paths under the test's
directories are the same inside and outside.

Its qemu.conf runs QEMU as root with no security driver and no cgroups (two libvirtds would
otherwise both create ``machine/qemu-1-NAME`` for their first domain of the same name), and
writes QEMU's output to files (no virtlogd). ``namespaces = []``: QEMU sees the host's /dev, so
the raw block device under a disk's metadata image opens (libvirt 9.0 does not know that data
file, so it would not put it in QEMU's private /dev; drivers/libvirt/raw.py).

The daemon runs in the foreground as a child of the test (``unshare`` execs it, so the pid is
libvirtd's own); :meth:`LibvirtHost.stop` destroys its domains and ends it, and kills any QEMU
it started by the pid files libvirt keeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# libvirtd probes QEMU's capabilities on its first start (8 s here) and caches them; the cache is
# kept between tests (libvirt checks it against QEMU's binary and its own version itself).
CAPS_CACHE = Path("~/.cache/vmreplica/libvirt-qemu-capabilities").expanduser()
BIND = ("run/libvirt", "var/lib/libvirt", "var/cache/libvirt", "var/log/libvirt", "etc/libvirt")

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
remember_owner = 0
namespaces = [ ]
"""
LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{log}"
"""


@dataclass
class LibvirtHost:
    root: Path
    process: subprocess.Popen[bytes] | None = None
    started: list[int] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.root / "run/libvirt/libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def _prepare(self) -> None:
        for rel in BIND:
            (self.root / rel).mkdir(parents=True, exist_ok=True)
            # The mount point: /run is a tmpfs, and /run/libvirt exists only once a libvirtd
            # of the host's own ran since boot.
            Path("/", rel).mkdir(parents=True, exist_ok=True)
        caps = self.root / "var/cache/libvirt/qemu/capabilities"
        if CAPS_CACHE.is_dir() and not caps.exists():
            shutil.copytree(CAPS_CACHE, caps)
        etc = self.root / "etc/libvirt"
        if not (etc / "qemu.conf").exists():
            for name in ("libvirt.conf", "virtlogd.conf", "virtlockd.conf", "qemu-lockd.conf"):
                if Path("/etc/libvirt", name).exists():
                    shutil.copy(Path("/etc/libvirt", name), etc / name)
            (etc / "qemu.conf").write_text(QEMU_CONF)
            (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(log=self.log))
            (etc / "qemu").mkdir(exist_ok=True)
            (etc / "hooks").mkdir(exist_ok=True)

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the daemon; :meth:`wait_ready` waits for it (several start at once)."""
        self._prepare()
        self.socket.unlink(missing_ok=True)
        mounts = " && ".join(
            f"mount --bind {self.root / rel} /{rel}" for rel in BIND
        )  # /var/run is a symlink to /run on Debian
        script = (
            f"{mounts} && exec libvirtd --config {self.root / 'etc/libvirt/libvirtd.conf'} "
            f"--pid-file {self.root / 'libvirtd.pid'}"
        )
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"libvirtd exited: {self.log.read_text()[-2000:]}")
            probe = subprocess.run(
                ["virsh", "-c", self.uri, "version"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, check=check
        )

    def kill(self) -> None:
        """kill -9 of the daemon: its domains run on."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def qemu_pids(self) -> list[int]:
        """The QEMU processes of its domains (run/libvirt/qemu/NAME.pid; driver.pid there is
        libvirtd's own lock)."""
        pids = []
        for pid_file in (self.root / "run/libvirt/qemu").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pid_file.read_text().strip())
                if "qemu" in Path(f"/proc/{pid}/comm").read_text():
                    pids.append(pid)
        return pids

    def _keep_capabilities(self) -> None:
        caps = self.root / "var/cache/libvirt/qemu/capabilities"
        if CAPS_CACHE.exists() or not any(caps.glob("*.xml")):
            return
        staging = CAPS_CACHE.with_name(f"{CAPS_CACHE.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(caps, staging)
        try:
            staging.rename(CAPS_CACHE)  # another test's copy may have won: fine
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._keep_capabilities()
        if self.process is not None and self.process.poll() is None:
            names = self.virsh("list", "--name", check=False).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False)
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in self.qemu_pids():
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def libvirt_host(root: Path) -> Iterator[LibvirtHost]:
    with libvirt_hosts([root]) as hosts:
        yield hosts[0]


@contextlib.contextmanager
def libvirt_hosts(roots: list[Path]) -> Iterator[list[LibvirtHost]]:
    """Several daemons, started at once (each takes seconds to probe the host), always
    stopped."""
    hosts = [LibvirtHost(root) for root in roots]
    try:
        for host in hosts:
            host.spawn()
        for host in hosts:
            host.wait_ready()
        yield hosts
    finally:
        for host in hosts:
            host.stop()
