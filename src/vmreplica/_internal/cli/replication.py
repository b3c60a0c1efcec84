"""``vmreplica replication …``: replication of VMs to a replica server."""

from __future__ import annotations

import click

from vmreplica._internal.cli.output import clients, common, render
from vmreplica._internal.models import ConnectionTest
from vmreplica.errors import AccessDenied, ConnectionFailed, InvalidState


@click.group("replication")
def group() -> None:
    """Replicate VMs, watch their health, and test connections."""


@group.command("test-connection")
@common
@click.option("--replica-server", required=True, metavar="FQDN", help="The replica server's name.")
@click.option("--replica-port", required=True, type=int, help="Its certificate listener port.")
@click.option(
    "--auth",
    default="certificate",
    show_default=True,
    type=click.Choice(["kerberos", "certificate"]),
)
def test_connection(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    replica_server: str,
    replica_port: int,
    auth: str,
) -> None:
    """Check that this host can replicate to a replica server, and say why not."""
    rows = [c.test_connection(replica_server, replica_port, auth) for c in clients(computer_names)]
    render(rows, ConnectionTest, output, properties)
    refused = [r for r in rows if not r.authorized]
    if refused:
        first = refused[0]
        reason = first.reason or "refused"
        if not first.reachable or not first.tls_ok:
            raise ConnectionFailed(reason)
        if reason.startswith("replication disabled"):
            raise InvalidState(reason)
        raise AccessDenied(reason)
