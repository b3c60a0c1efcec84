"""Pure validation of operator input: names, FQDN patterns, durations, times, sizes, paths, and
per-VM replication settings; for the CLI, the API layer and the engine alike.

Each function returns the normalized value or raises :class:`InvalidArgument` with one line
that names the bad value and what would be accepted.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Protocol, TypeVar

from vmreplica._internal.bandwidth import Schedule
from vmreplica.errors import InvalidArgument

# Used with fullmatch only: with match, "$" also matches before a final newline.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_VM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._+-]{0,98}[A-Za-z0-9._+-])?")
_TRUST_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
# Trees of the operating system: never replica storage, in whole or in part.
_SYSTEM_TREES = tuple(
    Path(p)
    for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
              "/run", "/sbin", "/sys", "/usr")
)  # fmt: skip
# Shared directories that may hold storage below them, but are not storage themselves.
_SHARED_ROOTS = tuple(
    Path(p) for p in ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var")
)
_KERNEL_MAGIC = (0x202, b"HdrS")  # a bzImage's setup header
_ELF_MAGIC = b"\x7fELF"
_INITRD_MAGICS = (
    b"\x1f\x8b",  # gzip
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\xfd7zXZ\x00",  # xz
    b"\x5d\x00\x00",  # lzma
    b"BZh",  # bzip2
    b"\x02\x21\x4c\x18",  # lz4 legacy
    b"\x04\x22\x4d\x18",  # lz4
    b"\x89LZO",  # lzo
    b"070701",  # cpio newc
    b"070702",  # cpio crc
)

_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(?:I?B)?\s*", re.IGNORECASE)
FREQUENCIES = (30, 300, 900)
MAX_RECOVERY_POINT_INTERVAL = 86400

MONITORING_HOURS = (1, 2, 3, 4, 6, 8, 12, 24)
MONITORING_DAYS = (2, 3, 4, 5, 6, 7)
ALLOWED_MONITORING_INTERVALS = frozenset(
    [h * 3600 for h in MONITORING_HOURS] + [d * 86400 for d in MONITORING_DAYS]
)


def size(text: str) -> int:
    """Bytes from an operator-typed size, with qemu's binary suffixes (``1.5G``, ``512M``)."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"invalid size {text!r}: use a number with K, M, G, T, P or E")
    value = Fraction(match.group(1)) * (1 << _UNITS[match.group(2).upper()])
    if value.denominator != 1:
        raise InvalidArgument(f"invalid size {text!r}: not a whole number of bytes")
    if value <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be greater than zero")
    return int(value)


class ReplicationSettings(Protocol):
    @property
    def frequency_sec(self) -> int: ...
    @property
    def recovery_history(self) -> int: ...
    @property
    def snapshot_frequency_hour(self) -> int | None: ...
    @property
    def recovery_point_interval(self) -> int: ...
    @property
    def auto_resync_start(self) -> str: ...
    @property
    def auto_resync_end(self) -> str: ...
    @property
    def bandwidth_schedule(self) -> str | None: ...


S = TypeVar("S", bound=ReplicationSettings)


def replication_settings(s: S) -> S:
    """Hyper-V's rules for per-VM settings, for ``enable``/``set`` and for what a peer sends."""
    if s.frequency_sec not in FREQUENCIES:
        raise InvalidArgument(
            f"invalid replication frequency {s.frequency_sec}: use 30, 300 or 900 seconds"
        )
    if not 0 <= s.recovery_history <= 24:
        raise InvalidArgument(
            f"invalid recovery history {s.recovery_history}: use 0 to 24 additional points"
        )
    if s.snapshot_frequency_hour is not None:
        if not 1 <= s.snapshot_frequency_hour <= 12:
            raise InvalidArgument("invalid --snapshot-frequency: use 1 to 12 hours")
        if s.recovery_history == 0:
            raise InvalidArgument("--snapshot-frequency needs --recovery-history above 0")
    if not 1 <= s.recovery_point_interval <= MAX_RECOVERY_POINT_INTERVAL:
        raise InvalidArgument(
            f"invalid --recovery-point-interval {s.recovery_point_interval}: use 1 to "
            f"{MAX_RECOVERY_POINT_INTERVAL} seconds"
        )
    for edge in (s.auto_resync_start, s.auto_resync_end):
        if time_of_day(edge) != edge:
            raise InvalidArgument(f"invalid auto-resynchronize window time {edge!r}: use HH:MM")
    if s.bandwidth_schedule:
        Schedule.parse(s.bandwidth_schedule)
    return s


def fqdn(value: str, what: str = "server name") -> str:
    name = value.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(
            f"invalid {what} {value!r}: expected a host name such as vmhost1.contoso.com"
        )
    return name


def kerberos_principal(value: str) -> str:
    """``service/host[@REALM]`` or ``name[@REALM]``: printable, no spaces, bounded."""
    if not 0 < len(value) <= 255 or not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidArgument(
            f"invalid Kerberos principal {value[:60]!r}: expected one such as "
            "host/vmhost1.contoso.com@CONTOSO.COM"
        )
    return value


