"""A real Linux test guest: Debian's cloud kernel plus a busybox initramfs that writes records.

The guest's ``/init`` mounts the ext4 disk ``/dev/vda`` at ``/data`` and appends to
``/data/records.log`` lines ``"SEQ CRC PAYLOAD\\n"``: SEQ counts from 1, PAYLOAD is
:func:`record_payload` (a function of SEQ), and CRC is the zlib CRC-32 of ``"SEQ PAYLOAD"`` in
8 lower-case hex digits. Each record is ``fdatasync``-ed before the next one is written, so every
record the guest reported is on disk. A new boot drops a torn tail and carries on after the last
record. The ACPI power button (QMP ``system_powerdown``) stops the writer, unmounts ``/data`` and
powers off. Kernel arguments: ``vmr.records=N`` writes N more records and powers off,
``vmr.mode=idle`` mounts and waits for the power button, ``vmr.progress=K`` prints
``vmr: records: SEQ`` on the serial console every K records (default 50).

``vmr.mode=load vmr.rate=B vmr.region=R vmr.pool=P vmr.seconds=S`` (tests/guest_load.py) writes
no records: it fills a P MiB pool in tmpfs from /dev/urandom once, then overwrites the R MiB file
``/data/load.bin`` (allocated once, so the disk never grows past it) front to back and round
again with 1 MiB slices of the pool, O_DIRECT, paced to B bytes per second since it started, for
S seconds (0: until the power button). Every second it prints ``vmr: load: bytes=N cs=T`` (bytes
written in T centiseconds), and ``vmr: load: done bytes=N cs=T`` at the end.

Debian's qemu-guest-agent (``qemu-ga``, with the libraries it links) runs in the guest when the
VM has the virtio-serial port ``org.qemu.guest_agent.0`` (every VM the agent starts has it), so
the host can freeze and thaw ``/data``; ``vmr.qga=off`` leaves it out, as a guest without the
agent.

Run it (see :func:`qemu_args`; never ``-accel kvm`` here, nested KVM hangs)::

    qemu-system-x86_64 -accel tcg -cpu max -m 256 -display none -nic none -no-reboot \\
        -kernel K -initrd I -append "console=ttyS0 quiet panic=-1 vmr.records=200" \\
        -drive file=DISK.qcow2,if=virtio,format=qcow2 -serial file:LOG

Console markers: ``vmr: ready mode=M last_seq=S limit=N`` once the writer starts,
``vmr: stopping: REASON`` and ``vmr: power off`` at the end, ``vmr: guest agent started``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest_load import LOAD_SHELL, Load
from vmreplica.errors import IntegrityError, VmrError

KERNEL_ARGS = "console=ttyS0 quiet panic=-1"
RECORDS_FILE = "records.log"
# insmod order matters: each module needs the ones before it. evdev + button give the guest
# /dev/input/eventN for the ACPI power button.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk", "virtio_console", "evdev", "button")  # fmt: skip
_KERNEL_META = "linux-image-cloud-amd64"
_BUSYBOX = "busybox-static"
_QGA = "qemu-guest-agent"
_PAYLOAD_SUFFIX = "-the-quick-brown-fox-jumps-over-the-lazy-dog"

INIT_SCRIPT = r"""#!/bin/sh
# vmreplica test guest, PID 1. Appends "SEQ CRC32 PAYLOAD" lines to /data/records.log.
export PATH=/bin
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs run /run
log() { echo "vmr: $*"; }
off() {
  log "stopping: $1"
  sync
  if grep -q ' /data ' /proc/mounts; then
    umount /data || mount -o remount,ro /data || log "unmount failed"
  fi
  log "power off"
  poweroff -f
  sleep 60
}
mode=write; limit=0; every=50; qga=on; rate=0; region=1024; pool=64; seconds=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmr.mode=*) mode=${a#*=} ;;
    vmr.qga=*) qga=${a#*=} ;;
    vmr.records=*) limit=${a#*=} ;;
    vmr.progress=*) every=${a#*=} ;;
    vmr.rate=*) rate=${a#*=} ;;
    vmr.region=*) region=${a#*=} ;;
    vmr.pool=*) pool=${a#*=} ;;
    vmr.seconds=*) seconds=${a#*=} ;;
  esac
done
for m in $(cat /etc/vmr-modules); do insmod "/lib/modules/$m.ko" || log "insmod $m failed"; done
set -- /sys/bus/virtio/drivers/virtio_console/virtio*
[ -e "$1" ] || qga=off  # no virtio-serial device: no port to wait for
if [ "$qga" = on ]; then
  # The guest agent, on the virtio-serial port the host names org.qemu.guest_agent.0.
  i=0
  while [ $i -lt 40 ]; do
    for p in /sys/class/virtio-ports/*; do
      if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
        qemu-ga -m virtio-serial -p "/dev/${p##*/}" -t /run -f /run/qemu-ga.pid -d \
          && log "guest agent started" || log "guest agent failed"
        i=99
      fi
    done
    i=$((i + 1)); [ $i -lt 99 ] && sleep 0.05
  done
