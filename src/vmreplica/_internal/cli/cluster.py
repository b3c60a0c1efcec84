"""``vmreplica cluster init|join|get|node list``: a node's membership of a cluster on etcd.

These run on a node and speak to etcd directly (like `host init`, they set up this host's
host.toml): the cluster exists in etcd, not in any one agent. The agent joins at its next start
(docs/CLUSTER.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from vmreplica._internal import certs
from vmreplica._internal.certs import check_dns_name
from vmreplica._internal.cli.output import output_options, render
from vmreplica._internal.cluster_config import (
    ClusterSettings,
    parse_endpoints,
    validate_cluster_name,
)
from vmreplica._internal.config import load_host_config, write_toml_atomic
from vmreplica._internal.models import ClusterInfo, ClusterNode
from vmreplica.errors import InvalidArgument, InvalidState

if TYPE_CHECKING:
    from vmreplica._internal.cluster.etcd import Etcd

T = TypeVar("T")


def _run(settings: ClusterSettings, fn: Callable[[Etcd], Awaitable[T]]) -> T:
    # The etcd client (and aiohttp under it) is imported only by the commands that speak to
    # etcd, so that every other command of the CLI starts without it.
    from vmreplica._internal.cluster.etcd import Etcd

    async def go() -> T:
        etcd = Etcd(settings.etcd, ssl=settings.ssl_context())
        try:
            return await fn(etcd)
        finally:
            await etcd.close()

    return asyncio.run(go())


def _settings(config_path: Path) -> ClusterSettings:
    config = load_host_config(config_path)
    if config.cluster is None:
        raise InvalidState(f"{config_path}: this host is in no cluster (`vmreplica cluster join`)")
    return config.cluster


def _write(config_path: Path, settings: ClusterSettings) -> None:
    config = load_host_config(config_path)
    if config.cluster is not None and config.cluster.name != settings.name:
        raise InvalidState(
            f"{config_path}: this host is already a node of cluster {config.cluster.name}"
        )
    write_toml_atomic(config_path, dataclasses.replace(config, cluster=settings).to_toml())


def _membership(
    name: str, etcd: str, lease_ttl: int, tls: tuple[Path | None, Path | None, Path | None]
) -> ClusterSettings:
    """The settings `init|join` write, all checked first (one-line errors, nothing changed):
    the URLs, the TLS files together, and that the files make a usable client context."""
    ca, cert, key = (p.resolve() if p is not None else None for p in tls)
    try:
        settings = ClusterSettings(
            validate_cluster_name(name), parse_endpoints(etcd), lease_ttl, ca, cert, key
        )
    except InvalidArgument as e:
        raise InvalidArgument(e.message.replace("etcd_ca", "--etcd-ca")
                              .replace("etcd_cert", "--etcd-cert")
                              .replace("etcd_key", "--etcd-key")) from e  # fmt: skip
    settings.ssl_context()  # a missing, unreadable or mismatched file refuses here
    return settings


def membership_options(f: Callable[..., None]) -> Callable[..., None]:
    for flag, what in (("--etcd-key", "this node's client key"),
                       ("--etcd-cert", "this node's client certificate for etcd"),
                       ("--etcd-ca", "the CA etcd's certificate must be issued by")):  # fmt: skip
        f = click.option(flag, type=click.Path(path_type=Path), metavar="PEM",
                         help=f"{what.capitalize()} (https:// etcd, mutual TLS).")(f)  # fmt: skip
    f = click.option("--lease-ttl", type=click.IntRange(2, 300), default=10, show_default=True,
                     help="Seconds after a node's death before another can take its VMs.")(f)  # fmt: skip
    f = click.option("--etcd", "etcd", required=True, metavar="URL[,URL…]",
                     help="etcd client URLs, https://HOST:PORT (http:// is unauthenticated).")(f)  # fmt: skip
    f = click.option("--name", required=True, help="The cluster's name.")(f)
    return click.option("--config", "config_path", required=True,
                        type=click.Path(path_type=Path), help="This host's host.toml.")(f)  # fmt: skip


@click.group("cluster")
def group() -> None:
    """Clusters of hosts on etcd: membership, ownership of VMs (docs/CLUSTER.md)."""


@group.command("init")
@membership_options
@output_options
def init_cmd(
    config_path: Path,
    name: str,
    etcd: str,
    lease_ttl: int,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
    output: str,
    properties: str | None,
) -> None:
    """Create a cluster in etcd and make this host its first node (restart its agent)."""
    settings = _membership(name, etcd, lease_ttl, (etcd_ca, etcd_cert, etcd_key))
    load_host_config(config_path)  # a bad host.toml refuses before etcd is changed
    created = datetime.now(UTC).isoformat(timespec="seconds")
    from vmreplica._internal.cluster import member

    _run(settings, lambda e: member.create_cluster(e, name, {"name": name, "created": created}))
    _write(config_path, settings)
    render([_info(settings)], ClusterInfo, output, properties)


@group.command("join")
@membership_options
@output_options
def join_cmd(
    config_path: Path,
    name: str,
    etcd: str,
    lease_ttl: int,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
    output: str,
    properties: str | None,
) -> None:
    """Make this host a node of an existing cluster (restart its agent)."""
    settings = _membership(name, etcd, lease_ttl, (etcd_ca, etcd_cert, etcd_key))
    info = _info(settings)  # refuses a cluster that does not exist
    _write(config_path, settings)
    render([info], ClusterInfo, output, properties)


@group.command("get")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="The host.toml of a node of the cluster.")  # fmt: skip
@output_options
def get_cmd(config_path: Path, output: str, properties: str | None) -> None:
    """The cluster this host is a node of."""
    render([_info(_settings(config_path))], ClusterInfo, output, properties)


@group.group("node")
def node_group() -> None:
    """The nodes of a cluster."""


@node_group.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="The host.toml of a node of the cluster.")  # fmt: skip
@output_options
def node_list_cmd(config_path: Path, output: str, properties: str | None) -> None:
    """Every node with its health: a live etcd lease, and the VMs it owns."""
    settings = _settings(config_path)

    from vmreplica._internal.cluster import member

    async def fetch(etcd: Etcd) -> list[ClusterNode]:
        owners = await member.owners(etcd, settings.name)
        return [
            ClusterNode(
                n.name,
                n.address,
                n.healthy,
                n.lease_remaining,
                sorted(vm for vm, node in owners.items() if node == n.name),
            )
            for n in await member.nodes(etcd, settings.name)
        ]

    render(_run(settings, fetch), ClusterNode, output, properties)


@group.group("broker")
def broker_group() -> None:
    """The cluster's Replica Broker name (its client access point)."""