def primary_server_pattern(value: str) -> str:
    """An allowed-primary pattern: an FQDN, or ``*.`` followed by one (Hyper-V's only wildcard)."""
    pattern = value.lower().rstrip(".")
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest:
            raise InvalidArgument(
                f"invalid allowed primary server {value!r}: only one wildcard is allowed"
            )
        fqdn(rest, "allowed primary server")
        return pattern
    if "*" in pattern:
        raise InvalidArgument(
            f"invalid allowed primary server {value!r}: a wildcard may only be the whole first "
            "label, as in *.contoso.com"
        )
    return fqdn(pattern, "allowed primary server")


def pattern_matches(pattern: str, name: str) -> bool:
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def vm_name(value: str) -> str:
    if "/" in value or "\\" in value or "\0" in value:
        raise InvalidArgument(f"invalid VM name {value!r}: a name may not contain a path separator")
    if value in (".", "..") or not _VM_NAME.fullmatch(value):
        raise InvalidArgument(
            f"invalid VM name {value!r}: use 1-100 letters, digits, spaces, '.', '_', '+' or '-', "
            "starting with a letter or digit and not ending with a space"
        )
    return value


def trust_group(value: str) -> str:
    if not _TRUST_GROUP.fullmatch(value):
        raise InvalidArgument(
            f"invalid trust group {value!r}: use 1-64 letters, digits, spaces, '.', '_' or '-'"
        )
    return value


def monitoring_interval(value: str | int) -> int:
    """Seconds from ``12h``, ``2d``, ``3600`` or ``3600s``; only Hyper-V's choices are allowed."""
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+)\s*([smhd]?)", text)
    if not match:
        raise InvalidArgument(f"invalid monitoring interval {value!r}: use e.g. 12h or 2d")
    number, unit = int(match.group(1)), match.group(2) or "s"
    seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds not in ALLOWED_MONITORING_INTERVALS:
        raise InvalidArgument(
            f"invalid monitoring interval {value!r}: allowed are 1, 2, 3, 4, 6, 8, 12 or 24 hours, "
            "or 2 to 7 days"
        )
    return seconds


def time_of_day(value: str) -> str:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise InvalidArgument(f"invalid time of day {value!r}: expected HH:MM, e.g. 09:00")
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def port(value: int, what: str = "port") -> int:
    if not 1 <= value <= 65535:
        raise InvalidArgument(f"invalid {what} {value}: expected 1 to 65535")
    return value


def storage_location(value: str) -> Path:
    """An absolute path for replica storage: not a system tree, not a shared root itself, and
    not reached through a symbolic link (whose target could be changed under the agent)."""
    if not value or "\0" in value:
        raise InvalidArgument("invalid storage location: empty path")
    path = Path(value)
    if not path.is_absolute():
        raise InvalidArgument(f"invalid storage location {value!r}: an absolute path is required")
    if any(part == ".." for part in path.parts):
        raise InvalidArgument(f"invalid storage location {value!r}: '..' is not allowed")
    path = Path(os.path.normpath(path))
    if path.resolve() != path:
        raise InvalidArgument(
            f"invalid storage location {value!r}: it goes through a symbolic link "
            f"(to {path.resolve()}); give the real path"
        )
    if path in _SHARED_ROOTS or any(path == t or t in path.parents for t in _SYSTEM_TREES):
        raise InvalidArgument(
            f"invalid storage location {value!r}: a system directory; use a directory of its "
            "own, such as /var/lib/vmreplica/replicas"
        )
    return path


def child_path(folder: Path, name: str) -> Path:
    """``folder/name`` for a VM or disk name, refusing anything that would escape ``folder``."""
    candidate = (folder / name).resolve()
    if candidate.parent != folder.resolve():
        raise InvalidArgument(f"name {name!r} would escape its storage folder {folder}")
    return candidate


def boot_image(path: Path, kind: str) -> None:
    """Refuse a file that is not a kernel (bzImage or ELF) or an initrd (cpio, compressed or
    not): a VM booted with any other file would hand its content to the guest."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError as e:
        raise InvalidArgument(f"cannot read {kind} {path}: {e.strerror or e}") from None
    if kind == "kernel":
        offset, magic = _KERNEL_MAGIC
        ok = head[offset : offset + len(magic)] == magic or head.startswith(_ELF_MAGIC)
    else:
        ok = head.startswith(_INITRD_MAGICS)
    if not ok:
        what = "a Linux kernel (bzImage or ELF)" if kind == "kernel" else "an initrd (cpio archive)"
        raise InvalidArgument(f"--{kind} {path}: not {what}")


def host_memory_mb() -> int:
    """This host's memory: a VM given more could never start here."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise InvalidArgument("cannot read the host's memory size from /proc/meminfo")


def boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "yes", "on", "1", "$true"):
        return True
    if text in ("false", "no", "off", "0", "$false"):
        return False
    raise InvalidArgument(f"invalid boolean {value!r}: expected true or false")
