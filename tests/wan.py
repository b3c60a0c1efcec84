"""Two sites in network namespaces of their own, joined by an emulated WAN link
(tests/linkemu.py): the fixture for tests of what crosses a poor network.

:meth:`Wan.start` makes the namespaces (``ip netns add``, loopback up) and starts the link
emulator; :meth:`Wan.stop` always ends it and deletes the namespaces. Side A is ``10.231.0.1``,
side B ``10.231.0.2``; the addresses exist only inside the namespaces, so several links may run
at once. A process runs on a side through :meth:`Wan.prefix` (``ip netns exec NS``, which execs:
the pid is the program's own). Unix sockets are paths, not addresses, so the CLI and tests in
the root namespace still reach an agent's local socket on either side.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADDR_A = "10.231.0.1"
ADDR_B = "10.231.0.2"


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Wan:
    base: Path
    ns_a: str
    ns_b: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def control(self) -> Path:
        return self.base / "link.sock"

    @classmethod
    def start(cls, seed: int = 1) -> Wan:
        tag = secrets.token_hex(3)
        wan = cls(
            Path(tempfile.mkdtemp(prefix="vmr-wan-", dir="/tmp")), f"vmrw{tag}a", f"vmrw{tag}b"
        )
        try:
            _ip("netns", "add", wan.ns_a)
            _ip("netns", "add", wan.ns_b)
            log = (wan.base / "linkemu.log").open("wb")
            wan.process = subprocess.Popen(
                [sys.executable, "-m", "tests.linkemu", "--a", wan.ns_a, "--b", wan.ns_b,
                 "--addr-a", ADDR_A, "--addr-b", ADDR_B, "--control", str(wan.control),
                 "--seed", str(seed)],
                stdout=subprocess.PIPE, stderr=log, cwd=Path(__file__).parent.parent,
            )  # fmt: skip
            assert wan.process.stdout is not None
            if wan.process.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the link emulator did not start: {wan.log_tail()}")
        except BaseException:
            wan.stop()
            raise
        return wan

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "linkemu.log").read_text()[-2000:]
        return ""

    def prefix(self, side: str) -> list[str]:
        """What to put before a command to run it on ``side`` ("a" or "b")."""
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]

    def address(self, side: str) -> str:
        return ADDR_A if side == "a" else ADDR_B

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(s.makefile("rb").readline())
        if not answer.get("ok"):
            raise RuntimeError(f"link emulator: {answer.get('error')}")
        return dict(answer)

    def shape(self, *, rtt: float | None = None, loss: float | None = None,
              rate: float | None = None, queue: float | None = None) -> None:  # fmt: skip
        """Delay (round trip, seconds), loss (0..1), rate (bit/s each way; 0 unlimited)."""
        fields = {"rtt": rtt, "loss": loss, "rate": rate, "queue": queue}
        self._call({"cmd": "shape", **{k: v for k, v in fields.items() if v is not None}})

    def down(self) -> None:
        self._call({"cmd": "down"})

    def up(self) -> None:
        self._call({"cmd": "up"})

    def stats(self) -> dict[str, Any]:
        """Bytes and packets delivered and dropped: ``a_to_b`` and ``b_to_a``."""
        return self._call({"cmd": "stats"})

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "del", ns, check=False)
        with contextlib.suppress(OSError):
            for entry in self.base.iterdir():
                entry.unlink()
            self.base.rmdir()


VETH_A = "10.232.0.1"
VETH_B = "10.232.0.2"


@dataclass
class VethLink:
    """Two sites joined by a kernel veth pair, its rate capped by ``tc tbf`` on both ends: for
    rates the user-space emulator cannot reach (1 Gbit/s). No delay or loss: this kernel has no
    ``sch_netem``. Side A is ``10.232.0.1``, side B ``10.232.0.2``."""

    ns_a: str
    ns_b: str

    @property
    def devices(self) -> dict[str, tuple[str, str]]:
        return {"a": (self.ns_a, self.ns_a + "v"), "b": (self.ns_b, self.ns_b + "v")}

    @classmethod
    def start(cls) -> VethLink:
        tag = secrets.token_hex(3)
        link = cls(f"vmrv{tag}a", f"vmrv{tag}b")
        try:
            _ip("netns", "add", link.ns_a)
            _ip("netns", "add", link.ns_b)
            (ns_a, dev_a), (ns_b, dev_b) = link.devices["a"], link.devices["b"]
            _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
            for ns, dev, addr in ((ns_a, dev_a, VETH_A), (ns_b, dev_b, VETH_B)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            link.stop()
            raise
        return link

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]

    def address(self, side: str) -> str:
        return VETH_A if side == "a" else VETH_B

    def shape(self, rate: float) -> None:
        """Cap each direction at ``rate`` bit/s (0: no cap), with a 10 ms bucket."""
        for ns, dev in self.devices.values():
            if not rate:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)  # fmt: skip
                continue
            burst = max(64 << 10, int(rate / 8 / 100))
            done = subprocess.run(
                ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                 f"{int(rate)}bit", "burst", str(burst), "latency", "100ms"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"tc tbf on {dev}: {done.stderr.strip()}")

    def sent(self, side: str = "a") -> int:
        """Bytes the side's end of the link has sent."""
        ns, dev = self.devices[side]
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(done.stdout)

    def stop(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
