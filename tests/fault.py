"""Fault injection for tests: small or read-only file systems made by the test itself.

The suite runs as root (CI does, and QEMU tests need it anyway), so these never skip: a mount
that fails is a broken test machine, reported as a failure rather than hidden.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(mountpoint: Path, size: str = "1M", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mountpoint`` (created if needed), unmounted on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, (
        f"cannot mount a tmpfs at {mountpoint} (root needed): {done.stderr}"
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
