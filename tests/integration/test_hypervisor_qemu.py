"""The QEMU driver against real qemu-system-x86_64 processes (TCG)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmreplica._internal.drivers.qemu.command_line import pid_path, qmp_path
from vmreplica._internal.drivers.qemu.qemu import (
    VmEnd,
    VmSpec,
    attach,
    is_vm_process,
    launch,
)
from vmreplica._internal.drivers.qemu.qmp import QmpCommandError
from vmreplica.errors import ConnectionFailed, InvalidArgument, InvalidState, NotFound, VmrError

# A boot sector that enables the ACPI power button, prints "R" on the serial port, then polls
# PM1 status and powers off through PM1 control (SLP_EN, S5) once the button is pressed:
# the smallest guest that obeys system_powerdown. PM base is 0x600 under SeaBIOS on q35.
ACPI_GUEST = bytes.fromhex(
    "BA0206 B80001 EF"  # PM1_EN |= PWRBTN_EN
    "B052 BAF803 EE"  # 'R' on COM1
    "BA0006 ED A90001 74F7"  # until PM1_STS & PWRBTN_STS
    "BA0406 B80020 EF"  # PM1_CNT = SLP_EN | S5
    "F4 EBFE"  # halt
)


def reap(root: Path) -> None:
    """SIGKILL every process whose command line mentions ``root``, and wait for them."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in argv and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
            os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}/cmdline").read_bytes():
            time.sleep(0.02)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        reap(tmp_path)


def qcow2(root: Path, name: str = "disk0.qcow2", size: str = "16M") -> Path:
    path = root / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def acpi_disk(root: Path) -> Path:
    raw = root / "boot.raw"
    raw.write_bytes(ACPI_GUEST.ljust(510, b"\0") + b"\x55\xaa" + bytes(4 * 1024 * 1024 - 512))
    path = root / "boot.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    return path


def make_spec(root: Path, *disks: Path, name: str = "vm1") -> VmSpec:
    return VmSpec(
        id=str(uuid.uuid4()),
        name=name,
        cpus=1,
        memory_mb=64,
        disks=disks,
        run_dir=root / "run" / name,
    )


async def guest_armed(spec: VmSpec) -> None:
    """Wait until the ACPI guest has enabled its power button (it then prints "R")."""
    serial = spec.run_dir / "serial.log"
    for _ in range(300):
        if serial.exists() and b"R" in serial.read_bytes():
            return
        await asyncio.sleep(0.05)
    pytest.fail("the test guest did not boot")


def running(spec: VmSpec) -> bool:
    text = pid_path(spec).read_text() if pid_path(spec).exists() else ""
    return bool(text.strip()) and is_vm_process(int(text), spec)


def test_launch_and_qemu_io_write_read_verify(root: Path) -> None:
    disk = qcow2(root)
    spec = make_spec(root, disk)

    async def scenario() -> None:
        vm = await launch(spec)
        assert await vm.status() == "running"
        assert is_vm_process(vm.pid, spec)
        wrote = await vm.hmp('qemu-io disk0 "write -P 0xab 1M 64k"')
        assert "wrote 65536/65536 bytes at offset 1048576" in wrote
        same = await vm.hmp('qemu-io disk0 "read -P 0xab 1M 64k"')
        assert "read 65536/65536" in same and "Pattern verification failed" not in same
        other = await vm.hmp('qemu-io disk0 "read -P 0xcd 1M 64k"')
        assert "Pattern verification failed at offset 1048576" in other
        await vm.quit()
        assert await vm.wait_end() is VmEnd.EXITED

    asyncio.run(scenario())
    assert not running(spec)
    assert not pid_path(spec).exists()  # QEMU removes it on a clean exit
    # The write went through the block layer into the image itself.
    check = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 1M 64k", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Pattern verification failed" not in check.stdout


