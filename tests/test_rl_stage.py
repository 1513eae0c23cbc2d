"""Stage `rl` on the tiny model: PPO raises a known reward with a bounded KL, resumes exactly, keeps
its metrics; missing inputs are one-line errors (DPO, RLOO and GRPO: tests/test_rl_trl.py)."""

import itertools
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from constitutional import devices
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.records import append_records, read_records
from constitutional.rl import policy, trainer
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
    # The PM's new score head (and so PPO's value model, initialised from it) comes from the global
    # RNG: seeded, every test starts from the same PM whatever ran before it in the session.
    torch.manual_seed(0)
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pm.save_pretrained(run.path("pm"))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run.path("pm"))
    return run


def run_ppo(config, run_dir, prompts, reward=space_reward):
    return trainer.run_ppo(config.training, config.seed, config.rl, run_dir, prompts, reward)


def make_config(data=None, training=None, **rl_settings):
    settings = {
        "steps": 12, "rollout_batch_size": 8, "minibatch_size": 4, "learning_rate": 3e-3, "max_new_tokens": 12,
        "kl_coef": 0.01, "missing_eos_penalty": 0.0, "empty_answer_penalty": 0.0, "save_steps": 100,
        "lora": {"enabled": False}, **rl_settings,
    }  # fmt: skip
    sections = {"data": data, "training": training}
    return config_from_dict({"seed": 1, "rl": settings, **{key: value for key, value in sections.items() if value}})


