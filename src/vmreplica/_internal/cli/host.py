"""``vmreplica host init|serve|install-service``: set up and run a host agent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from vmreplica._internal import systemd, validate
from vmreplica._internal.config import (
    DEFAULT_KEYTAB,
    HostConfig,
    KerberosKeys,
    TlsFiles,
    load_host_config,
    parse_listen,
    parse_port_range,
    parse_resolve,
    write_toml_atomic,
)
from vmreplica._internal.files import write_atomic
from vmreplica.errors import InvalidArgument, NotFound, StorageError


@click.group("host")
def group() -> None:
    """Set up and run the host agent (one per hypervisor host)."""


@group.command("init")
@click.option("--name", required=True, help="This host's name (FQDN), as in its certificate.")
@click.option(
    "--state-dir", required=True, type=click.Path(path_type=Path), help="Where state and VMs live."
)
@click.option("--mgmt-listen", required=True, metavar="ADDR:PORT", help="Management HTTPS address.")
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Management unix socket (root-only).",
)
@click.option("--ca", required=True, type=click.Path(path_type=Path), help="CA certificate (PEM).")
@click.option(
    "--cert", required=True, type=click.Path(path_type=Path), help="Host certificate (PEM)."
)
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Host key (PEM).")
@click.option(
    "--admin", "admins", multiple=True, help="Certificate name allowed on the management API."
)
@click.option(
    "--resolve", "resolve", multiple=True, metavar="FQDN=ADDR", help="Address override for a peer."
)
@click.option(
    "--accel",
    default="tcg",
    show_default=True,
    type=click.Choice(["tcg", "kvm"]),
    help="QEMU accelerator for VMs.",
)
@click.option(
    "--driver",
    default="qemu",
    show_default=True,
    type=click.Choice(["qemu", "libvirt"]),
    help="Hypervisor driver: QEMU processes of the agent's own, or libvirt domains.",
)
@click.option(
    "--libvirt-uri",
    default="qemu:///system",
    show_default=True,
    help="libvirt connection URI (with --driver libvirt).",
)
@click.option(
    "--initial-copy-ports",
    metavar="FIRST-LAST",
    help="TCP ports this host, as a replica, serves initial copies on (default: any free port).",
)
@click.option(
    "--metrics-listen",
    metavar="ADDR:PORT",
    help="Also serve /metrics over plain HTTP here (a loopback address only).",
)
@click.option(
    "--crl",
    type=click.Path(path_type=Path),
    help="The CA's revocation list (PEM), checked on every TLS connection; reloaded on SIGHUP.",
)
@click.option(
    "--keytab",
    type=click.Path(path_type=Path),
    help=f"Kerberos keytab with this host's keys (default {DEFAULT_KEYTAB}).",
)
@click.option("--principal", help="Kerberos principal this host sends as (default host/NAME).")
@click.option(
    "--out", default=Path("host.toml"), type=click.Path(path_type=Path), show_default=True
)
def init(
    name: str,
    state_dir: Path,
    mgmt_listen: str,
    socket_path: Path,
    ca: Path,
    cert: Path,
    key: Path,
    admins: tuple[str, ...],
    resolve: tuple[str, ...],
    accel: str,
    driver: str,
    libvirt_uri: str,
    initial_copy_ports: str | None,
    metrics_listen: str | None,
    crl: Path | None,
    keytab: Path | None,
    principal: str | None,
    out: Path,
) -> None:
    """Write host.toml for a new host agent."""
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key), ("--crl", crl)):
        if path is not None and not path.is_file():
            maker = "cert crl" if flag == "--crl" else "cert issue"
            raise NotFound(f"{flag} {path}: no such file (make one with `vmreplica {maker}`)")
    config = HostConfig(
        name=validate.fqdn(name, "host name"),
        state_dir=state_dir.absolute(),
        socket=socket_path.absolute(),
        mgmt_listen=parse_listen(mgmt_listen),
        tls=TlsFiles(
            ca.absolute(), cert.absolute(), key.absolute(), crl.absolute() if crl else None
        ),
        admins=tuple(a.lower() for a in admins),
        resolve=parse_resolve(list(resolve)),
        accel=accel,
        driver=driver,
        libvirt_uri=libvirt_uri,
        initial_copy_ports=parse_port_range(initial_copy_ports) if initial_copy_ports else None,
        metrics_listen=_loopback(parse_listen(metrics_listen)) if metrics_listen else None,
        kerberos=_kerberos_keys(name, keytab, principal),
    )
    write_toml_atomic(out, config.to_toml())
    click.echo(f"wrote {out}")


@group.command("serve")
@click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="host.toml"
)
def serve_cmd(config_path: Path) -> None:
    """Run the host agent in the foreground until SIGTERM."""
    # The agent pulls in the whole engine: only `host serve` pays for it.
    from vmreplica._internal.agent import serve

    serve(load_host_config(config_path))


@group.command("install-service")
@click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="host.toml"
)
@click.option(
    "--unit-dir",
    default=Path("/etc/systemd/system"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the unit goes.",
)
@click.option(
    "--tmpfiles-dir",
    default=Path("/etc/tmpfiles.d"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the entry for the socket's directory goes.",
)
def install_service(config_path: Path, unit_dir: Path, tmpfiles_dir: Path) -> None:
    """Write vmreplica.service (Type=notify, watchdog, KillMode=process, hardened) for this
    host.toml, and a tmpfiles.d entry for the management socket's directory."""
    config_path = config_path.absolute()
    config = load_host_config(config_path)
    import vmreplica

    python = Path(sys.executable)
    used = [config_path, config.state_dir, config.socket, config.tls.ca, config.tls.cert,
            config.tls.key, python, Path(vmreplica.__file__).parent]  # fmt: skip
    hardening = systemd.hardening_for([p.absolute() for p in used])
    for directory in (unit_dir, tmpfiles_dir):
        if not directory.is_dir():
            raise NotFound(f"{directory}: no such directory (is systemd installed?)")
    unit = unit_dir / systemd.UNIT_NAME
    tmpfiles = tmpfiles_dir / systemd.TMPFILES_NAME
    try:
        write_atomic(unit, systemd.unit_text(python, config_path, config.name, hardening).encode())
        write_atomic(tmpfiles, systemd.tmpfiles_text(config.socket.parent).encode())
        os.chmod(unit, 0o644)
        os.chmod(tmpfiles, 0o644)
    except OSError as e:
        raise StorageError(f"cannot write the unit: {e.strerror or e}") from e
    click.echo(f"wrote {unit} and {tmpfiles}")
    for note in hardening.notes:
        click.echo(note)
    click.echo(
        "next: systemctl daemon-reload && systemd-tmpfiles --create "
        f"{tmpfiles} && systemctl enable --now {systemd.UNIT_NAME}"
    )


def _loopback(listen: tuple[str, int]) -> tuple[str, int]:
    host = listen[0]
    if host != "::1" and not host.startswith("127."):
        raise InvalidArgument(
            f"--metrics-listen {host}: a loopback address only (127.0.0.1 or ::1); remote "
            "scrapers use /metrics on the management listener, with TLS"
        )
    return listen


def _kerberos_keys(name: str, keytab: Path | None, principal: str | None) -> KerberosKeys | None:
    """Both defaults: nothing in host.toml (the agent reads /etc/krb5.keytab when Kerberos is
    used). The keytab is checked only at use: a host may run with certificates alone."""
    if keytab is None and principal is None:
        return None
    if principal is not None:
        validate.kerberos_principal(principal)
    return KerberosKeys(
        (keytab or Path(DEFAULT_KEYTAB)).absolute(), principal or f"host/{name.lower()}"
    )
