"""Why a TLS handshake failed, in one line, when the cause is a certificate's dates, its
revocation, its issuer or its use: the peer refused this host's certificate (its alert says how,
or this host's own files do: a certificate its own CA did not issue, or one not for client
authentication), or this host refused the peer's (OpenSSL's verify message says how). Shared by
the replication client and the CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

EXPIRED = "expired certificate"
NOT_YET_VALID = "certificate not yet valid"
REVOKED = "revoked certificate"
WRONG_USAGE = "wrong-usage certificate"
OTHER_CA = "certificate of another CA"
UNTRUSTED = "untrusted certificate"
# What this host's own certificate can be refused for, by name: such a refusal is reported as
# it is, never as a peer that could not be reached.
OWN_REASONS = (EXPIRED, NOT_YET_VALID, REVOKED, WRONG_USAGE, OTHER_CA)


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


def _unfit(cert: Path, ca: Path | None) -> tuple[str, str] | None:
    """Why no partner of this host's CA takes ``cert`` as a client's: (reason, why), or None."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    exts = {e.oid: e.value for e in parsed.extensions}
    basic = exts.get(ExtensionOID.BASIC_CONSTRAINTS)
    if isinstance(basic, x509.BasicConstraints) and basic.ca:
        return WRONG_USAGE, "it is a CA's certificate, not a host's"
    usage = exts.get(ExtensionOID.EXTENDED_KEY_USAGE)
    if isinstance(usage, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return WRONG_USAGE, "it is not for client authentication (its extended key usage)"
    keys = exts.get(ExtensionOID.KEY_USAGE)
    if isinstance(keys, x509.KeyUsage) and not keys.digital_signature:
        return WRONG_USAGE, "its key usage does not allow signing, which TLS needs"
    if ca is None:
        return None
    try:
        cas = x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError):
        return None
    for issuer in cas:
        try:
            parsed.verify_directly_issued_by(issuer)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    return OTHER_CA, f"it is not issued by the CA of {ca} (the one its partners trust)"


def own_certificate_refused(
    tls_error: str, cert: Path, peer: str, refused: bool = False, crl: Path | None = None,
    ca: Path | None = None,
) -> str | None:  # fmt: skip
    """``tls_error``: the text of the alert the peer sent; ``cert``: this side's certificate;
    ``refused``: the peer is known to have refused it, alert or not (a reset in the handshake
    can overtake the alert), so its dates, ``crl``, use and issuer (``ca``: this side's CA
    file) are looked at anyway."""
    low = tls_error.lower()
    if "alert certificate revoked" in low or (refused and _listed(cert, crl)):
        return f"{REVOKED}: {peer} refused the certificate {cert}: its CA revoked it"
    alerted = any(
        f"alert {a}" in low for a in ("unsupported certificate", "unknown ca", "bad certificate")
    )
    if refused or alerted:
        unfit = _unfit(cert, ca)
        if unfit is not None:
            return f"{unfit[0]}: {peer} refused the certificate {cert}: {unfit[1]}"
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
    if "unsuitable certificate purpose" in low:
        return f"{WRONG_USAGE}: the certificate of {peer} is not for server authentication"
    if "local issuer" in low or "self-signed" in low or "self signed" in low:
        return f"{UNTRUSTED}: the certificate of {peer} is not issued by a CA this host trusts"
    if "revoked" in low:
        return f"{REVOKED}: the certificate of {peer} is revoked (this host's CRL lists it)"
    if "not yet valid" in low:
        return (
            f"{NOT_YET_VALID}: the certificate of {peer} is not valid yet (are the clocks right?)"
        )
    if "expired" in low:
        return f"{EXPIRED}: the certificate of {peer} has expired"
    return None
