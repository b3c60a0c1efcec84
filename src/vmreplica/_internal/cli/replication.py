"""``vmreplica replication …``: replication of VMs to a replica server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmreplica._internal.cli.output import absolute, clients, collect, common, render
from vmreplica._internal.cli.server import BOOL
from vmreplica._internal.cli.waiting import wait_initial, wait_resync
from vmreplica._internal.models import ConnectionTest, Measurement, Replication
from vmreplica.client import Client
from vmreplica.errors import AccessDenied, ConnectionFailed, InvalidArgument, InvalidState


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
        if not first.reachable or (first.kerberos_ok is None and not first.tls_ok):
            raise ConnectionFailed(reason)
        if reason.startswith("replication disabled"):
            raise InvalidState(reason)
        raise AccessDenied(reason)


def _settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--frequency", type=click.Choice(["30", "300", "900"]), help="Seconds between cycles (default 300)."),
        click.option("--recovery-history", type=click.IntRange(0, 24), help="Additional hourly points to keep (default 0)."),
        click.option("--snapshot-frequency", type=click.IntRange(1, 12), help="Hours between app-consistent points."),
        click.option("--compression", type=BOOL, help="Compress deltas on the wire (default true)."),
        click.option("--max-bandwidth", metavar="RATE",
                     help="Cap on what this VM sends, bits/s with k, M, G suffixes (0: none)."),
        click.option("--bandwidth-schedule", metavar="RULES",
                     help='Caps by day and time, e.g. "Mon-Fri 08:00-18:00=20M,*=0" ("" clears).'),
        click.option("--encrypt", type=BOOL,
                     help="Kerberos: encrypt bodies (GSS wrap), not only sign them (default false)."),
        click.option("--auto-resynchronize", type=BOOL, help="Resynchronize automatically (default false)."),
        click.option("--auto-resynchronize-start", metavar="HH:MM",
                     help="Start of the automatic resynchronization window (default 18:30)."),
        click.option("--auto-resynchronize-end", metavar="HH:MM",
                     help="End of the automatic resynchronization window (default 06:00)."),
        click.option("--recovery-point-interval", type=click.IntRange(1), metavar="SECONDS",
                     help="Advanced: seconds between recovery points (default 3600)."),
    ]):  # fmt: skip
        f = decorator(f)
    return f


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in values.items() if v is not None}
    if "frequency" in out:
        out["frequency"] = int(out["frequency"])
    return out


@group.command("enable")
@common
@click.argument("vm")
@click.option("--replica-server", metavar="FQDN", help="The replica server's name.")
@click.option("--replica-port", type=int, help="Its certificate listener port.")
@click.option(
    "--auth",
    default="certificate",
    show_default=True,
    type=click.Choice(["kerberos", "certificate"]),
)
@click.option(
    "--exclude-disk",
    "exclude_disks",
    multiple=True,
    metavar="PATH",
    help="A disk not to replicate.",
)
@click.option(
    "--as-replica",
    is_flag=True,
    help="On the replica host: this VM (a copy of the primary's) is what its replica starts from.",
)
@click.option(
    "--allowed-primary",
    metavar="FQDN",
    help="With --as-replica: the only primary that may use the copy (default: any authorized).",
)
@_settings_options
def enable(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    vm: str,
    replica_server: str | None,
    replica_port: int | None,
    auth: str,
    exclude_disks: tuple[str, ...],
    as_replica: bool,
    allowed_primary: str | None,
    **settings: Any,
) -> None:
    """Enable replication of a VM to a replica server (run on the primary).

    With --as-replica, on the replica host: a copy of the VM registered there (``vm new NAME
    --disk-path ...``, off) becomes the start of its replica; then `start-initial --use-backup`
    on the primary sends only the blocks that differ.
    """
    if as_replica:  # the primary's options would be silently ignored: refused instead
        primary_only = [flag for flag, given in (
            ("--replica-server", replica_server is not None),
            ("--replica-port", replica_port is not None), ("--exclude-disk", bool(exclude_disks)),
            *((f"--{k.replace('_', '-')}", True) for k in _settings(settings)),
        ) if given]  # fmt: skip
        if primary_only:
            raise InvalidArgument(
                f"{primary_only[0]} goes with enable on the primary, not with --as-replica"
            )
        rows = [
            c.replication_enable_as_replica(vm, allowed_primary) for c in clients(computer_names)
        ]
        render(rows, Replication, output, properties)
        return
    if allowed_primary is not None:
        raise InvalidArgument("--allowed-primary goes with --as-replica")
    if replica_server is None or replica_port is None:
        raise InvalidArgument("give --replica-server and --replica-port")
    rows = [
        c.replication_enable(vm, replica_server, replica_port, auth, exclude_disks=[absolute(d) for d in exclude_disks],
                             **_settings(settings))
        for c in clients(computer_names)
    ]  # fmt: skip
    render(rows, Replication, output, properties)


@group.command("set")
@common
@click.argument("vm")
@click.option("--reverse", is_flag=True, help="Reverse the direction after a failover.")
@click.option(
    "--replica-server",
    metavar="FQDN",
    help="With --reverse: the new replica (default: old primary).",
)
@click.option("--replica-port", type=int, help="With --reverse: its certificate port.")
@_settings_options
def set_cmd(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    vm: str,
    reverse: bool,
    replica_server: str | None,
    replica_port: int | None,
    **settings: Any,
) -> None:
    """Change replication settings (from the next cycle), or reverse the direction."""
    args = _settings(settings)
    if reverse:
        args.update(reverse=True)
    if replica_server is not None or replica_port is not None:  # refused without --reverse
        args.update(replica_server=replica_server, replica_port=replica_port)
    render(
        [c.replication_set(vm, **args) for c in clients(computer_names)],
        Replication,
        output,
        properties,
    )


@group.command("get")
@common
@click.argument("vm", required=False)
@click.option("--state", help="Only relationships in this state.")
@click.option(
    "--health", type=click.Choice(["Normal", "Warning", "Critical"]), help="Only this health."
)
@click.option("--mode", type=click.Choice(["Primary", "Replica", "ExtendedReplica", "TestReplica"]))
def get(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    vm: str | None,
    state: str | None,
    health: str | None,
    mode: str | None,
) -> None:
    """Show replication relationships."""
    rows = collect(computer_names, lambda c: list(c.replication_get(vm, state, health, mode)))
    render(rows, Replication, output, properties)


@group.command("measure")
@common
@click.argument("vm", required=False)
def measure(
    computer_names: tuple[str, ...], output: str, properties: str | None, vm: str | None
) -> None:
    """Replication statistics and health over the monitoring window."""
    render(
        collect(computer_names, lambda c: list(c.replication_measure(vm))),
        Measurement,
        output,
        properties,
    )


@group.command("start-initial")
@common
@click.argument("vm")
@click.option(
    "--use-backup",
    is_flag=True,
    help="Start from the copy on the replica (enable --as-replica there).",
)
@click.option(
    "--destination", metavar="DIR", help="Write the copy to offline media in DIR (import-initial)."
)
@click.option(
    "--compressed",
    is_flag=True,
    help="Send the copy as compressed deltas that resume after a cut (for WAN links).",
)
@click.option("--start-time", metavar="ISO", help="Start then (at most 7 days ahead).")
@click.option("--wait", is_flag=True, help="Show progress until initial replication is done.")
def start_initial(
    computer_names: tuple[str, ...], output: str, properties: str | None, vm: str,
    use_backup: bool, destination: str | None, compressed: bool, start_time: str | None,
    wait: bool,
) -> None:  # fmt: skip
    """Start initial replication (run on the primary): a full copy over the network, a compare
    against a copy already on the replica (--use-backup), or a copy to offline media
    (--destination DIR, imported on the replica with import-initial).

    --compressed sends the network copy as zstd-compressed deltas of the blocks that are not
    zero, each resumed from where the replica stopped if the link breaks; the plain copy (NBD,
    uncompressed) is faster on a LAN.

    Run it again on a copy that failed to retry it now rather than on the schedule.
    """
    if destination is not None:  # the agent's working directory is not the caller's
        destination = str(Path(destination).absolute())
    for client in clients(computer_names):
        row = client.replication_start_initial(vm, use_backup, destination, start_time, compressed)
        if wait and row.state == "Resynchronizing":
            row = wait_resync(client, vm, "initial replication")
        elif wait and row.state == "InitialReplicationInProgress":
            row = wait_initial(client, vm)
            if row.state == "Resynchronizing":  # it resumed from what the replica kept
                row = wait_resync(client, vm, "initial replication")
        render([row], Replication, output, properties)


@group.command("import-initial")
@common
@click.argument("vm")
@click.option("--path", "path", required=True, metavar="DIR", help="The offline media's directory.")
def import_initial(
    computer_names: tuple[str, ...], output: str, properties: str | None, vm: str, path: str
) -> None:
    """Import offline media written by start-initial --destination (run on the replica): the
    copy is verified, becomes the replica's base, and the deltas received meanwhile are applied."""
    absolute = str(Path(path).absolute())
    rows = [c.replication_import_initial(vm, absolute) for c in clients(computer_names)]
    render(rows, Replication, output, properties)