def test_disconnect_then_attach_finds_the_running_vm(root: Path) -> None:
    spec = make_spec(root, qcow2(root))

    async def start() -> int:
        vm = await launch(spec)
        await vm.hmp('qemu-io disk0 "write -P 0x11 0 4k"')
        await vm.disconnect()
        with pytest.raises(InvalidState):
            await vm.status()
        return vm.pid

    async def again(pid: int) -> None:
        vm = await attach(spec)
        assert vm is not None and vm.pid == pid
        assert await vm.status() == "running"
        assert "Pattern verification failed" not in await vm.hmp(
            'qemu-io disk0 "read -P 0x11 0 4k"'
        )
        await vm.quit()

    pid = asyncio.run(start())
    assert running(spec)
    asyncio.run(again(pid))  # a fresh event loop, as in a restarted agent
    assert not running(spec)


def test_vm_survives_sigkill_of_the_launching_process(root: Path) -> None:
    spec = make_spec(root, qcow2(root))
    launcher = (
        "import asyncio, sys, uuid\n"
        "from pathlib import Path\n"
        "from vmreplica._internal.drivers.qemu.qemu import VmSpec, launch\n"
        "async def main():\n"
        f"    spec = VmSpec({spec.id!r}, 'vm1', 1, 64, (Path({str(spec.disks[0])!r}),),\n"
        f"                  Path({str(spec.run_dir)!r}))\n"
        "    vm = await launch(spec)\n"
        "    print(vm.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
    finally:
        # The agent's whole process group, holding the QMP connection, as a service manager
        # or a Ctrl-C would end it.
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()

    async def scenario() -> None:
        vm = await attach(spec)
        assert vm is not None and vm.pid == pid
        assert await vm.status() == "running"
        await vm.quit()

    assert running(spec)
    asyncio.run(scenario())


def test_attach_after_qemu_was_killed_returns_none_and_relaunch_works(root: Path) -> None:
    spec = make_spec(root, qcow2(root))

    async def crash() -> None:
        vm = await launch(spec)
        os.kill(vm.pid, signal.SIGKILL)  # from outside, as the OOM killer would
        assert await vm.wait_end() is VmEnd.DIED
        assert not await vm.wait_shutdown(0.1)

    async def after() -> None:
        assert await attach(spec) is None
        vm = await launch(spec)  # over the stale pidfile and monitor socket
        assert await vm.status() == "running"
        await vm.kill()
        assert await vm.wait_end() is VmEnd.DIED

    asyncio.run(crash())
    assert pid_path(spec).exists() and qmp_path(spec).exists()  # left behind by the crash
    asyncio.run(after())


def test_pidfile_naming_another_process_is_not_taken_for_the_vm(root: Path) -> None:
    spec = make_spec(root, qcow2(root))
    spec.run_dir.mkdir(parents=True)
    pid_path(spec).write_text(f"{os.getpid()}\n")
    assert not is_vm_process(os.getpid(), spec)
    assert asyncio.run(attach(spec)) is None


def test_same_vm_id_in_another_run_dir_is_a_different_vm(root: Path) -> None:
    spec = make_spec(root, qcow2(root))
    twin = VmSpec(spec.id, "twin", 1, 64, (qcow2(root, "twin.qcow2"),), root / "run" / "twin")

    async def scenario() -> None:
        vm = await launch(spec)
        assert await attach(twin) is None
        assert not is_vm_process(vm.pid, twin)
        with pytest.raises(InvalidState, match="already running"):
            await launch(spec)
        await vm.quit()

    asyncio.run(scenario())


def test_acpi_powerdown_leaves_qemu_alive_in_shutdown(root: Path) -> None:
    spec = make_spec(root, acpi_disk(root), qcow2(root))

    async def scenario() -> None:
        vm = await launch(spec)
        await guest_armed(spec)
        await vm.powerdown()
        assert await vm.wait_shutdown(10)
        assert await vm.status() == "shutdown"
        assert await vm.wait_end() is VmEnd.POWERED_OFF
        assert is_vm_process(vm.pid, spec)  # -no-shutdown
        await vm.quit()
        assert await vm.wait_end() is VmEnd.EXITED

    asyncio.run(scenario())
    assert not running(spec)


def test_guest_poweroff_while_the_agent_is_away_is_seen_on_attach(root: Path) -> None:
    spec = make_spec(root, acpi_disk(root))

    async def power_off_unwatched() -> None:
        vm = await launch(spec)
        await guest_armed(spec)
        await vm.powerdown()
        await vm.disconnect()

    async def come_back() -> None:
        await asyncio.sleep(0.5)
        vm = await attach(spec)
        assert vm is not None
        assert await asyncio.wait_for(vm.wait_end(), 10) is VmEnd.POWERED_OFF
        assert await vm.status() == "shutdown"
        # Images are still open: killing QEMU now is no clean exit, power-off or not.
        await vm.kill()
        assert await vm.wait_end() is VmEnd.DIED

    asyncio.run(power_off_unwatched())
    asyncio.run(come_back())


def test_powerdown_ignored_by_a_guest_without_os(root: Path) -> None:
    spec = make_spec(root, qcow2(root))

    async def scenario() -> None:
        vm = await launch(spec)
        await vm.powerdown()
        assert not await vm.wait_shutdown(1.0)
        assert await vm.status() == "running"
        await vm.kill()
        assert await vm.wait_end() is VmEnd.DIED
        with pytest.raises(InvalidState):
            await vm.execute("query-status")

    asyncio.run(scenario())
    assert not running(spec)


def test_qmp_errors_carry_qemu_description_and_args_pass_through(root: Path) -> None:
    spec = make_spec(root, qcow2(root))

    async def scenario() -> None:
        vm = await launch(spec)
        with pytest.raises(QmpCommandError, match="nosuch") as err:
            await vm.execute("block-dirty-bitmap-add", {"node": "nosuch", "name": "b"})
        assert "VM 'vm1'" in str(err.value) and err.value.command == "block-dirty-bitmap-add"
        add = {"node": "disk0", "name": "b0", "persistent": True}
        await vm.execute(
            "transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": add}]}
        )
        nodes = await vm.execute("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        bitmaps = {n["node-name"]: n.get("dirty-bitmaps", []) for n in nodes}
        assert {"disk0", "disk0-file"} <= set(bitmaps)
        assert [b["name"] for b in bitmaps["disk0"]] == ["b0"]
        with pytest.raises(VmrError, match="has not been found"):
            await vm.execute("no-such-command")
        await vm.quit()

    asyncio.run(scenario())


def test_second_monitor_client_is_refused_while_one_is_connected(root: Path) -> None:
    spec = make_spec(root, qcow2(root))

    async def scenario() -> None:
        vm = await launch(spec)
        with pytest.raises(ConnectionFailed, match="another client"):
            await attach(spec, timeout=1.0)
        assert await vm.status() == "running"  # the first session is unharmed
        await vm.quit()

    asyncio.run(scenario())


def test_launch_refuses_missing_and_non_qcow2_disks(root: Path) -> None:
    raw = root / "disk.raw"
    raw.write_bytes(bytes(1024 * 1024))
    missing = root / "nope.qcow2"
    with pytest.raises(NotFound, match=r"nope\.qcow2 does not exist"):
        asyncio.run(launch(make_spec(root, missing)))
    with pytest.raises(InvalidArgument, match=r"disk\.raw is not a qcow2 image"):
        asyncio.run(launch(make_spec(root, raw)))
    with pytest.raises(InvalidArgument, match="given twice"):
        disk = qcow2(root)
        asyncio.run(launch(make_spec(root, disk, disk)))
    with pytest.raises(InvalidArgument, match="not a UUID"):
        asyncio.run(launch(VmSpec("x", "vm", 1, 64, (qcow2(root, "d.qcow2"),), root / "r")))


def test_qemu_start_failure_reports_its_stderr(root: Path) -> None:
    base = qcow2(root, "base.qcow2")
    top = root / "top.qcow2"
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)]
    subprocess.run(cmd, check=True)
    base.unlink()
    spec = make_spec(root, top)
    with pytest.raises(VmrError, match=r"QEMU failed to start VM 'vm1': .*base\.qcow2") as err:
        asyncio.run(launch(spec))
    assert "\n" not in str(err.value)
    assert not running(spec)
