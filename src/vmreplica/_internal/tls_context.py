"""TLS contexts from the certificates of the private CA (certs.py), and the names they carry:
what the CLI needs to reach an agent, without `cryptography`, which only makes and reads
certificates (its import alone costs a command about 40 ms).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path

from vmreplica.errors import InvalidArgument, NotFound, StorageError

PathArg = str | os.PathLike[str]
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def peer_dns_names(peercert: Mapping[str, object] | None) -> list[str]:
    """DNS SANs from ``SSLSocket.getpeercert()``, the verified identity authorization uses."""
    sans = (peercert or {}).get("subjectAltName")
    entries = sans if isinstance(sans, tuple) else ()
    pairs = [e for e in entries if isinstance(e, tuple) and len(e) == 2]
    return [v for k, v in pairs if k == "DNS" and isinstance(v, str)]


def server_ssl_context(
    ca: PathArg, cert: PathArg, key: PathArg, crl: PathArg | None = None
) -> ssl.SSLContext:
    """Listener side: a client is admitted only with a certificate from our CA (not revoked
    by ``crl`` when one is given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _finish_context(ctx, Path(ca), Path(cert), Path(key), crl)


def client_ssl_context(
    ca: PathArg, cert: PathArg, key: PathArg, crl: PathArg | None = None
) -> ssl.SSLContext:
    """Connecting side: the server must prove both our CA and the host name we dialled."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True  # the default, but this module's reason to exist
    return _finish_context(ctx, Path(ca), Path(cert), Path(key), crl)


def etcd_client_ssl_context(ca: PathArg, cert: PathArg, key: PathArg) -> ssl.SSLContext:
    """A client context for etcd, capped at TLS 1.2: under 1.3 etcd checks our certificate after
    the handshake has completed on our side, and its refusal arrives as a reset connection that
    cannot be told from a member that is down; under 1.2 it is an alert in the handshake, so a
    wrong etcd_cert is reported as one."""
    ctx = client_ssl_context(ca, cert, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def load_crl(ctx: ssl.SSLContext, crl: PathArg) -> int:
    """Check peers' certificates against ``crl`` from now on; the number of revoked serials.

    Loading into a live context is how a reload works: OpenSSL keeps every CRL it was given and
    uses the newest one of an issuer, and a revocation is never taken back."""
    path = Path(crl)
    data = _read(path, "CRL")
    from cryptography import x509  # only where a CRL is configured

    try:
        count = len(list(x509.load_pem_x509_crl(data)))
        ctx.load_verify_locations(cafile=path)
    except (ValueError, ssl.SSLError) as e:
        raise InvalidArgument(f"{path} is not a PEM certificate revocation list ({e})") from e
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return count


def _finish_context(
    ctx: ssl.SSLContext, ca: Path, cert: Path, key: Path, crl: PathArg | None
) -> ssl.SSLContext:
    """Only our CA is trusted, never the system store, so public certificates earn nothing."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca_pem = _read(ca, "CA certificate").decode("ascii", errors="replace")
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as e:
        raise InvalidArgument(f"{ca} is not a PEM CA certificate ({e.reason or e})") from e
    _read(cert, "certificate")  # ssl's own errors do not say which file is missing
    _read(key, "private key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        why = "they do not match" if e.reason == "KEY_VALUES_MISMATCH" else (e.reason or str(e))
        raise InvalidArgument(f"cannot use certificate {cert} with key {key}: {why}") from e
    if crl is not None:
        load_crl(ctx, crl)
    return ctx


def check_dns_name(raw: str) -> str:
    """A name a certificate of this CA can carry, lower-cased. Single hosts only: a wildcard
    would let one stolen key impersonate a whole domain."""
    name = raw.strip().lower()  # DNS ignores case; authorization compares strings
    if not name:
        raise InvalidArgument("empty DNS name")
    if name.rsplit(".", 1)[-1].isdigit():  # no top-level domain is numeric
        raise InvalidArgument(f"{raw!r} looks like an IP address; name the host by DNS")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        rule = "labels of 1-63 letters, digits, inner hyphens; 253 chars at most; no '*'"
        raise InvalidArgument(f"{raw!r} is not a valid DNS name ({rule})")
    return name


def _read(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise NotFound(f"{what} not found: {path}{hint}") from e
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
