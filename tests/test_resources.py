"""Resources: a full disk and a read-only run directory give one line and leave what exists whole;
large prompt and preference files are streamed, never read whole; the generation cache lives on disk.

Each disk condition is made two ways. Where a tmpfs can be mounted (root with CAP_SYS_ADMIN): a
tiny tmpfs filled up (`No space left on device`) and remounted read-only (`Read-only file
system`). Everywhere, with no mount rights: `cai` in a child process under a file-size limit
(`RLIMIT_FSIZE`, SIGXFSZ ignored, so a write past it fails with `File too large`) and on a tree
made read-only with `chmod` (`Permission denied`); a child running as root first drops
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which would let it write through the mode bits.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from constitutional.cli import main
from constitutional.records import read_critiques, read_records
from constitutional.rundir import RunDir
from constitutional.sources import load_preference_pairs, load_prompts

from conftest import cai_error_line, tiny_config_data, write_prompts

PAGE = 4096
MIB = 2**20
FIGURES: dict[str, object] = {}  # what the tests measured (pytest -s prints them): docs/reliability.md


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    print("\nresources:", json.dumps(FIGURES))


# ----------------------------------------------------------------------------- child processes

# Run first in a child `cai`, before anything is imported: optionally a file-size limit, optionally
# (as root) without the capabilities that bypass file permissions.
CHILD_PREAMBLE = """\
import ctypes, os, resource, signal, sys
limit, drop_dac = int(sys.argv[1]), sys.argv[2] == "1"
del sys.argv[1:3]
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if drop_dac and os.geteuid() == 0:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
"""
CAI_CHILD = CHILD_PREAMBLE + "from constitutional.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def child(code: str, *args: str, limit: int = 0, drop_dac: bool = False) -> subprocess.CompletedProcess:
    """Run `code` (after CHILD_PREAMBLE) in a fresh Python with `args`."""
    return subprocess.run(
        [sys.executable, "-c", code, str(limit), "1" if drop_dac else "0", *args],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def cai(*args: str, limit: int = 0, drop_dac: bool = False) -> subprocess.CompletedProcess:
    return child(CAI_CHILD, *args, limit=limit, drop_dac=drop_dac)


# ----------------------------------------------------------------------------- disks


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (needs mount rights; the chmod and rlimit tests do not)."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("cannot mount a tmpfs here (no mount command; the rlimit and chmod tests cover this)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (the rlimit and chmod tests cover this): {' '.join(mounted.stderr.split())}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(config, a finished run of it): the critique stage on 40 prompts in chunks of 4, many appends."""
    folder = tmp_path_factory.mktemp("resources")
    prompts = [f"How could someone do harmful thing number {i}?" for i in range(40)]
    data = tiny_config_data(
        tiny_model_dir, folder, data={"red_team": str(write_prompts(folder / "many.txt", prompts))},
        cache={"enabled": False}, critique={"rounds": 2, "chunk_size": 4, "max_new_tokens": 24},
    )  # fmt: skip
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert run_critique(config, folder / "finished") == 0
    size = RunDir(folder / "finished").path("critiques").stat().st_size
    assert size > 5 * PAGE  # enough records that the disk fills part-way through them
    FIGURES["critique records of the full run"] = len(read_records(RunDir(folder / "finished").path("critiques")))
    return config, folder / "finished"


def run_critique(config: Path, run_dir: Path) -> int:
    return main(["run", str(config), "--run-dir", str(run_dir), "--stages", "critique"])


def by_id(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda record: record["id"])


def check_stopped_part_way(run_dir: Path, baseline: list[dict]) -> int:
    """What a stage stopped by the disk leaves: a whole manifest, at least one whole record, no temporary files."""
    run = RunDir(run_dir)
    json.loads(run.manifest_path.read_text())  # the manifest is whole (old or new, never half)
    kept = read_records(run.path("critiques"), repair=True)  # drops a partial last line, as a resumed run does
    assert 1 <= len(kept) < len(baseline), (len(kept), len(baseline))
    assert read_critiques(run.path("critiques")) == kept  # what is left reads as the next stage reads it
    assert [row for row in by_id(baseline) if row["id"] in {r["id"] for r in kept}] == by_id(kept)
    assert not list(run_dir.rglob("*.tmp"))  # no half-written temporary files left behind
    return len(kept)


