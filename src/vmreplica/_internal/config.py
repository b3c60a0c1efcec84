"""host.toml (one per host agent) and the CLI config (``-c`` names → management URLs).

Both are TOML: read with :mod:`tomllib`, written with ``tomli_w``. Loading validates every field
so that a typo is reported at start-up as one line naming the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from vmreplica._internal.cluster_config import ClusterSettings, parse_cluster
from vmreplica._internal.tls_context import check_dns_name
from vmreplica.errors import InvalidArgument, NotFound, StorageError

DEFAULT_SOCKET = "/run/vmreplica/agent.sock"
DEFAULT_CLI_CONFIG = "~/.config/vmreplica/cli.toml"
DRIVERS = ("qemu", "libvirt")
DEFAULT_LIBVIRT_URI = "qemu:///system"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    # The CA's certificate revocation list: peers' certificates are checked against it on every
    # listener and connection; the agent reloads it on SIGHUP. None: no revocation checks.
    crl: Path | None = None


DEFAULT_KEYTAB = "/etc/krb5.keytab"


@dataclass(frozen=True)
class KerberosKeys:
    """Where this host's Kerberos keys come from: the keytab, and the principal in it that this
    host authenticates as when it sends (as a replica it accepts ``HTTP/`` or ``host/`` FQDN)."""

    keytab: Path
    principal: str


@dataclass(frozen=True)
class PeerCredentials:
    """What this host proves its identity with to a replica server, for either authentication."""

    tls: TlsFiles
    kerberos: KerberosKeys


@dataclass(frozen=True)
class HostConfig:
    name: str
    state_dir: Path
    socket: Path
    mgmt_listen: tuple[str, int]
    tls: TlsFiles
    admins: tuple[str, ...] = ()
    resolve: Mapping[str, str] = field(default_factory=dict)
    accel: str = "tcg"
    # The hypervisor driver: "qemu" (the built-in runtime: QEMU processes of the agent's own)
    # or "libvirt" (VMs are libvirt domains, at libvirt_uri).
    driver: str = "qemu"
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    # TCP ports a replica serves initial copies on (NBD with TLS), for a firewall to allow;
    # None: any free port.
    initial_copy_ports: tuple[int, int] | None = None
    # Test tooling: `vm monitor` may run HMP `qemu-io` (guest-disk writes through QEMU's block
    # layer). Off, as it must be on a real host: only read-only `info` commands run.
    allow_qemu_io: bool = False
    # A plain HTTP port, on a loopback address, that serves only /metrics (for a local
    # Prometheus or node exporter); None: /metrics only on the management listener, with TLS.
    metrics_listen: tuple[str, int] | None = None
    # None: the defaults, /etc/krb5.keytab and host/NAME (see :attr:`kerberos_keys`).
    kerberos: KerberosKeys | None = None
    # None: a host on its own, in no cluster.
    cluster: ClusterSettings | None = None

    @property
    def kerberos_keys(self) -> KerberosKeys:
        return self.kerberos or KerberosKeys(Path(DEFAULT_KEYTAB), f"host/{self.name}")

    @property
    def credentials(self) -> PeerCredentials:
        return PeerCredentials(self.tls, self.kerberos_keys)

    def resolve_address(self, fqdn: str) -> str:
        """The address to dial for a peer: the ``[resolve]`` override, else the name itself."""
        return self.resolve.get(fqdn, fqdn)

    def to_toml(self) -> dict[str, Any]:
        return (
            {
                "name": self.name,
                "state_dir": str(self.state_dir),
                "socket": str(self.socket),
                "mgmt_listen": f"{self.mgmt_listen[0]}:{self.mgmt_listen[1]}",
                "accel": self.accel,
                "admins": list(self.admins),
                "tls": {
                    "ca": str(self.tls.ca),
                    "cert": str(self.tls.cert),
                    "key": str(self.tls.key),
                }
                | ({"crl": str(self.tls.crl)} if self.tls.crl else {}),
                "resolve": dict(self.resolve),
            }
            | (
                {"initial_copy_ports": "{}-{}".format(*self.initial_copy_ports)}
                if self.initial_copy_ports
                else {}
            )
            | ({"allow_qemu_io": True} if self.allow_qemu_io else {})
            | (
                {"driver": self.driver, "libvirt_uri": self.libvirt_uri}
                if self.driver != "qemu"
                else {}
            )
            | (
                {"kerberos": {"keytab": str(k.keytab), "principal": k.principal}}
                if (k := self.kerberos) is not None
                else {}
            )
            | (
                {"metrics_listen": "{}:{}".format(*self.metrics_listen)}
                if self.metrics_listen
                else {}
            )
            | ({"cluster": c.to_toml()} if (c := self.cluster) is not None else {})
        )


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid listen address {value!r}: expected ADDRESS:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # Not an address, so a host name: caught here, not when the agent binds it at start.
        try:
            check_dns_name(host)
        except InvalidArgument:
            raise InvalidArgument(
                f"invalid listen address {value!r}: {host!r} is neither an IP address nor a "
                "host name"
            ) from None
    return host, int(port)


def parse_port_range(value: str) -> tuple[int, int]:
    """``FIRST-LAST`` (or one port) as an inclusive range."""
    first, _, last = value.partition("-")
    last = last or first
    if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) < 65536):
        raise InvalidArgument(
            f"invalid port range {value!r}: expected FIRST-LAST, e.g. 10900-10999"
        )
    return int(first), int(last)


def parse_resolve(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise InvalidArgument(f"invalid --resolve {item!r}: expected FQDN=ADDRESS")
        out[name.lower()] = addr
    return out


def write_toml_atomic(path: Path, data: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            tomli_w.dump(dict(data), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise NotFound(f"{what} not found: {path}") from e
    except OSError as e:
        raise StorageError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{what} {path} is not valid TOML: {e}") from e


def _req_str(data: Mapping[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{path}: missing or invalid '{key}'")
    return value


def load_host_config(path: Path) -> HostConfig:
    data = _read_toml(path, "host config")
    tls = data.get("tls")
    if not isinstance(tls, dict):
        raise InvalidArgument(f"{path}: missing [tls] table")
    resolve = data.get("resolve", {})
    admins = data.get("admins", [])
    if not isinstance(resolve, dict) or not all(isinstance(v, str) for v in resolve.values()):
        raise InvalidArgument(f"{path}: [resolve] must map names to address strings")
    if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
        raise InvalidArgument(f"{path}: 'admins' must be a list of names")
    return HostConfig(
        name=_req_str(data, "name", path).lower(),
        state_dir=Path(_req_str(data, "state_dir", path)),
        socket=Path(data.get("socket", DEFAULT_SOCKET)),
        mgmt_listen=parse_listen(_req_str(data, "mgmt_listen", path)),
        tls=TlsFiles(
            ca=Path(_req_str(tls, "ca", path)),
            cert=Path(_req_str(tls, "cert", path)),
            key=Path(_req_str(tls, "key", path)),
            crl=Path(_req_str(tls, "crl", path)) if "crl" in tls else None,
        ),
        admins=tuple(admins),
        resolve={k.lower(): v for k, v in resolve.items()},
        accel=str(data.get("accel", "tcg")),
        driver=_driver(data.get("driver", "qemu"), path),
        libvirt_uri=str(data.get("libvirt_uri", DEFAULT_LIBVIRT_URI)),
        initial_copy_ports=_port_range(data.get("initial_copy_ports"), path),
        allow_qemu_io=_flag(data, "allow_qemu_io", path),
        metrics_listen=(
            parse_listen(str(data["metrics_listen"])) if data.get("metrics_listen") else None
        ),
        kerberos=_kerberos(data.get("kerberos"), path),
        cluster=parse_cluster(data.get("cluster"), path),
    )


def _driver(value: object, path: Path) -> str:
    if value not in DRIVERS:
        raise InvalidArgument(f"{path}: driver must be one of {', '.join(DRIVERS)}, not {value!r}")
    return str(value)


def _kerberos(value: object, path: Path) -> KerberosKeys | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path}: [kerberos] must be a table with keytab and principal")
    keytab, principal = value.get("keytab", DEFAULT_KEYTAB), value.get("principal")
    if not isinstance(keytab, str) or not isinstance(principal, str) or not principal:
        raise InvalidArgument(f"{path}: [kerberos] needs keytab and principal as strings")
    return KerberosKeys(Path(keytab), principal)


def _flag(data: Mapping[str, Any], key: str, path: Path) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{path}: '{key}' must be true or false")
    return value


def _port_range(value: object, path: Path) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{path}: 'initial_copy_ports' must be a string like \"10900-10999\"")
    try:
        return parse_port_range(value)
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: 'initial_copy_ports': {e.message}") from None


@dataclass(frozen=True)
class RemoteHost:
    """How the CLI reaches one host's management API over HTTPS with a client certificate."""

    name: str
    url: str
    ca: Path
    cert: Path
    key: Path
    # The name the host's certificate must carry, when it is neither in the URL nor the -c name.
    server_name: str | None = None
    # The CA's revocation list: the host's certificate is checked against it, and a refusal of
    # the administrator's own certificate is explained by it.
    crl: Path | None = None


