"""The pending log of a primary: ``<state>/replication/<vm id>/pending/<sequence>/``, one
directory per delta, complete once its ``manifest.json`` exists. Deltas leave it in order, each
only after the replica acknowledged it (or said it already has it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from vmreplica._internal.config import HostConfig
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport.delta import disk_file


class PendingLog:
    def __init__(self, config: HostConfig) -> None:
        self._config = config

    def vm_dir(self, vm_id: str) -> Path:
        return self._config.state_dir / "replication" / vm_id

    def root(self, vm_id: str) -> Path:
        return self.vm_dir(vm_id) / "pending"

    def delta_dir(self, vm_id: str, sequence: int) -> Path:
        return self.root(vm_id) / str(sequence)

    def entries(self, vm_id: str) -> list[tuple[int, Path]]:
        """``(sequence, directory)``, oldest first; an entry without a manifest is not
        committed yet."""
        root = self.root(vm_id)
        if not root.is_dir():
            return []
        return sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit())

    def manifest(self, delta_dir: Path) -> wire.DeltaManifest | None:
        path = delta_dir / wire.MANIFEST
        return wire.DeltaManifest.from_json(path.read_bytes()) if path.exists() else None

    def size(self, vm_id: str) -> int:
        return sum(f.stat().st_size for _, d in self.entries(vm_id) for f in d.glob("*.qcow2"))

    def files(self, vm_id: str, sequence: int, disks: int) -> list[Path]:
        """Where delta ``sequence`` keeps each replicated disk (``disk{n}`` of the wire)."""
        return [disk_file(self.delta_dir(vm_id, sequence), n) for n in range(disks)]

    def clear(self, vm_id: str) -> None:
        shutil.rmtree(self.root(vm_id), ignore_errors=True)

    def forget(self, vm_id: str) -> None:
        """Everything replication keeps for the VM, when it is removed or reversed."""
        shutil.rmtree(self.vm_dir(vm_id), ignore_errors=True)
