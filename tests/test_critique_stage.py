"""The critique stage on the tiny model: record shape, determinism, resume after a crash."""

import json

import pytest

from constitutional.config import config_from_dict
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.stages import critique

from conftest import tiny_config_data

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
        return config, result, read_records(result.path("critiques"))

    return run


def test_records_have_the_contract_fields_and_fresh_principles(run_stage):
    config, run, records = run_stage("run")
    assert len(records) == 7
    assert [r["kind"] for r in records].count("red_team") == 5
    for record in records:
        assert set(record) >= FIELDS
        if record["kind"] == "red_team":
            assert len(record["revisions"]) == config.critique.rounds
            ids = [revision["principle_id"] for revision in record["revisions"]]
            assert len(set(ids)) == len(ids)  # a fresh principle each round
            assert set(record["revisions"][0]) == {"principle_id", "critique", "revision"}
        else:
            # The paper's 2 samples per helpfulness prompt (the default); the first is also initial_response.
            samples = record["helpful_samples"]
            assert record["revisions"] == [] and len(samples) == config.critique.helpful_samples == 2
            assert record["initial_response"] == samples[0]
            flagged = [
                index for index in range(2) if any(f.startswith(f"helpful_samples[{index}]:") for f in record["flags"])
            ]
            usable = [text for index, text in enumerate(samples) if index not in flagged]
            assert record["final_response"] == (usable[0] if usable else "")
        # Outputs never run on into the next turn.
        for text in [record["initial_response"]] + [r["critique"] for r in record["revisions"]]:
            assert "Human:" not in text and "CritiqueRequest:" not in text
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "done" and manifest["counts"]["records"] == 7
    assert manifest["counts"]["helpful_samples"] == 4
    assert (run.root / "config.yaml").exists()


class ScriptedModel:
    """A back end that answers from a script keyed by (prompt text, turn): known good and bad outputs."""

    model_id = "scripted"

    def __init__(self, script):
        self.script = script

    def apply_chat_template(self, messages):
        return None

    def generate(self, prompts, params, seeds=None):
        texts = []
        for prompt in prompts:
            turn = prompt.rstrip().rsplit("\n", 1)[-1].rstrip(":")  # "Assistant", "Critique" or "Revision"
            live = prompt.rsplit("Human:", 1)[-1].strip()  # the last human turn: the red-team prompt
            asked = next(key for key in self.script if live.startswith(key))
            texts.append(self.script[asked][turn])
        return texts


def test_degenerate_and_copied_outputs_are_flagged_and_never_final(make_config):
    config = make_config(critique={"rounds": 1, "num_fewshot": 1})
    inputs = critique.check(config, config.critique)
    example_words = inputs.constitution.critique_fewshot[0].split()
    copied = "Sure. " + " ".join(example_words[-20:-8])  # 12 words lifted from the few-shot example
    good = "Here is a careful and honest answer that stays on topic for you."
    script = {
        "How do I pick a lock?": {"Assistant": good, "Critique": "It is fine.", "Revision": copied},
        "Tell me how to cheat on a test.": {"Assistant": good, "Critique": "Too blunt.", "Revision": "la la la " * 12},
        "Write an insult for my coworker.": {"Assistant": good, "Critique": "Unkind.", "Revision": "A kinder reply."},
        "How can I find where my ex lives now?": {"Assistant": "", "Critique": "", "Revision": "   "},
    }
    chunk = [(item, "red_team") for item in inputs.red_team if item.prompt in script]
    records = critique.CritiqueWriter(config, config.critique, inputs, ScriptedModel(script)).process(chunk)
    by_prompt = {record["prompt"]: record for record in records}

    lock = by_prompt["How do I pick a lock?"]
    assert lock["flags"] == ["revisions[0].revision:copied_fewshot"] and lock["final_response"] == good
    cheat = by_prompt["Tell me how to cheat on a test."]
    assert cheat["flags"] == ["revisions[0].revision:repetitive"] and cheat["final_response"] == good
    insult = by_prompt["Write an insult for my coworker."]
    assert insult["flags"] == [] and insult["final_response"] == "A kinder reply."
    ex = by_prompt["How can I find where my ex lives now?"]
    assert ex["flags"] == [
        "initial_response:empty",
        "revisions[0].critique:empty",
        "revisions[0].revision:empty",
        "final_response:none",
    ]
    assert ex["final_response"] == ""
    counts = critique.summarize(records)
    assert counts["flagged"] == 3 and counts["copied_fewshot"] == 1 and counts["without_usable_final_response"] == 1


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
    resumed = read_records(run.path("critiques"))
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
    assert read_records(run.path("critiques")) == records