@broker_group.command("add")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="The host.toml of a node of the cluster.")  # fmt: skip
@click.option("--name", "cap", required=True, help="The broker's name (FQDN) primaries use.")
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path),
              help="CA directory: issue this node's certificate for its name and the broker's.")  # fmt: skip
@output_options
def broker_add_cmd(
    config_path: Path, cap: str, ca_dir: Path | None, output: str, properties: str | None
) -> None:
    """Give the cluster its broker name; run it on every node (with --ca, or issue each node a
    certificate carrying both names), then restart the node's agent."""
    config = load_host_config(config_path)
    settings = _settings(config_path)
    cap = check_dns_name(cap.lower())

    from vmreplica._internal.cluster import member

    async def record(etcd: Etcd) -> None:
        current = await member.cluster_config(etcd, settings.name)
        broker = current.get("broker")
        if broker and broker != cap:
            raise InvalidState(f"cluster {settings.name} already has the broker name {broker}")
        if broker != cap:
            await member.set_cluster_config(etcd, settings.name, current | {"broker": cap})

    _run(settings, record)
    if ca_dir is not None:
        # Issued beside the node's files, then moved over them: the agent reads them at start.
        tls = config.tls
        staging = tls.cert.parent / ".broker-issue"
        issued = certs.issue(ca_dir, [config.name, cap], staging)
        os.replace(issued.key, tls.key)
        os.replace(issued.cert, tls.cert)
        shutil.rmtree(staging, ignore_errors=True)
    elif cap not in certs.cert_dns_names(config.tls.cert):
        click.echo(
            f"vmreplica: warning: {config.tls.cert} does not carry {cap}: primaries that "
            f"replicate to {cap} will refuse this node (issue it with --ca, or `vmreplica cert "
            f"issue --name {config.name} --name {cap}`)",
            err=True,
        )
    render([_info(settings)], ClusterInfo, output, properties)


def _info(settings: ClusterSettings) -> ClusterInfo:
    from vmreplica._internal.cluster import member

    async def fetch(etcd: Etcd) -> ClusterInfo:
        config = await member.cluster_config(etcd, settings.name)
        nodes = await member.nodes(etcd, settings.name)
        vms = await etcd.get_prefix(member.prefix(settings.name) + "vms/")
        broker = config.get("broker")
        created = config.get("created")
        return ClusterInfo(
            name=settings.name,
            etcd_endpoints=list(settings.etcd),
            broker=str(broker) if broker else None,
            nodes=len(nodes),
            healthy_nodes=sum(n.healthy for n in nodes),
            vms=len(vms),
            created=str(created) if created else None,
        )

    return _run(settings, fetch)