fi
for d in /sys/class/input/event*; do
  [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] || continue
  (dd if="/dev/input/${d##*/}" of=/dev/null bs=24 count=1 2>/dev/null && : >/run/stop) &
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -gt 200 ] && off "no /dev/vda"; sleep 0.05
done
mount -t ext4 /dev/vda /data || off "cannot mount /dev/vda"
payload() { P="vmreplica-record-$1@SUFFIX@"; }
F=/data/records.log
seq=0
if [ -s $F ]; then
  n=$(wc -l <$F)
  keep=$(head -n "$n" $F | wc -c)
  total=$(wc -c <$F)
  if [ "$keep" -ne "$total" ]; then
    log "dropping torn tail ($((total - keep)) bytes)"
    truncate -s "$keep" $F && sync -d $F
  fi
  if [ "$n" -gt 0 ]; then
    set -- $(tail -n 1 $F)
    payload "$1"
    if [ "$#" -eq 3 ] && [ "$3" = "$P" ] && [ "$(printf '%s %s' "$1" "$P" | crc32)" = "$2" ]; then
      seq=$1
    else
      log "last record is corrupt; not writing"; mode=idle
    fi
  fi
fi
@LOAD@log "ready mode=$mode last_seq=$seq limit=$limit"
[ "$mode" = load ] && load
if [ "$mode" = write ]; then
  n=0
  while [ ! -e /run/stop ] && { [ "$limit" -eq 0 ] || [ $n -lt "$limit" ]; }; do
    seq=$((seq + 1)); n=$((n + 1))
    payload $seq
    c=$(printf '%s %s' $seq "$P" | crc32)
    { printf '%s %s %s\n' $seq "$c" "$P" >>$F && sync -d $F; } || off "cannot write record $seq"
    [ $((seq % every)) -eq 0 ] && log "records: $seq"
  done
  log "wrote $n records, last_seq=$seq"
  [ -e /run/stop ] || off "record limit reached"
fi
while [ ! -e /run/stop ]; do sleep 0.2; done
off "power button"
""".replace("@SUFFIX@", _PAYLOAD_SUFFIX).replace("@LOAD@", LOAD_SHELL)


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class RecordReport:
    """What :func:`verify_records` found. ``count`` counts the valid prefix 1..``last_seq``."""

    count: int
    last_seq: int
    torn_tail: bool
    fsck_clean: bool
    details: str
    errors: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when the records are an unbroken, valid prefix and fsck found nothing."""
        return not self.errors and self.fsck_clean


def record_payload(seq: int) -> str:
    return f"vmreplica-record-{seq}{_PAYLOAD_SUFFIX}"


def record_line(seq: int) -> bytes:
    """The exact line the guest writes for ``seq``, newline included."""
    payload = record_payload(seq)
    crc = zlib.crc32(f"{seq} {payload}".encode())
    return f"{seq} {crc:08x} {payload}\n".encode()


