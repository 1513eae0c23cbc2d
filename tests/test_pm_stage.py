"""Stage `pm`: the soft Bradley-Terry loss, the mix and split, training on the tiny model, scoring,
resume, and bad input."""

import gzip
import json
import math
import random
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, TrainerCallback

from constitutional import preference_trainer
from constitutional.cli import main
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.preference import PreferenceModel, soft_bradley_terry_loss
from constitutional.records import append_records, read_records
from constitutional.rundir import RunDir
from constitutional.stages import pm

from conftest import tiny_config_data

TOPICS = [
    "bread",
    "tea",
    "rain",
    "chess",
    "maths",
    "bikes",
    "plants",
    "music",
    "maps",
    "knots",
    "clocks",
    "glue",
    "paint",
    "socks",
    "lamps",
    "boats",
    "kites",
    "soap",
    "salt",
    "wool",
    "coins",
    "bees",
    "ink",
    "stone",
]


def transcript(prompt, answer):
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def separable_data(run_dir, folder, seed=0):
    """AI labels and human comparisons where the better answer always says `yes` and the worse `no`.

    Orientation (which side is better) is random, so only the content separates them.
    """
    rng = random.Random(seed)
    labels = []
    for index, topic in enumerate(TOPICS):
        a_better = rng.random() < 0.5
        good, bad = f"yes yes yes about {topic}", f"no no no about {topic}"
        labels.append({
            "id": f"ai-{index}", "prompt": f"Tell me about {topic}.", "principle_id": "harm",
            "response_a": good if a_better else bad, "response_b": bad if a_better else good,
            "p_a": 0.9 if a_better else 0.1,
        })  # fmt: skip
    append_records(run_dir.path("ai_labels"), labels)
    human = folder / "human.jsonl"
    rows = [
        {"chosen": transcript(f"What about {topic} {n}?", f"yes yes yes, {topic}"),
         "rejected": transcript(f"What about {topic} {n}?", f"no no no, {topic}")}
        for n in range(2) for topic in TOPICS
    ]  # fmt: skip
    human.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return human


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    def make(human, **pm_settings):
        settings = {"learning_rate": 3e-3, "batch_size": 8, "epochs": 4, "max_length": 64, "eval_fraction": 0.25,
                    "save_steps": 1000,
        "max_human": None, "logging_steps": 1, **pm_settings}  # fmt: skip
        data = tiny_config_data(tiny_model_dir, tmp_path, pm=settings)
        data["data"]["human_preferences"] = str(human)
        return config_from_dict(data)

    return make


# ----------------------------------------------------------------------------- the loss


def test_soft_loss_equals_hand_computed_values():
    rewards_a, rewards_b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    p_a = torch.tensor([0.8, 0.5, 0.0])

    def log_sigmoid(x):
        return math.log(1 / (1 + math.exp(-x)))

    expected = (
        -((0.8 * log_sigmoid(1.0) + 0.2 * log_sigmoid(-1.0)) + (0.5 * log_sigmoid(0.0) * 2) + log_sigmoid(3.0)) / 3
    )  # = (0.51326 + 0.69315 + 0.04859) / 3
    assert expected == pytest.approx(0.418332, abs=1e-6)
    assert soft_bradley_terry_loss(rewards_a, rewards_b, p_a).item() == pytest.approx(expected, abs=1e-6)


def test_with_hard_labels_it_is_the_standard_bradley_terry_loss():
    torch.manual_seed(0)
    rewards_a, rewards_b = torch.randn(16), torch.randn(16)
    p_a = (torch.rand(16) > 0.5).float()
    chosen = torch.where(p_a == 1, rewards_a, rewards_b)
    rejected = torch.where(p_a == 1, rewards_b, rewards_a)
    standard = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(soft_bradley_terry_loss(rewards_a, rewards_b, p_a), standard)


# ----------------------------------------------------------------------------- the mix


def test_mix_randomises_human_order_and_splits_by_conversation(tmp_path, make_config):
    run = RunDir(tmp_path / "run")
    human = separable_data(run, tmp_path)
    config = make_config(human)
    inputs = pm.check(config, config.pm)
    counts = pm.write_mix(config, config.pm, run, inputs)
    train, held_out = read_records(run.path("pm_train")), read_records(run.path("pm_eval"))
    assert counts["train"] == {"ai_harmlessness": 18, "human_helpfulness": 36}
    assert counts["eval"] == {"ai_harmlessness": 6, "human_helpfulness": 12}
    humans = [row for row in train + held_out if row["source"] == "human_helpfulness"]
    assert {row["p_a"] for row in humans} == {0.0, 1.0}  # chosen at A for some rows, at B for others
    for row in humans:
        better = row["response_a"] if row["p_a"] == 1.0 else row["response_b"]
        assert better.startswith("yes")
    conversations = lambda rows: {json.dumps([row.get("history", []), row["prompt"]]) for row in rows}  # noqa: E731
    assert not conversations(train) & conversations(held_out)
    # Deterministic: the same seed gives the same split and order.
    again = RunDir(tmp_path / "again")
    separable_data(again, tmp_path)
    pm.write_mix(config, config.pm, again, inputs)
    assert read_records(again.path("pm_train")) == train


