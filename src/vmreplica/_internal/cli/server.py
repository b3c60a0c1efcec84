"""``vmreplica server get|set``: replication server settings (Get/Set-VMReplicationServer)."""

from __future__ import annotations

from typing import Any

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
from vmreplica._internal.models import ServerSettings
from vmreplica._internal.validate import boolean


class BoolParam(click.ParamType[bool, Any]):
    name = "BOOL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        return boolean(value)


BOOL = BoolParam()


@click.group("server")
def group() -> None:
    """Replication server settings."""


@group.command("get")
@common
def get(computer_names: tuple[str, ...], output: str, properties: str | None) -> None:
    """Show the replication server settings."""
    render(collect(computer_names, lambda c: c.server_get()), ServerSettings, output, properties)


@group.command("set")
@common
@stdin_option
@click.option("--enabled", type=BOOL, help="Accept replication as a replica server.")
@click.option(
    "--auth", type=click.Choice(["kerberos", "certificate", "both"]), help="Allowed authentication."
)
@click.option("--kerberos-port", type=int, help="Kerberos (HTTP) port; default 80.")
@click.option(
    "--max-bandwidth", metavar="RATE",
    help="Cap on all replication this host sends, bits/s with k, M, G suffixes (0: none).",
)  # fmt: skip
@click.option(
    "--bandwidth-schedule", metavar="RULES",
    help='Caps by day and time, e.g. "Mon-Fri 08:00-18:00=20M,*=0" ("" clears).',
)  # fmt: skip
@click.option("--certificate-port", type=int, help="Certificate (HTTPS) port; default 443.")
@click.option(
    "--any-server", type=BOOL, help="Accept any authenticated primary (needs --storage-location)."
)
@click.option(
    "--storage-location", metavar="PATH", help="Default storage location for replica VMs."
)
@click.option("--certificate", metavar="PATH", help="Listener certificate instead of the host's.")
@click.option("--key", metavar="PATH", help="Key of --certificate.")
@click.option("--ca", metavar="PATH", help="CA that primaries' certificates must chain to.")
@click.option(
    "--monitoring-interval", metavar="DURATION", help="1,2,3,4,6,8,12,24h or 2-7d; default 12h."
)
@click.option(
    "--monitoring-start-time",
    metavar="HH:MM",
    help="Start of the monitoring window; default 09:00.",
)
def set_cmd(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    **changes: Any,
) -> None:
    """Change the replication server settings."""
    args = {k: v for k, v in changes.items() if v is not None}
    if from_stdin:
        targets = [client_for_object(obj, computer_names) for obj in read_stdin_objects()]
    else:
        targets = clients(computer_names)
    render([c.server_set(**args) for c in targets], ServerSettings, output, properties)
