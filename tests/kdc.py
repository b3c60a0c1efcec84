"""A real MIT Kerberos realm for tests: ``kdb5_util`` makes the database in a directory of its own,
``kadmin.local`` adds the hosts' ``host/`` and ``HTTP/`` principals and writes their keytabs, and
``krb5kdc`` serves it on a loopback port. Processes see it through ``KRB5_CONFIG`` and
``KRB5_KDC_PROFILE`` (:meth:`Realm.env`). :meth:`Realm.stop` always ends the KDC."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from tests.localcluster import free_port

REALM = "VMR.TEST"


@dataclass
class Realm:
    base: Path
    name: str = REALM
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    keytabs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str = REALM, clockskew: int = 300, max_life: str = "1h") -> Realm:
        realm = cls(Path(tempfile.mkdtemp(prefix="vmr-kdc-", dir="/tmp")), name, free_port())
        realm.write_config(clockskew)
        (realm.base / "kdc.conf").write_text(
            "[kdcdefaults]\n"
            f"    kdc_listen = 127.0.0.1:{realm.port}\n"
            f"    kdc_tcp_listen = 127.0.0.1:{realm.port}\n"
            "[realms]\n"
            f"    {name} = {{\n"
            f"        database_name = {realm.base}/principal\n"
            f"        key_stash_file = {realm.base}/stash\n"
            f"        acl_file = {realm.base}/kadm5.acl\n"
            f"        max_life = {max_life}\n"
            "    }\n"
            "[logging]\n"
            f"    kdc = FILE:{realm.base}/kdc.log\n"
        )
        realm.run("kdb5_util", "create", "-s", "-r", name, "-P", "vmr-test-master")
        with open(realm.base / "kdc.err", "wb") as err:
            realm.process = subprocess.Popen(
                ["krb5kdc", "-n", "-r", name], env=realm.env(), stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", realm.port)) == 0:
                    break
            if realm.process.poll() is not None or time.monotonic() > deadline:
                realm.stop()
                raise RuntimeError(f"krb5kdc did not start: {(realm.base / 'kdc.err').read_text()}")
            time.sleep(0.05)
        return realm

    def write_config(self, clockskew: int, path: Path | None = None) -> Path:
        """A krb5.conf for this realm (another one, with its own clock skew, at ``path``)."""
        path = path or self.base / "krb5.conf"
        path.write_text(
            "[libdefaults]\n"
            f"    default_realm = {self.name}\n"
            "    dns_lookup_kdc = false\n"
            "    dns_lookup_realm = false\n"
            "    dns_canonicalize_hostname = false\n"
            "    rdns = false\n"
            "    udp_preference_limit = 1\n"
            f"    clockskew = {clockskew}\n"
            "[realms]\n"
            f"    {self.name} = {{\n"
            f"        kdc = 127.0.0.1:{self.port}\n"
            "    }\n"
        )
        return path

    def env(self, config: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["KRB5_CONFIG"] = str(config or self.base / "krb5.conf")
        env["KRB5_KDC_PROFILE"] = str(self.base / "kdc.conf")
        env["KRB5RCACHEDIR"] = str(self.base)
        return env

    def run(self, *cmd: str) -> str:
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def add_host(self, fqdn: str, services: tuple[str, ...] = ("host", "HTTP")) -> Path:
        """The host's principals, and a keytab holding their keys."""
        keytab = self.base / f"{fqdn}.keytab"
        for service in services:
            principal = f"{service}/{fqdn}@{self.name}"
            self.run("kadmin.local", "-q", f"addprinc -randkey {principal}")
            self.run("kadmin.local", "-q", f"ktadd -k {keytab} {principal}")
        self.keytabs[fqdn] = keytab
        return keytab

    def remove_principal(self, principal: str) -> None:
        self.run("kadmin.local", "-q", f"delprinc -force {principal}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if os.environ.get("VMREPLICA_KEEP_TEST_DIRS") != "1":
            subprocess.run(["rm", "-rf", "--", str(self.base)], check=False)


def use_kerberos(host_toml: Path, keytab: Path, principal: str) -> None:
    """Name the host's keytab and principal in its host.toml."""
    config = tomllib.loads(host_toml.read_text())
    config["kerberos"] = {"keytab": str(keytab), "principal": principal}
    host_toml.write_text(tomli_w.dumps(config))
