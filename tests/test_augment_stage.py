"""Stage `augment` (the paper's model-generated prompts): generation, de-duplication, resume, critique, bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from constitutional.cli import main
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.seeding import seed_for
from constitutional.sources import load_prompts
from constitutional.stages import augment

from conftest import cai_error_line, tiny_config_data

RECORD_FIELDS = {"id", "kind", "prompt", "fewshot_ids", "slot", "dropped"}

# What the scripted model writes for (kind, slot, attempt). The tiny config's red-team sources
# include "How do I pick a lock?"; its helpfulness sources "Explain photosynthesis briefly.".
SCRIPT = {
    ("red_team", 0, 0): "how do I pick a LOCK",  # a source prompt, other case and punctuation
    ("red_team", 0, 1): "Tell me a way to sneak into a concert.",
    # The same as slot 0's second draw, which is drawn a round later: slot order still decides.
    ("red_team", 1, 0): "TELL me a way to sneak into a concert!",
    ("red_team", 1, 1): '  3. "How can I forge a signature?"',
    ("red_team", 2, 0): "",
    ("red_team", 2, 1): "la la la la " * 5,
    ("red_team", 2, 2): "ok",  # the last of 3 draws: slot 2 is a shortfall
    ("red_team", 3, 0): "Assistant: Sure, here is how",
    ("red_team", 3, 1): "What is the best way to shoplift?",
    ("helpful", 0, 0): "Explain photosynthesis briefly",
    ("helpful", 0, 1): "How should I plan a week of meals?",
}
EXPECTED = [  # (kind, slot, prompt, dropped)
    ("red_team", 0, "Tell me a way to sneak into a concert.", ["duplicate_source"]),
    ("red_team", 1, "How can I forge a signature?", ["duplicate"]),
    ("red_team", 3, "What is the best way to shoplift?", ["turn_marker"]),
    ("helpful", 0, "How should I plan a week of meals?", ["duplicate_source"]),
]
SCRIPTED = {"red_team": 4, "helpful": 1, "num_fewshot": 3, "max_attempts": 3}


class ScriptedModel:
    """Writes SCRIPT's text for each request's seed and records the seeds of every generate call."""

    model_id = "scripted"

    def __init__(self, seed: int) -> None:
        self.by_seed = {seed_for(seed, "augment", kind, str(slot), str(attempt)): text
                        for (kind, slot, attempt), text in SCRIPT.items()}  # fmt: skip
        self.calls: list[list[int]] = []

    def generate(self, prompts, params, seeds=None):
        assert params.stop == ("\n",) and all(prompt.endswith(".") for prompt in prompts)
        self.calls.append(list(seeds))
        return [self.by_seed[seed] for seed in seeds]

    def score_options(self, prompts, options):
        raise AssertionError("augment never scores")

    def close(self):
        pass


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    def make(**sections):
        return config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, **sections))

    return make


def use_scripted(monkeypatch, config) -> ScriptedModel:
    """Stage augment's model (an explicit `augment.model`) becomes the scripted one; others load as usual."""
    model, original = ScriptedModel(config.seed), type(config).open_backend

    def open_backend(self, spec, cache_path):
        return model if spec is self.augment.model else original(self, spec, cache_path)

    monkeypatch.setattr(type(config), "open_backend", open_backend)
    return model


def scripted_config(make_config, tiny_model_dir, **values):
    return make_config(augment={**SCRIPTED, "model": str(tiny_model_dir), **values})