def kernel_cmdline(
    *, records: int | None = None, mode: str = "write", extra: str = "", load: Load | None = None
) -> str:
    """``-append`` text: ``records`` more records then power off, or forever; mode
    write|idle|load (load needs ``load``)."""
    if mode not in ("write", "idle", "load"):
        raise VmrError(f"unknown guest mode {mode!r}; use 'write', 'idle' or 'load'")
    if (mode == "load") != (load is not None):
        raise VmrError("the guest's load mode and a Load go together")
    args = [KERNEL_ARGS, f"vmr.mode={mode}"]
    if records is not None:
        args.append(f"vmr.records={records}")
    if load is not None:
        args += load.args()
    return " ".join([*args, extra]).strip()


def qemu_args(assets: GuestAssets, disk: Path, *, cmdline: str | None = None) -> list[str]:
    """QEMU options that boot the guest on ``disk`` (add -display, -serial, -qmp, ...)."""
    return [
        *("-accel", "tcg", "-cpu", "max", "-m", "256"),
        *("-kernel", str(assets.kernel), "-initrd", str(assets.initrd)),
        *("-append", cmdline if cmdline is not None else kernel_cmdline()),
        *("-drive", f"file={disk},if=virtio,format=qcow2"),
    ]


def _run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True, check=False
    )
    if proc.returncode not in ok_codes:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise VmrError(f"{cmd[0]} failed (exit {proc.returncode}): {' / '.join(err)}")
    return proc


def _apt_show(*names: str) -> dict[str, dict[str, str]]:
    cmd = ["apt-cache", "show", "--no-all-versions", *names]
    out = _run(cmd, ok_codes=(0, 100)).stdout.decode()
    paragraphs = (dict(re.findall(r"^([\w-]+): (.*)$", p, flags=re.M)) for p in out.split("\n\n"))
    return {p["Package"]: p for p in paragraphs if "Package" in p}


def _resolve_once() -> tuple[str, str, str] | None:
    info = _apt_show(_KERNEL_META, _BUSYBOX)
    depends = info.get(_KERNEL_META, {}).get("Depends", "")
    m = re.search(r"(linux-image-\S+-cloud-amd64) \(= (\S+)\)", depends)
    if m:
        kpkg, kver = m.groups()
    else:  # no metapackage: take the newest linux-image-*-cloud-amd64
        pattern = r"^linux-image-[0-9].*-cloud-amd64$"
        found = _run(["apt-cache", "search", "--names-only", pattern]).stdout.decode()
        names = [line.split()[0] for line in found.splitlines() if line.strip()]
        if not names:
            return None
        kpkg = max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
        kver = _apt_show(kpkg).get(kpkg, {}).get("Version", "")
    bver = info.get(_BUSYBOX, {}).get("Version", "")
    return (kpkg, kver, bver) if kver and bver else None


def _resolve_packages() -> tuple[str, str, str]:
    """(kernel package, its version, busybox-static version); apt-get update once if needed."""
    resolved = _resolve_once()
    if resolved is None:  # lists missing: fetch them once
        _run(["apt-get", "update"])
        resolved = _resolve_once()
    if resolved:
        return resolved
    raise VmrError(f"cannot find a {_KERNEL_META} kernel and {_BUSYBOX} in the apt lists")


def _apt_download(dest: Path, pkgs: Sequence[str]) -> None:
    cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", *pkgs]
    try:
        _run(cmd, cwd=dest)
    except VmrError:
        _run(["apt-get", "update"])
        _run(cmd, cwd=dest)


def _read_module(path: Path) -> bytes:
    """The module, decompressed: then the guest needs no xz/gzip support in insmod or kernel."""
    unpack = {".xz": lzma.decompress, ".gz": gzip.decompress}.get(path.suffix, bytes)
    return unpack(path.read_bytes())


def _copy_with_libraries(binary: Path, stage: Path, target: str) -> None:
    """``binary`` at ``target`` in the initramfs, with the shared libraries ``ldd`` finds for it
    (this host runs the guest's Debian release, so its libraries are the guest's)."""
    dest = stage / target.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    for line in _run(["ldd", binary]).stdout.decode().splitlines():
        found = re.search(r"(/\S+) \(0x", line)
        if found is None:
            continue
        lib = Path(found.group(1))
        copy = stage / str(lib).lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        if not copy.exists():
            shutil.copy2(lib.resolve(), copy)


