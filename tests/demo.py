"""The demo: two hosts on this machine, set up and driven with the commands a user would type.

Run it with ``scripts/demo.sh``. Every step prints the command line, then its output. It leaves
nothing running: agents and VMs are stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import guest
from tests.localcluster import free_port

BASE = Path(os.environ.get("VMREPLICA_DEMO_DIR", "/tmp/vmr-demo"))
GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


class Demo:
    def __init__(self) -> None:
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(
            os.environ,
            VMREPLICA_CONFIG=str(BASE / "cli.toml"),
            VMREPLICA_SOCKET=str(BASE / "vmhost1" / "agent.sock"),
        )

    def say(self, text: str) -> None:
        print(f"\n\033[1m## {text}\033[0m", flush=True)

    def run(self, *args: str, show: bool = True) -> str:
        print(f"$ vmreplica {shlex.join(args)}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "vmreplica", *args], env=self.env, capture_output=True, text=True
        )
        if show and proc.stdout.strip():
            print(proc.stdout.rstrip(), flush=True)
        if proc.returncode != 0:
            print(proc.stderr.rstrip(), flush=True)
            raise SystemExit(f"demo step failed: vmreplica {shlex.join(args)}")
        return proc.stdout

    def serve(self, name: str) -> None:
        ready = BASE / name / "ready"
        ready.unlink(missing_ok=True)
        print(f"$ vmreplica host serve --config {BASE / name / 'host.toml'} &", flush=True)
        env = dict(self.env, VMREPLICA_READY_FILE=str(ready))
        with open(BASE / name / "agent.log", "ab") as log:
            self.agents[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmreplica",
                    "host",
                    "serve",
                    "--config",
                    str(BASE / name / "host.toml"),
                ],
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or self.agents[name].poll() is not None:
                raise SystemExit(f"agent {name} did not start: see {BASE / name / 'agent.log'}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for agent in self.agents.values():
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        # The VMs outlive their agents by design; the demo leaves nothing running.
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if (
                entry.name.isdigit()
                and cmdline.startswith(b"qemu")
                and str(BASE).encode() in cmdline
            ):
                os.kill(int(entry.name), signal.SIGKILL)

    def main(self) -> None:
        if BASE.exists():
            shutil.rmtree(BASE)
        BASE.mkdir(parents=True)
        os.chdir(BASE)
        ports = {name: (free_port(), free_port()) for name in ("vmhost1", "vmhost2")}

        self.say("A private CA, a certificate per host and one for the administrator")
        self.run("cert", "new-ca", "--out", "ca")
        for name in ("vmhost1", "vmhost2"):
            self.run("cert", "issue", "--ca", "ca", "--name", name, "--out", f"{name}/tls")
        self.run("cert", "issue", "--ca", "ca", "--name", "admin", "--out", "admin")

        self.say("Two host agents on this machine (loopback), each with its own state")
        cli_toml = []
        for name, (mgmt, _) in ports.items():
            self.run(
                "host",
                "init",
                "--name",
                name,
                "--state-dir",
                f"{BASE}/{name}/state",
                "--mgmt-listen",
                f"127.0.0.1:{mgmt}",
                "--socket",
                f"{BASE}/{name}/agent.sock",
                "--ca",
                f"{name}/tls/ca.pem",
                "--cert",
                f"{name}/tls/cert.pem",
                "--key",
                f"{name}/tls/key.pem",
                "--admin",
                "admin",
                "--resolve",
                "vmhost1=127.0.0.1",
                "--resolve",
                "vmhost2=127.0.0.1",
                "--out",
                f"{name}/host.toml",
            )
            cli_toml.append(
                f'[hosts."{name}"]\nurl = "https://127.0.0.1:{mgmt}"\n'
                f'ca = "{BASE}/ca/ca.pem"\ncert = "{BASE}/admin/cert.pem"\nkey = "{BASE}/admin/key.pem"\n'
            )
            self.serve(name)
        (BASE / "cli.toml").write_text("\n".join(cli_toml))
        print(
            f"(the CLI config {BASE / 'cli.toml'} maps -c vmhost1/vmhost2 to their management URLs)"
        )

        port1, port2 = str(ports["vmhost1"][1]), str(ports["vmhost2"][1])
        self.say("Both hosts accept replication from each other (trust group Production)")
        for host, port, peer in (("vmhost1", port1, "vmhost2"), ("vmhost2", port2, "vmhost1")):
            self.cmd(
                f"server set -c {host} --enabled true --auth certificate --certificate-port {port}"
            )
            self.cmd(f"auth new -c {host} --allowed-primary {peer} --storage-location {BASE}/{host}/replicas "
                     "--trust-group Production")  # fmt: skip
        self.cmd("server get -c vmhost1 -c vmhost2 --property "
                 "computer_name,replication_enabled,allowed_authentication_type,certificate_authentication_port")  # fmt: skip
        self.cmd(
            f"replication test-connection -c vmhost2 --replica-server vmhost1 --replica-port {port1} --auth certificate"
        )

        self.say(
            "contoso2: a real Linux guest on vmhost2 that appends checksummed records to ext4 and syncs"
        )
        assets = guest.build_guest_assets(GUEST_CACHE)
        data = BASE / "contoso2-data.qcow2"
        guest.make_data_disk(data, 64)
        self.run("vm", "new", "contoso2", "-c", "vmhost2", "--memory", "256M", "--disk-path", str(data),
                 "--kernel", str(assets.kernel), "--initrd", str(assets.initrd), "--append", guest.kernel_cmdline())  # fmt: skip
        self.cmd("vm start contoso2 -c vmhost2")

        self.say("Replicate it to vmhost1 every 30 s, keeping recovery points")
        self.cmd(f"replication enable contoso2 -c vmhost2 --replica-server vmhost1 --replica-port {port1} "
                 "--auth certificate --frequency 30 --recovery-history 4 --recovery-point-interval 20")  # fmt: skip
        self.cmd("replication get -c vmhost2 -c vmhost1")
        self.cmd("replication start-initial contoso2 -c vmhost2 --wait", capture=False)
        print("(waiting for two scheduled cycles, about a minute)", flush=True)
        time.sleep(65)
        self.cmd("replication measure contoso2 -c vmhost2 -o list")
        self.cmd("recovery-point list contoso2 -c vmhost1")

        self.say("Test failover on vmhost1: a separate VM on its own overlay; replication goes on")
        self.cmd("failover start contoso2 -c vmhost1 --as-test")
        self.cmd("vm list -c vmhost1")
        test_disk = self.replica_storage("vmhost1") / "test" / "disk0.qcow2"
        report = guest.verify_records(test_disk)
        print(
            f"the test VM's disk: {report.details}; fsck clean after journal replay: {report.fsck_clean}"
        )
        self.cmd("failover stop contoso2 -c vmhost1")

        self.say(
            "Disaster: vmhost2 loses power (the VM is cut off, then its agent); unplanned failover"
        )
        self.cmd("vm stop contoso2 -c vmhost2 --force")
        lost = guest.verify_records(data)
        self.stop_agent("vmhost2")
        print(
            f"(vmhost2's disk holds {lost.count} records; those written after the last cycle never left it)"
        )
        self.cmd("failover start contoso2 -c vmhost1")
        overlay = self.replica_storage("vmhost1") / "failover" / "disk0.qcow2"
        report = guest.verify_records(overlay)
        print(f"the failed-over disk: {report.details}; fsck clean after journal replay: {report.fsck_clean}; "
              f"records form an unbroken prefix: {not report.errors}")  # fmt: skip
        self.cmd("replication get contoso2 -c vmhost1")

        self.say("vmhost2 is back: reverse replication (delta failback), run contoso2 on vmhost1")
        self.serve("vmhost2")
        self.cmd("replication set contoso2 -c vmhost1 --reverse")
        self.cmd("vm start contoso2 -c vmhost1")
        time.sleep(10)
        self.cmd("replication sync contoso2 -c vmhost1")
        self.cmd("replication get contoso2 -c vmhost1 -c vmhost2")

        self.say("Planned failover back to vmhost2, with no data loss, and reverse again")
        self.cmd("vm stop contoso2 -c vmhost1")
        before = guest.verify_records(overlay)
        print(f"records on vmhost1 when it stopped: {before.count}")
        self.cmd("failover start contoso2 -c vmhost1 --prepare")
        self.cmd("failover start contoso2 -c vmhost2")
        self.cmd("replication set contoso2 -c vmhost2 --reverse")
        back = self.vm_disk("vmhost2")
        arrived = guest.verify_records(back)
        print(f"records on vmhost2 after failing back: {arrived.count} "
              f"(none lost: {arrived.count == before.count and not arrived.errors})")  # fmt: skip
        self.cmd("vm start contoso2 -c vmhost2")
        time.sleep(10)
        self.cmd("vm stop contoso2 -c vmhost2")
        after = guest.verify_records(back)
        print(f"records on vmhost2 now: {after.count} (the guest went on from {arrived.count}: "
              f"{after.count > arrived.count and not after.errors}); fsck clean: {after.fsck_clean}")  # fmt: skip
        self.cmd("replication sync contoso2 -c vmhost2")
        self.cmd("replication get contoso2 -c vmhost1 -c vmhost2")
        self.cmd("replication measure contoso2 -c vmhost2 -o list --property "
                 "vm_name,state,health,health_details,last_replication_size,successful_replication_count")  # fmt: skip

        self.say("What happened, from vmhost2's event log")
        self.cmd("event list -c vmhost2 --property time,kind,message")
        self.say("Done")

    def cmd(self, line: str, capture: bool = True) -> str:
        args = shlex.split(line)
        if capture:
            return self.run(*args)
        print(f"$ vmreplica {line}", flush=True)
        if subprocess.run([sys.executable, "-m", "vmreplica", *args], env=self.env).returncode != 0:
            raise SystemExit(f"demo step failed: vmreplica {line}")
        return ""

    def vm_disk(self, host: str) -> Path:
        out = self.run("vm", "get", "contoso2", "-c", host, "-o", "json", show=False)
        return Path(json.loads(out)[0]["disks"][0])

    def replica_storage(self, host: str) -> Path:
        return BASE / host / "replicas" / "contoso2"

    def stop_agent(self, name: str) -> None:
        print(f"$ kill {name}'s agent", flush=True)
        agent = self.agents.pop(name)
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)


def main() -> None:
    demo = Demo()
    try:
        demo.main()
    finally:
        demo.stop_all()


if __name__ == "__main__":
    main()
