"""``vmreplica cert new-ca|issue``: a private CA and host/administrator certificates."""

from __future__ import annotations

from pathlib import Path

import click

from vmreplica._internal import certs


@click.group("cert")
def group() -> None:
    """Make a CA and certificates for hosts and administrators."""


@group.command("new-ca")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for ca.pem and ca.key."
)
@click.option("--name", default="vmreplica CA", show_default=True, help="The CA's common name.")
@click.option("--force", is_flag=True, help="Overwrite an existing CA.")
def new_ca(out: Path, name: str, force: bool) -> None:
    """Create a certificate authority."""
    files = certs.new_ca(out, common_name=name, force=force)
    click.echo(f"wrote {files.cert} and {files.key}")


@group.command("issue")
@click.option(
    "--ca", "ca_dir", required=True, type=click.Path(path_type=Path), help="Directory of the CA."
)
@click.option("--name", "names", multiple=True, required=True, help="DNS name (repeatable).")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for cert.pem, key.pem."
)
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
def issue(ca_dir: Path, names: tuple[str, ...], out: Path, days: int) -> None:
    """Issue a certificate for server and client authentication."""
    files = certs.issue(ca_dir, list(names), out, days=days)
    click.echo(f"wrote {files.cert}, {files.key} and {files.ca}")