def _build_initrd(
    kernel_root: Path, busybox: Path, stage: Path, out: Path, qga: Path | None = None
) -> None:
    mod_dirs = list((kernel_root / "lib" / "modules").glob("*/kernel"))
    if len(mod_dirs) != 1:
        raise VmrError(f"expected one lib/modules/<version>/kernel tree, found {len(mod_dirs)}")
    found = {p.name.split(".ko")[0]: p for p in mod_dirs[0].rglob("*.ko*")}
    for d in ("bin", "dev", "proc", "sys", "run", "data", "etc", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, stage / "bin" / "busybox")
    for applet in _run([busybox, "--list"]).stdout.decode().split():
        if applet != "busybox":
            (stage / "bin" / applet).symlink_to("busybox")
    for name in MODULES:
        if name not in found:
            raise VmrError(f"kernel module {name} not found under {mod_dirs[0]}")
        (stage / "lib" / "modules" / f"{name}.ko").write_bytes(_read_module(found[name]))
    (stage / "etc" / "vmr-modules").write_text("\n".join(MODULES) + "\n")
    if qga is not None:
        _copy_with_libraries(qga, stage, "/bin/qemu-ga")
    (stage / "init").write_text(INIT_SCRIPT)
    (stage / "init").chmod(0o755)
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    archive = _run(
        [busybox, "cpio", "-o", "-H", "newc"], cwd=stage, stdin="\n".join(names).encode()
    )
    out.write_bytes(gzip.compress(archive.stdout, compresslevel=9, mtime=0))


def _complete(assets: GuestAssets) -> bool:
    return assets.kernel.is_file() and assets.initrd.is_file()


def build_guest_assets(cache_dir: Path) -> GuestAssets:
    """Kernel and initramfs of the test guest, built once per package versions in ``cache_dir``.

    The build is keyed on the candidate versions of the kernel and busybox-static packages (and
    on the init script). ``current.json`` remembers the key for the current apt lists, so a call
    after the first returns without asking apt.
    """
    lists = Path("/var/lib/apt/lists")
    local = hashlib.sha256(json.dumps([MODULES, INIT_SCRIPT]).encode()).hexdigest()
    stamp = [lists.stat().st_mtime_ns if lists.exists() else 0, local]
    pointer = cache_dir / "current.json"
    try:
        current = json.loads(pointer.read_text())
        final = cache_dir / str(current["key"])
        assets = GuestAssets(kernel=final / "vmlinuz", initrd=final / "initrd.img")
        if current["stamp"] == stamp and _complete(assets):
            return assets
    except (OSError, ValueError, KeyError):
        pass
    kpkg, kver, bver = _resolve_packages()
    qver = _apt_show(_QGA).get(_QGA, {}).get("Version", "")
    if not qver:
        raise VmrError(f"cannot find {_QGA} in the apt lists")
    recipe = json.dumps([kpkg, kver, bver, qver, MODULES, INIT_SCRIPT]).encode()
    key = f"{kpkg.removeprefix('linux-image-')}-{hashlib.sha256(recipe).hexdigest()[:12]}"
    final = cache_dir / key
    assets = GuestAssets(kernel=final / "vmlinuz", initrd=final / "initrd.img")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("a") as lock:  # closing it releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(assets):
            _build(cache_dir, final, kpkg, kver, bver, qver)
        tmp_pointer = pointer.with_suffix(f".{os.getpid()}.tmp")
        tmp_pointer.write_text(json.dumps({"key": key, "stamp": stamp}))
        tmp_pointer.replace(pointer)
    return assets


def _build(cache_dir: Path, final: Path, kpkg: str, kver: str, bver: str, qver: str) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        debs, kroot, broot, out = tmp / "debs", tmp / "kernel", tmp / "busybox", tmp / "out"
        debs.mkdir()
        out.mkdir()
        qroot = tmp / "qga"
        _apt_download(debs, [f"{kpkg}={kver}", f"{_BUSYBOX}={bver}", f"{_QGA}={qver}"])
        for prefix, root in ((kpkg, kroot), (_BUSYBOX, broot), (_QGA, qroot)):
            _run(["dpkg", "-x", next(debs.glob(f"{prefix}_*.deb")), root])
        shutil.copy2(next((kroot / "boot").glob("vmlinuz-*")), out / "vmlinuz")
        _build_initrd(kroot, broot / "bin" / "busybox", tmp / "stage", out / "initrd.img",
                      qroot / "usr" / "sbin" / "qemu-ga")  # fmt: skip
        manifest = {"kernel": f"{kpkg}={kver}", "busybox": f"{_BUSYBOX}={bver}",
                    "guest agent": f"{_QGA}={qver}"}  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.rename(final)


