"""``vmreplica host init|serve``: set up and run a host agent."""

from __future__ import annotations

from pathlib import Path

import click

from vmreplica._internal import validate
from vmreplica._internal.config import (
    HostConfig,
    TlsFiles,
    load_host_config,
    parse_listen,
    parse_port_range,
    parse_resolve,
    write_toml_atomic,
)
from vmreplica.errors import NotFound


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
    "--initial-copy-ports",
    metavar="FIRST-LAST",
    help="TCP ports this host, as a replica, serves initial copies on (default: any free port).",
)
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
    initial_copy_ports: str | None,
    out: Path,
) -> None:
    """Write host.toml for a new host agent."""
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not path.is_file():
            raise NotFound(f"{flag} {path}: no such file (make one with `vmreplica cert issue`)")
    config = HostConfig(
        name=validate.fqdn(name, "host name"),
        state_dir=state_dir.absolute(),
        socket=socket_path.absolute(),
        mgmt_listen=parse_listen(mgmt_listen),
        tls=TlsFiles(ca.absolute(), cert.absolute(), key.absolute()),
        admins=tuple(a.lower() for a in admins),
        resolve=parse_resolve(list(resolve)),
        accel=accel,
        initial_copy_ports=parse_port_range(initial_copy_ports) if initial_copy_ports else None,
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
