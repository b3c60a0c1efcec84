"""``vmreplica event list``: the host's event log."""

from __future__ import annotations

import click

from vmreplica._internal.cli.output import collect, common, render
from vmreplica._internal.models import Event


@click.group("event")
def group() -> None:
    """Read the event log."""


@group.command("list")
@common
@click.option("--since", metavar="ISO", help="Only events at or after this time.")
def list_cmd(
    computer_names: tuple[str, ...], output: str, properties: str | None, since: str | None
) -> None:
    """List events, oldest first."""
    render(collect(computer_names, lambda c: list(c.event_list(since))), Event, output, properties)
