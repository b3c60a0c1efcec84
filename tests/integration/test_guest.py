"""The real Linux test guest under QEMU (TCG): record writing, power-off, crash, verification.

The kernel and initramfs are built once into $VMREPLICA_GUEST_CACHE (default
~/.cache/vmreplica/guest); the first run downloads two Debian packages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.guest import (
    GuestAssets,
    build_guest_assets,
    check_records,
    kernel_cmdline,
    make_data_disk,
    qemu_args,
    record_line,
    verify_records,
)
from tests.guest_load import Load, load_progress
from vmreplica.errors import IntegrityError

QEMU = "qemu-system-x86_64"
CACHE = Path(os.environ.get("VMREPLICA_GUEST_CACHE", "~/.cache/vmreplica/guest")).expanduser()


class Guest:
    """One QEMU process running the guest; its serial console goes to ``serial``."""

    def __init__(self, proc: subprocess.Popen[bytes], serial: Path, qmp_sock: Path) -> None:
        self.proc, self.serial, self.qmp_sock = proc, serial, qmp_sock
        self.started = time.monotonic()

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_console(self, text: str, timeout: float = 60) -> float:
        """Seconds since start when ``text`` appeared on the console."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no {text!r} on the console (rc={self.proc.poll()}):\n{self.console()}"
                )
            time.sleep(0.05)
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running after {timeout}s:\n{self.console()}")

    def qmp(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_sock))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # greeting
            for name in ("qmp_capabilities", command):
                stream.write(json.dumps({"execute": name}).encode() + b"\n")
                stream.flush()
                reply: dict[str, Any] = {"event": None}
                while "event" in reply:
                    reply = json.loads(stream.readline())
                assert "return" in reply, reply
        return reply