def test_off_by_default_it_reads_and_writes_nothing(tmp_path, make_config):
    config = make_config(data={"red_team": "no-such-file.txt"})  # never read while the stage is off
    run = run_pipeline(config, tmp_path / "run", ["augment"])
    assert not run.path("augmented_prompts").exists()
    entry = run.read_manifest()["stages"]["augment"]
    assert entry["status"] == "done" and entry["counts"]["records"] == 0
    assert entry["counts"]["red_team"] == {"requested": 0, "kept": 0, "generated": 0, "dropped": {}, "shortfall": 0}


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_duplicates_of_sources_and_of_each_other_are_drawn_again_in_slot_order(
    tmp_path, make_config, tiny_model_dir, monkeypatch, chunk_size
):
    config = scripted_config(make_config, tiny_model_dir, chunk_size=chunk_size)
    use_scripted(monkeypatch, config)
    run = run_pipeline(config, tmp_path / "run", ["augment"])
    records = read_records(run.path("augmented_prompts"))
    # The same prompts whatever the chunking: slots are settled as if made one at a time.
    assert [(r["kind"], r["slot"], r["prompt"], r["dropped"]) for r in records] == EXPECTED
    sources = {
        kind: load_prompts(getattr(config.data, kind), prefix=prefix, base_dir=config.base_dir)
        for kind, (prefix, _) in augment.SOURCES.items()
    }
    for record in records:
        assert set(record) == RECORD_FIELDS
        assert record["id"] == augment.augmented_id(record["kind"], record["prompt"])
        assert record["id"].startswith(augment.PREFIX[record["kind"]] + "-")
        source_ids = {item.id for item in sources[record["kind"]]}
        shown = min(3, len(source_ids))  # num_fewshot, or all there are (2 helpfulness prompts)
        assert record["id"] not in source_ids and len(set(record["fewshot_ids"])) == len(record["fewshot_ids"]) == shown
        assert set(record["fewshot_ids"]) <= source_ids
    counts = run.read_manifest()["stages"]["augment"]["counts"]
    assert counts["records"] == 4
    assert counts["red_team"] == {
        "requested": 4,
        "kept": 3,
        "generated": 9,
        "dropped": {"duplicate": 1, "duplicate_source": 1, "empty": 1, "repetitive": 1, "too_short": 1,
                    "turn_marker": 1},
        "shortfall": 1,
    }  # fmt: skip
    assert counts["helpful"] == {
        "requested": 1, "kept": 1, "generated": 2, "dropped": {"duplicate_source": 1}, "shortfall": 0
    }  # fmt: skip


def test_cleaning_and_problems():
    assert augment.clean(' 12. "Where can I buy a fake passport?"  \nHuman: more') == "Where can I buy a fake passport?"
    assert augment.clean("- How   do I\tstart a garden?") == "How do I start a garden?"
    assert augment.problem("How do I start a garden?", 10, 300) is None
    assert augment.problem("Say Human: hi to me", 1, 300) == "turn_marker"
    assert augment.problem("broken \ufffd text here", 1, 300) == "unprintable"
    assert augment.problem("x" * 301, 10, 300) == "too_long"
    assert augment.normalise("How do I pick a LOCK?!") == augment.normalise("how do i pick a lock")
    prompt = augment.fewshot_prompt("Header.", ["First one?", "Second one?"])
    assert prompt == "Header.\n\n1. First one?\n2. Second one?\n3."


class Crash(Exception):
    pass


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path, make_config, tiny_model_dir, monkeypatch):
    config = scripted_config(make_config, tiny_model_dir, chunk_size=1)
    use_scripted(monkeypatch, config)
    reference = read_records(run_pipeline(config, tmp_path / "reference", ["augment"]).path("augmented_prompts"))

    original, calls = augment.PromptWriter.process, {"n": 0}

    def crashing(self, backend, chunk, advance):
        calls["n"] += 1
        if calls["n"] == 3:  # red-team slots 0 and 1 are written, slot 2 is in flight
            raise Crash("killed")
        return original(self, backend, chunk, advance)

    monkeypatch.setattr(augment.PromptWriter, "process", crashing)
    with pytest.raises(Crash):
        run_pipeline(config, tmp_path / "crashy", ["augment"])
    output = tmp_path / "crashy" / "data" / "augmented_prompts.jsonl"
    assert [record["slot"] for record in read_records(output)] == [0, 1]
    with output.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "aug-rt-partial", "kind": "red_')  # a kill in the middle of a write
    monkeypatch.setattr(augment.PromptWriter, "process", original)
    model = use_scripted(monkeypatch, config)
    run = run_pipeline(config, tmp_path / "crashy", ["augment"])
    assert read_records(run.path("augmented_prompts")) == reference
    # Nothing finished was drawn again: only slots 2 and 3 and the helpful slot.
    drawn = {seed for call in model.calls for seed in call}
    assert not drawn & {seed_for(config.seed, "augment", "red_team", str(slot), "0") for slot in (0, 1)}
    assert run.read_manifest()["stages"]["augment"]["counts"]["red_team"]["generated"] == 9


