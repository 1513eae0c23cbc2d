"""Host memory between stages (`memory.py`): what a finished stage held is given back, each stage's peak measured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")

# In a child process with automatic collection off (as when a stage's models sit in reference
# cycles the collector has not reached yet): 400 MiB held by a cycle, dropped, then released.
CHILD = textwrap.dedent(
    """
    import gc, json, sys
    from constitutional import memory

    def rss_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))

    gc.disable()
    before = rss_mb()
    memory.reset_peak()
    holder = {"blocks": [bytearray(4096) for _ in range(100_000)]}
    holder["self"] = holder  # a cycle: only the collector frees it
    del holder
    held, peak = rss_mb(), memory.peak_rss_mb()
    if sys.argv[1] == "release":
        memory.release()
    after = rss_mb()
    memory.reset_peak()
    print(json.dumps({"before": before, "held": held, "peak": peak, "after": after, "new_peak": memory.peak_rss_mb()}))
    """
)


def measure(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_release_gives_a_dropped_stages_memory_back():
    kept, released = measure("keep"), measure("release")
    for figures in (kept, released):
        assert figures["held"] - figures["before"] > 350  # the 400 MiB are resident
        assert figures["peak"] >= figures["held"] - 1  # the stage's peak includes them (MiB, rounded)
    assert kept["after"] - kept["before"] > 350  # without release: still there
    assert released["after"] - released["before"] < 50  # with release: back to the OS
    # After a reset the peak is today's resident memory, not the old high-water mark.
    assert released["new_peak"] < released["peak"] - 300


def test_each_stage_records_its_peak_and_training_stages_their_precision(tiny_model_dir, tmp_path):
    from constitutional.config import config_from_dict
    from constitutional.pipeline import run_pipeline
    from constitutional.rundir import RunDir

    from conftest import tiny_config_data

    config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path), base_dir=tmp_path)
    run_pipeline(config, tmp_path / "run", ["critique", "sl"])
    run = RunDir(tmp_path / "run")
    for stage in ("critique", "sl"):
        assert run.stage_entry(stage)["peak_rss_mb"] > 100  # torch, transformers and the model
    assert run.stage_entry("sl")["precision"] == "fp32"  # what the tiny config asks for, as used
    assert "precision" not in run.stage_entry("critique")


# A 6 MiB block freed (glibc then raises its mmap threshold above 6 MiB), then another allocated:
# which mapping of /proc/self/maps holds it: the heap, or an anonymous mapping of its own.
CHILD_LARGE_BLOCK = textwrap.dedent(
    """
    import ctypes, json, sys
    from constitutional import memory

    if sys.argv[1] == "map":
        memory.map_large_allocations()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 6 * 2**20
    libc.free(libc.malloc(size))
    address = libc.malloc(size)
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *fields = line.split()
            low, high = (int(end, 16) for end in span.split("-"))
            if low <= address < high:
                print(json.dumps({"size": high - low, "name": fields[4] if len(fields) > 4 else ""}))
    """
)


def large_block(mode: str, **environment: str) -> dict:
    import os

    result = subprocess.run([sys.executable, "-c", CHILD_LARGE_BLOCK, mode], capture_output=True, text=True,
                            check=True, env={**os.environ, **environment})  # fmt: skip
    return json.loads(result.stdout)


def test_large_allocations_get_a_mapping_of_their_own_that_a_free_returns():
    """Without it glibc serves the second block from its heap (where frees fragment); with it, from a mapping."""
    assert large_block("default")["name"] == "[heap]"
    mapped = large_block("map")
    assert mapped["name"] == "" and mapped["size"] > 6 * 2**20  # anonymous (it may border another mapping)
    # A threshold the user set in the environment is theirs: 64 MiB keeps the block on the heap.
    assert large_block("map", MALLOC_MMAP_THRESHOLD_=str(64 * 2**20))["name"] == "[heap]"
