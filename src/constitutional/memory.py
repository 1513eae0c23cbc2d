"""Host memory between stages: give a finished stage's memory back, and measure each stage's peak.

One `cai run` process runs the stages one after another. A stage's models are garbage once it
returns, but reference cycles wait for the collector, and glibc keeps freed heap pages in the
process unless asked to return them, so without `release()` the next stage starts on top of the
last one's memory. `peak_rss_mb()` after `reset_peak()` is the stage's own peak resident memory
(Linux: /proc/self/status VmHWM, reset through /proc/self/clear_refs); None where that is not there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import sys

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def release() -> None:
    """Collect cycles, return freed heap pages to the OS (glibc), and empty torch's CUDA cache if it has one."""
    gc.collect()
    torch = sys.modules.get("torch")  # only if a stage imported it: importing it here would cost memory
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # a libc without malloc_trim (musl): nothing to ask
            ctypes.CDLL(name).malloc_trim(0)


def reset_peak() -> None:
    """Start measuring a new peak (the kernel's high-water mark of resident memory)."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_rss_mb() then reports the process's peak so far


def peak_rss_mb() -> float | None:
    """Peak resident memory since `reset_peak()` (or since the process started), in MiB; None if unknown."""
    try:
        with open(_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
