"""host.toml's `[cluster]`: the cluster this host is a node of, and how it reaches etcd.

etcd holds the cluster's authorization entries, server settings and VM ownership, so it is
reached over `https://` with mutual TLS (`etcd_ca`, `etcd_cert`, `etcd_key`: all three or none).
Plain `http://` is still accepted, for compatibility; the agent warns at start that anyone who
reaches etcd's port can then rewrite the cluster (docs/CLUSTER.md, "Security").
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vmreplica._internal import tls_context
from vmreplica.errors import InvalidArgument

TLS_KEYS = ("etcd_ca", "etcd_cert", "etcd_key")


@dataclass(frozen=True)
class ClusterSettings:
    """`[cluster]`: the cluster this host is a node of (docs/CLUSTER.md)."""

    name: str
    etcd: tuple[str, ...]
    # The node's etcd lease: another node can take this node's VMs this long after its death.
    lease_ttl: int = 10
    # Mutual TLS to etcd: the CA etcd's certificate is checked against, this node's client
    # certificate and key. None: plain http, unauthenticated.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None

    def __post_init__(self) -> None:
        check_tls(self.etcd, (self.etcd_ca, self.etcd_cert, self.etcd_key))

    @property
    def tls(self) -> bool:
        return self.etcd_ca is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client context for etcd (one-line errors for missing or unusable files)."""
        if self.etcd_ca is None or self.etcd_cert is None or self.etcd_key is None:
            return None
        return tls_context.etcd_client_ssl_context(self.etcd_ca, self.etcd_cert, self.etcd_key)

    def to_toml(self) -> dict[str, Any]:
        files = {k: str(v) for k in TLS_KEYS if (v := getattr(self, k)) is not None}
        return {"name": self.name, "etcd": list(self.etcd), "lease_ttl": self.lease_ttl} | files


def check_tls(endpoints: tuple[str, ...], files: tuple[Path | None, ...]) -> None:
    """All three files or none; https needs them, http refuses them (one-line errors)."""
    given = sum(f is not None for f in files)
    if given not in (0, 3):
        raise InvalidArgument("etcd TLS: give etcd_ca, etcd_cert and etcd_key together, or none")
    schemes = {urlsplit(u).scheme for u in endpoints}
    if len(schemes) > 1:
        raise InvalidArgument("etcd: every URL must be https:// (or every one http://)")
    if schemes == {"https"} and not given:
        raise InvalidArgument(
            "etcd: https:// needs etcd_ca, etcd_cert and etcd_key (mutual TLS with etcd)"
        )
    if schemes == {"http"} and given:
        raise InvalidArgument("etcd: the TLS files need https:// URLs, not http://")


def parse_cluster(value: object, path: Path) -> ClusterSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path}: [cluster] must be a table with name and etcd")
    etcd, ttl = value.get("etcd"), value.get("lease_ttl", 10)
    if not isinstance(etcd, list) or not all(isinstance(u, str) for u in etcd):
        raise InvalidArgument(f"{path}: [cluster] etcd must be a list of https://HOST:PORT URLs")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 2 <= ttl <= 300:
        raise InvalidArgument(f"{path}: [cluster] lease_ttl must be 2..300 seconds")
    files: list[Path | None] = []
    for key in TLS_KEYS:
        raw = value.get(key)
        if raw is not None and (not isinstance(raw, str) or not raw):
            raise InvalidArgument(f"{path}: [cluster] {key} must be a file path")
        files.append(None if raw is None else _absolute(Path(raw), path))
    try:
        endpoints = parse_endpoints(",".join(etcd))
        name = validate_cluster_name(str(value.get("name", "")))
        return ClusterSettings(name, endpoints, ttl, *files)
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: [cluster] {e.message}") from e


def _absolute(file: Path, config_path: Path) -> Path:
    """A relative path in host.toml is relative to host.toml's directory."""
    return file if file.is_absolute() else config_path.parent / file


def validate_cluster_name(name: str) -> str:
    """A cluster name is a key component in etcd: letters, digits, `-`, `_`, `.`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise InvalidArgument(
            f"invalid cluster name {name!r}: 1 to 63 letters, digits, '.', '-' or '_'"
        )
    return name


def parse_endpoints(value: str) -> tuple[str, ...]:
    """`https://host:port[,…]` → the endpoints, checked (one-line errors, nothing changed)."""
    endpoints = tuple(v.strip() for v in value.split(",") if v.strip())
    if not endpoints:
        raise InvalidArgument("--etcd: give at least one URL, e.g. https://10.0.0.1:2379")
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise InvalidArgument(f"--etcd: {url!r} is not https://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            raise InvalidArgument(f"--etcd: {url!r} is not https://HOST:PORT")
    return endpoints
