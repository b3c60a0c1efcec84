"""A WAN link between two network namespaces, emulated in user space: delay, loss, a rate cap
with a bounded queue, and a link that goes down and up, all changeable while it runs.

Why not ``tc netem``: this machine's kernel has no ``sch_netem`` (``tc qdisc add … netem`` says
"Specified qdisc kind is unknown"; so are fq, cake, etf and plug; tbf and htb exist). So the link
is a TUN device in each namespace (``vmrwan``, point to point) and this process between them,
moving each IP packet from one to the other after the link's delay, unless it drops it. One
process, one thread, an asyncio loop: about 30,000 packets a second here, enough for 100 Mbit/s
of 1500-byte packets.

Run as ``python -m tests.linkemu --a NS --b NS --addr-a IP --addr-b IP --control SOCK``; it
prints ``ready`` once both devices are up. The control socket takes one JSON object per line
and answers one: ``{"cmd": "shape", "rtt": 0.2, "loss": 0.02, "rate": 20e6}`` (rate in bits per
second, 0 unlimited; unnamed fields keep their value), ``{"cmd": "down"}``, ``{"cmd": "up"}``,
``{"cmd": "stats"}`` (bytes and packets delivered and dropped, each way). :class:`tests.wan.Wan`
drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import fcntl
import json
import os
import random
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
DEVICE = "vmrwan"
MTU = 1500


@dataclass
class Shape:
    rtt: float = 0.0  # seconds; each way gets half
    loss: float = 0.0  # probability that a packet is dropped, each way
    rate: float = 0.0  # bits per second, each way; 0: unlimited
    queue: float = 0.25  # seconds of the rate a direction may queue before it drops (tail drop)
    up: bool = True


@dataclass
class Counters:
    bytes: int = 0
    packets: int = 0
    dropped: int = 0
    dropped_bytes: int = 0


@dataclass
class Direction:
    """One way of the link: packets leave ``source`` and arrive at ``sink`` after the delay."""

    name: str
    sink: int
    shape: Shape
    counters: Counters = field(default_factory=Counters)
    rng: random.Random = field(default_factory=random.Random)
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    free_at: float = 0.0  # when the cap lets the next packet start
    timer: asyncio.TimerHandle | None = None

    def offer(self, loop: asyncio.AbstractEventLoop, packet: bytes) -> None:
        now = loop.time()
        s = self.shape
        if not s.up or (s.loss > 0 and self.rng.random() < s.loss):
            self._drop(packet)
            return
        start = max(now, self.free_at)
        if s.rate > 0:
            if (start - now) > s.queue:
                self._drop(packet)
                return
            self.free_at = start + len(packet) * 8 / s.rate
            start = self.free_at
        self.queue.append((start + s.rtt / 2, packet))
        if self.timer is None:
            self.timer = loop.call_at(self.queue[0][0], self.drain, loop)

    def drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, packet = self.queue.popleft()
            try:
                os.write(self.sink, packet)
            except OSError:
                self._drop(packet)  # the device's queue is full: a loss, as on a wire
                continue
            self.counters.bytes += len(packet)
            self.counters.packets += 1
        if self.queue:
            self.timer = loop.call_at(self.queue[0][0], self.drain, loop)

    def _drop(self, packet: bytes) -> None:
        self.counters.dropped += 1
        self.counters.dropped_bytes += len(packet)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _tun(namespace: str, local: str, peer: str) -> int:
    """The TUN device of ``namespace``, up, with ``local`` and a route to ``peer``."""
    _setns(f"/run/netns/{namespace}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    for cmd in (
        ["ip", "addr", "add", local, "peer", peer, "dev", DEVICE],
        ["ip", "link", "set", DEVICE, "mtu", str(MTU), "up"],
        ["ip", "link", "set", "lo", "up"],
    ):
        subprocess.run(cmd, check=True)
    return fd


async def _control(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ways: list[Direction]
) -> None:
    while line := await reader.readline():
        try:
            request = json.loads(line)
            cmd = request.pop("cmd")
            if cmd == "shape":
                for way in ways:
                    for key, value in request.items():
                        setattr(way.shape, key, type(getattr(way.shape, key))(value))
            elif cmd in ("up", "down"):
                for way in ways:
                    way.shape.up = cmd == "up"
            elif cmd != "stats":
                raise ValueError(f"unknown command {cmd!r}")
            answer: dict[str, object] = {
                "ok": True,
                **{w.name: asdict(w.counters) for w in ways},
                "shape": asdict(ways[0].shape),
            }
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            answer = {"ok": False, "error": str(e)}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
    writer.close()


async def _serve(args: argparse.Namespace) -> None:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd_a = _tun(args.a, args.addr_a, args.addr_b)
    fd_b = _tun(args.b, args.addr_b, args.addr_a)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns(home, CLONE_NEWNET)
    os.close(home)
    shape = Shape()
    a_to_b = Direction("a_to_b", fd_b, shape, rng=random.Random(args.seed))
    b_to_a = Direction("b_to_a", fd_a, shape, rng=random.Random(args.seed + 1))
    loop = asyncio.get_running_loop()

    def pump(source: int, way: Direction) -> None:
        for _ in range(64):  # a burst at a time, then let the other side and the timers run
            try:
                packet = os.read(source, MTU + 64)
            except BlockingIOError:
                return
            way.offer(loop, packet)

    loop.add_reader(fd_a, pump, fd_a, a_to_b)
    loop.add_reader(fd_b, pump, fd_b, b_to_a)
    server = await asyncio.start_unix_server(
        lambda r, w: _control(r, w, [a_to_b, b_to_a]), path=args.control
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="network namespace of side A")
    ap.add_argument("--b", required=True, help="network namespace of side B")
    ap.add_argument("--addr-a", required=True)
    ap.add_argument("--addr-b", required=True)
    ap.add_argument("--control", required=True, help="unix socket for shape/up/down/stats")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