def _simple(name: str, doc: str, call: Callable[[Client, str], Replication]) -> None:
    @group.command(name, help=doc)
    @common
    @click.argument("vm")
    def command(
        computer_names: tuple[str, ...], output: str, properties: str | None, vm: str
    ) -> None:
        render([call(c, vm) for c in clients(computer_names)], Replication, output, properties)


_simple(
    "suspend",
    "Pause replication; changes are kept and sent on resume.",
    lambda c, v: c.replication_suspend(v),
)
_simple(
    "remove",
    "Remove replication on this side (run on each side).",
    lambda c, v: c.replication_remove(v),
)
_simple(
    "reset-statistics", "Start the statistics anew.", lambda c, v: c.replication_reset_statistics(v)
)


@group.command("resume")
@common
@click.argument("vm")
@click.option("--resynchronize", is_flag=True, help="Resynchronize (when tracking was lost).")
@click.option(
    "--start-time", metavar="ISO", help="With --resynchronize: start then (at most 7 days ahead)."
)
@click.option("--continue", "go_on", is_flag=True, help="Continue a suspended resynchronization.")
@click.option("--wait", is_flag=True, help="Show the resynchronization's progress until it ends.")
def resume(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    vm: str,
    resynchronize: bool,
    start_time: str | None,
    go_on: bool,
    wait: bool,
) -> None:
    """Resume a suspended (or failed) replication on the primary; resynchronize one whose
    change tracking was lost (only the blocks that differ travel, recovery points are kept).

    On a replica host, it retries the recovery of a replica that takes no changes after a
    failed step (health Critical, "takes no changes"), once its cause is fixed.
    """
    for client in clients(computer_names):
        row = client.replication_resume(vm, resynchronize, start_time, go_on)
        if wait and row.state == "Resynchronizing":
            row = wait_resync(client, vm, "resynchronization")
        render([row], Replication, output, properties)


_simple(
    "stop",
    "Stop a resynchronization; the replica stays exactly as it was before it.",
    lambda c, v: c.replication_stop(v),
)


_simple(
    "stop-initial",
    "Stop an initial replication of any kind, running or scheduled (run on the primary).",
    lambda c, v: c.replication_stop_initial(v),
)


_simple(
    "sync",
    "Replicate now, outside the schedule, and wait until the replica has applied it.",
    lambda c, v: c.replication_sync(v),
)
