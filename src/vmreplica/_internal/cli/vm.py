"""``vmreplica vm …``: virtual machines run by QEMU on a host."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from vmreplica._internal.cli.output import (
    absolute,
    client_for_object,
    clients,
    collect,
    common,
    read_stdin_objects,
    render,
    stdin_option,
)
from vmreplica._internal.models import Model, Vm
from vmreplica.client import Client
from vmreplica.errors import InvalidArgument


@click.group("vm")
def group() -> None:
    """Create, run and remove virtual machines."""


@group.command("new")
@common
@click.argument("name")
@click.option("--memory", default="256M", show_default=True, help="Memory size, e.g. 512M or 2G.")
@click.option("--cpus", default=1, show_default=True, type=int)
@click.option(
    "--disk", "disk_sizes", multiple=True, metavar="SIZE", help="New empty qcow2 disk (repeatable)."
)
@click.option(
    "--disk-path",
    "disk_paths",
    multiple=True,
    metavar="PATH",
    help="Existing qcow2 image, used in place.",
)
@click.option(
    "--disk-parent",
    "disk_parents",
    multiple=True,
    metavar="PATH",
    help="Differencing disk over this parent image.",
)
@click.option("--kernel", metavar="PATH", help="Boot this kernel directly.")
@click.option("--initrd", metavar="PATH", help="Initial ramdisk for --kernel.")
@click.option("--append", metavar="ARGS", help="Kernel command line.")
def new(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    name: str,
    memory: str,
    cpus: int,
    disk_sizes: tuple[str, ...],
    disk_paths: tuple[str, ...],
    disk_parents: tuple[str, ...],
    kernel: str | None,
    initrd: str | None,
    append: str | None,
) -> None:
    """Create a VM. Disks are attached in the order: --disk, --disk-path, --disk-parent."""
    disks = (
        [{"size": s} for s in disk_sizes]
        + [{"path": absolute(p)} for p in disk_paths]
        + [{"parent": absolute(p)} for p in disk_parents]
    )
    kernel, initrd = (None if f is None else absolute(f) for f in (kernel, initrd))
    rows = [
        c.vm_new(name, memory, cpus, disks, kernel, initrd, append) for c in clients(computer_names)
    ]
    render(rows, Vm, output, properties)


@group.command("list")
@common
def list_cmd(computer_names: tuple[str, ...], output: str, properties: str | None) -> None:
    """List VMs."""
    render(collect(computer_names, lambda c: list(c.vm_list())), Vm, output, properties)


@group.command("get")
@common
@click.argument("name")
def get(computer_names: tuple[str, ...], output: str, properties: str | None, name: str) -> None:
    """Show one VM."""
    render(collect(computer_names, lambda c: c.vm_get(name)), Vm, output, properties)


def _each_vm(
    name: str | None,
    from_stdin: bool,
    computer_names: tuple[str, ...],
    action: Callable[[Client, str], Vm],
) -> list[Model]:
    if from_stdin:
        rows: list[Model] = []
        for obj in read_stdin_objects():
            vm_name = obj.get("name") or obj.get("vm_name")
            if not isinstance(vm_name, str):
                raise InvalidArgument(
                    "--stdin: each object needs a name (pipe from `vm list -o json`)"
                )
            rows.append(action(client_for_object(obj, computer_names), vm_name))
        return rows
    if name is None:
        raise InvalidArgument("give a VM name or --stdin")
    return [action(c, name) for c in clients(computer_names)]


@group.command("start")
@common
@stdin_option
@click.argument("name", required=False)
def start(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    name: str | None,
) -> None:
    """Start a VM."""
    render(
        _each_vm(name, from_stdin, computer_names, lambda c, n: c.vm_start(n)),
        Vm,
        output,
        properties,
    )


@group.command("stop")
@common
@stdin_option
@click.argument("name", required=False)
@click.option(
    "--force",
    is_flag=True,
    help="Turn the VM off at once (the guest is not asked; disks are closed cleanly).",
)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the guest."
)
def stop(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    name: str | None,
    force: bool,
    timeout: float,
) -> None:
    """Stop a VM: ACPI power-off, or turn it off at once with --force."""
    rows = _each_vm(name, from_stdin, computer_names, lambda c, n: c.vm_stop(n, force, timeout))
    render(rows, Vm, output, properties)


@group.command("remove")
@common
@stdin_option
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Kill the VM first if it runs.")
@click.option(
    "--delete-storage",
    is_flag=True,
    help="A (former) replica VM: also delete its replica storage, every recovery point included.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (--delete-storage).")
def remove(
    computer_names: tuple[str, ...],
    output: str,
    properties: str | None,
    from_stdin: bool,
    name: str | None,
    force: bool,
    delete_storage: bool,
    yes: bool,
) -> None:
    """Remove a VM and the disks it created (images given with --disk-path are kept)."""
    if delete_storage and not yes:
        if not sys.stdin.isatty() or from_stdin:
            raise InvalidArgument(
                "--delete-storage deletes the replica's data and every recovery point: confirm "
                "with --yes"
            )
        click.confirm(
            f"Delete the replica storage of {name}, every recovery point included?",
            abort=True,
            err=True,
        )
    rows = _each_vm(
        name, from_stdin, computer_names, lambda c, n: c.vm_remove(n, force, delete_storage)
    )
    render(rows, Vm, output, properties)


@group.command("monitor")
@click.option(
    "-c", "--computer-name", "computer_name", metavar="NAME", help="Host (default: local agent)."
)
@click.argument("name")
@click.argument("command")
def monitor(computer_name: str | None, name: str, command: str) -> None:
    """Run a read-only HMP `info` command in a running VM (diagnostics, like virsh
    qemu-monitor-command --hmp). Hosts whose host.toml sets allow_qemu_io (test hosts) also
    run `qemu-io DISK "…"`; nothing else runs, since HMP can run commands on the host."""
    click.echo(Client.connect(computer_name).vm_monitor(name, command), nl=False)