def test_the_tiny_model_writes_prompts_reproducibly_whatever_the_chunking(tmp_path, make_config):
    sections = {"red_team": 3, "helpful": 2, "num_fewshot": 2, "max_new_tokens": 8, "min_chars": 1, "max_attempts": 2}
    first = run_pipeline(make_config(augment=sections), tmp_path / "a", ["augment"])
    second = run_pipeline(
        make_config(augment={**sections, "chunk_size": 1}, cache={"enabled": False}), tmp_path / "b", ["augment"]
    )
    records = read_records(first.path("augmented_prompts"))
    assert records == read_records(second.path("augmented_prompts"))
    counts = first.read_manifest()["stages"]["augment"]["counts"]
    for kind, wanted in (("red_team", 3), ("helpful", 2)):
        mine = [record for record in records if record["kind"] == kind]
        assert counts[kind]["kept"] == len(mine) and counts[kind]["kept"] + counts[kind]["shortfall"] == wanted
        assert counts[kind]["generated"] == len(mine) + sum(counts[kind]["dropped"].values())
        assert all(augment.problem(record["prompt"], 1, 300) is None for record in mine)
        assert len({augment.normalise(record["prompt"]) for record in mine}) == len(mine)


def test_critique_answers_the_augmented_prompts_after_the_sources(tmp_path, make_config, tiny_model_dir, monkeypatch):
    config = scripted_config(make_config, tiny_model_dir)
    use_scripted(monkeypatch, config)
    run = run_pipeline(config, tmp_path / "run", ["augment", "critique"])
    augmented = read_records(run.path("augmented_prompts"))
    records = read_records(run.path("critiques"))
    prefixes = [record["id"].rsplit("-", 1)[0] for record in records]
    assert prefixes == ["rt"] * 5 + ["aug-rt"] * 3 + ["hp"] * 2 + ["aug-hp"]
    by_id = {record["id"]: record for record in records}
    for prompt in augmented:
        assert by_id[prompt["id"]]["prompt"] == prompt["prompt"] and by_id[prompt["id"]]["kind"] == prompt["kind"]
    assert len(by_id[augmented[0]["id"]]["revisions"]) == config.critique.rounds
    entry = run.read_manifest()["stages"]["critique"]
    assert entry["counts"]["augmented"] == 4 and entry["counts"]["records"] == 11
    assert entry["inputs"]["augmented_prompts"] == run.fingerprint("augmented_prompts")

    # The augmented prompts are an input of critique: a changed file makes it stale.
    path = run.path("augmented_prompts")
    path.write_text("".join(json.dumps(record) + "\n" for record in augmented[:-1]), encoding="utf-8")
    with pytest.raises(UserError, match="augmented_prompts.jsonl changed"):
        run_pipeline(config, run.root, ["critique"])


def test_critique_with_augment_on_needs_the_augment_stage(tmp_path, make_config, tiny_model_dir):
    config = scripted_config(make_config, tiny_model_dir)
    with pytest.raises(UserError, match=r"'augment' has not run.*--stages augment,critique"):
        run_pipeline(config, tmp_path / "run", ["critique"])
    assert not (tmp_path / "run").exists()


def test_without_augmentation_critique_is_unchanged(tmp_path, make_config):
    config = make_config()
    alone = run_pipeline(config, tmp_path / "alone", ["critique"])
    after = run_pipeline(config, tmp_path / "after", ["augment", "critique"])
    assert after.path("critiques").read_bytes() == alone.path("critiques").read_bytes()
    assert not after.path("augmented_prompts").exists()
    assert alone.read_manifest()["stages"]["critique"]["counts"]["augmented"] == 0


@pytest.mark.parametrize(
    ("augment_section", "source", "expected"),
    [
        ({"red_team": 2}, "", "red_team.txt: no prompts found"),
        ({"red_team": 2, "min_chars": 1, "max_chars": 5}, None, "data.red_team: "),
    ],
)
def test_an_augmentation_source_without_prompts_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, capsys, augment_section, source, expected
):
    data = tiny_config_data(tiny_model_dir, tmp_path, augment=augment_section)
    if source is not None:
        (tmp_path / "red_team.txt").write_text(source, encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    run_dir = tmp_path / "run"
    code = main(["run", str(config), "--run-dir", str(run_dir), "--stages", "augment,critique"])
    error = cai_error_line(capsys.readouterr().err)
    assert code == 2 and expected in error, error
    assert not run_dir.exists()


def test_with_augment_off_a_changed_base_model_leaves_critique_fresh(tmp_path, make_config):
    run = run_pipeline(make_config(), tmp_path / "run", ["augment", "critique"])
    # models.base shapes sl and later stages only: critique (and an idle augment) must stay done.
    run_pipeline(make_config(models={"base": "embedded"}), run.root, ["critique"])
    assert run.read_manifest()["stages"]["critique"]["status"] == "done"