def test_helpful_fraction_and_identical_answers(tmp_path, make_config):
    run = RunDir(tmp_path / "run")
    human = separable_data(run, tmp_path)
    with human.open("a") as handle:
        handle.write(
            json.dumps({"chosen": transcript("Same?", "same"), "rejected": transcript("Same?", "same")}) + "\n"
        )
    config = make_config(human, helpful_fraction=0.25)
    counts = pm.write_mix(config, config.pm, run, pm.check(config, config.pm))
    assert counts["skipped_identical"] == 1
    assert counts["train"] == {"ai_harmlessness": 18, "human_helpfulness": 6}  # 6 / (18 + 6) = 0.25


def test_builtin_human_preferences_ship_with_the_package(make_config):
    config = make_config("builtin")
    inputs = pm.check(config, config.pm)
    assert len(inputs.human) >= 200
    assert all(pair["chosen"].strip() and pair["rejected"].strip() for pair in inputs.human)


# ----------------------------------------------------------------------------- training and scoring


def test_the_tiny_model_learns_a_separable_preference(tmp_path, make_config, capsys):
    run = RunDir(tmp_path / "run")
    config = make_config(separable_data(run, tmp_path))
    counts = pm.run(config, config.pm, run, pm.check(config, config.pm))
    assert counts["held_out_accuracy"]["ai_harmlessness"] > 0.9
    assert counts["held_out_accuracy"]["human_helpfulness"] > 0.9
    report = json.loads(run.path("pm_report").read_text())
    assert report["accuracy"]["human_helpfulness"]["chance"] == 0.5
    assert 0 <= report["calibration"]["human_helpfulness"]["ece"] <= 1
    assert run.path("pm_calibration").read_bytes().startswith(b"\x89PNG")
    saved = {path.name for path in run.path("pm").iterdir()}
    assert "model.safetensors" in saved and "tokenizer.json" in saved and pm.SUMMARY in saved
    classifier = AutoModelForSequenceClassification.from_pretrained(run.path("pm"))
    assert classifier.config.num_labels == 1 and classifier.get_output_embeddings() is None  # no vocabulary head
    # The PM alone, from the command line.
    prompts, responses = tmp_path / "prompts.txt", tmp_path / "responses.jsonl"
    prompts.write_text("Tell me about owls.\nTell me about owls.\n")
    responses.write_text(
        json.dumps({"response": "yes yes yes about owls"})
        + "\n"
        + json.dumps({"response": "no no no about owls"})
        + "\n"
    )
    capsys.readouterr()
    assert main(["score", str(run.root), "--prompts", str(prompts), "--responses", str(responses)]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["response"] for row in scored] == ["yes yes yes about owls", "no no no about owls"]
    assert scored[0]["score"] > scored[1]["score"]
    assert main(["score", str(tmp_path / "nowhere"), "--prompts", str(prompts), "--responses", str(responses)]) == 2
    assert "no preference model here" in capsys.readouterr().err


def test_lora_pm_is_merged_into_a_plain_classifier(tmp_path, make_config, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    config = make_config(separable_data(run, tmp_path), epochs=1, lora={"enabled": True, "r": 4, "alpha": 8})
    pm.run(config, config.pm, run, pm.check(config, config.pm))
    saved = {path.name for path in run.path("pm").iterdir()}
    assert "model.safetensors" in saved and "adapter_config.json" not in saved
    trained = AutoModelForSequenceClassification.from_pretrained(run.path("pm")).state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).state_dict()
    assert trained.keys() == base.keys()
    changed = [name for name in base if not torch.equal(trained[name], base[name])]
    assert any(name.endswith("q_proj.weight") for name in changed)  # the adapters, merged into the weights
    assert "model.embed_tokens.weight" not in changed  # LoRA leaves what it does not target alone


