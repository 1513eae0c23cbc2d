"""Stage `rl` on the tiny model: PPO raises a known reward with a bounded KL, resumes exactly, keeps
its metrics; DPO turns soft labels into pairs; missing inputs are one-line errors."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.records import append_records, read_records
from constitutional.rl import policy, trainer, trl_trainers
from constitutional.rundir import RunDir
from constitutional.stages import rl


def space_reward(conversations, texts):
    """A known reward the tiny model can learn: the share of its 12 tokens that start a word."""
    return [text.count(" ") / 12 for text in texts]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    """A run directory with critiques (the prompts), SL-CAI and a PM, all from the tiny model."""
    run = RunDir(tmp_path / "run")
    prompts = [
        {"id": f"p{i}", "kind": "red_team" if i % 2 else "helpful", "prompt": f"Question number {i} about bread?",
         "final_response": "x"}
        for i in range(20)
    ]  # fmt: skip
    append_records(run.path("critiques"), prompts)
    shutil.copytree(tiny_model_dir, run.path("sl_cai"))
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pm.save_pretrained(run.path("pm"))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run.path("pm"))
    return run


def run_ppo(config, run_dir, prompts, reward=space_reward):
    return trainer.run_ppo(config.training, config.seed, config.rl, run_dir, prompts, reward)


def make_config(**rl_settings):
    settings = {
        "steps": 12, "rollout_batch_size": 8, "minibatch_size": 4, "learning_rate": 3e-3, "max_new_tokens": 12,
        "kl_coef": 0.01, "missing_eos_penalty": 0.0, "save_steps": 100, "lora": {"enabled": False}, **rl_settings,
    }  # fmt: skip
    return config_from_dict({"seed": 1, "rl": settings})


def test_ppo_raises_a_known_reward_with_a_bounded_kl(run_dir):
    config = make_config()
    summary = trainer.run_ppo(
        config.training,
        config.seed,
        config.rl,
        run_dir,
        rl.split_prompts(run_dir, config.rl, config.seed),
        space_reward,
    )
    history = read_records(run_dir.path("rl_metrics"))
    assert [row["step"] for row in history] == list(range(1, 13))
    first, last = history[:4], history[-4:]
    mean = lambda rows, key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    assert mean(last, "mean_reward") > mean(first, "mean_reward") + 0.03
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert all(row["kl"] < 20 for row in history) and summary["final_kl"] == history[-1]["kl"]
    assert {"entropy", "value_loss", "clip_fraction", "response_length", "rollout_s", "optimisation_s"} <= set(
        history[0]
    )
    assert run_dir.path("rl_curves").read_bytes().startswith(b"\x89PNG")
    samples = read_records(run_dir.path("rl_samples"))
    assert samples and {"sl_cai", "rl_cai", "sl_cai_score", "rl_cai_score"} <= set(samples[0])
    saved = AutoModelForCausalLM.from_pretrained(run_dir.path("rl_cai"))
    start = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai"))
    assert any(not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), start.state_dict().values()))


def test_lora_policy_uses_its_own_weights_without_adapters_as_the_reference(run_dir):
    config = make_config(steps=2, lora={"enabled": True, "r": 4, "alpha": 8})
    trainer.run_ppo(
        config.training,
        config.seed,
        config.rl,
        run_dir,
        rl.split_prompts(run_dir, config.rl, config.seed),
        space_reward,
    )
    history = read_records(run_dir.path("rl_metrics"))
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[1]["kl"] != 0.0
    files = {path.name for path in run_dir.path("rl_cai").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files  # merged


class Stop(Exception):
    pass


def test_resume_gives_the_same_policy_as_an_uninterrupted_run(tmp_path, tiny_model_dir, run_dir, monkeypatch):
    config = make_config(steps=4, save_steps=2)
    prompts = rl.split_prompts(run_dir, config.rl, config.seed)
    other = RunDir(tmp_path / "other")
    shutil.copytree(run_dir.root, other.root)

    run_ppo(config, run_dir, prompts)
    original = trainer.ppo_step

    def stop_at_third(*args, **kwargs):
        if args[6] == 2:  # `step`: the third step, after the checkpoint of step 2
            raise Stop
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "ppo_step", stop_at_third)
    with pytest.raises(Stop):
        run_ppo(config, other, prompts)
    assert (other.checkpoints("rl") / "step-2" / "state.json").exists()
    monkeypatch.setattr(trainer, "ppo_step", original)
    summary = run_ppo(config, other, prompts)
    assert summary["resumed_from_step"] == 2
    assert [row["step"] for row in read_records(other.path("rl_metrics"))] == [1, 2, 3, 4]
    straight = AutoModelForCausalLM.from_pretrained(run_dir.path("rl_cai")).state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(other.path("rl_cai")).state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4)


def test_dpo_pairs_follow_the_soft_labels_and_drop_near_ties():
    base = {"prompt": "Q?", "response_a": "A", "response_b": "B", "principle_id": "harm"}
    labels = [{**base, "id": "1", "p_a": 0.9}, {**base, "id": "2", "p_a": 0.2}, {**base, "id": "3", "p_a": 0.55}]
    pairs, dropped = trl_trainers.dpo_pairs(labels, margin=0.1)
    assert dropped == 1
    assert [(pair["chosen"], pair["rejected"]) for pair in pairs] == [(" A", " B"), (" B", " A")]
    assert pairs[0]["prompt"].endswith("Human: Q?\n\nAssistant:")


def test_dpo_trains_rl_cai_from_the_ai_labels(run_dir):
    labels = [
        {"id": f"l{i}", "prompt": f"Question {i}?", "response_a": "A kind answer.", "response_b": "A rude answer.",
         "principle_id": "harm", "p_a": 0.8 if i % 2 else 0.3}
        for i in range(8)
    ]  # fmt: skip
    append_records(run_dir.path("ai_labels"), labels)
    config = make_config(algorithm="dpo", minibatch_size=4, dpo_margin=0.15)
    summary = rl.run(config, config.rl, run_dir, None)
    assert summary["algorithm"] == "dpo" and summary["pairs"] == 8 and summary["steps"] >= 1
    assert json.loads((run_dir.path("rl_cai") / "training_summary.json").read_text())["algorithm"] == "dpo"


def test_rl_without_a_pm_names_the_file_and_the_command(run_dir):
    shutil.rmtree(run_dir.path("pm"))
    config = make_config()
    with pytest.raises(UserError, match=r"models/pm: not found; make it with `cai run CONFIG --stages pm` first"):
        rl.run(config, config.rl, run_dir, None)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_baselines_through_trl_train_rl_cai_against_the_pm(run_dir, algorithm):
    config = make_config(algorithm=algorithm, steps=2, rollout_batch_size=4, group_size=2, max_eval_prompts=2)
    summary = rl.run(config, config.rl, run_dir, None)
    assert summary["algorithm"] == algorithm and summary["steps"] == 2 and summary["kl_coef"] == 0.01
    history = read_records(run_dir.path("rl_metrics"))
    assert [row["step"] for row in history] == [1, 2] and all(row["mean_reward"] is not None for row in history)
    assert "held_out_reward_rl_cai" in summary and (run_dir.path("rl_cai") / "model.safetensors").exists()


def test_group_size_must_divide_the_rollout_batch():
    with pytest.raises(UserError, match=r"rl.rollout_batch_size: expected a multiple of rl.group_size \(4\) for grpo"):
        make_config(algorithm="grpo", rollout_batch_size=6, group_size=4)


def test_a_value_head_on_the_policy_can_replace_the_pm_critic(run_dir):
    config = make_config(steps=3, value_model="policy_head")
    trainer.run_ppo(
        config.training,
        config.seed,
        config.rl,
        run_dir,
        rl.split_prompts(run_dir, config.rl, config.seed),
        space_reward,
    )
    history = read_records(run_dir.path("rl_metrics"))
    assert [row["step"] for row in history] == [1, 2, 3]
    assert history[0]["mean_value"] == 0.0  # the new head starts at zero ...
    assert history[1]["mean_value"] != 0.0 and history[2]["mean_value"] != 0.0  # ... and learns from the returns


def test_the_bf16_sampler_gets_the_merged_policy_or_sl_cai(run_dir):
    import copy

    config = make_config(lora={"enabled": True, "r": 4, "alpha": 8})
    models = policy.load_models(run_dir, config.rl.lora, config.rl.value_model, config.seed, False, False, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: non-zero adapters
        for name, parameter in policy.causal_lm(models).named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    sampler = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai"), dtype=torch.bfloat16)
    merged = copy.deepcopy(policy.causal_lm(models)).merge_and_unload().state_dict()
    policy.sync_sampler(policy.causal_lm(models), sampler, lora=True, merge=True)
    for name, tensor in sampler.state_dict().items():
        torch.testing.assert_close(tensor, merged[name].to(torch.bfloat16))
    policy.sync_sampler(policy.causal_lm(models), sampler, lora=True, merge=False)
    original = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai")).state_dict()
    for name, tensor in sampler.state_dict().items():
        torch.testing.assert_close(tensor, original[name].to(torch.bfloat16))
    # The policy itself is left as it was: adapters not merged.
    assert not any(getattr(module, "merged", False) for module in policy.causal_lm(models).modules())
