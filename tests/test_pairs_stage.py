"""Stage `pairs`: two seeded samples per red-team prompt from the SL-CAI model."""

import shutil

import pytest

from constitutional.backends import SamplingParams
from constitutional.comparisons import sample_pairs
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.records import append_records, read_records
from constitutional.rundir import RunDir
from constitutional.stages import pairs

CRITIQUES = [
    {"id": "rt-1", "kind": "red_team", "prompt": "How do I pick a lock?", "final_response": "x"},
    {"id": "hp-1", "kind": "helpful", "prompt": "How do I bake bread?", "final_response": "y"},
    {
        "id": "rt-2",
        "kind": "red_team",
        "prompt": "Note: 3:30pm. Insult my boss.",
        "final_response": "z",
        "history": [{"role": "human", "text": "Hi"}, {"role": "assistant", "text": "Hello!"}],
    },
]


@pytest.fixture
def run_with_sl_cai(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    append_records(run.path("critiques"), CRITIQUES)
    shutil.copytree(tiny_model_dir, run.path("sl_cai"))
    config = config_from_dict({"pairs": {"max_new_tokens": 6, "chunk_size": 1}, "transformers": {"dtype": "float32"}})
    return config, run


def test_two_different_samples_per_red_team_prompt(run_with_sl_cai, monkeypatch):
    config, run = run_with_sl_cai
    counts = pairs.run(config, config.pairs, run, pairs.check(config, config.pairs))
    records = read_records(run.path("pairs"))
    assert [record["id"] for record in records] == ["rt-1", "rt-2"]  # helpful prompts are not paired
    for record in records:
        assert set(record) >= {"id", "prompt", "response_a", "response_b"}
        assert record["response_a"] != record["response_b"]
    assert records[1]["history"] == CRITIQUES[2]["history"]
    assert counts == {**counts, "prompts": 2, "pairs": 2, "dropped_identical": 0}

    # Resuming samples nothing again (the model is not even loaded) and keeps the data identical.
    def no_model(*args, **kwargs):
        raise AssertionError("SL-CAI was opened although every prompt was paired")

    monkeypatch.setattr(type(config), "open_backend", no_model)
    assert pairs.run(config, config.pairs, run, pairs.check(config, config.pairs))["pairs"] == 2
    assert read_records(run.path("pairs")) == records


class _Echo:
    """A back end that answers every prompt with the same text: every pair is identical."""

    model_id = "echo"

    def generate(self, prompts, params, seeds=None):
        return ["same answer"] * len(prompts)


def test_identical_pairs_are_dropped():
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    assert sample_pairs(_Echo(), [CRITIQUES[0]], params, seed=0) == []


def test_missing_inputs_are_user_errors(tmp_path):
    config = config_from_dict({})
    run = RunDir(tmp_path / "empty")
    with pytest.raises(UserError, match="no SL-CAI model"):
        pairs.run(config, config.pairs, run, pairs.check(config, config.pairs))
    with pytest.raises(UserError, match="pairs.temperature"):
        config_from_dict({"pairs": {"temperature": 0}})
    run.path("sl_cai").mkdir(parents=True)
    (run.path("sl_cai") / "config.json").write_text("{}")
    append_records(run.path("critiques"), [{"id": "a", "prompt": "p"}])
    with pytest.raises(UserError, match=r"critiques.jsonl:1: missing field 'kind'"):
        pairs.run(config, config.pairs, run, pairs.check(config, config.pairs))
