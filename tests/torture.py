"""The seeded crash-torture loop of the reliability issue: a real Linux guest (tests/guest.py)
writes checksummed records on a primary (vmhost2) replicating to a replica (vmhost1), while
kill -9 hits, at random moments of random phases, the primary agent, the replica agent, a
qemu-img or qemu-storage-daemon child of either agent, or the VM's QEMU.

Every choice comes from ``random.Random(seed)``: each round picks a phase, a victim and a delay
into the phase. A ``child`` victim is a helper an agent runs: its kind (qemu-storage-daemon or
qemu-img) is drawn from a second generator of the same seed (so the rounds' draws stay those of
the seed), and the harness watches, from the delay on while the phase runs, for a process of
that kind and kills the oldest one; if the phase runs none, the round found nothing to kill
and another round is drawn. Each kill records the kind it hit and the helper kinds present.
The phases, each driven through the CLI as an operator would:

- ``cycle``: ``replication sync``; with ``--recovery-point-interval 1`` and
  ``--recovery-history 2`` each cycle also freezes a recovery point on the replica and prunes
  the oldest, so a kill there lands in freezing and pruning as often as in cut, send and apply;
- ``test-failover``: ``failover start --as-test`` on a random point, then ``failover stop``;
- ``failover``: an unplanned failover to a random point (``--force``, the primary still runs),
  then ``failover stop`` (cancel);
- ``resync``: the VM's QEMU is killed first (tracking lost), the VM restarted, and
  ``replication resume --resynchronize`` starts the resynchronization the kill then hits (unless
  the automatic one started first);
- ``planned``: a planned failover to vmhost1, reverse, the guest writing there, then fail-back
  and reverse again (tests/torture_planned.py);
- ``initial``: replication removed on both sides with the replica's storage, enabled again,
  and the kill lands in ``start-initial --wait``: the NBD copy into the replica's
  qemu-storage-daemon (tests/torture_initial.py).

After each kill the harness does what a service manager and an administrator would: it starts
the killed agent again, starts the VM again if its QEMU died, ends a failover or test
failover the kill left behind, and finishes a planned round trip it interrupted. Then it waits, up to ``recovery_timeout``, for both sides to be
Replicating, not quarantined, and a ``replication sync`` to succeed (a lost tracking is mended
by the VM's automatic resynchronization, whose window spans the day). A recovery that does not
come is recorded as a failure with the agents' last log lines, and the loop goes on. Then the
oldest recovery point not yet opened is opened through a test failover and checked as at the
end (:func:`tests.torture_check.check_point`): with ``--recovery-history 2`` points are pruned
within a round or two, and opening each one made would double the run's length, so each round
opens one, and the results count the points made and opened.

At the end (:mod:`tests.torture_check`): the guest is stopped cleanly, a last sync made, and
every recovery point on the replica is opened through a test failover and checked: ext4 clean
(``e2fsck -fn`` after journal replay) and the records an unbroken, valid prefix; the latest
holds every record the primary's disk holds, and equals it (``qemu-img compare``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests import guest, torture_initial, torture_planned
from tests.integration.replication_env import PRIMARY, REPLICA, Pair, wait_for
from tests.integration.test_failover import two_way
from tests.localcluster import Cluster

VM = "app"
PHASES = ("cycle", "test-failover", "failover", "resync", "planned", "initial")
VICTIMS = ("primary-agent", "replica-agent", "child", "vm-qemu")
# The kinds a kill records: a child victim is one of the two helper kinds.
KINDS = ("primary-agent", "replica-agent", "qemu-storage-daemon", "qemu-img", "vm-qemu")
# How long into each phase a kill may land, in seconds: about the phase's length here (TCG).
# The initial copy of the guest's 64 MiB disk (its allocated part) is over within a second or
# two; a child victim is watched for from the delay on, so a short span still finds the copy.
SPAN = {"cycle": 4.0, "test-failover": 2.0, "failover": 2.0, "resync": 3.0, "planned": 30.0,
        "initial": 1.0}  # fmt: skip
# /proc/PID/stat's comm is the name cut to 15 bytes: "qemu-storage-da". The earlier key here,
# b"qemu-storage-d" (14), matched no process, and no storage daemon was ever killed.
CHILDREN = {b"qemu-img": "qemu-img", b"qemu-storage-daemon"[:15]: "qemu-storage-daemon"}
GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


@dataclass
class Kill:
    round: int
    phase: str
    victim: str
    delay: float
    kind: str = ""  # one of KINDS: what was killed
    load1: float = 0.0  # the machine's 1-minute load average at the kill: it is shared
    wanted: str = ""  # a child victim: the kind drawn for it
    kinds_present: list[str] = field(default_factory=list)  # child kinds seen at a child kill
    at: str = ""  # when the kill landed (UTC)
    target: str = ""  # what was killed: "vmhost2 agent", "qemu-img (vmhost1)", ...
    during: bool = False  # the phase's command was still running when the kill landed
    outcome: str = ""  # recovered | timeout | no-target
    recovery_s: float = 0.0
    actions: list[str] = field(default_factory=list)  # what the operator side did
    detail: str = ""


def helpers_of(parents: dict[int, str]) -> list[tuple[int, str, str]]:
    """(pid, kind, parent's name) of every qemu-img and qemu-storage-daemon whose parent is one
    of ``parents`` (pid to name), oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid in parents and comm in CHILDREN:
            found.append((int(entry.name), CHILDREN[comm], parents[ppid]))
    return sorted(found)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Torture:
    def __init__(self, cluster: Cluster, seed: int, *, recovery_timeout: float = 300.0,
                 phases: tuple[str, ...] = PHASES, log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.cluster = cluster
        self.phases = phases
        self.rng = random.Random(seed)
        # The child kind: drawn only in child rounds, so from a stream of its own.
        self.child_rng = random.Random(f"{seed}-child")
        self.point_checks: list[dict[str, Any]] = []
        self.points_made: set[str] = set()  # "id@creation_time": ids start over after "initial"
        self.checked: set[str] = set()
        self.seed = seed
        self.recovery_timeout = recovery_timeout
        self.log = log
        self.kills: list[Kill] = []
        self.data = cluster.base / "app-data.qcow2"
        self.pair: Pair | None = None

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        self.cluster.start_all()
        self.pair = two_way(self.cluster)  # vmhost2 accepts vmhost1 too: for the reverse
        assets = guest.build_guest_assets(GUEST_CACHE)
        guest.make_data_disk(self.data, 64)
        self.cli("vm", "new", VM, "--disk-path", str(self.data), "--kernel", str(assets.kernel),
                 "--initrd", str(assets.initrd), "--append",
                 guest.kernel_cmdline(extra="vmr.progress=20"))  # fmt: skip
        self.cli("vm", "start", VM)
        wait_for(lambda: "vmr: records:" in self.serial(), 120, "the guest's first records")
        self.cli("replication", "enable", VM, "--replica-server", REPLICA, "--replica-port",
                 str(self.pair.port), "--auth", "certificate", "--frequency", "30",
                 "--recovery-history", "2", "--recovery-point-interval", "1",
                 "--auto-resynchronize", "true", "--auto-resynchronize-start", "00:00",
                 "--auto-resynchronize-end", "23:59")  # fmt: skip
        self.cli("replication", "start-initial", VM, "--wait", timeout=600)
        for _ in range(3):  # a few points to fail over to from the first round on
            time.sleep(1.1)
            self.cli("replication", "sync", VM)

    # -- helpers -----------------------------------------------------------------------------

    def cli(self, *args: str, host: str = PRIMARY, check: bool = True,
            timeout: float = 180.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "vmreplica", *args], capture_output=True, text=True,
            env=self.cluster.env(host), timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"vmreplica {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def popen(self, *args: str, host: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "vmreplica", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=self.cluster.env(host),
        )  # fmt: skip

    def json(self, *args: str, host: str = PRIMARY) -> Any:
        return json.loads(self.cli(*args, "-o", "json", host=host, timeout=60).stdout)

    def serial(self) -> str:
        run = self.cluster.hosts[PRIMARY].state_dir / "run"
        logs = sorted(run.glob("*/serial.log")) if run.exists() else []
        return "".join(p.read_text(errors="replace") for p in logs)

    def state(self, host: str) -> dict[str, Any]:
        rows = self.json("replication", "get", VM, host=host)
        return dict(rows[0])

    def points(self) -> list[str]:
        return [str(p["id"]) for p in self.json("recovery-point", "list", VM, host=REPLICA)]

    def vm_pids(self) -> list[int]:
        """The VM's QEMU, on whichever host runs it (never a test VM's)."""
        out = []
        for pid in self.cluster.qemu_pids():
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"qemu-system" in args[0] and f"guest={VM}".encode() in args:
                    out.append(pid)
        return out

    def children(self) -> list[tuple[int, str, str]]:
        """(pid, kind, agent) of qemu-img and qemu-storage-daemon processes an agent started."""
        agents = {h.process.pid: name for name, h in self.cluster.hosts.items() if h.process}
        return helpers_of(agents)

    def _log_size(self, name: str) -> int:
        log = self.cluster.hosts[name].log
        return log.stat().st_size if log.exists() else 0

    def _log_since(self, name: str, offset: int) -> str:
        with self.cluster.hosts[name].log.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for name, host in self.cluster.hosts.items():
            text = host.log.read_text(errors="replace").splitlines() if host.log.exists() else []
            out.append(f"[{name}] " + " | ".join(text[-lines:]))
        return "\n".join(out)

    # -- one round ---------------------------------------------------------------------------

    def round(self, number: int) -> Kill:
        phase = self.rng.choice(self.phases)
        victim = self.rng.choice(VICTIMS)
        delay = round(self.rng.uniform(0.0, SPAN[phase]), 2)
        point_pick = self.rng.random()
        kill = Kill(number, phase, victim, delay)
        self.log(f"{_now()} round {number}: {phase}, kill {victim} after {delay} s")
        mark = self._log_size(PRIMARY)
        try:
            op = self._begin(phase, point_pick, kill)
        except Exception as e:  # the kill still lands, and recovery is still awaited
            op = None
            kill.actions.append(f"the phase could not begin: {e}")

        def running() -> bool:
            if phase == "resync":  # its command only starts it; it ends when the log says so
                return "resync of app finished" not in self._log_since(PRIMARY, mark)
            return op is not None and op.poll() is None

        time.sleep(delay)
        killed = self._kill(victim, kill, running)
        output = ""
        if op is not None:
            try:
                output, _ = op.communicate(timeout=self.recovery_timeout)
            except subprocess.TimeoutExpired:
                op.kill()
                output, _ = op.communicate()
                kill.actions.append("the phase's command hung: killed")
        if not killed:
            kill.outcome = "no-target"
            kill.detail = (f"no {kill.wanted or victim} to kill while the phase ran (children seen: "
                           f"{', '.join(kill.kinds_present) or 'none'}); phase said: {output[-200:]}")  # fmt: skip
        begun = time.monotonic()
        try:
            self._operator(kill, phase)
            if self._recover(phase, kill):
                kill.outcome = kill.outcome or "recovered"
            else:
                kill.outcome = "timeout"
                kill.detail = (kill.detail + "\n" + self.log_tails()).strip()
        except Exception as e:  # recorded, and the loop goes on
            kill.outcome = "timeout"
            kill.detail = f"{e}\n{self.log_tails()}"
        kill.recovery_s = round(time.monotonic() - begun, 1)
        self.log(f"    {kill.target or '-'}: {kill.outcome} in {kill.recovery_s} s "
                 f"({'; '.join(kill.actions)})")  # fmt: skip
        self.kills.append(kill)
        return kill

    def _begin(self, phase: str, pick: float, kill: Kill) -> subprocess.Popen[str] | None:
        if phase == "cycle":
            return self.popen("replication", "sync", VM, host=PRIMARY)
        if phase == "planned":
            return torture_planned.begin(self)
        if phase == "initial":
            return torture_initial.begin(self, kill)
        if phase == "resync":
            self._kill_vm(self.vm_pids())
            wait_for(lambda: self.state(PRIMARY)["state"] == "WaitingForStartResynchronize"
                     or self.json("vm", "get", VM)[0]["state"] == "Off", 60, "the VM off")  # fmt: skip
            self._start_vm(kill)
            # The automatic resynchronization may have started (or even finished) meanwhile.
            if self.state(PRIMARY)["state"] != "WaitingForStartResynchronize":
                kill.actions.append("resync started automatically")
                return None
            return self.popen("replication", "resume", VM, "--resynchronize", host=PRIMARY)
        points = self.points()
        point = points[min(int(pick * len(points)), len(points) - 1)]
        kill.actions.append(f"point {point}")
        if phase == "test-failover":
            script = ["failover start {vm} --as-test --recovery-point {p}", "failover stop {vm}"]
        else:
            script = ["failover start {vm} --recovery-point {p} --force", "failover stop {vm}"]
        return self._sequence(script, point)

    def _sequence(self, script: list[str], point: str) -> subprocess.Popen[str]:
        """The phase's commands one after the other, in one process the kill can overlap."""
        env = self.cluster.env(REPLICA)
        cmds = [
            [sys.executable, "-m", "vmreplica", *c.format(vm=VM, p=point).split()] for c in script
        ]
        body = " && ".join(" ".join(f"'{a}'" for a in c) for c in cmds)
        return subprocess.Popen(["sh", "-c", body], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip

    def _kill(self, victim: str, kill: Kill, running: Callable[[], bool]) -> bool:
        kill.load1 = round(os.getloadavg()[0], 2)
        kill.during = running()
        kill.at = _now()
        if victim in ("primary-agent", "replica-agent"):
            name = PRIMARY if victim == "primary-agent" else REPLICA
            self.cluster.kill(name)
            kill.target, kill.kind = f"{name} agent", victim
            return True
        if victim == "vm-qemu":
            pids = self.vm_pids()
            self._kill_vm(pids)
            kill.target, kill.kind = ("VM's QEMU", victim) if pids else ("", "")
            return bool(pids)
        # A child lives only while a step runs: watch for one of the drawn kind until the phase
        # ends. Killing the first child seen hit only qemu-img: a phase's first helper is a
        # short qemu-img (info, create), and a storage daemon starts later and lives briefly.
        kill.wanted = self.child_rng.choice(("qemu-storage-daemon", "qemu-img"))
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kill.during = running()
            kill.at = _now()
            found = self.children()
            seen |= {k for _, k, _ in found}
            if mine := [c for c in found if c[1] == kill.wanted]:
                kill.kinds_present = sorted({k for _, k, _ in found})
                pid, kind, agent = mine[0]  # the oldest of the kind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kill.target, kill.kind = f"{kind} ({agent})", kind
                    return True
            if not kill.during:
                break
            time.sleep(0.01)
        kill.kinds_present = sorted(seen)  # what the phase ran instead, if anything
        return False

    def _kill_vm(self, pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # Until it is gone: one still exiting would pass for a VM that runs.
        wait_for(lambda: not set(pids) & set(self.vm_pids()), 30, "the VM's QEMU gone")

    # -- recovery ----------------------------------------------------------------------------

    def _start_vm(self, kill: Kill) -> None:
        wait_for(lambda: self.json("vm", "get", VM)[0]["state"] == "Off", 60, "the VM seen off")
        self.cli("vm", "start", VM)
        kill.actions.append("VM started again")

    def _operator(self, kill: Kill, phase: str) -> None:
        """What the service manager and the administrator do after the kill."""
        for name, host in self.cluster.hosts.items():
            if host.process is None:
                self.cluster.start(name, timeout=120)
                kill.actions.append(f"{name} agent started again")
        if phase != "planned" and not self.vm_pids():  # in a planned one, home() decides where
            self._start_vm(kill)

    def _end_failovers(self, kill: Kill) -> None:
        replica = self.state(REPLICA)
        tests = [v for v in self.json("vm", "list", host=REPLICA) if v["name"].endswith(" - Test")]
        if replica["state"] == "FailedOverWaitingCompletion" or tests:
            done = self.cli("failover", "stop", VM, host=REPLICA, check=False)
            torture_planned.act(kill, f"failover stop ({done.returncode})")

    def _recover(self, phase: str, kill: Kill) -> bool:
        deadline = time.monotonic() + self.recovery_timeout
        if phase == "planned" and not torture_planned.home(self, kill, deadline):
            return False
        if phase == "initial" and not torture_initial.finish(self, kill, deadline):
            return False
        while time.monotonic() < deadline:
            try:
                self._end_failovers(kill)
                primary, replica = self.state(PRIMARY), self.state(REPLICA)
                sides = (primary["mode"], primary["state"], replica["state"])
                quarantined = replica.get("quarantine") or primary.get("quarantine")
                if sides == ("Primary", "Replicating", "Replicating") and not quarantined:
                    synced = self.cli("replication", "sync", VM, check=False, timeout=150)
                    if synced.returncode == 0:
                        return True
                    kill.detail = f"sync: {synced.stderr.strip()[-300:]}"
                else:
                    kill.detail = f"states {primary['state']} / {replica['state']}"
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                kill.detail = str(e)[-300:]
            time.sleep(2)
        return False

    def records_seen(self) -> int:
        found = re.findall(r"vmr: records: (\d+)", self.serial())
        return max(map(int, found), default=0)
