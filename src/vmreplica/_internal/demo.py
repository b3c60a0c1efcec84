"""The demo: two hosts on this machine, set up and driven with the commands a user would type.

Run it with ``scripts/demo.sh``. Every step prints the command line, then its output. It leaves
nothing running: agents and VMs are stopped at the end, also on failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmreplica._internal import guest
from vmreplica._internal.localcluster import free_port

BASE = Path(os.environ.get("VMREPLICA_DEMO_DIR", "/tmp/vmr-demo"))
GUEST_CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


class Demo:
    def __init__(self) -> None:
        self.agents: list[subprocess.Popen[bytes]] = []
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
        print(f"$ vmreplica host serve --config {BASE / name / 'host.toml'} &", flush=True)
        env = dict(self.env, VMREPLICA_READY_FILE=str(ready))
        with open(BASE / name / "agent.log", "ab") as log:
            self.agents.append(
                subprocess.Popen(
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
            )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or self.agents[-1].poll() is not None:
                raise SystemExit(f"agent {name} did not start: see {BASE / name / 'agent.log'}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)

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

        replica_port = str(ports["vmhost2"][1])
        self.say("vmhost2 becomes a replica server that accepts vmhost1, in trust group Production")
        self.run(
            "server",
            "set",
            "-c",
            "vmhost2",
            "--enabled",
            "true",
            "--auth",
            "certificate",
            "--certificate-port",
            replica_port,
        )
        self.run(
            "auth",
            "new",
            "-c",
            "vmhost2",
            "--allowed-primary",
            "vmhost1",
            "--storage-location",
            f"{BASE}/vmhost2/replicas",
            "--trust-group",
            "Production",
        )
        self.run("auth", "get", "-c", "vmhost2")
        self.run(
            "server",
            "get",
            "-c",
            "vmhost1",
            "-c",
            "vmhost2",
            "--property",
            "computer_name,replication_enabled,allowed_authentication_type,certificate_authentication_port",
        )
        self.run(
            "replication",
            "test-connection",
            "-c",
            "vmhost1",
            "--replica-server",
            "vmhost2",
            "--replica-port",
            replica_port,
            "--auth",
            "certificate",
        )

        self.say("A real Linux guest on vmhost1, writing checksummed records to an ext4 disk")
        assets = guest.build_guest_assets(GUEST_CACHE)
        guest.make_data_disk(BASE / "contoso2-data.qcow2", 64)
        self.run(
            "vm",
            "new",
            "contoso2",
            "-c",
            "vmhost1",
            "--memory",
            "256M",
            "--disk-path",
            str(BASE / "contoso2-data.qcow2"),
            "--kernel",
            str(assets.kernel),
            "--initrd",
            str(assets.initrd),
            "--append",
            guest.kernel_cmdline(),
        )
        self.run("vm", "start", "contoso2", "-c", "vmhost1")
        time.sleep(8)
        self.run("vm", "list", "-c", "vmhost1", "-c", "vmhost2")
        self.run("vm", "stop", "contoso2", "-c", "vmhost1")
        report = guest.verify_records(BASE / "contoso2-data.qcow2")
        print(f"records on the disk: {report.details} (fsck clean: {report.fsck_clean})")

        self.say("What happened, from vmhost2's event log")
        self.run("event", "list", "-c", "vmhost2", "--property", "time,kind,message")
        self.say("Done: replication and failover of this VM come with the next releases")


def main() -> None:
    demo = Demo()
    try:
        demo.main()
    finally:
        demo.stop_all()


if __name__ == "__main__":
    main()
