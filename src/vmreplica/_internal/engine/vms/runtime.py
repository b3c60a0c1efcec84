"""Running VMs: start, stop, watch, and find again after an agent restart.

A VM's process outlives the agent: on start-up the agent reattaches to every VM it left running
and records those whose process died meanwhile. Operations on one VM are serialized by its
``vm`` lock; different VMs proceed in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmreplica._internal.engine.context import Context
from vmreplica._internal.ports.hypervisor import VmProcess
from vmreplica._internal.store.vms import VmRecord
from vmreplica.errors import InvalidState, VmrError

if TYPE_CHECKING:  # the service owns the runtime; the runtime only looks VMs up through it
    from vmreplica._internal.engine.vms.service import VmService

log = logging.getLogger("vmreplica.vms")

OFF = "Off"
RUNNING = "Running"
DEFAULT_STOP_TIMEOUT = 60.0


class VmRuntime:
    def __init__(self, ctx: Context, vms: VmService) -> None:
        self._ctx = ctx
        self._vms = vms
        self._running: dict[str, VmProcess] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        # Hooks for the replication engine: a VM about to start, and a VM that went off.
        self.start_guards: list[Callable[[VmRecord], None]] = []
        self.on_off: list[Callable[[VmRecord, bool], None]] = []
        self.on_started: list[Callable[[VmRecord], None]] = []

    def process(self, vm_id: str) -> VmProcess | None:
        return self._running.get(vm_id)

    def _set_state(self, vm_id: str, state: str) -> None:
        self._ctx.stores.vms.set_state(vm_id, state)

    async def start(self, name: str) -> None:
        rec = self._vms.find(name)
        async with self._ctx.locks.vm(rec.id):
            rec = self._vms.find(name)
            if rec.state == RUNNING:
                raise InvalidState(f"VM {name} is already running")
            for guard in self.start_guards:
                guard(rec)
            for disk in rec.disks:
                for other_id in self._ctx.stores.vms.users_of(disk, other_than=rec.id):
                    other = self._vms.by_id(other_id)
                    raise InvalidState(
                        f"VM {name} cannot start: its disk {disk} is also a disk of VM "
                        f"{other.name if other else other_id}"
                    )
            self._vms.run_dir(rec.id).mkdir(parents=True, exist_ok=True)
            process = await self._ctx.driver.launch(self._vms.spec(rec))
            self._set_state(rec.id, RUNNING)
            self._adopt(rec, process)
            self._ctx.events.record("vm-started", f"started VM {name} (pid {process.pid})", name)
            for hook in self.on_started:
                hook(rec)

    def _adopt(self, rec: VmRecord, process: VmProcess) -> None:
        self._running[rec.id] = process
        self._watchers[rec.id] = asyncio.create_task(
            self._watch(rec.id, process), name=f"watch-{rec.name}"
        )

    async def _watch(self, vm_id: str, process: VmProcess) -> None:
        """Notice a guest that powered itself off, or a process that died, and record it Off."""
        clean = await process.wait_exit_or_shutdown()
        rec = self._vms.by_id(vm_id)
        if rec is None or self._running.get(vm_id) is not process:
            return
        async with self._ctx.locks.vm(vm_id):
            if self._running.get(vm_id) is not process:
                return
            if clean:
                with contextlib.suppress(VmrError):
                    await process.quit()
            why = "the guest powered off" if clean else "its process died"
            await self._went_off(rec, clean, why)

    async def _went_off(self, rec: VmRecord, clean: bool, why: str) -> None:
        self._running.pop(rec.id, None)
        self._watchers.pop(rec.id, None)
        self._set_state(rec.id, OFF)
        level = "info" if clean else "error"
        kind = "vm-off" if clean else "vm-died"
        self._ctx.events.record(kind, f"VM {rec.name} is off: {why}", rec.name, level)
        for hook in self.on_off:
            hook(rec, clean)

    async def _stop_process(self, rec: VmRecord, force: bool, timeout: float) -> None:
        process = self._running.get(rec.id)
        watcher = self._watchers.pop(rec.id, None)
        if watcher is not None:
            watcher.cancel()
        if process is None:
            self._set_state(rec.id, OFF)
            return
        if not force:
            await process.powerdown()
            if not await process.wait_shutdown(timeout):
                self._watchers[rec.id] = asyncio.create_task(self._watch(rec.id, process))
                raise InvalidState(
                    f"VM {rec.name} did not power off within {timeout:.0f} s (the guest ignored the "
                    "ACPI request): use `vm stop --force` to kill it"
                )
            await process.quit()
            clean = True
        else:
            # Turned off like a power cut for the guest, but the process still closes its
            # images, so change tracking survives; killed only if it does not obey.
            try:
                await process.quit(timeout=10.0)
                clean = True
            except VmrError:
                await process.kill()
                clean = False
        why = "stopped by the operator" + (" (turned off)" if force else "")
        await self._went_off(rec, clean=clean, why=why)

    async def stop_if_running(self, rec: VmRecord) -> None:
        """Turn it off at once; the caller holds the VM's lock."""
        if self._running.get(rec.id) is not None or rec.state == RUNNING:
            await self._stop_process(rec, force=True, timeout=0)

    async def ensure_off(self, vm_id: str) -> None:
        rec = self._vms.by_id(vm_id)
        if rec is not None and rec.state == RUNNING:
            async with self._ctx.locks.vm(vm_id):
                await self._stop_process(rec, force=True, timeout=0)

    async def kill(self, vm_id: str, why: str) -> bool:
        """Kill it at once, before waiting for its lock (a node fenced from its cluster must
        not run it a moment longer); then record it off. False: it was not running."""
        process = self._running.get(vm_id)
        rec = self._vms.by_id(vm_id)
        if process is None or rec is None:
            return False
        await process.kill()
        async with self._ctx.locks.vm(vm_id):
            if self._running.get(vm_id) is process:  # not recorded by its watcher meanwhile
                watcher = self._watchers.pop(vm_id, None)
                if watcher is not None:
                    watcher.cancel()
                await self._went_off(rec, False, why)
        return True

    async def stop(
        self, name: str, force: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT
    ) -> None:
        rec = self._vms.find(name)
        async with self._ctx.locks.vm(rec.id):
            rec = self._vms.find(name)
            if rec.state != RUNNING:
                raise InvalidState(f"VM {name} is not running")
            await self._stop_process(rec, force=force, timeout=timeout)

    async def monitor(self, name: str, command: str) -> str:
        """A diagnostic command; the driver runs only what is read-only (and test writes where
        host.toml's ``allow_qemu_io`` says so): a monitor as a whole is root on the host."""
        rec = self._vms.find(name)
        process = self._running.get(rec.id)
        if process is None:
            raise InvalidState(f"VM {name} is not running")
        return await process.monitor(command.strip(), self._ctx.config.allow_qemu_io)

    # -- agent life cycle ------------------------------------------------------------------

    async def recover(self) -> None:
        """Reattach to VMs left running. One VM that cannot be recovered is reported and left
        as it is: it must not keep the others down."""
        for rec in self._vms.records():
            if rec.state != RUNNING:
                continue
            try:
                await self._reattach(rec)
            except Exception as e:
                if not isinstance(e, VmrError):
                    log.exception("recovery of VM %s failed", rec.name)
                self._ctx.events.record(
                    "vm-recovery-failed", f"cannot recover VM {rec.name}: {e}", rec.name, "error"
                )

    async def reattach(self, rec: VmRecord) -> None:
        """A VM that runs but was started outside the agent (a libvirt domain it adopted)."""
        async with self._ctx.locks.vm(rec.id):
            self._set_state(rec.id, RUNNING)
            await self._reattach(rec)

    async def _reattach(self, rec: VmRecord) -> None:
        process = await self._ctx.driver.attach(self._vms.spec(rec))
        if process is None:
            await self._went_off(rec, False, "its process ended while the agent was down")
            return
        if await process.status() == "shutdown":
            with contextlib.suppress(VmrError):
                await process.quit()
            await self._went_off(rec, True, "the guest powered off while the agent was down")
            return
        self._adopt(rec, process)
        self._ctx.events.record(
            "vm-reattached", f"reattached to running VM {rec.name} (pid {process.pid})", rec.name
        )

    async def detach_all(self) -> None:
        """On agent shutdown: let VMs run on, dropping only our connections to them."""
        for task in self._watchers.values():
            task.cancel()
        for process in self._running.values():
            with contextlib.suppress(VmrError):
                await process.disconnect()
        self._watchers.clear()
        self._running.clear()
