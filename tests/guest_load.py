"""The test guest's load mode (see tests/guest.py): the shell function its ``/init`` runs for
``vmr.mode=load``, the kernel arguments that set it up, and the reader of its console lines."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmreplica.errors import VmrError

# Spliced into guest.INIT_SCRIPT; uses its log() and off().
LOAD_SHELL = r"""# now= centiseconds since boot, without a fork ("1" + fraction - 100: no octal for ".08")
cs() { read -r up _ </proc/uptime; now=$((${up%.*} * 100 + 1${up#*.} - 100)); }
load() {
  # Random bytes once (urandom is slow under TCG), then slices of them at rotating offsets.
  cs; t=$now
  head -c $((pool << 20)) /dev/urandom >/run/pool || off "cannot fill the random pool"
  cs; log "load: pool of $pool MiB in $(((now - t) * 10)) ms"
  L=/data/load.bin
  fallocate -l $((region << 20)) $L && sync || off "cannot allocate $region MiB"
  log "load: ready rate=$rate region=$region pool=$pool seconds=$seconds"
  cs; t0=$now; wrote=0; src=0; dst=0; shown=0; el=0
  while [ ! -e /run/stop ] && { [ "$seconds" -eq 0 ] || [ $el -lt $((seconds * 100)) ]; }; do
    cs; el=$((now - t0))
    n=$(((rate * el / 100 - wrote) >> 20))
    [ $n -gt 8 ] && n=8  # a few MiB per dd, so stop and progress stay timely when behind
    [ $n -gt $((pool - src)) ] && n=$((pool - src))
    [ $n -gt $((region - dst)) ] && n=$((region - dst))
    if [ $n -gt 0 ]; then
      dd if=/run/pool of=$L bs=1M skip=$src seek=$dst count=$n conv=notrunc oflag=direct \
        2>/dev/null || off "cannot write at $dst MiB"
      wrote=$((wrote + (n << 20))); src=$(((src + n) % pool)); dst=$((dst + n))
      # Skewed on each pass, so a place never gets the bytes it had when region % pool == 0.
      [ $dst -ge $region ] && dst=0 && src=$(((src + 7) % pool))
    else
      usleep 20000
    fi
    if [ $((el / 100)) -gt $shown ]; then
      shown=$((el / 100)); log "load: bytes=$wrote cs=$el"
    fi
  done
  cs; log "load: done bytes=$wrote cs=$((now - t0))"
  [ -e /run/stop ] || off "load time reached"
}
"""


@dataclass(frozen=True)
class Load:
    """What ``vmr.mode=load`` writes: ``rate`` bytes per second of random data, for ``seconds``
    (0: until the power button) over a ``region_mib`` file, from a ``pool_mib`` random pool."""

    rate: int
    region_mib: int = 1024
    pool_mib: int = 64
    seconds: int = 0

    def args(self) -> list[str]:
        if self.rate <= 0 or self.region_mib < 1 or self.pool_mib < 1 or self.seconds < 0:
            raise VmrError(f"bad guest load {self}")
        return [f"vmr.rate={self.rate}", f"vmr.region={self.region_mib}",
                f"vmr.pool={self.pool_mib}", f"vmr.seconds={self.seconds}"]  # fmt: skip


_LOAD_LINE = re.compile(r"vmr: load: (?:done )?bytes=(\d+) cs=(\d+)")


def load_progress(console: str) -> list[tuple[float, int]]:
    """``(seconds since the load started, bytes written)`` from the guest's console lines."""
    return [(int(cs) / 100, int(b)) for b, cs in _LOAD_LINE.findall(console)]
