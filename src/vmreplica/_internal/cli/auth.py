"""``vmreplica auth new|get|set|remove``: authorization entries of a replica server."""

from __future__ import annotations

import click

from vmreplica._internal.cli.output import (
    client_for_object,
    clients,
    collect,
    common,
    read_stdin_objects,
    render,
    stdin_option,
)
from vmreplica._internal.models import AuthEntry, Model
from vmreplica.errors import InvalidArgument


@click.group("auth")
def group() -> None:
    """Which primary servers may replicate to this host."""


@group.command("new")
@common
@click.option(
    "--allowed-primary", required=True, metavar="PATTERN", help="FQDN or *.domain of the primary."
)
@click.option(
    "--storage-location", required=True, metavar="PATH", help="Where its replica VMs are stored."
)
@click.option(
    "--trust-group", required=True, metavar="NAME", help="Security tag shared by related primaries."
)
def new(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    allowed_primary: str,
    storage_location: str,
    trust_group: str,
) -> None:
    """Authorize a primary server."""
    rows = [
        c.auth_new(allowed_primary, storage_location, trust_group) for c in clients(computer_names)
    ]
    render(rows, AuthEntry, output, properties)


@group.command("get")
@common
@click.option("--allowed-primary", metavar="PATTERN", help="Only this entry.")
@click.option("--trust-group", metavar="NAME", help="Only entries of this trust group.")
def get(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    allowed_primary: str | None,
    trust_group: str | None,
) -> None:
    """List authorization entries."""
    rows = collect(computer_names, lambda c: list(c.auth_get(allowed_primary, trust_group)))
    render(rows, AuthEntry, output, properties)


@group.command("set")
@common
@stdin_option
@click.option("--allowed-primary", metavar="PATTERN", help="The entry to change (or --stdin).")
@click.option(
    "--storage-location", metavar="PATH", help="New storage location (new replica VMs only)."
)
@click.option("--trust-group", metavar="NAME", help="New trust group.")
def set_cmd(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    allowed_primary: str | None,
    storage_location: str | None,
    trust_group: str | None,
) -> None:
    """Change authorization entries."""
    if storage_location is None and trust_group is None:
        raise InvalidArgument("nothing to change: give --storage-location and/or --trust-group")
    rows: list[Model] = []
    if from_stdin:
        for obj in read_stdin_objects():
            pattern = obj.get("allowed_primary_server")
            if not isinstance(pattern, str):
                raise InvalidArgument(
                    "--stdin: each object needs allowed_primary_server (pipe from `auth get -o json`)"
                )
            rows.append(
                client_for_object(obj, computer_names).auth_set(
                    pattern, storage_location, trust_group
                )
            )
    elif allowed_primary is None:
        raise InvalidArgument("give --allowed-primary PATTERN or --stdin")
    else:
        rows = [
            c.auth_set(allowed_primary, storage_location, trust_group)
            for c in clients(computer_names)
        ]
    render(rows, AuthEntry, output, properties)


@group.command("remove")
@common
@stdin_option
@click.option("--allowed-primary", metavar="PATTERN", help="Remove this entry.")
@click.option("--trust-group", metavar="NAME", help="Remove every entry of this trust group.")
def remove(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    allowed_primary: str | None,
    trust_group: str | None,
) -> None:
    """Remove authorization entries."""
    rows: list[Model] = []
    if from_stdin:
        for obj in read_stdin_objects():
            pattern = obj.get("allowed_primary_server")
            if not isinstance(pattern, str):
                raise InvalidArgument("--stdin: each object needs allowed_primary_server")
            rows.extend(client_for_object(obj, computer_names).auth_remove(allowed_primary=pattern))
    else:
        for c in clients(computer_names):
            rows.extend(c.auth_remove(allowed_primary, trust_group))
    render(rows, AuthEntry, output, properties)
