"""``vmreplica vm move VM --to NODE``: a primary VM changes nodes within its cluster."""

from __future__ import annotations

import sys

import click

from vmreplica._internal.cli.output import clients, common, render
from vmreplica._internal.models import VmMove


@click.command("move")
@common
@click.argument("name")
@click.option(
    "--to", "to", required=True, metavar="NODE", help="The node of the cluster to move to."
)
@click.option(
    "--force",
    is_flag=True,
    help="Turn a running VM off at once (the guest is not asked; disks are closed cleanly).",
)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True,
    help="Seconds to wait for the guest to power off.",
)  # fmt: skip
def command(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    name: str,
    to: str,
    force: bool,
    timeout: float,
) -> None:
    """Move a VM to another node of this host's cluster (cold: stopped here, started there).

    Its disks stay in the cluster's shared storage; its replication continues with a delta."""
    rows = []
    for client in clients(computer_names):
        if sys.stderr.isatty():  # for a person watching; a refusal stays one line for a script
            click.echo(f"moving VM {name} to {to}: stopping it, sending its last delta…", err=True)
        rows.append(client.vm_move(name, to, force, timeout))
    render(rows, VmMove, output, properties)
