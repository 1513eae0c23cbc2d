"""Stage `pm` measured on human comparisons from outside its training mix (`pm.helpfulness_eval`):
the figures in eval/pm.json, in- vs out-of-distribution labels, and bad input through `cai run`."""

import json
import random
import re

import pytest
import yaml

from constitutional.cli import main
from constitutional.evaluation.report import build_report
from constitutional.intervals import wilson_interval
from constitutional.preference_eval import held_out_figures, verdict
from constitutional.records import append_records
from constitutional.rundir import RunDir

from conftest import cai_error_line, tiny_config_data

TOPICS = ["bread", "tea", "rain", "chess", "maths", "bikes", "plants", "music", "maps", "knots", "clocks", "glue"]


def transcript(prompt, answer):
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def write_hh(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def comparisons(template, topics, repeats=2):
    """HH-format rows where the chosen answer says `yes` and the rejected `no` (position is the stage's coin)."""
    return [
        {"chosen": transcript(template.format(topic=topic, n=n), f"yes yes yes, {topic}"),
         "rejected": transcript(template.format(topic=topic, n=n), f"no no no, {topic}")}
        for n in range(repeats) for topic in topics
    ]  # fmt: skip


def prepare_run(tmp_path, tiny_model_dir, **pm_settings):
    """A run directory with AI labels placed by hand and a config for the tiny model; returns (config, run)."""
    run = RunDir(tmp_path / "run")
    rng = random.Random(0)
    labels = []
    for index, topic in enumerate(TOPICS):
        a_better = rng.random() < 0.5
        good, bad = f"yes yes yes about {topic}", f"no no no about {topic}"
        labels.append({"id": f"ai-{index}", "prompt": f"Tell me about {topic}.", "principle_id": "harm",
                       "response_a": good if a_better else bad, "response_b": bad if a_better else good,
                       "p_a": 0.9 if a_better else 0.1})  # fmt: skip
    append_records(run.path("ai_labels"), labels)
    human = write_hh(tmp_path / "human.jsonl", comparisons("What about {topic} {n}?", TOPICS))
    settings = {"learning_rate": 3e-3, "batch_size": 8, "epochs": 3, "max_length": 64, "eval_fraction": 0.25,
                "max_human": None, "save_steps": 1000, "logging_steps": 1, **pm_settings}  # fmt: skip
    data = tiny_config_data(tiny_model_dir, tmp_path, pm=settings)
    data["data"]["human_preferences"] = str(human)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config, run


# ----------------------------------------------------------------------------- the figures


class LengthPM:
    """Scores an answer by its length: a PM that has learnt nothing but length."""

    def score(self, conversations, responses):
        return [float(len(response)) for response in responses]


def test_figures_hold_an_interval_and_how_often_the_pm_picks_the_longer_answer():
    rows = [
        {"prompt": "q1", "response_a": "long answer", "response_b": "short", "p_a": 1.0},  # longer chosen
        {"prompt": "q2", "response_a": "long answer", "response_b": "short", "p_a": 0.0},  # shorter chosen
        {"prompt": "q3", "response_a": "tiny", "response_b": "a longer one", "p_a": 0.0},  # longer chosen
        {"prompt": "q4", "response_a": "same", "response_b": "also", "p_a": 1.0},  # equal length: a PM tie
    ]
    accuracy, calibrated, (predicted, labels) = held_out_figures(LengthPM(), rows, bins=4)
    assert accuracy["pm"] == accuracy["length_baseline"] == pytest.approx(2.5 / 4)
    assert accuracy["pm_prefers_longer"] == 1.0  # the three comparisons of unequal length
    assert accuracy["pm_ci95"] == [round(bound, 4) for bound in wilson_interval(2.5, 4)]  # ties count half
    assert accuracy["comparisons"] == 4 and accuracy["chance"] == 0.5 and labels == [1.0, 0.0, 0.0, 1.0]
    assert predicted[3] == 0.5 and 0 <= calibrated["ece"] <= 1


def test_the_verdict_follows_the_interval_not_the_point_estimate():
    entry = {"chance": 0.5, "length_baseline": 0.325, "pm": 0.39, "pm_ci95": [0.325, 0.46]}
    assert verdict(entry).startswith("is below chance and is within noise of the length baseline")
    entry = {"chance": 0.5, "length_baseline": 0.55, "pm": 0.7, "pm_ci95": [0.6, 0.78]}
    assert verdict(entry).startswith("beats chance and beats the length baseline")
    entry = {"chance": 0.5, "length_baseline": 0.6, "pm": 0.54, "pm_ci95": [0.47, 0.61]}
    assert verdict(entry).startswith("is within noise of chance and is within noise of the length baseline")
    assert "nothing to measure" in verdict({"chance": 0.5, "length_baseline": 0.5, "pm_ci95": None})


def test_helpfulness_eval_is_reported_apart_from_the_in_distribution_held_out_rows(tmp_path, tiny_model_dir):
    outside = comparisons("How about {topic}, number {n}?", TOPICS[:6], repeats=1)
    # Comparisons of the training file: those the PM trained on (not held out) may not count as outside the mix.
    trained = comparisons("What about {topic} {n}?", TOPICS, repeats=2)
    eval_file = write_hh(tmp_path / "helpful-eval.jsonl", outside + trained[:4])
    config, run = prepare_run(tmp_path, tiny_model_dir, helpfulness_eval=str(eval_file))
    assert main(["run", str(config), "--run-dir", str(run.root), "--stages", "pm"]) == 0
    report = json.loads(run.path("pm_report").read_text(encoding="utf-8"))
    assert set(report["accuracy"]) == {"ai_harmlessness", "human_helpfulness", "helpfulness_eval"}
    held_out, real = report["accuracy"]["human_helpfulness"], report["accuracy"]["helpfulness_eval"]
    assert held_out["in_distribution"] is True and "held out from the training mix" in held_out["data"]
    assert real["in_distribution"] is False and real["data"].startswith(f"pm.helpfulness_eval: {eval_file}")
    in_training = sum(not held_out_has(run, row) for row in trained[:4])
    assert in_training >= 1 and real["left_out_in_training_mix"] == in_training
    assert real["comparisons"] == 6 + 4 - in_training
    assert real["chance"] == 0.5 and 0 <= real["pm"] <= 1 and 0 <= real["length_baseline"] <= 1
    assert real["pm_ci95"][0] <= real["pm"] <= real["pm_ci95"][1]
    assert "helpfulness_eval" in report["calibration"]
    manifest = json.loads(run.manifest_path.read_text(encoding="utf-8"))
    entry = manifest["stages"]["pm"]
    assert entry["settings"]["pm.helpfulness_eval"] == str(eval_file) and "helpfulness_eval" in entry["inputs"]
    assert entry["counts"]["held_out_accuracy"]["helpfulness_eval"] == real["pm"]


def held_out_has(run, row):
    """Whether the conversation of an HH row landed in pm_eval.jsonl (then it was never trained on)."""
    prompt = row["chosen"].split("\n\nHuman: ")[1].split("\n\nAssistant:")[0]
    return any(json.loads(line)["prompt"] == prompt for line in run.path("pm_eval").read_text().splitlines())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"pm\.helpfulness_eval: .*missing\.jsonl: no such file"),
        (json.dumps({"chosen": transcript("Hi?", "Hello"), "rejected": transcript("Hi?", "Go away")}) + "\n{oops\n",
         r"pm\.helpfulness_eval: .*bad\.jsonl:2: invalid JSON"),
        ('{"prompt": "Hi?"}\n', r"pm\.helpfulness_eval: .*bad\.jsonl:1: no chosen/rejected fields"),
        ("\n", r"pm\.helpfulness_eval: .*bad\.jsonl: no preference pairs found"),
    ],
)  # fmt: skip
def test_a_missing_or_malformed_helpfulness_eval_stops_with_one_line_and_writes_nothing(
    tmp_path, tiny_model_dir, capsys, content, message
):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content, encoding="utf-8")
    config, run = prepare_run(tmp_path, tiny_model_dir, helpfulness_eval=str(path))
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    capsys.readouterr()
    assert main(["run", str(config), "--run-dir", str(run.root), "--stages", "pm"]) == 2
    line = cai_error_line(capsys.readouterr().err)
    assert re.search(message, line), line
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before  # nothing written


