"""What SL-CAI trains on (Bai et al. 2022, section 3.1): the revision of every round, every helpfulness sample."""

import json

import pytest
import yaml

from constitutional.cli import main
from constitutional.config import config_from_dict, load_config
from constitutional.errors import UserError
from constitutional.records import append_records
from constitutional.rundir import RunDir
from constitutional.stages import sl

from conftest import REPO, cai_error_line, tiny_config_data


def red_team(index, revisions, flags=(), initial="A first answer.", final=None):
    """A red-team record with the given revision texts (rounds 1..n) and flags."""
    steps = [
        {"principle_id": f"p{i}", "critique": "Could be kinder.", "revision": text} for i, text in enumerate(revisions)
    ]
    return {
        "id": f"rt-{index}",
        "kind": "red_team",
        "prompt": f"Bad question {index}?",
        "initial_response": initial,
        "revisions": steps,
        "final_response": final if final is not None else revisions[-1],
        "flags": list(flags),
    }


def helpful(index, samples=None, flags=(), final=None):
    """A helpful record with `helpful_samples`, or without (a file from before samples: `final` only)."""
    record = {"id": f"hp-{index}", "kind": "helpful", "prompt": f"Good question {index}?", "initial_response": ""}
    if samples is not None:
        record["helpful_samples"] = samples
        record["initial_response"] = samples[0]
    usable = [
        text for i, text in enumerate(samples or []) if not any(f.startswith(f"helpful_samples[{i}]") for f in flags)
    ]
    record.update(revisions=[], final_response=final if final is not None else usable[0], flags=list(flags))
    return record


RECORDS = [
    # Round 2's revision copied a few-shot example: rounds 1 and 3 are examples, final is round 3's.
    red_team(0, ["Revision one.", "Copied text.", "Revision three."], ["revisions[1].revision:copied_fewshot"]),
    red_team(1, ["R1.", "R2.", "R3."]),
    # Every revision unusable: the critique stage fell back to the initial answer (round 0).
    red_team(
        2,
        ["", "la la la", "Sure."],
        ["revisions[0].revision:empty", "revisions[1].revision:repetitive", "revisions[2].revision:copied_fewshot"],
        final="A first answer.",
    ),
    helpful(0, ["Sample A.", "Sample B."]),
    helpful(1, ["", "Sample C."], ["helpful_samples[0]:empty"]),
    helpful(2, final="An answer from an older file."),  # no helpful_samples: its one answer
]


@pytest.fixture
def critiques(tmp_path):
    path = tmp_path / "critiques.jsonl"
    append_records(path, RECORDS)
    return path


def settings(**values):
    return config_from_dict({"sl": values}).sl


def completions(examples, kind):
    return sorted(example.completion for example in examples if example.kind == kind)


def test_all_revisions_trains_on_every_usable_revision_and_every_helpful_sample(critiques):
    assert settings().targets == "all_revisions"  # the paper's setup is the default
    examples, counts = sl.load_examples(critiques, settings(), 0, "<eos>")
    assert completions(examples, "red_team") == sorted(
        f" {text}<eos>" for text in ["Revision one.", "Revision three.", "R1.", "R2.", "R3."]
    )
    assert completions(examples, "helpful") == sorted(
        f" {text}<eos>" for text in ["Sample A.", "Sample B.", "Sample C.", "An answer from an older file."]
    )
    assert counts == {
        "examples": 9,
        "examples_red_team": 5,
        "examples_helpful": 4,
        "examples_by_round": {"1": 2, "2": 1, "3": 2},
        "skipped_degenerate": 1,  # rt-2: no usable revision
        "skipped_revisions": 4,
        "skipped_helpful_samples": 1,
        "helpful_left_out": 0,
    }
    # A revision's prompt is its record's conversation, as for the final response.
    assert sum(e.prompt == "Human: Bad question 1?\n\nAssistant:" for e in examples) == 3


