"""The hypervisor port: all the engine knows of a hypervisor, and all a driver must provide.

The engine speaks of VMs, disks by their position in the VM, tracking generations, deltas,
point-in-time views, byte ranges and replica chains; a driver (drivers/qemu for QEMU itself,
later libvirt) turns that into processes, QMP commands, node names, bitmaps and sockets, none of
which the engine ever sees. Structural typing (:class:`typing.Protocol`): a driver implements
the methods and imports nothing from the engine.

Change tracking, as every driver must provide it. Each replicated disk records writes in the
current *generation* G (the engine keeps G in its database). :meth:`DiskSession.cut` copies what
G recorded into a delta file per disk and starts G+1 at that same instant, for all disks at one
crash-consistent point; G keeps its bits until :meth:`DiskSession.drop`, which the engine calls
only once the delta is durable and recorded. :meth:`DiskSession.settle` brings the disks back to
exactly one recording generation G after anything went wrong in between, losing no write, or
raises ResyncRequired when G itself cannot be trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from vmreplica._internal.config import TlsFiles
from vmreplica._internal.extents import Extent
from vmreplica.errors import VmrError


@dataclasses.dataclass(frozen=True)
class NbdPsk:
    """A one-time pre-shared key for an initial copy between hosts without certificates (the
    Kerberos listener): both sides derive it from the GSS session key of the call that opened
    the import, so it never travels."""

    username: str
    key: bytes


NbdCredentials = TlsFiles | NbdPsk

Progress = Callable[[float], None]  # percent done, 0 to 100


@dataclasses.dataclass(frozen=True)
class Definition:
    """A primary's own domain XML, kept by its replica (definition.py): a driver that has
    domains defines the failed-over (``test``: the test failover's) domain from it."""

    xml: str
    test: bool = False


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """What a hypervisor needs to run a VM; ``run_dir`` is the VM's private working folder."""

    id: str
    name: str
    cpus: int
    memory_mb: int
    disks: tuple[Path, ...]
    run_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    accel: str = "tcg"
    definition: Definition | None = None  # a replica VM's primary's domain XML
    # Each disk's recorded format (None: not recorded): never told by the guest's first bytes.
    formats: tuple[str | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class DefinedVm:
    """A VM the hypervisor defines on its own (a libvirt domain made with virsh, virt-manager,
    Cockpit): the agent takes it as one of its VMs. ``spec.run_dir`` is not set."""

    spec: VmSpec
    running: bool


class VmProcess(Protocol):
    """A running VM, started or found again by the driver."""

    @property
    def pid(self) -> int: ...

    async def status(self) -> str:
        """The hypervisor's run status: "running", "paused", "shutdown" (guest powered off)…"""
        ...

    async def wait_exit_or_shutdown(self) -> bool:
        """Until the guest powers off or the process ends; False if it died (tracking lost)."""
        ...

    async def wait_shutdown(self, timeout: float) -> bool: ...

    async def powerdown(self) -> None: ...

    async def quit(self, timeout: float = 30.0) -> None:
        """End it cleanly: images closed, tracking stored."""
        ...

    async def kill(self, timeout: float = 10.0) -> None: ...

    async def disconnect(self) -> None:
        """Let go of it and leave it running (the agent stops; VMs do not)."""
        ...

    async def monitor(self, command: str, test_writes: bool) -> str:
        """A diagnostic command of the hypervisor's monitor, run only if it changes nothing
        (``test_writes``: guest-disk writes for tests too); anything else is AccessDenied."""
        ...

    async def freeze_filesystems(self, timeout: float) -> int:
        """Have the guest flush and freeze its file systems (its guest agent); how many.
        GuestAgentUnavailable when the guest has no agent that answers."""
        ...

    async def thaw_filesystems(self, timeout: float) -> int:
        """Thaw them again; harmless when nothing is frozen."""
        ...


class GuestAgentUnavailable(VmrError):
    """The guest has no agent that answers: application-consistent points cannot be taken."""


@dataclasses.dataclass(frozen=True)
class DiskOwner:
    """The disks of one VM, as a session opens them: in ``process`` when the VM runs, else in
    whatever the driver uses for disks of a VM that is off. ``replicated`` are the positions of
    the disks that replicate, in ``disks``."""

    vm_name: str
    disks: tuple[Path, ...]
    replicated: tuple[int, ...]
    run_dir: Path
    process: VmProcess | None
    vm_id: str = ""  # the VM's UUID: a libvirt domain is found by it
    formats: tuple[str | None, ...] = ()  # as VmSpec.formats


class DiskSession(Protocol):
    """The replicated disks of one VM, open for tracking and copies; deltas and ranges are by
    the disk's position among the replicated disks (``disk{n}`` of a delta)."""

    async def settle(self, generation: int) -> None: ...

    async def cut(self, generation: int, dests: Sequence[Path]) -> None:
        """A delta of what ``generation`` recorded, one sparse qcow2 per disk; the next
        generation starts at the same instant."""
        ...

    async def drop(self, generation: int) -> None: ...

    async def stop_tracking(self) -> None:
        """Remove every generation (replication removed, or tracking to start anew)."""
        ...

    async def cut_top(self, dests: Sequence[Path]) -> None:
        """After a failover: what the VM wrote into its overlays (their top image only), with
        generation 1 of tracking starting at that instant."""
        ...

    async def dirty_extents(self, generation: int) -> list[list[Extent]]:
        """Per disk, the ranges ``generation`` marks as written."""
        ...

    async def copy_ranges(
        self, dests: Sequence[Path], extents: Mapping[int, Sequence[Extent]]
    ) -> int:
        """Copy ``extents[n]`` of disk n into the qcow2 file ``dests[n]`` in place; the disks
        must not change meanwhile. Returns the bytes copied."""
        ...


class CopySource(Protocol):
    """A point-in-time view of a VM's replicated disks, for the initial copy."""


class ImportTarget(Protocol):
    """New images on a replica, served over the network for an initial copy."""

    @property
    def port(self) -> int: ...

    @property
    def exports(self) -> tuple[str, ...]: ...

    async def finish(self) -> None:
        """The copy is complete: close the images (written and flushed)."""
        ...

    async def discard(self) -> None: ...


class ReplicaChain(Protocol):
    """One replicated disk on the replica: ``base ← rp-K… ← tip`` in one directory."""

    @property
    def dir(self) -> Path: ...

    @property
    def base(self) -> Path: ...

    @property
    def tip(self) -> Path: ...

    @property
    def resync(self) -> Path:
        """Where a resynchronization's overlay lives, if there is one."""
        ...

    @property
    def top(self) -> Path:
        """What deltas go into: a resynchronization's overlay above tip while there is one."""
        ...

    async def begin_resync(self) -> None: ...

    async def end_resync(self, commit: bool) -> None:
        """Fold the resynchronization's overlay into tip (``commit``), or drop it."""
        ...

    def rp_path(self, point_id: int) -> Path: ...

    def point_ids(self) -> list[int]: ...

    async def virtual_size(self) -> int: ...

    async def check_incoming(self, delta: Path) -> None: ...

    async def apply_delta(self, delta: Path, *, missing_ok: bool = False) -> bool: ...

    async def adopt_as_base(self, image: Path) -> None:
        """An initial copy becomes the base of an empty chain."""
        ...

    async def freeze_recovery_point(self, point_id: int) -> Path: ...

    async def prune_oldest(self, pinned: Collection[int] = frozenset()) -> bool: ...

    async def overlay_for(self, point: int, overlay_path: Path) -> Path: ...

    async def recover(self, pinned: Collection[int] = frozenset()) -> list[str]: ...

    async def verify(self) -> None: ...


class HypervisorDriver(Protocol):
    # -- VMs ---------------------------------------------------------------------------------

    async def launch(self, spec: VmSpec) -> VmProcess: ...

    async def attach(self, spec: VmSpec) -> VmProcess | None:
        """The VM's process if it still runs (after an agent restart), else None."""
        ...

    async def defined_vms(self) -> list[DefinedVm]:
        """Every VM the hypervisor itself defines (none for a bare QEMU)."""
        ...

    async def forget(self, vm_id: str) -> None:
        """The VM is off and must not be started here other than through the agent, or is
        gone: whatever definition the hypervisor keeps of it goes (a libvirt domain, with its
        checkpoints' records); its files stay. Harmless when there is none."""
        ...

    async def definition(self, vm_id: str) -> str | None:
        """The hypervisor's own definition of the VM (a libvirt domain's XML), which a primary
        sends its replica; None when it keeps none."""
        ...

    async def restore(self, xml: str) -> None:
        """Define the VM again from what ``definition`` gave before a ``forget``, when the step
        that followed it failed (its checkpoints do not come back)."""
        ...

    # -- disk images -------------------------------------------------------------------------

    async def check_image(self, path: Path) -> None:
        """Refuse a file that is not a disk image this driver can run."""
        ...

    async def create_image(self, path: Path, size: int | None, backing: Path | None = None) -> None:
        """A new qcow2 image: ``size`` bytes, or the size of ``backing`` above it."""

    async def virtual_size(self, path: Path, fmt: str | None = None) -> int: ...

    async def disk_format(self, path: Path, run_dir: Path | None = None, index: int = 0) -> str:
        """A disk's format, told once when it is given to a VM and recorded with it (``run_dir``,
        ``index``: a disk from before formats were recorded, told by what the driver left)."""
        ...

    async def check_standalone(self, path: Path) -> None:
        """Raise InvalidArgument unless the image can be a replica chain's ``base`` as it is (a
        seed): in the chains' format, with no backing file and no external data file."""
        ...

    async def required_size(self, path: Path, fmt: str | None = None) -> int:
        """Bytes a copy of the image's whole content needs."""
        ...

    async def allocated(self, image: Path) -> list[Extent]:
        """The ranges the image itself holds (not what shows through from below)."""
        ...

    async def start_tracking_offline(self, disks: Sequence[Path], generation: int = 1) -> None:
        """A generation of tracking on images nothing has open (older generations go)."""
        ...

    # -- sessions, copies ----------------------------------------------------------------------

    def session(self, owner: DiskOwner) -> AbstractAsyncContextManager[DiskSession]: ...

    def point_in_time(
        self, owner: DiskOwner, generation: int | None
    ) -> AbstractAsyncContextManager[CopySource]:
        """A view of the replicated disks as they are now, tracking starting anew at that
        instant in ``generation`` (None: tracking stays as it is); for a VM that is off (kept
        off by its lock), the images themselves."""
        ...

    async def copy_to(
        self,
        source: CopySource,
        disk: int,
        address: str,
        port: int,
        export: str,
        tls: NbdCredentials,
        tls_hostname: str,
        work_dir: Path,
        progress: Progress | None = None,
        max_bytes_per_sec: int = 0,
    ) -> None:
        """Copy disk ``disk`` of ``source`` into export ``export`` of a replica's import at
        ``address:port``, checking its certificate against ``tls_hostname``."""
        ...

    async def export_to_file(
        self, source: CopySource, disk: int, dest: Path, progress: Progress | None = None
    ) -> None:
        """Copy disk ``disk`` of ``source`` into a new standalone image at ``dest``, in the
        format of replica chains (offline media for an initial replication)."""
        ...

    async def hash_view(
        self, source: CopySource, disk: int, block_size: int, first_block: int = 0,
        count: int | None = None,
    ) -> list[bytes | None]:  # fmt: skip
        """blake3 of ``count`` blocks of ``block_size`` (to the end when None) of disk ``disk``
        of a point-in-time view, from ``first_block`` on; None for a block that reads as zeros
        (holes are not read)."""
        ...

    async def hash_image(
        self, image: Path, block_size: int, first_block: int = 0, count: int | None = None
    ) -> list[bytes | None]:
        """The same of an image nothing writes (a replica chain's top, read through its
        backing chain)."""
        ...

    async def extract_blocks(
        self, source: CopySource, disk: int, dest: Path, blocks: Sequence[int], block_size: int,
        skip_zeros: bool = False,
    ) -> int:  # fmt: skip
        """A new standalone qcow2 ``dest`` holding ``blocks`` of disk ``disk`` of the view at
        their offsets (zeros as zero clusters; ``skip_zeros``: left out, for a delta into an
        empty chain), a delta like those cycles cut. Returns the bytes of data."""
        ...

    async def open_import(
        self,
        files: Sequence[Path],
        sizes: Sequence[int],
        work_dir: Path,
        vm_name: str,
        tls: NbdCredentials,
        peer_identity: str,
        listen_host: str,
        ports: tuple[int, int] | None,
    ) -> ImportTarget:
        """New images ``files`` served for one peer's initial copy, over TLS, to the client
        certificate subject ``peer_identity`` only."""
        ...

    # -- replica chains --------------------------------------------------------------------

    def chain(self, directory: Path) -> ReplicaChain: ...

    async def create_chain(self, directory: Path, virtual_size: int) -> ReplicaChain: ...

    # -- the agent's own helpers -----------------------------------------------------------------

    def end_leftovers(self, markers: Sequence[Path]) -> list[int]:
        """End helper processes an earlier agent left running on these paths."""
        ...
