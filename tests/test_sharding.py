"""Sharded generation (`--shard i/n`) and `cai merge`: the merged shards are the unsharded run's records,
and an incomplete or inconsistent set of shards is named and never merged."""

import pytest

from constitutional.cli import main
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records, write_records_atomic
from constitutional.rundir import RunDir
from constitutional.sharding import Shard, merge_shards, parse_shard

from conftest import tiny_config_data


@pytest.fixture
def config(tiny_model_dir, tmp_path):
    data = tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1, "max_new_tokens": 6})
    return config_from_dict(data, base_dir=str(tmp_path))


@pytest.fixture
def shards(config, tmp_path):
    """The critique stage run unsharded, and as shards 0/2 and 1/2 in their own run directories."""
    full = run_pipeline(config, tmp_path / "full", ["critique"])
    parts = [run_pipeline(config, tmp_path / f"shard{i}", ["critique"], shard=Shard(i, 2)) for i in range(2)]
    return full, parts


def test_merged_shards_hold_exactly_the_unsharded_records(shards, tmp_path):
    full, parts = shards
    expected = read_records(full.path("critiques"))
    for index, part in enumerate(parts):
        rows = read_records(part.path("critiques"))
        assert rows and all(Shard(index, 2).holds(row["id"]) for row in rows)
        assert part.stage_entry("critique")["shard"] == f"{index}/2"
    target = RunDir(tmp_path / "merged")
    counts = merge_shards(target, list(reversed(parts)), "critique")
    merged = read_records(target.path("critiques"))
    assert counts["records"] == {"critiques": len(expected)}
    # The same records (each depends only on its prompt and seed), in shard order.
    assert sorted(merged, key=lambda row: row["id"]) == sorted(expected, key=lambda row: row["id"])
    assert target.stage_status("critique") == "done"
    assert target.stage_entry("critique")["settings"] == full.stage_entry("critique")["settings"]


def test_a_missing_or_doubled_shard_is_named_and_nothing_is_merged(shards, tmp_path):
    _, (zero, one) = shards
    target = RunDir(tmp_path / "merged")
    with pytest.raises(UserError, match=r"shard 1/2 of critique is missing; nothing merged"):
        merge_shards(target, [zero], "critique")
    with pytest.raises(UserError, match=r"shard 0/2 of critique is given twice"):
        merge_shards(target, [zero, zero, one], "critique")
    assert not target.path("critiques").exists() and not target.exists()


def test_a_shard_file_cut_short_or_holding_foreign_records_is_refused(shards, tmp_path):
    full, (zero, one) = shards
    target = RunDir(tmp_path / "merged")
    rows = read_records(one.path("critiques"))
    write_records_atomic(one.path("critiques"), rows[:-1])
    with pytest.raises(UserError, match=r"records, but shard 1/2 finished with"):
        merge_shards(target, [zero, one], "critique")
    foreign = [row for row in read_records(full.path("critiques")) if Shard(0, 2).holds(row["id"])][:1]
    write_records_atomic(one.path("critiques"), rows[:-1] + foreign)
    with pytest.raises(UserError, match=r"belongs to another shard than 1/2"):
        merge_shards(target, [zero, one], "critique")
    assert not target.path("critiques").exists()


def test_sharding_is_refused_where_it_cannot_work(shards, config, tmp_path):
    _, (zero, _) = shards
    with pytest.raises(UserError, match="stage 'sl' cannot be sharded"):
        run_pipeline(config, tmp_path / "other", ["sl"], shard=Shard(0, 2))
    with pytest.raises(UserError, match=r"holds only shard 0/2 of critique: `cai merge` the shards first"):
        run_pipeline(config, zero.root, ["sl"])
    with pytest.raises(UserError, match="holds shard 0/2; use one run directory per shard"):
        run_pipeline(config, zero.root, ["critique"], shard=Shard(1, 2))
    for text in ("2/2", "x", "1/0"):
        with pytest.raises(UserError, match="--shard: expected i/n"):
            parse_shard(text)


def test_cai_merge_on_the_command_line(shards, tmp_path, capsys):
    _, (zero, one) = shards
    assert main(["merge", str(tmp_path / "merged"), str(zero.root), "--stage", "critique"]) == 2
    assert "shard 1/2 of critique is missing" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "merged"), str(zero.root), str(one.root), "--stage", "critique"]) == 0
    assert "merged 2 shards of critique" in capsys.readouterr().out