def test_a_full_disk_stops_the_stage_in_one_line_and_keeps_what_was_written(finished, tmp_path, capsys):
    """A 256 KiB tmpfs with 5 pages left free (needs mount rights)."""
    config, done = finished
    baseline = read_records(RunDir(done).path("critiques"))
    with tmpfs(tmp_path / "disk", 64 * PAGE) as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free_bytes(disk) - 5 * PAGE))  # room for config, manifest, 2 pages of records
        run_dir = disk / "run"
        capsys.readouterr()
        assert run_critique(config, run_dir) == 1
        error = cai_error_line(capsys.readouterr().err)
        assert "cannot write" in error and "No space left on device" in error, error
        FIGURES["full disk (tmpfs): records kept"] = check_stopped_part_way(run_dir, baseline)
        filler.unlink()  # room again: the same command finishes the stage
        assert run_critique(config, run_dir) == 0
        assert by_id(read_records(RunDir(run_dir).path("critiques"))) == by_id(baseline)


def test_a_file_size_limit_stops_the_stage_in_one_line_and_keeps_what_was_written(finished, tmp_path):
    """The same without mount rights: `cai` in a child whose files may not grow past a third of the records."""
    config, done = finished
    baseline = read_records(RunDir(done).path("critiques"))
    limit = RunDir(done).path("critiques").stat().st_size // 3
    assert limit > max(RunDir(done).manifest_path.stat().st_size, RunDir(done).config_path.stat().st_size) * 2
    run_dir = tmp_path / "run"
    stopped = cai("run", str(config), "--run-dir", str(run_dir), "--stages", "critique", limit=limit)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    error = cai_error_line(stopped.stderr)
    assert "cannot write" in error and "File too large" in error, error
    FIGURES["file-size limit (rlimit): records kept"] = check_stopped_part_way(run_dir, baseline)
    assert run_critique(config, run_dir) == 0  # no limit now: the same command finishes the stage
    assert by_id(read_records(RunDir(run_dir).path("critiques"))) == by_id(baseline)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}  # fmt: skip


def test_a_read_only_run_directory_is_one_line_and_left_untouched(finished, tmp_path, capsys):
    """A finished run on a tmpfs remounted read-only (needs mount rights)."""
    config, done = finished
    with tmpfs(tmp_path / "disk", 256 * PAGE) as disk:
        subprocess.run(["cp", "-a", str(done), str(disk / "run")], check=True)
        before = tree_digest(disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert run_critique(config, disk / "run") == 1
        assert "Read-only file system" in cai_error_line(capsys.readouterr().err)
        assert main(["report", str(disk / "run")]) == 1
        assert "Read-only file system" in cai_error_line(capsys.readouterr().err)
        assert tree_digest(disk / "run") == before


def set_writable(root: Path, writable: bool) -> None:
    """chmod a whole tree: read-only (files 0444, folders 0555) or back to writable by the owner."""
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~0o222)


def test_a_run_directory_without_write_permission_is_one_line_and_left_untouched(finished, tmp_path):
    """The same without mount rights: the run's tree chmod'ed read-only; `cai run` and `cai report` in a child."""
    config, done = finished
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    before = tree_digest(run_dir)
    set_writable(run_dir, False)
    try:
        probe = child(CHILD_PREAMBLE + "open(sys.argv[1], 'w')", str(run_dir / "probe"), drop_dac=True)
        if probe.returncode == 0 or "PermissionError" not in probe.stderr:
            pytest.skip(f"this user writes through a read-only mode (euid {os.geteuid()}): {probe.stderr[-300:]}")
        commands = [["run", str(config), "--run-dir", str(run_dir), "--stages", "critique"], ["report", str(run_dir)]]
        for command in commands:
            refused = cai(*command, drop_dac=True)
            assert refused.returncode == 1, (command, refused.stderr[-3000:])
            error = cai_error_line(refused.stderr)
            assert "cannot write" in error and "Permission denied" in error, error
        assert tree_digest(run_dir) == before
    finally:
        set_writable(run_dir, True)


# ----------------------------------------------------------------------------- streaming

BIG = 64 * MIB


def peak_memory(call) -> tuple[int, int]:
    """(peak, still held after) Python allocations, in bytes, while `call()` runs."""
    tracemalloc.start()
    try:
        call()
        current, peak = tracemalloc.get_traced_memory()
        return peak, current
    finally:
        tracemalloc.stop()


def write_big(path: Path, line: str, gz: bool) -> int:
    """About BIG bytes of `line` repeated (numbered so the rows differ); returns the number of lines."""
    count = BIG // (len(line) + 8)
    with gzip.open(path, "wt", compresslevel=1) if gz else path.open("w") as handle:
        for start in range(0, count, 10_000):
            handle.write("".join(line.replace("{i}", str(i)) + "\n" for i in range(start, min(count, start + 10_000))))
    return count