def tls_server_name(host: RemoteHost) -> str:
    """The name the host's certificate is checked against: ``server_name`` when given, else the
    host in the URL, else (the URL holds an IP address, which certificates here never carry)
    the ``-c`` name."""
    if host.server_name:
        return host.server_name
    try:
        url_host = urlsplit(host.url).hostname
    except ValueError:  # e.g. an unclosed "[": the request itself will report the bad URL
        url_host = None
    if not url_host:
        return host.name
    try:
        ipaddress.ip_address(url_host)
    except ValueError:
        return url_host
    return host.name


def cli_config_path() -> Path:
    return Path(os.environ.get("VMREPLICA_CONFIG", DEFAULT_CLI_CONFIG)).expanduser()


def load_remote_host(name: str) -> RemoteHost:
    path = cli_config_path()
    data = _read_toml(path, "CLI config")
    hosts = data.get("hosts", {})
    entry = hosts.get(name) if isinstance(hosts, dict) else None
    if not isinstance(entry, dict):
        raise NotFound(f'unknown computer name {name!r}: add [hosts."{name}"] to {path}')
    return RemoteHost(
        name=name,
        url=_req_str(entry, "url", path).rstrip("/"),
        ca=Path(_req_str(entry, "ca", path)),
        cert=Path(_req_str(entry, "cert", path)),
        key=Path(_req_str(entry, "key", path)),
        server_name=_server_name(entry.get("server_name"), path, name),
        crl=Path(_req_str(entry, "crl", path)) if "crl" in entry else None,
    )


def _server_name(value: object, path: Path, host: str) -> str | None:
    if value is None:
        return None
    where = f'{path}: [hosts."{host}"] server_name'
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string (the host name in its certificate)")
    try:
        return check_dns_name(value)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e.message}") from None
