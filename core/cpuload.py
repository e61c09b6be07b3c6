"""How busy other processes keep this machine's CPUs: what a timing taken here is worth.

core/fastpath.py times candidate paths in alternating rounds, which evens out steady load but not a test suite
or a second study starting and stopping beside it; it trusts (caches) only timings taken while other processes
left the cores mostly idle.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


class OtherLoad:
    """How busy the machine's CPUs were with other processes over a stretch of time, as a share of all cores:
    every core's busy time (/proc/stat) minus this process's own CPU time. NaN where /proc/stat is absent."""

    def __enter__(self) -> OtherLoad:
        self.share = math.nan
        self._start = (_busy_cpu_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_cpu_s(), time.process_time(), time.perf_counter()
        if math.isfinite(busy) and math.isfinite(self._start[0]) and wall - self._start[2] >= MIN_LOAD_WINDOW_S:
            others = (busy - self._start[0]) - (own - self._start[1])
            self.share = max(0.0, others / max((wall - self._start[2]) * (os.cpu_count() or 1), 1e-9))


def _busy_cpu_s() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return math.nan
    ticks = [int(x) for x in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


# paths measured while other processes kept this share of the cores busy are not trusted beyond this process:
# alternating rounds even out steady load, not a test suite starting and stopping (measured: a 2-core study's
# calibration beside 2 pytest workers timed bf16 + NHWC at 33 img/s against 250 alone, and picked fp32)
BUSY_SHARE = 0.25
MIN_LOAD_WINDOW_S = 1.0  # a shorter stretch says nothing about load (/proc/stat counts in clock ticks)
