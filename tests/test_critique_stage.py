"""The critique stage on the tiny model: record shape, determinism, resume after a crash."""

import json

import pytest

from conftest import tiny_config_data
from constitutional.config import config_from_dict
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.stages import critique

FIELDS = {"id", "kind", "prompt", "initial_response", "revisions", "final_response", "flags"}


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """Config for the tiny model and a handful of prompts, with per-test section overrides."""

    def make(**sections):
        return config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, **sections))

    return make


@pytest.fixture
def run_stage(tmp_path, make_config):
    def run(run_name, **sections):
        config = make_config(**sections)
        result = run_pipeline(config, tmp_path / run_name, ["critique"])
        return config, result, read_records(result.data("critiques.jsonl"))

    return run


def test_records_have_the_contract_fields_and_fresh_principles(run_stage):
    config, run, records = run_stage("run")
    assert len(records) == 7
    assert [r["kind"] for r in records].count("red_team") == 5
    for record in records:
        assert FIELDS <= set(record)
        if record["kind"] == "red_team":
            assert len(record["revisions"]) == config.critique.rounds
            ids = [revision["principle_id"] for revision in record["revisions"]]
            assert len(set(ids)) == len(ids)  # a fresh principle each round
            assert set(record["revisions"][0]) == {"principle_id", "critique", "revision"}
        else:
            assert record["revisions"] == [] and record["final_response"] == record["initial_response"] or \
                "initial_response:empty" in " ".join(record["flags"])
        # Outputs never run on into the next turn.
        for text in [record["initial_response"]] + [r["critique"] for r in record["revisions"]]:
            assert "Human:" not in text and "CritiqueRequest:" not in text
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "done" and manifest["counts"]["records"] == 7
    assert (run.root / "config.yaml").exists()


def test_degenerate_outputs_are_flagged_not_kept_as_final(run_stage):
    # One new token per turn: a random tiny model's outputs are often blank or junk.
    _, _, records = run_stage("short", critique={"max_new_tokens": 1})
    flagged = [record for record in records if record["flags"]]
    for record in flagged:
        for flag in record["flags"]:
            field, reason = flag.rsplit(":", 1)
            assert reason in {"empty", "repetitive", "none"}
        if "final_response:none" in record["flags"]:
            assert record["final_response"] == ""


def test_same_config_and_seed_give_the_same_data(run_stage):
    _, _, first = run_stage("a")
    _, _, second = run_stage("b", cache={"enabled": False})
    assert first == second


class Crash(Exception):
    pass


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path, monkeypatch, run_stage, make_config):
    _, _, reference = run_stage("reference", cache={"enabled": False})

    # Crash in the middle of the second chunk, after the first chunk's records were written.
    calls = {"n": 0}
    original = critique.CritiqueWriter.process

    def crashing_process(self, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed")
        return original(self, chunk)

    monkeypatch.setattr(critique.CritiqueWriter, "process", crashing_process)
    config = make_config()
    with pytest.raises(Crash):
        run_pipeline(config, tmp_path / "crashy", ["critique"])
    out = tmp_path / "crashy" / "data" / "critiques.jsonl"
    assert len(read_records(out)) == config.critique.chunk_size
    manifest = json.loads((tmp_path / "crashy" / "manifest.json").read_text())
    assert manifest["stages"]["critique"]["status"] == "failed"
    # A kill during a write leaves a partial line behind.
    with out.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "rt-partial", "kind": "red_')
    monkeypatch.setattr(critique.CritiqueWriter, "process", original)

    run = run_pipeline(config, tmp_path / "crashy", ["critique"])
    resumed = read_records(run.data("critiques.jsonl"))
    assert [r["id"] for r in resumed] == [r["id"] for r in reference]
    assert resumed == reference
    assert run.read_manifest()["stages"]["critique"]["status"] == "done"
    assert run.read_manifest()["stages"]["critique"]["counts"]["records"] == len(reference)


def test_a_done_stage_is_skipped(monkeypatch, run_stage):
    config, run, records = run_stage("once")

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(critique, "run", refuse)
    run_pipeline(config, run.root, ["critique"])
    assert read_records(run.data("critiques.jsonl")) == records
