"""``vmreplica recovery-point list``: the points a replica VM can fail over to."""

from __future__ import annotations

import click

from vmreplica._internal.cli.output import collect, common, render
from vmreplica._internal.models import RecoveryPoint


@click.group("recovery-point")
def group() -> None:
    """Recovery points of replica VMs."""


@group.command("list")
@common
@click.argument("vm")
def list_cmd(computer_names: tuple[str, ...], output: str, properties: str | None, vm: str) -> None:
    """List a replica VM's recovery points, oldest first, and Latest."""
    render(
        collect(computer_names, lambda c: list(c.recovery_point_list(vm))),
        RecoveryPoint,
        output,
        properties,
    )