# ----------------------------------------------------------------------------- the report


def test_the_report_says_in_words_whether_the_pm_beats_chance_on_real_data(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.manifest_path.write_text(json.dumps({"stages": {}}), encoding="utf-8")
    held_out = {"comparisons": 13, "pm": 1.0, "pm_ci95": [0.77, 1.0], "length_baseline": 0.54, "chance": 0.5,
                "pm_prefers_longer": 0.5, "in_distribution": True, "data": "held out"}  # fmt: skip
    run.path("pm_report").parent.mkdir(parents=True, exist_ok=True)
    run.path("pm_report").write_text(json.dumps({"accuracy": {"human_helpfulness": held_out}}), encoding="utf-8")
    html = build_report(run)
    assert "held out, in distribution" in html and "not measured on human comparisons from outside" in html
    real = {"comparisons": 200, "pm": 0.56, "pm_ci95": [0.491, 0.627], "length_baseline": 0.588, "chance": 0.5,
            "pm_prefers_longer": 0.47, "in_distribution": False, "data": "pm.helpfulness_eval: hh.jsonl"}  # fmt: skip
    report = {"accuracy": {"human_helpfulness": held_out, "helpfulness_eval": real}}
    run.path("pm_report").write_text(json.dumps(report), encoding="utf-8")
    html = build_report(run)
    assert "not measured on human comparisons from outside" not in html
    assert "the PM is within noise of chance and is within noise of the length baseline" in html
    assert "56.0% [49%, 63%]" in html and "outside the training mix" in html