def test_final_targets_are_the_final_responses(critiques):
    examples, counts = sl.load_examples(critiques, settings(targets="final"), 0)
    assert completions(examples, "red_team") == [" A first answer.", " R3.", " Revision three."]
    assert counts["examples_by_round"] == {"0": 1, "3": 2}  # rt-2's final is its initial answer
    assert counts["examples_red_team"] == 3 and counts["skipped_degenerate"] == 0 and counts["skipped_revisions"] == 0
    assert counts["examples_helpful"] == 4  # helpful samples do not depend on sl.targets


def test_helpful_fraction_is_a_share_of_examples_not_of_prompts(critiques):
    # 5 red-team examples (from 3 prompts): a share of 0.25 is round(0.25 * 5 / 0.75) = 2 helpful examples.
    examples, counts = sl.load_examples(critiques, settings(helpful_fraction=0.25), 0)
    assert counts["examples_helpful"] == 2 and counts["helpful_left_out"] == 2 and counts["examples"] == 7
    assert sum(example.kind == "helpful" for example in examples) == 2
    again, _ = sl.load_examples(critiques, settings(helpful_fraction=0.25), 0)
    assert again == examples  # seeded


def test_all_revisions_on_records_without_revisions_is_refused(tmp_path):
    path = tmp_path / "critiques.jsonl"
    record = red_team(0, ["x"])
    record["revisions"] = []
    append_records(path, [record, helpful(0, ["Sample."])])
    with pytest.raises(UserError, match=rf"^{path}: sl.targets: all_revisions, but no red-team record has revisions"):
        sl.load_examples(path, settings(), 0)
    examples, counts = sl.load_examples(path, settings(targets="final"), 0)  # the answers as they are
    assert counts["examples_by_round"] == {"0": 1} and counts["examples"] == 2


@pytest.mark.parametrize(
    "field, value",
    [("revisions", "not a list"), ("revisions", [{"principle_id": "p"}]), ("helpful_samples", [1, 2])],
)
def test_malformed_revisions_or_samples_name_the_file_record_and_field(tmp_path, field, value):
    records = [red_team(0, ["x"]), helpful(0, ["Sample."])]
    records[0 if field == "revisions" else 1][field] = value
    path = tmp_path / "critiques.jsonl"
    append_records(path, records)
    with pytest.raises(UserError, match=rf"^{path}: record '(rt|hp)-0': field '{field}': expected a list"):
        sl.load_examples(path, settings(), 0)


def test_cai_run_refuses_all_revisions_after_zero_rounds_in_one_line(tmp_path, tiny_model_dir, capsys):
    data = tiny_config_data(
        tiny_model_dir,
        tmp_path,
        data={"max_red_team": 2, "max_helpful": 1},
        critique={"rounds": 0, "helpful_samples": 1},
        sl={"batch_size": 4, "max_length": 64, "save_steps": 100},
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = RunDir(tmp_path / "run")
    command = ["run", str(config), "--run-dir", str(run.root), "--stages", "critique,sl"]
    assert main(command) == 2
    error = cai_error_line(capsys.readouterr().err)
    assert str(run.path("critiques")) in error and "sl.targets" in error
    assert run.stage_status("critique") == "done" and run.stage_status("sl") != "done"
    assert not run.path("sl_cai").exists() and not list(run.checkpoints("sl").glob("checkpoint-*"))
    # Training on the answers as they are is the `final` ablation (a changed setting: --rerun).
    assert main([*command, "--set", "sl.targets=final", "--rerun"]) == 0
    assert run.stage_status("critique") == "done"
    counts = run.stage_entry("sl")["counts"]
    assert counts["examples_by_round"] == {"0": counts["examples_red_team"]}
    assert json.loads((run.path("sl_cai") / "training_summary.json").read_text())["steps"] >= 1


def test_7b_recipe_has_the_papers_sl_mix():
    """Section 3.1: 182,831 red-team prompts x 4 revisions, 135,296 helpfulness prompts x 2 samples at T = 1."""
    config = load_config(REPO / "configs" / "recipe-7b.yaml")
    revisions, samples = 182_831 * 4, 135_296 * 2
    assert config.sl.targets == "all_revisions" and config.critique.rounds == 4
    assert config.critique.helpful_samples == 2 and config.critique.helpful_temperature == 1.0
    assert config.sl.helpful_fraction == pytest.approx(samples / (revisions + samples), abs=1e-3)  # 0.270