def make_data_disk(path: Path, size_mb: int = 64) -> None:
    """Create ``path``: a qcow2 holding an empty ext4 file system, for the guest's /dev/vda."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mkdisk-") as tmp:
        raw = Path(tmp) / "disk.raw"
        with raw.open("wb") as fh:
            fh.truncate(size_mb * 1024 * 1024)
        # Eager init: otherwise the guest kernel zeroes inode tables in the background.
        opts = "lazy_itable_init=0,lazy_journal_init=0"
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmrdata", "-E", opts, raw])
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])


def check_records(data: bytes) -> tuple[int, bool, list[str]]:
    """(last valid seq, torn tail?, errors) for the bytes of records.log."""
    *lines, tail = data.split(b"\n")  # tail: after the last newline, empty or torn by a crash
    for seq, line in enumerate(lines, start=1):
        if line == record_line(seq)[:-1]:
            continue
        got, _, rest = line.decode(errors="replace").partition(" ")
        crc, _, payload = rest.partition(" ")
        if got != str(seq):
            what = f"gap or bad sequence: expected {seq}, found {got[:20]!r}"
        elif crc != f"{zlib.crc32(f'{got} {payload}'.encode()):08x}":
            what = f"record {seq} has a bad checksum"
        else:
            what = f"record {seq} has an unexpected payload"
        return seq - 1, bool(tail), [f"line {seq}: {what}"]
    return len(lines), bool(tail), []


def verify_records(
    qcow2_path: Path, *, strict: bool = False, force_share: bool = False
) -> RecordReport:
    """Check ``/records.log`` on the guest disk ``qcow2_path`` (backing chain allowed).

    Works on a raw copy: the journal is replayed first (the guest may have crashed), then
    ``e2fsck -fn`` decides ``fsck_clean``. A gap or a bad record is reported in ``errors``; with
    ``strict`` it raises :class:`IntegrityError`. ``force_share`` reads an image in use (-U).
    """
    with tempfile.TemporaryDirectory(prefix="vmr-verify-") as tmp:
        raw = Path(tmp) / "disk.raw"
        share = ["-U"] if force_share else []
        _run(["qemu-img", "convert", *share, "-O", "raw", qcow2_path, raw])
        replay = _run(["e2fsck", "-y", "-E", "journal_only", raw], ok_codes=(0, 1))
        fsck = _run(["e2fsck", "-f", "-n", raw], ok_codes=range(256))
        fsck_clean = fsck.returncode == 0
        cat = _run(["debugfs", "-R", f"cat /{RECORDS_FILE}", raw])
    replayed = b"recovering journal" in replay.stdout + replay.stderr
    notes = [f"journal {'replayed' if replayed else 'clean'}"]
    if not fsck_clean:
        notes.append(f"e2fsck -fn exit {fsck.returncode}: {fsck.stdout.decode()[-400:]!r}")
    if b"not found" in cat.stderr and not cat.stdout:
        notes.append(f"no /{RECORDS_FILE}")
    last_seq, torn, errors = check_records(cat.stdout)
    notes.append(f"{last_seq} records")
    if torn:
        tail = cat.stdout[cat.stdout.rfind(b"\n") + 1 :]
        kind = "" if record_line(last_seq + 1).startswith(tail) else "not "
        notes.append(f"torn tail of {len(tail)} bytes, {kind}a prefix of record {last_seq + 1}")
    notes.extend(errors)
    report = RecordReport(last_seq, last_seq, torn, fsck_clean, "; ".join(notes), tuple(errors))
    if strict and errors:
        raise IntegrityError(f"records on {qcow2_path} are damaged: {report.details}")
    return report