def test_a_score_does_not_depend_on_batch_mates_or_padding_side(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [[("human", "How do I bake bread?")], [("human", "Hi")], [("human", "Tell me a long story " * 5)]]
    responses = ["Mix flour and water.", "Hello!", "Once upon a time " * 6]
    alone = [
        PreferenceModel(model, tokenizer, batch_size=1).score([c], [r])[0] for c, r in zip(conversations, responses)
    ]
    together = PreferenceModel(model, tokenizer, batch_size=3).score(conversations, responses)
    tokenizer.padding_side = "left"
    left = PreferenceModel(model, tokenizer, batch_size=3).score(conversations, responses)
    assert together == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    assert len(set(round(score, 4) for score in alone)) == 3


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= 2:
            raise KeyboardInterrupt


def trained_pm(tmp_path, make_config, monkeypatch, name, interrupt=False, whole_table=False):
    """Stage pm on separable data in run `name`, interrupted after its step-2 checkpoint and run again if asked.

    With `whole_table` the interrupted part trains the whole embedding table, as the version before
    `embedding_rows.py` did. Returns the last run's counts and the saved PM's state dict.
    """
    run = RunDir(tmp_path / name)
    config = make_config(separable_data(run, tmp_path), save_steps=2, epochs=1, batch_size=4)
    inputs = pm.check(config, config.pm)
    if interrupt:
        build = pm.build_trainer

        def with_stop(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(StopAfterSave())
            return trainer

        with monkeypatch.context() as patch:
            patch.setattr(pm, "build_trainer", with_stop)
            if whole_table:
                patch.setattr(preference_trainer, "train_used_rows", lambda model, token_ids: None)
            with pytest.raises(KeyboardInterrupt):
                pm.run(config, config.pm, run, inputs)
        assert (run.checkpoints("pm") / "checkpoint-2").is_dir() and not run.path("pm").exists()
    counts = pm.run(config, config.pm, run, inputs)
    return counts, AutoModelForSequenceClassification.from_pretrained(run.path("pm")).state_dict()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, make_config, monkeypatch):
    straight_counts, straight = trained_pm(tmp_path, make_config, monkeypatch, "straight")
    resumed_counts, resumed = trained_pm(tmp_path, make_config, monkeypatch, "resumed", interrupt=True)
    assert resumed_counts["resumed_from_step"] == 2 and resumed_counts["steps"] == straight_counts["steps"]
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4)


def test_a_checkpoint_that_trained_the_whole_table_resumes_that_way(tmp_path, make_config, monkeypatch):
    """An interrupted pm of an earlier version (it trained the whole embedding table) resumed now ends as it would
    have: its optimizer state is the whole table's, so the resumed run trains the whole table too."""
    with monkeypatch.context() as patch:
        patch.setattr(preference_trainer, "train_used_rows", lambda model, token_ids: None)
        _, whole = trained_pm(tmp_path, make_config, monkeypatch, "whole")
    counts, resumed = trained_pm(tmp_path, make_config, monkeypatch, "resumed", interrupt=True, whole_table=True)
    assert counts["resumed_from_step"] == 2
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4)


def test_ai_helpfulness_labels_replace_human_data_when_asked(tmp_path, make_config, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    separable_data(run, tmp_path)
    helpful = [{"id": f"hp-{i}", "kind": "helpful", "prompt": f"How do I fold {topic}?", "final_response": "x"}
               for i, topic in enumerate(TOPICS[:6])]  # fmt: skip
    append_records(run.path("critiques"), helpful)
    shutil.copytree(tiny_model_dir, run.path("sl_cai"))
    config = make_config("none", helpfulness_max_new_tokens=6, epochs=1)
    counts = pm.write_mix(config, config.pm, run, pm.check(config, config.pm))
    helpfulness = read_records(run.path("ai_helpfulness"))
    assert 1 <= len(helpfulness) <= 6 and all(0 <= row["p_a"] <= 1 for row in helpfulness)
    assert {row["principle_id"] for row in helpfulness} <= {"helpful", "accurate", "complete", "clear"}
    assert counts["train"].get("ai_helpfulness", 0) + counts["eval"].get("ai_helpfulness", 0) == len(helpfulness)
    assert "human_helpfulness" not in counts["train"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "", "rejected": transcript("Hi?", "Hello")}, "field 'chosen' is empty"),
        ({"chosen": transcript("Hi?", "Hello")}, "no chosen/rejected fields"),
    ],
)
def test_bad_human_rows_name_file_and_line(tmp_path, make_config, row, message):
    human = tmp_path / "human.jsonl.gz"
    good = {"chosen": transcript("Ok?", "Yes."), "rejected": transcript("Ok?", "No.")}
    with gzip.open(human, "wt") as handle:
        handle.write(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"human.jsonl.gz:2: .*{message}"):
        pm.check(make_config(human), make_config(human).pm)


def test_bad_labels_and_tiny_splits_are_one_line_errors(tmp_path, make_config):
    run = RunDir(tmp_path / "run")
    human = separable_data(run, tmp_path)
    config = make_config(human)
    labels = read_records(run.path("ai_labels"))
    labels[3]["p_a"] = 1.5
    run.path("ai_labels").write_text("".join(json.dumps(label) + "\n" for label in labels))
    with pytest.raises(UserError, match=r"ai_labels.jsonl:4: field 'p_a': expected a probability in \[0, 1\]"):
        pm.write_mix(config, config.pm, run, pm.check(config, config.pm))
    run.path("ai_labels").write_text(json.dumps({**labels[0], "p_a": 0.7}) + "\n")
    with pytest.raises(UserError, match="only 1 ai_harmlessness conversation"):
        pm.write_mix(config, config.pm, run, pm.check(config, config.pm))
    assert not run.path("pm_train").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no preference pairs found"):
        pm.check(make_config(empty), make_config(empty).pm)


def test_pm_without_feedback_outputs_names_the_file_and_the_command(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path)))
    code = main(["run", str(config), "--run-dir", str(tmp_path / "run"), "--stages", "pm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "ai_labels.jsonl" in err and "'feedback'" in err and "--stages feedback,pm" in err
