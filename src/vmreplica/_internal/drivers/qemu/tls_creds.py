"""QEMU's TLS credentials objects for the initial copy's NBD connection: ``tls-creds-x509`` with
the host's certificates (and the CA's CRL when host.toml names one), or ``tls-creds-psk`` with a
one-time key (hosts that authenticate with Kerberos), each laid out in the directory QEMU reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmreplica._internal.config import TlsFiles
from vmreplica._internal.ports.hypervisor import NbdCredentials, NbdPsk

TLS_ID = "vmr-tls"
# RFC 7919's ffdhe3072 group (``openssl genpkey -genparam -algorithm DH -pkeyopt
# group:ffdhe3072``). A server's credentials without a ``dh-params.pem`` make QEMU generate
# 2048-bit DH parameters each time it loads them: 0.2 to 2.5 s of CPU here, on the initial
# copy's critical path, for parameters that TLS 1.3 (ECDHE or RFC 7919 groups) never uses.
# A published group is also the safer choice for TLS 1.2's DHE (RFC 7919, section 1).
_DH_PARAMS = (
    "-----BEGIN DH PARAMETERS-----\n"
    "MIIBiAKCAYEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n"
    "+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n"
    "87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n"
    "YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n"
    "7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n"
    "ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3\n"
    "7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32\n"
    "nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZsYu\n"
    "N///////////AgEC\n"
    "-----END DH PARAMETERS-----\n"
)


# GnuTLS's NORMAL with AES-128-GCM first, for both kinds of credentials: the client's order
# picks the suite. NORMAL alone gives certificates AES-256-GCM, whose four more AES rounds cost
# the copy's two CPU-bound threads (qemu-img encrypting, the import's daemon decrypting) about
# 3% of their time (bench/README.md, bench_nbd_copy.py); a SHA-256 PSK cannot use AES-256-GCM
# at all (a SHA-384 suite), and NORMAL's next choice, ChaCha20-Poly1305, costs 5 times the CPU
# of AES-GCM on hosts with AES-NI. AES-128-GCM is TLS 1.3's mandatory suite (RFC 8446, 9.1).
# AES-256-GCM and ChaCha20 stay, last, for a peer that lacks it.
PRIORITY = "NORMAL:-AES-256-GCM:-CHACHA20-POLY1305:+AES-256-GCM:+CHACHA20-POLY1305"


def kv(value: str) -> str:
    """Escape for QEMU's key=value option syntax."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class TlsCreds:
    """QEMU's TLS credentials object for one side of a copy: ``tls-creds-x509`` (certificates)
    or ``tls-creds-psk`` (a one-time key, :class:`NbdPsk`), in its directory."""

    kind: Literal["x509", "psk"]
    directory: Path
    username: str | None = None

    @property
    def priority(self) -> str:
        return PRIORITY

    def options(self, endpoint: str) -> str:
        opts = (
            f"tls-creds-{self.kind},id={TLS_ID},dir={kv(str(self.directory))},endpoint={endpoint}"
        )
        if self.username:
            opts += f",username={kv(self.username)}"
        return opts + f",priority={kv(self.priority)}"


def tls_creds(
    directory: Path, creds: NbdCredentials, endpoint: Literal["server", "client"]
) -> TlsCreds:
    if isinstance(creds, NbdPsk):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = directory / "keys.psk"
        fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{creds.username}:{creds.key.hex()}\n")
        if endpoint == "server":
            _write_dh_params(directory)
        return TlsCreds("psk", directory, creds.username if endpoint == "client" else None)
    return TlsCreds("x509", tls_creds_dir(directory, creds, endpoint))


def tls_creds_dir(directory: Path, tls: TlsFiles, endpoint: Literal["server", "client"]) -> Path:
    """The directory layout QEMU's ``tls-creds-x509`` wants, as links to the agent's files."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    links = {"ca-cert.pem": tls.ca, f"{endpoint}-cert.pem": tls.cert}
    links[f"{endpoint}-key.pem"] = tls.key
    if tls.crl is not None:
        links["ca-crl.pem"] = tls.crl  # QEMU checks the peer against it when it is there
    for name, target in links.items():
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path(target).absolute())
    if endpoint == "server":
        _write_dh_params(directory)
    return directory


def _write_dh_params(directory: Path) -> None:
    """The DH parameters QEMU's server credentials load (see ``_DH_PARAMS``)."""
    path = directory / "dh-params.pem"
    path.unlink(missing_ok=True)  # a link an older layout left would be written through
    path.write_text(_DH_PARAMS)
