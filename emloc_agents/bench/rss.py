"""PeakRSS: the peak resident memory one operation adds to the process, measured honestly.

``ru_maxrss`` (what ``peak_rss_mb`` in the summary reports) is monotone per process: once a model
is loaded it only moves when an operation exceeds the load's own peak, so it cannot tell two
operations apart. Linux keeps an exact high-water mark (``VmHWM``) that a process may reset to its
current RSS by writing ``5`` to ``/proc/self/clear_refs``; reading ``VmHWM`` after the operation
gives its true peak with no sampling gaps (``method = "vmhwm"``). Not every kernel keeps that mark
through a free (some sandboxed and virtualised kernels accept the reset yet report only the current
RSS), so the mark is used only after a probe, once per process, has seen it remember a freed
32 MiB mapping. Elsewhere a thread samples ``/proc/self/statm`` every ``interval`` seconds instead
(``"sampled"``: a lower bound that can miss spikes shorter than the interval). Without ``/proc``
nothing is measured.

RSS is what the kernel holds for the process (weights, activations, KV tensors and the
allocator's not-yet-returned free memory), so run each operation in a fresh process after a
small warm-up of the same kind: a reused allocator arena would otherwise hide part of the peak.
"""

from __future__ import annotations

import functools
import gc
import mmap
import os
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Current resident set size of this process (None without /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def hwm_bytes() -> int | None:
    """The kernel's resident high-water mark (``VmHWM``) of this process."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return hwm_bytes() is not None


@functools.cache
def hwm_tracks_frees(probe_bytes: int = 32 * 2**20) -> bool:
    """Whether this kernel's ``VmHWM`` can be reset and then remembers a spike freed before it is read."""
    if not reset_hwm():
        return False
    before = rss_bytes()
    if before is None:
        return False
    with mmap.mmap(-1, probe_bytes) as spike:  # anonymous; unmapped (RSS drops) when the block ends
        for offset in range(0, probe_bytes, mmap.PAGESIZE):
            spike[offset] = 1  # touch every page so it becomes resident
    after = hwm_bytes()
    return after is not None and after - before >= probe_bytes * 3 // 4


class PeakRSS:
    """``with PeakRSS() as p: op()`` -> ``p.delta_bytes``: peak RSS during ``op`` minus RSS before it."""

    def __init__(self, interval: float = 0.002, collect: bool = True) -> None:
        self.interval = interval
        self.collect = collect  # gc.collect() first (can take ~0.1 s; pass False inside a timed block)
        self.method: str | None = None
        self.baseline_bytes: int | None = None
        self.delta_bytes: int | None = None
        self._peak: int = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes() or 0)

    def __enter__(self) -> PeakRSS:
        if self.collect:
            gc.collect()
        exact = hwm_tracks_frees() and reset_hwm()
        self.method = "vmhwm" if exact else ("sampled" if rss_bytes() is not None else None)
        self.baseline_bytes = rss_bytes()
        if self.method == "sampled":
            self._peak = self.baseline_bytes or 0
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.baseline_bytes is None:
            return
        if self.method == "vmhwm":
            peak = hwm_bytes() or 0
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, rss_bytes() or 0)
        self.delta_bytes = max(0, peak - self.baseline_bytes)

    @property
    def delta_mb(self) -> float | None:
        return None if self.delta_bytes is None else self.delta_bytes / 2**20

    @property
    def baseline_mb(self) -> float | None:
        return None if self.baseline_bytes is None else self.baseline_bytes / 2**20
