"""``vmreplica failover start|stop|complete``: run a VM at the replica site."""

from __future__ import annotations

import sys

import click

from vmreplica._internal.cli.output import clients, common, render
from vmreplica._internal.models import Replication
from vmreplica.errors import InvalidArgument


@click.group("failover")
def group() -> None:
    """Fail VMs over to their replica (planned, unplanned or as a test)."""


@group.command("start")
@common
@click.argument("vm")
@click.option(
    "--prepare", is_flag=True, help="On the primary: ship the last changes for a planned failover."
)
@click.option("--as-test", is_flag=True, help="Create a '<VM> - Test' VM beside the replica.")
@click.option("--recovery-point", metavar="ID", help="The point to fail over to (default: Latest).")
@click.option("--force", is_flag=True, help="Fail over even though the VM runs on its primary.")
def start(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    vm: str,
    prepare: bool,
    as_test: bool,
    recovery_point: str | None,
    force: bool,
) -> None:
    """Start a failover (on the replica), or prepare a planned one (on the primary)."""
    if prepare and (as_test or recovery_point):
        raise InvalidArgument(
            "--prepare takes no --as-test or --recovery-point: it runs on the primary"
        )
    rows = [
        c.failover_start(vm, prepare, as_test, recovery_point, force)
        for c in clients(computer_names)
    ]
    render(rows, Replication, output, properties)


@group.command("stop")
@common
@click.argument("vm")
def stop(computer_names: tuple[str, ...], output: str, properties: str | None, vm: str) -> None:
    """Cancel a failover or end a test failover; the replica stays as it was."""
    render([c.failover_stop(vm) for c in clients(computer_names)], Replication, output, properties)


@group.command("complete")
@common
@click.argument("vm")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def complete(
    computer_names: tuple[str, ...], output: str, properties: str | None, vm: str, yes: bool
) -> None:
    """Keep the failed-over VM on its point and delete every other recovery point (irreversible)."""
    click.echo(
        f"Completing the failover of {vm} deletes all its other recovery points: this cannot be undone.",
        err=True,
    )
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidArgument("completing a failover is irreversible: confirm with --yes")
        click.confirm("Complete the failover?", abort=True, err=True)
    render(
        [c.failover_complete(vm) for c in clients(computer_names)], Replication, output, properties
    )
