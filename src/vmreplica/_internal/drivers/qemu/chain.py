"""The replica chain of one replicated disk: ``base ← rp-K… ← tip`` in one directory.

Deltas are committed into ``tip``; a recovery point freezes ``tip`` into ``rp-K`` (K is a
monotonic id, not a position) and starts a new empty ``tip`` on it; pruning folds the oldest
point into ``base``. The design invariant holds throughout: an image that backs another is never
written, except ``base`` by the pruning commit (every view above it shadows what the commit
changes) and ``tip`` by the apply commit (only the incoming delta stands on it). The one other
write is the backing pointer in the header of the image above a pruned point; it changes no
content.

Every operation is a sequence of steps each of which is atomic on its own (a rename, a
``qemu-img`` run that is repeated whole) and after any prefix of which every recovery point still
reads what it read before. The state a crash leaves is therefore recognisable from the files alone
and :meth:`ReplicaChain.recover` finishes it; the only intent recorded is ``apply.pending``, the
path of the delta being applied, because a half-committed ``tip`` cannot be told from a whole one.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from vmreplica._internal import faults
from vmreplica._internal.drivers.qemu import chain_checks, qemu_img
from vmreplica._internal.drivers.qemu.chain_files import RecoveryPointFile, fs_errors
from vmreplica._internal.files import fsync_dir, off_loop
from vmreplica.errors import IntegrityError, InvalidArgument, InvalidState, NotFound, StorageError

BASE = "base.qcow2"
TIP = "tip.qcow2"
# During a resynchronization, deltas go into this overlay above tip instead, so that stopping
# the resynchronization leaves tip exactly as it was and finishing it commits them all at once.
RESYNC = "resync.qcow2"
PENDING = "apply.pending"
_TMP = ".tmp"
_RP_RE = re.compile(r"^rp-([1-9][0-9]*)\.qcow2$")

PointRef = int | Literal["latest"]


class ReplicaChain:
    """One disk's chain. Operations on one instance are serialized; callers keep one per disk."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory).resolve()
        self.base = self.dir / BASE
        self.tip = self.dir / TIP
        self.resync = self.dir / RESYNC
        self._pending_file = self.dir / PENDING
        self._lock = asyncio.Lock()

    @property
    def top(self) -> Path:
        """What deltas are committed into: the resynchronization's overlay while there is
        one, else ``tip``."""
        return self.resync if self.resync.exists() else self.tip

    async def begin_resync(self) -> None:
        """An empty overlay above ``tip`` (named relative to it, so a point frozen meanwhile
        leaves it reading the same); a repeated call changes nothing."""
        async with self._lock:
            if not self.resync.exists():
                await self._new_image(RESYNC, backing=TIP)

    async def end_resync(self, commit: bool) -> None:
        """Commit the overlay into ``tip`` and delete it, or just delete it; repeatable after a
        crash at any step (a commit writes the same clusters again)."""
        async with self._lock:
            if not self.resync.exists():
                return
            if commit and await self._empty_below_resync():
                # An initial copy into an empty chain: the overlay becomes base as it is (its
                # pointer to the empty tip dropped, then renamed over the empty base, which the
                # empty tip reads through), instead of a second copy of every block into tip.
                # Either step repeats after a crash: the chain below stays empty until the rename.
                await qemu_img.rebase_unsafe(self.resync, None)
                faults.hit("replica.mid_adopt")
                with fs_errors(f"cannot adopt {self.resync} as {self.base}"):
                    os.replace(self.resync, self.base)
                fsync_dir(self.dir)
                return
            if commit:
                await qemu_img.commit(self.resync)
            elif (pending := self.pending_delta()) is not None and not pending.exists():
                self._set_pending(None)  # an apply into the overlay, whose delta was dropped
            with fs_errors(f"cannot remove {self.resync}"):
                self.resync.unlink()
            fsync_dir(self.dir)

    async def _empty_below_resync(self) -> bool:
        """No point, and nothing allocated in tip or base."""
        if self.point_ids():
            return False
        return not any(e.present for e in await qemu_img.map(self.tip))

    def rp_path(self, point_id: int) -> Path:
        return self.dir / f"rp-{point_id}.qcow2"

    def point_ids(self) -> list[int]:
        """Ids of the recovery-point files present, oldest first (chain order: ids only grow)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.dir}: {exc.strerror}") from exc
        return sorted(int(m.group(1)) for m in map(_RP_RE.match, names) if m)

    def points(self) -> list[RecoveryPointFile]:
        result = []
        for point_id in self.point_ids():
            path = self.rp_path(point_id)
            with fs_errors(f"cannot read {path}"):
                st = path.stat()
            result.append(RecoveryPointFile(point_id, path, st.st_blocks * 512, st.st_mtime))
        return result

    async def virtual_size(self) -> int:
        return await qemu_img.virtual_size(self.base)

    @classmethod
    async def create(cls, directory: str | os.PathLike[str], virtual_size: int) -> ReplicaChain:
        """An empty ``base`` and a ``tip`` on it; a crash in between is finished by recover()."""
        chain = cls(directory)
        with fs_errors(f"cannot create {chain.dir}"):
            chain.dir.mkdir(parents=True, exist_ok=True)
        if chain.base.exists() or chain.tip.exists() or chain.point_ids():
            raise InvalidState(f"a replica chain already exists in {chain.dir}")
        await chain._new_image(BASE, size=virtual_size)
        await chain._new_image(TIP, backing=BASE)
        return chain

    async def apply_delta(self, delta: str | os.PathLike[str], *, missing_ok: bool = False) -> bool:
        """Commit a delta (sparse qcow2 of the changed clusters) into ``tip``, then delete it.

        Re-running it after a crash at any step is harmless; see :meth:`_apply`. Returns False
        when the delta is already gone: applied by an earlier run that recorded it in
        ``apply.pending``, or, with ``missing_ok``, by one that had finished completely.
        """
        path = Path(delta).absolute()
        async with self._lock:
            pending = self.pending_delta()
            if pending is not None and pending != path:
                raise InvalidState(
                    f"delta {pending} is half applied to {self.dir}: run recovery first"
                )
            if not self.tip.exists():
                raise InvalidState(f"{TIP} is missing in {self.dir}: run recovery first")
            if not path.exists():
                if pending == path:
                    self._set_pending(None)
                    return False
                if missing_ok:
                    return False
                raise NotFound(f"delta {path} does not exist")
            chain_checks.check_delta(self, path, allow_backing=True)
            if pending is None:
                self._set_pending(path)
            await self._apply(path)
            self._set_pending(None)
            return True

    async def _apply(self, delta: Path) -> None:
        # Why every step may be repeated, and the whole apply re-run after a crash anywhere:
        # - commit -d copies exactly the clusters allocated in the delta (data, and zero
        #   clusters as zero clusters) into tip and leaves the delta itself untouched: tip is
        #   given to it as the delta's backing when it opens the delta (commit_into), so not
        #   even the delta's header is written. Writing the same clusters again yields the same
        #   bytes, so a commit cut off halfway (tip holds part of the delta) or one repeated
        #   after success both end as "old tip overlaid by the delta". qemu-img fdatasyncs tip
        #   before it exits. (Older versions first wrote tip into the delta's header with
        #   rebase -u; a delta they left half applied names tip there, and applies the same.)
        # - the delta is deleted only after commit returned, so while it exists the apply may be
        #   unfinished and is redone; once it is gone, the pending marker naming it says "done".
        # "The same delta" means the last one applied: replaying an older delta after a newer
        # one would roll back clusters both touched; sequence numbers prevent that upstream.
        await qemu_img.commit_into(delta, self.top)
        await off_loop(_remove_applied, delta)

    async def check_incoming(self, delta: str | os.PathLike[str]) -> None:
        """Refuse a received delta that :meth:`apply_delta` could not apply: not a readable
        qcow2, another size than this disk, corrupt, an external data file, or any backing
        file at all (a delta is standalone: the apply gives it ``tip`` as backing).

        Run before the delta is recorded as received, so that a bad one leaves nothing behind.
        The header is read in Python; ``qemu-img check`` vets the rest once, here.
        """
        chain_checks.check_delta(self, Path(delta).absolute(), allow_backing=False)
        if (problem := await qemu_img.check(delta)) is not None:
            raise IntegrityError(f"delta {delta} fails qemu-img check: {problem}")

    async def adopt_as_base(self, image: Path) -> None:
        """An initial copy (a standalone full image) becomes the base of this empty chain as it
        is, instead of being committed block by block into the tip it reads through."""
        async with self._lock:
            empty = (
                not self.point_ids()
                and (await qemu_img.info(self.tip)).get("actual-size", 0) <= 1024 * 1024
            )
        if not empty:  # not an empty chain after all: apply it the ordinary way
            await self.apply_delta(image)
            return
        with fs_errors(f"cannot adopt {image} as {self.base}"):
            os.replace(image, self.base)
        fsync_dir(self.dir)

    async def freeze_recovery_point(self, point_id: int) -> Path:
        """``tip`` becomes ``rp-<id>`` and a new empty ``tip`` stands on it.

        Step 1 is a rename, step 2 creates the new tip under a temporary name and renames it in.
        A crash between them leaves ``rp-<id>`` on top with no ``tip``, which a repeated call or
        recover() completes; a repeated call after success changes nothing.
        """
        if point_id < 1:
            raise InvalidArgument(f"invalid recovery point id {point_id}")
        rp = self.rp_path(point_id)
        async with self._lock:
            if self.pending_delta() is not None:
                raise InvalidState(f"a delta is half applied to {self.dir}: run recovery first")
            ids = self.point_ids()
            if point_id in ids:
                if self.tip.exists():
                    if await self._backing_of(self.tip) == rp:
                        return rp
                    raise InvalidArgument(f"recovery point {point_id} already exists in {self.dir}")
                if point_id != ids[-1]:
                    raise IntegrityError(f"{TIP} is missing below newer points in {self.dir}")
            else:
                if ids and point_id < ids[-1]:
                    raise InvalidArgument(
                        f"recovery point id {point_id} is below the newest ({ids[-1]})"
                    )
                if not self.tip.exists():
                    raise InvalidState(f"{TIP} is missing in {self.dir}: run recovery first")
                with fs_errors(f"cannot rename {self.tip}"):
                    os.rename(self.tip, rp)
                fsync_dir(self.dir)
                faults.hit("replica.after_freeze_rename")  # rp-<id> on top, no tip yet
            await self._new_image(TIP, backing=rp.name)
            return rp

    async def prune_oldest(self, pinned: Collection[int] = frozenset()) -> bool:
        """Fold the oldest point into ``base``; False when there is none or pruning must wait.

        Any pinned point blocks pruning, not only the oldest: every overlay reads through
        ``base``, which the commit writes (and a running QEMU's image lock would refuse it).

        Step 1 commits rp-oldest into base: views above it do not change, since rp-oldest
        shadows every cluster the commit writes, and a repeated commit writes the same data.
        Step 2 points the next image at base: rp-oldest over the new base reads exactly as the
        new base, so the pointer change keeps content. Step 3 deletes rp-oldest, which nothing
        uses any more. A crash after step 2 (next already on base) is finished by deleting.
        """
        async with self._lock:
            ids = self.point_ids()
            if not ids or any(point_id in pinned for point_id in ids):
                return False
            oldest = self.rp_path(ids[0])
            above = self.rp_path(ids[1]) if len(ids) > 1 else self.tip
            if not above.exists():
                raise InvalidState(f"{above.name} is missing in {self.dir}: run recovery first")
            backing = await self._backing_of(above)
            if backing == oldest:
                await qemu_img.commit(oldest)
                faults.hit("replica.mid_prune")  # folded into base, the next image not moved
                await qemu_img.rebase_unsafe(above, BASE)
            elif backing != self.base:
                raise IntegrityError(f"{above.name} stands on {backing}, not on {oldest.name}")
            with fs_errors(f"cannot remove {oldest}"):
                oldest.unlink()
            fsync_dir(self.dir)
            return True

    async def overlay_for(self, point: PointRef, overlay_path: str | os.PathLike[str]) -> Path:
        """A new qcow2 above a recovery point, for a failover VM to write into.

        The point is never written afterwards; the caller pins it until the overlay is gone.
        The overlay names its backing by absolute path, since it usually lives elsewhere.
        """
        overlay = Path(overlay_path).absolute()
        if overlay.parent.resolve() == self.dir and self.is_chain_name(overlay.name):
            raise InvalidArgument(f"{overlay} is a name of the replica chain itself")
        async with self._lock:  # so that no prune removes the point meanwhile
            ids = self.point_ids()
            if point == "latest":
                if not ids:
                    raise NotFound(f"no recovery point yet in {self.dir}")
                point = ids[-1]
            elif point not in ids:
                raise NotFound(f"no recovery point {point} in {self.dir}")
            if overlay.exists():
                raise InvalidState(f"{overlay} already exists")
            tmp = overlay.with_name(overlay.name + _TMP)
            with fs_errors(f"cannot create {overlay.parent}"):
                overlay.parent.mkdir(parents=True, exist_ok=True)
            await qemu_img.create(tmp, None, self.rp_path(point))
            with fs_errors(f"cannot create {overlay}"):
                os.replace(tmp, overlay)
            fsync_dir(overlay.parent)
            return overlay

    async def recover(self, pinned: Collection[int] = frozenset()) -> list[str]:
        """Finish whatever a crash interrupted, judging from the files; returns what it did.

        A prune cut off before its rebase needs nothing (the chain reads correctly and the next
        prune repeats the commit), so only these states are repaired: leftover temporaries, a
        missing ``tip`` (create or freeze cut off), a pending apply, and an oldest point no image
        stands on any more (prune cut off before the delete).
        """
        done: list[str] = []
        async with self._lock:
            with fs_errors(f"cannot clean up {self.dir}"):
                for tmp in sorted(self.dir.glob("*" + _TMP)):
                    tmp.unlink()
                    done.append(f"removed leftover {tmp.name}")
            ids = self.point_ids()
            if not self.base.exists():
                if self.tip.exists() or ids:
                    raise IntegrityError(f"{BASE} is missing in {self.dir}: chain is broken")
                raise NotFound(f"no replica chain in {self.dir}")
            if not self.tip.exists():
                top = self.rp_path(ids[-1]) if ids else self.base
                await self._new_image(TIP, backing=top.name)
                done.append(f"created {TIP} on {top.name}")
            pending = self.pending_delta()
            if pending is not None:
                if pending.exists():
                    chain_checks.check_delta(self, pending, allow_backing=True)
                    await self._apply(pending)
                    done.append(f"finished applying {pending}")
                self._set_pending(None)
            if ids and ids[0] not in pinned:
                oldest = self.rp_path(ids[0])
                above = self.rp_path(ids[1]) if len(ids) > 1 else self.tip
                if await self._backing_of(above) == self.base:
                    with fs_errors(f"cannot remove {oldest}"):
                        oldest.unlink()
                    fsync_dir(self.dir)
                    done.append(f"removed {oldest.name}, already folded into {BASE}")
        return done

    async def verify(self) -> None:
        """Raise IntegrityError unless the chain is exactly base ← rp… ← tip and every image
        passes ``qemu-img check`` (chain_checks.py)."""
        await chain_checks.verify(self)

    @staticmethod
    def is_chain_name(name: str) -> bool:
        return name in (BASE, TIP, RESYNC, PENDING) or _RP_RE.match(name) is not None

    async def _backing_of(self, image: Path) -> Path | None:
        backing = (await qemu_img.info(image)).get("full-backing-filename")
        return None if backing is None else Path(backing).resolve()

    async def _new_image(
        self, name: str, *, size: int | None = None, backing: str | None = None
    ) -> Path:
        """Create under a temporary name and rename in, so ``name`` is never half made."""
        final, tmp = self.dir / name, self.dir / (name + _TMP)
        with fs_errors(f"cannot remove {tmp}"):
            tmp.unlink(missing_ok=True)
        await qemu_img.create(tmp, size, backing)
        with fs_errors(f"cannot create {final}"):
            os.replace(tmp, final)
        fsync_dir(self.dir)
        return final

    def pending_delta(self) -> Path | None:
        try:
            text = self._pending_file.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._pending_file}: {exc.strerror}") from exc
        return Path(text) if text else None

    def _set_pending(self, delta: Path | None) -> None:
        """Record (or clear) the apply in progress durably before the step that relies on it."""
        with fs_errors(f"cannot record the apply in {self.dir}"):
            if delta is None:
                self._pending_file.unlink(missing_ok=True)
            else:
                tmp = self._pending_file.with_name(PENDING + _TMP)
                with open(tmp, "w") as f:
                    f.write(f"{delta}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._pending_file)
        fsync_dir(self.dir)


def _remove_applied(delta: Path) -> None:
    with fs_errors(f"cannot remove applied delta {delta}"):
        delta.unlink()
    fsync_dir(delta.parent)
