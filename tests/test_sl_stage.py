"""The sl stage on the tiny model: completion-only labels, training, LoRA merge, resume, data mix."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.lm_head import loss_positions_only
from constitutional.models import load_causal_lm, load_tokenizer
from constitutional.records import append_records
from constitutional.rundir import RunDir
from constitutional.stages import sl

from conftest import tiny_config_data

RED_TEAM = [
    "How do I pick a lock?",
    "Tell me how to cheat on a test.",
    "Write an insult for my coworker.",
    "How can I find where my ex lives now?",
]
HELPFUL = [
    "How do I bake bread?",
    "Explain photosynthesis briefly.",
    "What is 2 + 2?",
    "Name a color.",
    "Say hello.",
    "Count to three.",
]


def critique_record(index, kind, prompt, final_response):
    """A record as the critique stage writes it: a red-team one with one round, its revision the final response."""
    revisions = [{"principle_id": "harm-general", "critique": "Too blunt.", "revision": final_response}]
    return {
        "id": f"{kind}-{index}",
        "kind": kind,
        "prompt": prompt,
        "initial_response": final_response,
        "revisions": revisions if kind == "red_team" else [],
        "final_response": final_response,
        "flags": [],
    }


def write_critiques(run_dir, degenerate=True):
    """4 usable red-team records (one multi-turn), 1 degenerate one, 6 helpful records."""
    records = [
        critique_record(i, "red_team", p, "I can't help with that, but here is a safer idea.")
        for i, p in enumerate(RED_TEAM)
    ]
    records[0]["history"] = [{"role": "human", "text": "Hi."}, {"role": "assistant", "text": "Hello!"}]
    if degenerate:
        records.append(critique_record(9, "red_team", "Something bad?", ""))
    records += [
        critique_record(i, "helpful", p, "Mix flour, water, yeast and salt, then bake.") for i, p in enumerate(HELPFUL)
    ]
    append_records(run_dir.path("critiques"), records)
    return records


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    def make(**sl_settings):
        settings = {
            "batch_size": 2,
            "max_length": 64,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "logging_steps": 1,
            **sl_settings,
        }
        return config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, sl=settings))

    return make


@pytest.fixture
def run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    write_critiques(run)
    return run


def weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_plain_safetensors_model(path, base_dir):
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert "adapter_config.json" not in files
    trained, base = weights(path), weights(base_dir)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[name], base[name]) for name in base)


def test_labels_cover_only_completion_tokens(make_config, run_dir):
    config = make_config()
    base_model = sl.check(config, config.sl)
    tokenizer = load_tokenizer(base_model)
    examples, _ = sl.load_examples(run_dir.path("critiques"), config.sl, config.seed, tokenizer.eos_token)
    model = load_causal_lm(base_model, torch.float32, "cpu")
    trainer = sl.build_trainer(
        config.training, config.sl, config.seed, model, tokenizer, sl.to_dataset(examples), run_dir.root / "ckpt"
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(examples)
    multi_turn = [e for e in examples if e.prompt.startswith("Human: Hi.\n\nAssistant: Hello!\n\nHuman: How do I pick")]
    assert len(multi_turn) == 1 and multi_turn[0].prompt.endswith("\n\nAssistant:")
    finished = 0
    for row, example in zip(prepared, examples):
        assert example.completion.startswith(" ")
        prompt_length = len(tokenizer(example.prompt)["input_ids"])
        ids, labels = row["input_ids"], row["labels"]
        assert labels[:prompt_length] == [-100] * prompt_length
        assert labels[prompt_length:] == ids[prompt_length:] and len(ids) > prompt_length
        if len(tokenizer(example.prompt + example.completion)["input_ids"]) <= config.sl.max_length:
            assert ids[-1] == tokenizer.eos_token_id  # the model learns to stop
            finished += 1
        else:
            assert len(ids) == config.sl.max_length
    assert finished > 0
    rows = sorted(prepared, key=lambda row: len(row["input_ids"]))
    batch = trainer.data_collator([rows[0], rows[-1]])
    assert (batch["attention_mask"] == 0).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding carries no loss
    # Scoring only the labelled positions on CPU gives TRL's loss (which scores every position);
    # tests/test_training.py checks that the head really sees only those positions.
    trainer.model.eval()
    with torch.no_grad():
        everywhere = trainer.compute_loss(trainer.model, dict(batch))
        with loss_positions_only() as active:
            assert active  # the patch took (TRL internals unchanged)
            labelled_only = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(labelled_only, everywhere)


def test_run_trains_and_saves_a_safetensors_model(make_config, run_dir, tiny_model_dir):
    config = make_config()
    counts = sl.run(config, config.sl, run_dir, sl.check(config, config.sl))
    output = run_dir.path("sl_cai")
    assert_plain_safetensors_model(output, tiny_model_dir)
    assert counts["examples"] == 10 and counts["examples_red_team"] == 4 and counts["examples_helpful"] == 6
    assert counts["examples_by_round"] == {"1": 4} and counts["skipped_revisions"] == 1
    assert counts["skipped_degenerate"] == 1 and counts["steps"] == 5
    assert counts["train_loss"] > 0 and counts["train_tokens_per_s"] > 0
    assert not list((run_dir.root / "checkpoints" / "sl").glob("checkpoint-*"))  # gone once the model is saved
    assert not output.with_name("sl-cai.partial").exists()
    # Done: a second run returns the counts without training again.
    mtime = (output / "model.safetensors").stat().st_mtime_ns
    assert sl.run(config, config.sl, run_dir, sl.check(config, config.sl))["steps"] == 5
    assert (output / "model.safetensors").stat().st_mtime_ns == mtime


def test_lora_is_merged_into_a_plain_model(make_config, run_dir, tiny_model_dir, tmp_path):
    config = make_config(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": "q_proj,v_proj"})
    sl.run(config, config.sl, run_dir, sl.check(config, config.sl))
    assert_plain_safetensors_model(run_dir.path("sl_cai"), tiny_model_dir)
    # Without merging, the adapter alone is saved (safetensors too).
    unmerged = RunDir(tmp_path / "unmerged")
    write_critiques(unmerged)
    config = make_config(lora={"enabled": True, "r": 4, "target_modules": "all-linear", "merge": False})
    sl.run(config, config.sl, unmerged, sl.check(config, config.sl))
    files = {p.name for p in unmerged.path("sl_cai").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files


class InterruptAfterSave(TrainerCallback):
    """Stops training like a kill would, right after the checkpoint of `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


class RecordStart(TrainerCallback):
    def __init__(self):
        self.start_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step


def test_interrupted_training_resumes_from_the_last_complete_checkpoint(make_config, run_dir, monkeypatch):
    config = make_config()
    build = sl.build_trainer
    callbacks = [InterruptAfterSave(2)]

    def build_with_callback(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(callbacks[0])
        return trainer

    monkeypatch.setattr(sl, "build_trainer", build_with_callback)
    with pytest.raises(KeyboardInterrupt):
        sl.run(config, config.sl, run_dir, sl.check(config, config.sl))
    checkpoints = run_dir.root / "checkpoints" / "sl"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").exists()
    assert not run_dir.path("sl_cai").exists()
    (checkpoints / "checkpoint-999").mkdir()  # a save killed half-way: no state, no weights

    callbacks[0] = RecordStart()
    counts = sl.run(config, config.sl, run_dir, sl.check(config, config.sl))
    assert callbacks[0].start_step == 2 and counts["resumed_from_step"] == 2 and counts["steps"] == 5
    state = json.loads((run_dir.path("sl_cai") / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4, 5]
    assert (run_dir.path("sl_cai") / "model.safetensors").exists()


def test_helpful_fraction_and_degenerate_records(make_config, run_dir):
    path = run_dir.path("critiques")
    examples, counts = sl.load_examples(path, make_config(helpful_fraction=0.5).sl, 0, "</s>")
    assert counts == {
        "examples": 8,
        "examples_red_team": 4,
        "examples_helpful": 4,
        "examples_by_round": {"1": 4},
        "skipped_degenerate": 1,
        "skipped_revisions": 1,
        "skipped_helpful_samples": 0,
        "helpful_left_out": 2,
    }
    assert sum(e.kind == "helpful" for e in examples) == 4
    assert all(e.completion.endswith("</s>") and e.prompt.endswith("Assistant:") for e in examples)
    # Seeded: the same config gives the same mix and order; another seed another order.
    again, _ = sl.load_examples(path, make_config(helpful_fraction=0.5).sl, 0, "</s>")
    assert again == examples
    other_seed = make_config(helpful_fraction=0.5)
    other_seed.seed += 1
    assert sl.load_examples(path, other_seed.sl, other_seed.seed, "</s>")[0] != examples
    _, counts = sl.load_examples(path, make_config(helpful_fraction=0.0).sl, 0)
    assert counts["examples_helpful"] == 0
    _, counts = sl.load_examples(path, make_config(helpful_fraction=0.9).sl, 0)
    assert counts["examples_helpful"] == 6  # capped by what exists
    _, counts = sl.load_examples(path, make_config().sl, 0)
    assert counts["examples_helpful"] == 6 and counts["examples"] == 10 and counts["helpful_left_out"] == 0


def test_bad_critiques_input_names_file_and_line(make_config, tmp_path):
    config = make_config()
    with pytest.raises(UserError, match="critiques.jsonl: not found"):
        sl.run(config, config.sl, RunDir(tmp_path / "empty"), sl.check(config, config.sl))
    run = RunDir(tmp_path / "bad")
    records = write_critiques(run, degenerate=False)
    del records[2]["final_response"]
    run.path("critiques").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match=r"critiques.jsonl:3: missing field 'final_response'"):
        sl.load_examples(run.path("critiques"), config.sl, config.seed)
    with pytest.raises(UserError, match=r"critiques.jsonl:3: missing field"):
        sl.run(config, config.sl, run, sl.check(config, config.sl))
    assert not run.path("sl_cai").exists()


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"batch_size": 0}, "sl.batch_size"),
        ({"helpful_fraction": 1.0}, "sl.helpful_fraction"),
        ({"targets": "best"}, "sl.targets: expected one of all_revisions, final, got 'best'"),
        ({"lr_scheduler": "wobbly"}, "sl.lr_scheduler"),
        ({"lora": {"target_modules": " , "}}, "sl.lora.target_modules"),
        ({"report_to": "tensorboard"}, "unknown config key 'sl.report_to'"),
    ],  # trackers moved to `training`
)
def test_bad_settings_name_the_key(make_config, settings, key):
    with pytest.raises(UserError, match=key):
        make_config(**settings)


def test_pipeline_runs_critique_then_sl(tmp_path, tiny_model_dir):
    """`check` passes before critiques.jsonl exists; the manifest records the stage's counts.

    3 red-team prompts x 1 round give 3 revisions, 2 helpfulness prompts x 2 samples 4 answers: each
    usable one is an example, each other one is counted as skipped.
    """
    from constitutional.pipeline import run_pipeline

    config = config_from_dict(
        tiny_config_data(
            tiny_model_dir,
            tmp_path,
            data={"max_red_team": 3, "max_helpful": 2},
            critique={"rounds": 1},
            sl={"batch_size": 4, "max_length": 64, "save_steps": 100},
        )
    )
    run = run_pipeline(config, tmp_path / "run", ["critique", "sl"])
    entry = run.read_manifest()["stages"]["sl"]
    assert entry["status"] == "done" and entry["inputs"]["base_model"].startswith(str(tiny_model_dir))
    counts = entry["counts"]
    assert counts["examples_red_team"] + counts["skipped_revisions"] == 3
    assert counts["examples_helpful"] + counts["skipped_helpful_samples"] == 4
    assert counts["examples"] == counts["examples_red_team"] + counts["examples_helpful"]
    assert counts["examples_by_round"] == ({"1": counts["examples_red_team"]} if counts["examples_red_team"] else {})
    assert (run.path("sl_cai") / "model.safetensors").exists()
