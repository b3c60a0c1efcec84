"""``vmreplica``: the command line. Errors become one line on stderr and an exit status here,
and only here (see :mod:`vmreplica.errors` for the statuses)."""

from __future__ import annotations

import importlib
import sys

import click

from vmreplica.errors import VmrError

USAGE_EXIT = 2

# Command groups by name, each imported only when it is used: a command
# then loads its own group's module alone, not every group's (and `cryptography` with some).
GROUPS = {
    "host": "host", "cluster": "cluster", "cert": "cert", "server": "server", "auth": "auth",
    "vm": "vm", "replication": "replication", "recovery-point": "recovery_point",
    "failover": "failover", "event": "event",
}  # fmt: skip


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(GROUPS)  # as click lists the commands it holds

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in GROUPS:
            return None
        module = importlib.import_module(f"vmreplica._internal.cli.{GROUPS[cmd_name]}")
        group: click.Group = module.group
        if cmd_name == "vm" and "move" not in group.commands:
            from vmreplica._internal.cli import vm_move

            group.add_command(vm_move.command)
        return group


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="vmreplica")
def cli() -> None:
    """Disaster-recovery replication of QEMU/KVM virtual machines (like Hyper-V Replica)."""


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