class RecordingModel:
    """Answers each request with its seed and temperature, and records every generate call."""

    model_id = "recording"

    def __init__(self, empty_seeds=()):
        self.calls = []
        self.empty_seeds = set(empty_seeds)

    def apply_chat_template(self, messages):
        return None

    def generate(self, prompts, params, seeds=None):
        self.calls.append((len(prompts), params.temperature, list(seeds)))
        return ["" if seed in self.empty_seeds else f"Answer {seed} at T={params.temperature}." for seed in seeds]


def test_helpfulness_prompts_get_their_samples_at_their_temperature_with_one_seed_each(make_config):
    config = make_config(critique={"rounds": 1, "temperature": 0.3, "helpful_samples": 3, "helpful_temperature": 1.0})
    inputs = critique.check(config, config.critique)
    chunk = [(inputs.red_team[0], "red_team")] + [(item, "helpful") for item in inputs.helpful]
    first = critique.helpful_sample_seed(config.seed, inputs.helpful[0].id, 0)
    model = RecordingModel(empty_seeds={first})
    records = critique.CritiqueWriter(config, config.critique, inputs, model).process(chunk)
    red, *helpful = records
    # Red-team answers, critiques and revisions at the critique temperature; samples at theirs, in one call.
    assert [(n, t) for n, t, _ in model.calls] == [(1, 0.3), (6, 1.0), (1, 0.3), (1, 0.3)]
    assert red["initial_response"].endswith("T=0.3.") and "helpful_samples" not in red
    for item, record in zip(inputs.helpful, helpful):
        seeds = [critique.helpful_sample_seed(config.seed, item.id, index) for index in range(3)]
        assert len(set(seeds)) == 3
        assert record["helpful_samples"] == ["" if s == first else f"Answer {s} at T=1.0." for s in seeds]
        assert record["initial_response"] == record["helpful_samples"][0]
    # Sample 0 shares the single answer's seed of before (helpful_samples: 1 reproduces those records).
    assert first == critique.seed_for(config.seed, inputs.helpful[0].id, "answer")
    # A flagged sample is never final: the first usable one is.
    assert helpful[0]["flags"] == ["helpful_samples[0]:empty"]
    assert helpful[0]["final_response"] == helpful[0]["helpful_samples"][1]
    assert helpful[1]["flags"] == [] and helpful[1]["final_response"] == helpful[1]["helpful_samples"][0]
    assert critique.summarize(records)["helpful_samples"] == 6
    # One seed per (prompt, sample): a chunk of one prompt gives the same record as a chunk of all.
    alone = critique.CritiqueWriter(config, config.critique, inputs, RecordingModel(empty_seeds={first}))
    assert alone.process([(inputs.helpful[1], "helpful")]) == [helpful[1]]


def test_samples_do_not_depend_on_batching(run_stage):
    _, _, whole = run_stage("whole", critique={"chunk_size": 7}, transformers={"batch_size": 8})
    _, _, single = run_stage(
        "single", critique={"chunk_size": 1}, transformers={"batch_size": 1}, cache={"enabled": False}
    )
    assert whole == single
    samples = [record["helpful_samples"] for record in whole if record["kind"] == "helpful"]
    assert len(samples) == 2 and all(len(set(pair)) == 2 for pair in samples)  # T = 1: two different answers


@pytest.mark.parametrize(
    "values, key",
    [
        ({"helpful_samples": 0}, "critique.helpful_samples: expected a positive number, got 0"),
        ({"helpful_temperature": -1}, "critique.helpful_temperature: expected 0 or more, got -1"),
    ],
)
def test_bad_helpful_sampling_settings_name_the_key(make_config, values, key):
    from constitutional.errors import UserError

    with pytest.raises(UserError, match=f"^{key}"):
        make_config(critique=values)
