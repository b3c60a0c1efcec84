"""Why a TLS handshake failed, in one line, when the cause is a certificate's dates or its
revocation: the peer refused this host's certificate (its alert says how), or this host refused
the peer's (OpenSSL's verify message says how). Shared by the replication client and the CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

EXPIRED = "expired certificate"
NOT_YET_VALID = "certificate not yet valid"
REVOKED = "revoked certificate"


def _listed(cert: Path, crl: Path | None) -> bool:
    """Whether this side's own CRL lists its own certificate."""
    if crl is None:
        return False
    from cryptography import x509  # only once a handshake failed: not in every command's start

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        revoked = x509.load_pem_x509_crl(crl.read_bytes())
    except (OSError, ValueError):
        return False
    return revoked.get_revoked_certificate_by_serial_number(parsed.serial_number) is not None


def _validity(cert: Path) -> tuple[dt.datetime, dt.datetime] | None:
    from cryptography import x509

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    return parsed.not_valid_before_utc, parsed.not_valid_after_utc


def own_certificate_refused(
    tls_error: str, cert: Path, peer: str, refused: bool = False, crl: Path | None = None
) -> str | None:
    """``tls_error``: the text of the alert the peer sent; ``cert``: this side's certificate;
    ``refused``: the peer is known to have refused it, alert or not (a reset in the handshake
    can overtake the alert), so its dates and ``crl`` are looked at anyway."""
    low = tls_error.lower()
    if "alert certificate revoked" in low or (refused and _listed(cert, crl)):
        return f"{REVOKED}: {peer} refused the certificate {cert}: its CA revoked it"
    if not refused and not any(
        f"alert {a}" in low for a in ("certificate expired", "bad certificate")
    ):
        return None
    dates = _validity(cert)
    now = dt.datetime.now(dt.UTC)
    if dates is not None and now < dates[0]:
        return (
            f"{NOT_YET_VALID}: {peer} refused the certificate {cert}: it is valid from "
            f"{dates[0]:%Y-%m-%d %H:%M} UTC (are the clocks right?)"
        )
    if dates is not None and now > dates[1]:
        return (
            f"{EXPIRED}: {peer} refused the certificate {cert}: it expired on "
            f"{dates[1]:%Y-%m-%d %H:%M} UTC (issue a new one with `vmreplica cert issue`)"
        )
    return None


def peer_certificate_refused(verify_message: str, peer: str) -> str | None:
    """``verify_message``: OpenSSL's reason for refusing the peer's certificate here."""
    low = verify_message.lower()
    if "revoked" in low:
        return f"{REVOKED}: the certificate of {peer} is revoked (this host's CRL lists it)"
    if "not yet valid" in low:
        return (
            f"{NOT_YET_VALID}: the certificate of {peer} is not valid yet (are the clocks right?)"
        )
    if "expired" in low:
        return f"{EXPIRED}: the certificate of {peer} has expired"
    return None
