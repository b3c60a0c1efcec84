"""qemu-storage-daemon driver, and the persistent-bitmap facts the resync logic relies on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmreplica._internal.drivers.qemu.qemu import VmSpec, launch
from vmreplica._internal.drivers.qemu.qmp import QmpCommandError
from vmreplica._internal.drivers.qemu.qsd import start_storage_daemon
from vmreplica.errors import InvalidArgument, InvalidState, NotFound, VmrError


def reap(root: Path) -> None:
    """SIGKILL every process whose command line mentions ``root``, and wait for them."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in argv:
            pids.append(int(entry.name))
            os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


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


def bitmaps(disk: Path) -> dict[str, list[str]]:
    """Persistent bitmaps of ``disk`` and their flags, as qemu-img reads them from the header."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def add_bitmap(name: str, node: str = "disk0") -> dict[str, object]:
    return {"node": node, "name": name, "persistent": True}


def test_bitmap_added_through_the_daemon_is_stored_on_stop(root: Path) -> None:
    disks = (qcow2(root), qcow2(root, "disk1.qcow2"))

    async def scenario() -> None:
        qsd = await start_storage_daemon(disks, root / "run", vm_name="vm1")
        nodes = await qsd.execute("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        names = {n["node-name"] for n in nodes}
        assert {"disk0", "disk0-file", "disk1", "disk1-file"} <= names
        await qsd.execute("block-dirty-bitmap-add", add_bitmap("b0"))
        await qsd.execute("block-dirty-bitmap-add", add_bitmap("b1", "disk1"))
        with pytest.raises(QmpCommandError, match="already"):
            await qsd.execute("block-dirty-bitmap-add", add_bitmap("b0"))
        await qsd.stop()
        with pytest.raises(InvalidState):
            await qsd.execute("query-version")

    asyncio.run(scenario())
    assert bitmaps(disks[0]) == {"b0": ["auto"]}
    assert bitmaps(disks[1]) == {"b1": ["auto"]}


def stored_bitmap(root: Path, disk: Path, name: str = "b0") -> None:
    """Add a persistent bitmap through a storage daemon and close the image, storing it."""

    async def scenario() -> None:
        qsd = await start_storage_daemon((disk,), root / "seed")
        await qsd.execute("block-dirty-bitmap-add", add_bitmap(name))
        await qsd.stop()

    asyncio.run(scenario())
    assert bitmaps(disk) == {name: ["auto"]}


def test_kill_9_of_qemu_leaves_its_persistent_bitmap_in_use(root: Path) -> None:
    disk = qcow2(root)
    stored_bitmap(root, disk)
    spec = VmSpec(str(uuid.uuid4()), "vm1", 1, 64, (disk,), root / "run")

    async def crash() -> None:
        vm = await launch(spec)
        # Opening the image read-write marks the bitmap in-use at once, in the header...
        assert bitmaps(disk) == {"b0": ["in-use", "auto"]}
        await vm.hmp('qemu-io disk0 "write -P 0xab 0 64k"')
        await vm.kill()

    asyncio.run(crash())
    # ...and only a clean close clears the mark, so after kill -9 it stays.
    assert bitmaps(disk) == {"b0": ["in-use", "auto"]}

    async def recover() -> None:
        # The only thing to do with an inconsistent bitmap is to drop it, and start anew.
        qsd = await start_storage_daemon((disk,), root / "qsd")
        nodes = await qsd.execute("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        (disk0,) = [n for n in nodes if n["node-name"] == "disk0"]
        assert [(b["name"], b["inconsistent"]) for b in disk0["dirty-bitmaps"]] == [("b0", True)]
        with pytest.raises(QmpCommandError, match="inconsistent"):
            await qsd.execute("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0"})
        await qsd.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
        await qsd.execute("block-dirty-bitmap-add", add_bitmap("b1"))
        await qsd.stop()

    asyncio.run(recover())
    assert bitmaps(disk) == {"b1": ["auto"]}


def test_bitmap_added_to_a_running_qemu_is_lost_if_it_never_closes_cleanly(root: Path) -> None:
    disk = qcow2(root)
    spec = VmSpec(str(uuid.uuid4()), "vm1", 1, 64, (disk,), root / "run")

    async def crash() -> None:
        vm = await launch(spec)
        await vm.execute("block-dirty-bitmap-add", add_bitmap("b0"))
        assert bitmaps(disk) == {}  # not written to the image until the image closes
        await vm.kill()

    asyncio.run(crash())
    assert bitmaps(disk) == {}


def test_quit_of_qemu_stores_its_persistent_bitmap(root: Path) -> None:
    disk = qcow2(root)
    spec = VmSpec(str(uuid.uuid4()), "vm1", 1, 64, (disk,), root / "run")

    async def scenario() -> None:
        vm = await launch(spec)
        await vm.execute("block-dirty-bitmap-add", add_bitmap("b0"))
        await vm.hmp('qemu-io disk0 "write -P 0xab 0 64k"')
        await vm.quit()

    asyncio.run(scenario())
    assert bitmaps(disk) == {"b0": ["auto"]}


def test_daemon_kill_leaves_bitmap_in_use(root: Path) -> None:
    disk = qcow2(root)
    stored_bitmap(root, disk)

    async def scenario() -> None:
        qsd = await start_storage_daemon((disk,), root / "run")
        await qsd.kill()
        assert not alive(qsd.pid)

    asyncio.run(scenario())
    assert bitmaps(disk) == {"b0": ["in-use", "auto"]}


def test_daemon_ends_cleanly_when_the_agent_is_killed(root: Path) -> None:
    disk = qcow2(root)
    stored_bitmap(root, disk)
    agent_code = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from vmreplica._internal.drivers.qemu.qsd import start_storage_daemon\n"
        "async def main():\n"
        f"    qsd = await start_storage_daemon((Path({str(disk)!r}),), Path({str(root)!r}))\n"
        "    await qsd.execute('block-dirty-bitmap-add',\n"
        "                      {'node': 'disk0', 'name': 'b1', 'persistent': True})\n"
        "    print(qsd.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    agent = subprocess.Popen([sys.executable, "-c", agent_code], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the storage daemon outlived the agent"
    # SIGTERM, not SIGKILL: a clean close, which stored the new bitmap and cleared in-use.
    assert bitmaps(disk) == {"b0": ["auto"], "b1": ["auto"]}


def test_daemon_refuses_a_disk_held_by_a_running_vm(root: Path) -> None:
    disk = qcow2(root)
    spec = VmSpec(str(uuid.uuid4()), "vm1", 1, 64, (disk,), root / "run")

    async def scenario() -> None:
        vm = await launch(spec)
        try:
            with pytest.raises(
                VmrError,
                match=r"daemon of VM 'vm1' failed to start: .*\"write\" lock.*another process",
            ):
                await start_storage_daemon((disk,), root / "qsd", vm_name="vm1")
        finally:
            await vm.quit()

    asyncio.run(scenario())


def test_daemon_refuses_bad_disk_lists(root: Path) -> None:
    raw = root / "disk.raw"
    raw.write_bytes(bytes(65536))
    with pytest.raises(NotFound, match=r"nope\.qcow2 does not exist"):
        asyncio.run(start_storage_daemon((root / "nope.qcow2",), root / "run"))
    with pytest.raises(InvalidArgument, match="not a qcow2 image"):
        asyncio.run(start_storage_daemon((raw,), root / "run"))
    with pytest.raises(InvalidArgument, match="no disks"):
        asyncio.run(start_storage_daemon((), root / "run"))


def test_daemon_monitor_is_a_socket_pair_and_its_run_dir_marks_it(root: Path) -> None:
    """The monitor is the agent's end of a socket pair (no socket file to poll for), and the run
    directory is on the daemon's command line: that is where an agent that restarts finds the
    daemons its predecessor left (children.leftovers), whatever directory the disks are in."""
    disk = qcow2(root)

    async def scenario() -> None:
        qsd = await start_storage_daemon((disk,), root / "state" / "qsd")
        try:
            argv = Path(f"/proc/{qsd.pid}/cmdline").read_bytes().split(b"\0")
            assert any(str(root / "state").encode() in arg for arg in argv), argv
            assert not list((root / "state" / "qsd").glob("*.sock"))
            assert isinstance(await qsd.execute("query-version"), dict)
        finally:
            await qsd.stop()

    asyncio.run(scenario())