@contextmanager
def boot(assets: GuestAssets, disk: Path, cmdline: str, name: str) -> Iterator[Guest]:
    sock_dir = Path(tempfile.mkdtemp(prefix="vmrg-"))  # short: unix socket paths are limited
    serial = disk.parent / f"{name}.serial.log"
    stderr = (disk.parent / f"{name}.qemu.log").open("wb")
    cmd = [QEMU, *qemu_args(assets, disk, cmdline=cmdline), "-display", "none", "-no-reboot"]
    cmd += ["-nic", "none", "-serial", f"file:{serial}"]
    cmd += ["-qmp", f"unix:{sock_dir / 'qmp'},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    try:
        yield Guest(proc, serial, sock_dir / "qmp")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def assets() -> GuestAssets:
    return build_guest_assets(CACHE)


@pytest.fixture(scope="module")
def disk200(assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data disk on which the guest wrote exactly 200 records and powered off by itself."""
    disk = tmp_path_factory.mktemp("disk200") / "data.qcow2"
    make_data_disk(disk)
    with boot(assets, disk, kernel_cmdline(records=200), "boot1") as guest:
        ready = guest.wait_console("vmr: ready")
        assert guest.wait_exit(60) == 0
        total = time.monotonic() - guest.started
        print(f"boot to writer: {ready:.2f}s; 200 records and power-off: {total:.2f}s")
        assert "stopping: record limit reached" in guest.console()
        assert "vmr: power off" in guest.console()
    return disk


def test_assets_are_cached(assets: GuestAssets) -> None:
    start = time.monotonic()
    assert build_guest_assets(CACHE) == assets
    assert time.monotonic() - start < 0.5
    assert assets.kernel.stat().st_size > 1_000_000
    assert assets.initrd.read_bytes()[:2] == b"\x1f\x8b"


def test_writes_requested_records_then_powers_off(disk200: Path) -> None:
    report = verify_records(disk200, strict=True)
    assert (report.count, report.last_seq, report.torn_tail) == (200, 200, False)
    assert report.fsck_clean and report.ok, report.details


def test_resumes_after_last_record_through_backing_chain(
    assets: GuestAssets, disk200: Path, tmp_path: Path
) -> None:
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk200, "-F", "qcow2", top], check=True
    )
    assert verify_records(top).count == 200
    with boot(assets, top, kernel_cmdline(records=25), "resume") as guest:
        assert guest.wait_exit(60) == 0
        assert "last_seq=200 limit=25" in guest.console()
    report = verify_records(top, strict=True)
    assert (report.count, report.torn_tail, report.ok) == (225, False, True), report.details
    assert verify_records(disk200).count == 200  # the base is untouched


def test_acpi_powerdown_stops_cleanly(assets: GuestAssets, tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    make_data_disk(disk)
    with boot(assets, disk, kernel_cmdline(), "powerdown") as guest:
        guest.wait_console("vmr: records: 50")
        pressed = time.monotonic()
        guest.qmp("system_powerdown")
        assert guest.wait_exit(20) == 0
        print(f"power button to QEMU exit: {time.monotonic() - pressed:.2f}s")
        assert "stopping: power button" in guest.console()
    report = verify_records(disk, strict=True)
    assert report.count >= 50 and not report.torn_tail and report.ok, report.details
    assert "journal clean" in report.details


def test_idle_mode_mounts_and_waits(assets: GuestAssets, tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    make_data_disk(disk)
    with boot(assets, disk, kernel_cmdline(mode="idle"), "idle") as guest:
        guest.wait_console("vmr: ready mode=idle")
        time.sleep(1)
        assert guest.proc.poll() is None
        guest.qmp("system_powerdown")
        assert guest.wait_exit(20) == 0
    report = verify_records(disk)
    assert (report.count, report.ok) == (0, True)
    assert "no /records.log" in report.details


def test_load_mode_overwrites_its_region_with_random_data(
    assets: GuestAssets, tmp_path: Path
) -> None:
    disk = tmp_path / "data.qcow2"
    make_data_disk(disk)
    load = Load(rate=8 << 20, region_mib=16, pool_mib=4, seconds=5)
    with boot(assets, disk, kernel_cmdline(mode="load", load=load), "load") as guest:
        assert guest.wait_exit(120) == 0
        console = guest.console()
    assert "stopping: load time reached" in console, console
    progress = load_progress(console)
    assert len(progress) >= 3, console  # a line a second, and the last one
    wrote = progress[-1][1]
    # Paced: never ahead of the rate; and past the region's end, so it went round.
    assert 16 << 20 < wrote <= load.rate * load.seconds + (1 << 20), console
    assert [b for _, b in progress] == sorted(b for _, b in progress)
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    region = subprocess.run(
        ["debugfs", "-R", "cat /load.bin", str(raw)], capture_output=True, check=True
    ).stdout
    assert len(region) == 16 << 20  # overwritten in place: the file never grew
    assert len(zlib.compress(region, 1)) > 0.99 * len(region)  # random, not zeros
    slices = {region[i : i + 64] for i in range(0, len(region), 1 << 20)}
    assert len(slices) == load.pool_mib  # 1 MiB slices of the pool, every one of them


def test_kill9_leaves_a_valid_prefix_and_guest_resumes(assets: GuestAssets, tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    make_data_disk(disk)
    with boot(assets, disk, kernel_cmdline(), "crash") as guest:
        guest.wait_console("vmr: records: 100")
        time.sleep(0.3)
        guest.proc.kill()
        guest.proc.wait()
        printed = guest.console().count("vmr: records: ")
    report = verify_records(disk, strict=True)
    assert report.fsck_clean and report.ok, report.details
    assert "journal replayed" in report.details
    assert report.count >= printed * 50  # everything the guest reported is on disk
    with boot(assets, disk, kernel_cmdline(records=10), "after-crash") as guest:
        assert guest.wait_exit(60) == 0
        assert f"last_seq={report.count} " in guest.console()
    again = verify_records(disk, strict=True)
    assert (again.count, again.torn_tail, again.ok) == (report.count + 10, False, True)


def test_torn_tail_is_reported_then_dropped_by_the_guest(
    assets: GuestAssets, tmp_path: Path
) -> None:
    log = tmp_path / "records.log"
    log.write_bytes(b"".join(record_line(s) for s in range(1, 31)) + record_line(31)[:20])
    raw, disk = tmp_path / "torn.raw", tmp_path / "torn.qcow2"
    with raw.open("wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", raw], check=True)
    write = ["debugfs", "-w", "-R", f"write {log} records.log", str(raw)]
    subprocess.run(write, check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, disk], check=True)
    report = verify_records(disk, strict=True)
    assert (report.count, report.torn_tail, report.ok) == (30, True, True)
    assert "torn tail of 20 bytes, a prefix of record 31" in report.details
    with boot(assets, disk, kernel_cmdline(records=5), "torn") as guest:
        assert guest.wait_exit(60) == 0
        assert "dropping torn tail (20 bytes)" in guest.console()
    again = verify_records(disk, strict=True)
    assert (again.count, again.torn_tail, again.ok) == (35, False, True)


def _tamper(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """Copy the guest disk ``src`` to ``dst`` with the bytes ``old`` replaced in place."""
    assert len(old) == len(new)
    raw = dst.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", src, raw], check=True)
    data = raw.read_bytes()
    assert data.count(old) == 1
    raw.write_bytes(data.replace(old, new))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, dst], check=True)
    raw.unlink()


def test_detects_a_bad_checksum(disk200: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    line = record_line(57)
    _tamper(disk200, bad, line, line.replace(b"quick", b"quack"))
    report = verify_records(bad)
    assert (report.count, report.last_seq, report.ok) == (56, 56, False)
    assert report.errors == ("line 57: record 57 has a bad checksum",)
    assert report.fsck_clean  # the file system is fine; the data is not
    with pytest.raises(IntegrityError, match="record 57 has a bad checksum"):
        verify_records(bad, strict=True)


def test_detects_a_gap(disk200: Path, tmp_path: Path) -> None:
    gap = tmp_path / "gap.qcow2"
    _tamper(disk200, gap, record_line(57), record_line(75))
    report = verify_records(gap)
    assert report.count == 56 and not report.ok
    assert "expected 57, found '75'" in report.details


def test_check_records_rules() -> None:
    good = b"".join(record_line(s) for s in range(1, 6))
    assert check_records(b"") == (0, False, [])
    assert check_records(good) == (5, False, [])
    assert check_records(good + record_line(6)[:9]) == (5, True, [])  # torn by a crash
    assert check_records(good + b"\0" * 30) == (5, True, [])
    assert check_records(good[1:])[2] == ["line 1: gap or bad sequence: expected 1, found ''"]
    assert check_records(record_line(2))[:2] == (0, False)
    bad_crc = good + b"6 " + record_line(6).split(b" ", 2)[1] + b" other\n"
    assert check_records(bad_crc)[2] == ["line 6: record 6 has a bad checksum"]
    other = good + f"6 {zlib.crc32(b'6 other'):08x} other\n".encode()
    assert check_records(other)[2] == ["line 6: record 6 has an unexpected payload"]
