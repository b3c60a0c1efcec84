"""``vmreplica``: the command line. Errors become one line on stderr and an exit status here,
and only here (see :mod:`vmreplica.errors` for the statuses)."""

from __future__ import annotations

import sys

import click

from vmreplica._internal.cli import (
    auth,
    cert,
    cluster,
    event,
    failover,
    host,
    recovery_point,
    replication,
    server,
    vm,
    vm_move,
)
from vmreplica.errors import VmrError

USAGE_EXIT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vmreplica")
def cli() -> None:
    """Disaster-recovery replication of QEMU/KVM virtual machines (like Hyper-V Replica)."""


for module in (host, cluster, cert, server, auth, vm, replication, recovery_point, failover, event):
    cli.add_command(module.group)
vm.group.add_command(vm_move.command)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="vmreplica", standalone_mode=False)
    except VmrError as err:
        click.echo(f"vmreplica: {err.message}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("vmreplica: aborted", err=True)
        return 130
    except click.ClickException as err:
        # Usage errors: one line plus a pointer to --help, never the multi-line usage block.
        hint = (
            f" (see `{err.ctx.command_path} --help`)"
            if isinstance(err, click.UsageError) and err.ctx
            else ""
        )
        click.echo(f"vmreplica: {err.format_message()}{hint}", err=True)
        return USAGE_EXIT if isinstance(err, click.UsageError) else err.exit_code
    except KeyboardInterrupt:
        click.echo("vmreplica: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return 0


def entry_point() -> None:
    sys.exit(main())