def test_ppo_raises_a_known_reward_with_a_bounded_kl(run_dir):
    config = make_config()
    summary = trainer.run_ppo(
        config.training,
        config.seed,
        config.rl,
        run_dir,
        rl.split_prompts(config, config.rl, run_dir),
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
        rl.split_prompts(config, config.rl, run_dir),
        space_reward,
    )
    history = read_records(run_dir.path("rl_metrics"))
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[1]["kl"] != 0.0
    files = {path.name for path in run_dir.path("rl_cai").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files  # merged


def test_lora_ppo_in_bf16_trains_on_bf16_frozen_weights_and_saves_the_merged_model(run_dir, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # emulated where it is not: a tiny model
    lora = {"enabled": True, "r": 4, "alpha": 8}
    config = make_config(training={"precision": "bf16", "device": "cpu"}, steps=2, lora=lora)
    trainer.run_ppo(config.training, config.seed, config.rl, run_dir, rl.split_prompts(config, config.rl, run_dir),
                    space_reward)  # fmt: skip
    history = read_records(run_dir.path("rl_metrics"))
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[1]["kl"] != 0.0
    saved = AutoModelForCausalLM.from_pretrained(run_dir.path("rl_cai"))
    sl_cai = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai"))
    changed = [name for name, p in saved.named_parameters() if not torch.equal(p.float(), sl_cai.state_dict()[name])]
    assert any("proj" in name for name in changed)  # the adapters were merged in


class Stop(Exception):
    pass


def test_resume_gives_the_same_policy_as_an_uninterrupted_run(tmp_path, tiny_model_dir, run_dir, monkeypatch):
    config = make_config(steps=4, save_steps=2)
    prompts = rl.split_prompts(config, config.rl, run_dir)
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
        rl.split_prompts(config, config.rl, run_dir),
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


def test_with_lora_and_bf16_the_frozen_weights_are_bf16_and_never_drift(run_dir, monkeypatch):
    """bf16 training holds the frozen weights in bf16 and trains fp32 adapters (and the value model's score
    head); syncing the sampler adds the adapters' update out of place, so the frozen weights stay bit for bit."""
    config = make_config(lora={"enabled": True, "r": 4, "alpha": 8})
    monkeypatch.setattr("constitutional.models.cpu_has_native_bf16", lambda: True)  # a bf16 sampler on every CPU
    models = policy.load_models(run_dir, config.rl.lora, "pm", config.seed, False, False, "cpu", bf16=True)
    lm, value = policy.causal_lm(models), models.value.model
    for model in (lm, value):
        trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad}
        assert trained and set(trained.values()) == {torch.float32}, trained
        assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert any("score" in name for name, p in value.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    before = {name: p.clone() for name, p in lm.named_parameters() if not p.requires_grad}
    sampler = models.sampler
    # Where no adapter changes a weight, the sampler reads the policy's own tensor (an output head too).
    base = lm.get_base_model()
    assert sampler.get_input_embeddings().weight is base.get_input_embeddings().weight
    assert sampler.get_output_embeddings().weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    for _ in range(5):  # five steps' syncs
        policy.sync_sampler(lm, sampler, lora=True, merge=True)
    for name, parameter in lm.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, before[name]), f"{name} drifted"
    deltas = policy._adapter_deltas(lm.get_base_model())
    assert deltas
    # The frozen head gets contiguous hidden states (a strided slice times a weight without gradient
    # is a batched matmul over copies of the weight in PyTorch: seconds and gigabytes at 262k tokens).
    seen = []
    for model in (lm.get_base_model(), sampler):
        model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = policy.encode(models.tokenizer, [[("human", "How do I bake bread?")]] * 2, [[5, 6], [7]], "cpu")
    with torch.no_grad():
        policy.reference_logprobs(models, batch)
        sampler(input_ids=batch["input_ids"], logits_to_keep=1)
    assert len(seen) == 2 and all(hidden.is_contiguous() for hidden in seen)
    sampled = dict(sampler.named_parameters())
    for name, delta in deltas.items():
        expected = (before[f"base_model.model.{name}"] + delta).to(torch.bfloat16)
        assert torch.equal(sampled[name.replace(".base_layer", "")], expected), name


# ----------------------------------------------------------------------------- held-out prompts


def prompt_file(path, prompts):
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def test_held_out_prompts_are_prompts_no_earlier_stage_trained_on(run_dir, tmp_path):
    """SL-CAI vs RL-CAI is compared on prompts of the run's sources that neither SL-CAI nor the PM saw."""
    red_team = ["Question number 1 about bread?", "A prompt the PM trained on?", "How do I pick a lock?",
                "Tell me a secret."]  # fmt: skip
    helpful = ["Question number 2 about bread?", "How do I bake bread?", "Explain the tides."]
    append_records(run_dir.path("pm_train"), [{"prompt": "A prompt the PM trained on?", "source": "human_helpfulness",
                                               "response_a": "a", "response_b": "b", "p_a": 1.0}])  # fmt: skip
    data = {"red_team": prompt_file(tmp_path / "rt.txt", red_team),
            "helpful": prompt_file(tmp_path / "hp.txt", helpful)}  # fmt: skip
    config = make_config(data=data, steps=1, rollout_batch_size=4, minibatch_size=2, max_eval_prompts=3)
    summary = rl.run(config, config.rl, run_dir, None)
    samples = read_records(run_dir.path("rl_samples"))
    # Red-team and helpfulness prompts alternate, each source in order, trained ones skipped, capped.
    assert [row["prompt"] for row in samples] == ["How do I pick a lock?", "How do I bake bread?", "Tell me a secret."]
    assert [row["kind"] for row in samples] == ["red_team", "helpful", "red_team"]
    assert summary["held_out_source"] == "unused_prompts" and summary["held_out_prompts"] == 3
    # RL-CAI minus SL-CAI paired by prompt, with its bootstrap interval over the 3 prompts.
    differences = [row["rl_cai_score"] - row["sl_cai_score"] for row in samples]
    assert summary["held_out_reward_difference"] == pytest.approx(sum(differences) / 3, abs=1e-3)
    low, high = summary["held_out_reward_difference_ci95"]
    assert min(differences) - 1e-3 <= low <= summary["held_out_reward_difference"] <= high <= max(differences) + 1e-3
    rows = read_records(run_dir.path("rl_prompts"))
    critiques = {row["id"] for row in read_records(run_dir.path("critiques"))}
    assert {row["id"] for row in rows if row["split"] == "train"} == critiques  # RL trains on every critique prompt


def test_held_out_prompts_fall_back_to_a_seeded_split_when_every_prompt_was_trained_on(run_dir, tmp_path, caplog):
    used = [f"Question number {i} about bread?" for i in range(20)]  # exactly the critiques' prompts
    data = {"red_team": prompt_file(tmp_path / "rt.txt", used[:12]), "helpful": prompt_file(tmp_path / "hp.txt", used)}
    config = make_config(data=data, eval_fraction=0.2)
    with caplog.at_level("WARNING"):
        prompts = rl.split_prompts(config, config.rl, run_dir)
    assert prompts["held_out_source"] == "critiques_split" and "every prompt of data.red_team" in caplog.text
    assert prompts["eval"] and {row["prompt"] for row in prompts["eval"]} <= set(used)
    assert len(prompts["train"]) + len(prompts["eval"]) == 20  # the old split, as before
    again = rl.split_prompts(config, config.rl, run_dir)  # read back from rl_prompts.jsonl
    assert again == prompts


# ----------------------------------------------------------------------------- one step's fidelity


def fixed_rollout_step(run_dir, monkeypatch, texts, truncated, **rl_settings):
    """One PPO step whose rollout is `texts` (and whether each never ended), every answer scored 1.

    Returns:
        (the experience collected, the step's metrics, the temperature of every policy forward).
    """
    from constitutional.rl.ppo import FixedKLController
    from constitutional.rl.rollout import Rollout

    config = make_config(rollout_batch_size=len(texts), minibatch_size=2, **rl_settings)
    accelerator, models, optimizer = trainer.prepare(config.training, config.seed, config.rl, run_dir)
    eos = models.tokenizer.eos_token_id
    ids = [models.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
    monkeypatch.setattr(trainer, "generate", lambda *args, **kwargs: Rollout(texts, ids, truncated))
    temperatures, forward = [], policy.PolicyModule.forward

    def recording_forward(self, *args, **kwargs):
        temperatures.append(kwargs.get("temperature"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(policy.PolicyModule, "forward", recording_forward)
    prompts = [{"id": f"p{i}", "kind": "red_team", "prompt": "Bread?"} for i in range(len(texts))]
    reward = lambda conversations, answers: [1.0] * len(answers)  # noqa: E731
    kl_control = FixedKLController(0.01)
    experience, _ = trainer.collect_experience(accelerator, models, kl_control, config.rl, prompts, 0, 1, reward)
    metrics = trainer.ppo_step(accelerator, models, optimizer, kl_control, config.rl, prompts, 0, 1, reward)
    return experience, metrics, temperatures


def test_empty_and_one_word_answers_lose_the_empty_answer_penalty(run_dir, monkeypatch):
    texts, truncated = ["", "   ", "No.", "Bread is baked."], [False, True, False, True]
    experience, metrics, _ = fixed_rollout_step(
        run_dir, monkeypatch, texts, truncated, empty_answer_penalty=0.5, missing_eos_penalty=0.25
    )
    # 1 - 0.5 for a short answer (empty, blank, one word), - 0.25 for one that never ended.
    assert experience["penalised"].tolist() == pytest.approx([0.5, 0.25, 0.5, 0.75])
    assert metrics["short_answers"] == 3 and metrics["truncated"] == 2


def test_policy_and_reference_log_probabilities_use_the_sampling_temperature(run_dir, monkeypatch):
    texts = ["Bread is baked.", "Mix flour and water.", "Knead it well.", "Then let it rise."]
    _, metrics, temperatures = fixed_rollout_step(run_dir, monkeypatch, texts, [False] * 4, temperature=0.7)
    # Policy and reference, in the rollout and in every update: the distribution that sampled.
    assert len(temperatures) > 4 and set(temperatures) == {0.7}
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference, tempered alike


class StopBeforeTraining(Exception):
    pass


@pytest.mark.parametrize("native_bf16, expected", [(True, True), (False, False)])
def test_the_reward_pm_scores_in_bf16_where_rl_trains_in_bf16(run_dir, monkeypatch, native_bf16, expected):
    """Frozen, it needs no fp32 master weights: bf16 halves the largest model rl holds that nothing trains."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    loaded = []

    def spy(path, **options):
        loaded.append(options)
        raise StopBeforeTraining

    monkeypatch.setattr(rl.PreferenceModel, "load", spy)
    config = config_from_dict({"seed": 1, "training": {"precision": "auto", "device": "cpu"}})
    with pytest.raises(StopBeforeTraining):
        rl.run(config, config.rl, run_dir, None)
    assert loaded[0]["bf16"] is expected and loaded[0]["device"] == "cpu"


def test_a_bf16_pm_scores_as_the_fp32_one_does(run_dir):
    """The same PM in bf16: scores within bf16's rounding, the same order of answers that are further apart."""
    from constitutional.preference import PreferenceModel

    conversations = [[("human", f"Question {i} about bread?")] for i in range(6)]
    answers = [f"Answer {i}: " + "bake it " * i for i in range(6)]
    fp32 = PreferenceModel.load(run_dir.path("pm")).score(conversations, answers)
    bf16_model = PreferenceModel.load(run_dir.path("pm"), bf16=True)
    assert next(bf16_model.model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_model.score(conversations, answers)
    assert bf16 == pytest.approx(fp32, abs=0.05 * max(1.0, max(map(abs, fp32))))
    # Answers nearer than bf16's rounding (about 0.001 here) may swap; those further apart may not.
    apart = [(i, j) for i, j in itertools.combinations(range(6), 2) if abs(fp32[i] - fp32[j]) > 0.01]
    assert len(apart) >= 5 and all((fp32[i] < fp32[j]) == (bf16[i] < bf16[j]) for i, j in apart)
