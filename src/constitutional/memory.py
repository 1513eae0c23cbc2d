"""Host memory: give a finished stage's memory back, keep a stage's own from fragmenting, measure each stage's peak.

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
import os
import sys

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_ALLOCATION = 4 * 2**20  # bytes: allocations at least this large get a mapping of their own


def map_large_allocations() -> None:
    """Give every allocation of 4 MiB or more its own mapping, returned to the OS when it is freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed; after that,
    training's activations and gradients of a few MiB each come from the heap, where one step's
    frees leave holes that the next step's shapes do not fit, and the process keeps growing. Measured
    on `pm` at the quickstart's size (10 steps, bf16 on 2 cores), peak resident memory: 7.26 GB
    with glibc's default, 6.80 GB with 4 MiB, 6.07 GB with 1 MiB (but 1 MiB made the steps 60%
    slower: every step faults in fresh pages; 4 MiB costs about 12%). A threshold the environment
    sets (MALLOC_MMAP_THRESHOLD_) is left alone; nothing happens outside glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # no glibc, or a libc without mallopt (musl)
        _glibc().mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)


def release() -> None:
    """Collect cycles, return freed heap pages to the OS (glibc), and empty torch's CUDA cache if it has one."""
    gc.collect()
    torch = sys.modules.get("torch")  # only if a stage imported it: importing it here would cost memory
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # no glibc, or a libc without malloc_trim (musl)
        _glibc().malloc_trim(0)


def _glibc() -> ctypes.CDLL:
    """The C library on Linux, whose malloc the tuning above is for; OSError elsewhere or when it is not found."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if not name:
        raise OSError("no C library to tune here")
    return ctypes.CDLL(name)


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
