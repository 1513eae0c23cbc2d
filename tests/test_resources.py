"""Resources: a full disk and a read-only run directory give one line and leave what exists whole;
large prompt and preference files are streamed, never read whole.

The disk tests mount a small tmpfs (root only; they skip with one line elsewhere).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from constitutional.cli import main
from constitutional.records import read_records
from constitutional.rundir import RunDir
from constitutional.sources import load_preference_pairs, load_prompts

from conftest import cai_error_line, tiny_config_data, write_prompts

PAGE = 4096


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path`."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@pytest.fixture
def critique_config(tmp_path, tiny_model_dir) -> Path:
    """The critique stage on 40 prompts in chunks of 4: many appends, more than 5 pages of records."""
    prompts = [f"How could someone do harmful thing number {i}?" for i in range(40)]
    data = tiny_config_data(
        tiny_model_dir, tmp_path, data={"red_team": str(write_prompts(tmp_path / "many.txt", prompts))},
        cache={"enabled": False}, critique={"rounds": 2, "chunk_size": 4, "max_new_tokens": 24},
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_critique(config: Path, run_dir: Path) -> int:
    return main(["run", str(config), "--run-dir", str(run_dir), "--stages", "critique"])


def test_a_full_disk_stops_the_stage_in_one_line_and_keeps_what_was_written(critique_config, tmp_path, capsys):
    assert run_critique(critique_config, tmp_path / "baseline") == 0
    baseline = read_records(RunDir(tmp_path / "baseline").path("critiques"))
    size = RunDir(tmp_path / "baseline").path("critiques").stat().st_size
    assert size > 5 * PAGE  # enough records that the disk fills part-way through them
    with tmpfs(tmp_path / "disk", 64 * PAGE) as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free_bytes(disk) - 5 * PAGE))  # room for config, manifest, 2 pages of records
        run_dir = disk / "run"
        assert run_critique(critique_config, run_dir) == 1
        error = cai_error_line(capsys.readouterr().err)
        assert "cannot write" in error and "No space left on device" in error
        run = RunDir(run_dir)
        json.loads(run.manifest_path.read_text())  # the manifest is whole (old or new, never half)
        kept = read_records(run.path("critiques"), repair=True) if run.path("critiques").exists() else []
        assert len(kept) < len(baseline)
        assert {row["id"] for row in kept} <= {row["id"] for row in baseline}
        assert not list(run_dir.rglob("*.tmp"))  # no half-written temporary files left behind
        filler.unlink()  # room again: the same command finishes the stage
        assert run_critique(critique_config, run_dir) == 0
        assert sorted(read_records(run.path("critiques")), key=lambda r: r["id"]) == sorted(
            baseline, key=lambda r: r["id"]
        )


def tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}  # fmt: skip


def test_a_read_only_run_directory_is_one_line_and_left_untouched(critique_config, tmp_path, capsys):
    assert run_critique(critique_config, tmp_path / "finished") == 0
    with tmpfs(tmp_path / "disk", 256 * PAGE) as disk:
        subprocess.run(["cp", "-a", str(tmp_path / "finished"), str(disk / "run")], check=True)
        before = tree_digest(disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert run_critique(critique_config, disk / "run") == 1
        assert "Read-only file system" in cai_error_line(capsys.readouterr().err)
        assert main(["report", str(disk / "run")]) == 1
        assert "Read-only file system" in cai_error_line(capsys.readouterr().err)
        assert tree_digest(disk / "run") == before


# ----------------------------------------------------------------------------- streaming

BIG = 64 * 1024 * 1024


def peak_memory(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_big(path: Path, line: str, gz: bool) -> None:
    """About BIG bytes of `line` repeated (numbered so the rows differ)."""
    count = BIG // (len(line) + 8)
    with gzip.open(path, "wt", compresslevel=1) if gz else path.open("w") as handle:
        for start in range(0, count, 10_000):
            handle.write("".join(line.replace("{i}", str(i)) + "\n" for i in range(start, min(count, start + 10_000))))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_a_large_prompt_file_is_streamed_not_read_whole(tmp_path, gz):
    path = tmp_path / ("prompts.jsonl.gz" if gz else "prompts.jsonl")
    write_big(path, json.dumps({"prompt": "Tell me about item {i}, in a few words."}), gz)
    items = []
    peak = peak_memory(lambda: items.extend(load_prompts(str(path), prefix="p", limit=100)))
    assert len(items) == 100
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB to read 100 prompts of a {BIG / 2**20:.0f} MiB file"


def test_a_large_preference_file_is_streamed_not_read_whole(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"chosen": "\n\nHuman: Question {i}?\n\nAssistant: A good answer.",
           "rejected": "\n\nHuman: Question {i}?\n\nAssistant: A worse answer."}  # fmt: skip
    write_big(path, json.dumps(row), gz=False)
    pairs = []
    peak = peak_memory(lambda: pairs.extend(load_preference_pairs(str(path), limit=100)))
    assert len(pairs) == 100 and peak < 4 * 1024 * 1024, peak


class EchoBackend:
    """A stand-in model: answers are a function of the prompt (the cache is what is measured)."""

    model_id = "echo"
    scoring_method = "forward pass"

    def generate(self, prompts, params, seeds=None):
        return [prompt[::-1] * 4 for prompt in prompts]

    def close(self):
        pass


def test_the_generation_cache_does_not_grow_in_memory(tmp_path):
    """Entries live in SQLite on disk: memory after 40k cached answers is what it was after 4k."""
    from constitutional.backends import SamplingParams
    from constitutional.backends.cache import CachingBackend

    cache = CachingBackend(EchoBackend(), tmp_path / "cache.sqlite")
    params = SamplingParams(max_new_tokens=8)

    def fill(start: int, count: int) -> None:
        for first in range(start, start + count, 500):
            prompts = [f"prompt number {i} " * 8 for i in range(first, first + 500)]
            cache.generate(prompts, params, list(range(first, first + 500)))

    tracemalloc.start()
    try:
        fill(0, 4_000)
        after_4k = tracemalloc.get_traced_memory()[0]
        fill(4_000, 36_000)
        after_40k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        cache.close()
    assert cache.misses == 40_000
    assert after_40k - after_4k < 1024 * 1024, (after_4k, after_40k)  # 36k more entries, under 1 MiB more
