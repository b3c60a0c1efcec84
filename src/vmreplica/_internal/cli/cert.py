"""``vmreplica cert new-ca|issue|revoke|crl``: a private CA, host and administrator
certificates, and the CA's revocation list."""

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


@group.command("revoke")
@click.option(
    "--ca", "ca_dir", required=True, type=click.Path(path_type=Path), help="Directory of the CA."
)
@click.option(
    "--cert", "cert_files", multiple=True, required=True, type=click.Path(path_type=Path),
    help="A certificate the CA issued (repeatable).",
)  # fmt: skip
def revoke(ca_dir: Path, cert_files: tuple[Path, ...]) -> None:
    """Revoke certificates: the CA's crl.pem, re-signed. Copy it to every host that names it
    (host.toml [tls] crl), then send their agents SIGHUP."""
    path, count = certs.write_crl(ca_dir, list(cert_files))
    click.echo(f"wrote {path} ({count} revoked)")


@group.command("crl")
@click.option(
    "--ca", "ca_dir", required=True, type=click.Path(path_type=Path), help="Directory of the CA."
)
def crl(ca_dir: Path) -> None:
    """Write (or re-sign) the CA's crl.pem without revoking anything new."""
    path, count = certs.write_crl(ca_dir)
    click.echo(f"wrote {path} ({count} revoked)")