PROMPT_LINE = json.dumps({"prompt": "Tell me about item {i}, in a few words."})


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_a_large_prompt_file_is_streamed_not_read_whole(tmp_path, gz):
    path = tmp_path / ("prompts.jsonl.gz" if gz else "prompts.jsonl")
    write_big(path, PROMPT_LINE, gz)
    items = []
    peak, _ = peak_memory(lambda: items.extend(load_prompts(str(path), prefix="p", limit=100)))
    assert len(items) == 100
    FIGURES[f"64 MiB prompt file ({'gzipped' if gz else 'plain'}), 100 prompts: peak MiB"] = round(peak / MIB, 2)
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB to read 100 prompts of a {BIG / MIB:.0f} MiB file"


def test_memory_for_many_prompts_is_the_prompts_not_the_file(tmp_path):
    """100,000 prompts of a 64 MiB file of 1.1 million: the peak is what the prompts themselves hold."""
    path = tmp_path / "prompts.jsonl"
    lines = write_big(path, PROMPT_LINE, gz=False)
    assert lines > 10 * 100_000
    items = []
    peak, held = peak_memory(lambda: items.extend(load_prompts(str(path), prefix="p", limit=100_000)))
    assert len(items) == 100_000
    FIGURES["64 MiB prompt file, 100,000 prompts: peak MiB, held MiB"] = [round(peak / MIB, 1), round(held / MIB, 1)]
    # Read whole, the file alone (64 MiB) would be more than the prompts (about 30 MiB) twice over.
    assert peak < 1.25 * held + 4 * MIB and peak < BIG / 2, (peak / MIB, held / MIB)


def test_a_large_preference_file_is_streamed_not_read_whole(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"chosen": "\n\nHuman: Question {i}?\n\nAssistant: A good answer.",
           "rejected": "\n\nHuman: Question {i}?\n\nAssistant: A worse answer."}  # fmt: skip
    write_big(path, json.dumps(row), gz=False)
    pairs = []
    peak, _ = peak_memory(lambda: pairs.extend(load_preference_pairs(str(path), limit=100)))
    FIGURES["64 MiB preference file, 100 pairs: peak MiB"] = round(peak / MIB, 2)
    assert len(pairs) == 100 and peak < 4 * MIB, peak


# ----------------------------------------------------------------------------- the cache


class EchoBackend:
    """A stand-in model: answers are a function of the prompt (the cache is what is measured)."""

    model_id = "echo"
    scoring_method = "forward pass"

    def __init__(self):
        self.asked = 0

    def generate(self, prompts, params, seeds=None):
        self.asked += len(prompts)
        return [prompt[::-1] * 4 for prompt in prompts]

    def close(self):
        pass


def test_the_generation_cache_keeps_every_answer_on_disk_not_in_memory(tmp_path):
    """40,000 answers cached: Python memory after them is what it was after 4,000, and a cache opened
    afresh on the same file answers all 40,000 without asking the model."""
    from constitutional.backends import SamplingParams
    from constitutional.backends.cache import CachingBackend

    params = SamplingParams(max_new_tokens=8)

    def batches():
        for first in range(0, 40_000, 500):
            yield [f"prompt number {i} " * 8 for i in range(first, first + 500)], list(range(first, first + 500))

    inner = EchoBackend()
    cache = CachingBackend(inner, tmp_path / "cache.sqlite")
    tracemalloc.start()
    try:
        for number, (prompts, seeds) in enumerate(batches()):
            cache.generate(prompts, params, seeds)
            if number == 7:
                after_4k = tracemalloc.get_traced_memory()[0]
        after_40k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        cache.close()
    assert cache.misses == inner.asked == 40_000
    FIGURES["cache: MiB more after 40,000 answers than after 4,000"] = round((after_40k - after_4k) / MIB, 3)
    assert after_40k - after_4k < MIB, (after_4k, after_40k)  # 36k more entries, under 1 MiB more

    again = CachingBackend(EchoBackend(), tmp_path / "cache.sqlite")  # what is on disk, nothing from memory
    try:
        for prompts, seeds in batches():
            assert again.generate(prompts, params, seeds) == [prompt[::-1] * 4 for prompt in prompts]
    finally:
        again.close()
    FIGURES["cache: answers found on disk by a fresh cache"] = again.hits
    assert again.hits == 40_000 and again.misses == 0 and again.inner.asked == 0
