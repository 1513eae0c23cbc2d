"""Stage `rl`'s TRL algorithms on the tiny model: DPO learns from the PM's training mix with one soft
target per pair (ties teach nothing, clamped chain-of-thought labels are kept); RLOO and GRPO give
the PM only the answer, never a turn the model invents after it."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.records import append_records
from constitutional.rl import trl_trainers
from constitutional.rundir import RunDir
from constitutional.stages import rl


def make_config(**rl_settings):
    settings = {"minibatch_size": 4, "learning_rate": 3e-3, "max_new_tokens": 12, "save_steps": 100,
                "lora": {"enabled": False}, **rl_settings}  # fmt: skip
    return config_from_dict({"seed": 1, "rl": settings})


def comparison(i, p_a, source="ai_harmlessness", **extra):
    """A `pm_train.jsonl` row (stage pm's format)."""
    return {"id": f"c{i}", "source": source, "prompt": f"Question {i}?", "response_a": "A kind answer.",
            "response_b": "A rude answer.", "p_a": p_a, **extra}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_model_dir, run.path("sl_cai"))
    return run


# ----------------------------------------------------------------------------- DPO pairs


def test_clamped_chain_of_thought_labels_are_not_near_ties():
    # feedback.cot clamps labels to [0.4, 0.6]; abs(0.6 - 0.5) is 0.09999999999999998 in floating point.
    pairs, dropped = trl_trainers.dpo_pairs([comparison(0, 0.6), comparison(1, 0.4)], margin=0.1)
    assert dropped == 0 and len(pairs) == 2


def test_pairs_put_the_preferred_answer_first_with_its_soft_target():
    history = [{"role": "human", "text": "Hi."}, {"role": "assistant", "text": "Hello."}]
    rows = [comparison(0, 0.45, history=history), comparison(1, 1.0, "human_helpfulness"), comparison(2, 0.5),
            comparison(3, 0.0, "human_helpfulness")]  # fmt: skip
    pairs, dropped = trl_trainers.dpo_pairs(rows, margin=0.0)
    assert dropped == 1  # the exact tie: neither answer is preferred
    assert [(pair["chosen"], pair["rejected"], pair["p"]) for pair in pairs] == [
        (" A rude answer.", " A kind answer.", pytest.approx(0.55)),
        (" A kind answer.", " A rude answer.", 1.0),
        (" A rude answer.", " A kind answer.", 1.0),
    ]
    assert [pair["source"] for pair in pairs] == ["ai_harmlessness", "human_helpfulness", "human_helpfulness"]
    assert pairs[0]["prompt"] == "Human: Hi.\n\nAssistant: Hello.\n\nHuman: Question 0?\n\nAssistant:"


def test_dpo_margin_is_an_optional_filter_that_keeps_its_boundary():
    rows = [comparison(0, 0.6), comparison(1, 0.8), comparison(2, 0.3), comparison(3, 0.35)]
    pairs, dropped = trl_trainers.dpo_pairs(rows, margin=0.2)
    assert dropped == 2 and [pair["p"] for pair in pairs] == [0.8, pytest.approx(0.7)]
    assert trl_trainers.DPOOptions().dpo_margin == 0.0  # by default every non-tie comparison is kept


# ----------------------------------------------------------------------------- the soft-target loss


def test_soft_dpo_loss_matches_hand_computed_values():
    beta, margins = 0.1, torch.tensor([2.0, -1.0, 0.0])
    p = torch.tensor([0.8, 1.0, 0.6])
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = [
        -(0.8 * log_sigmoid(0.2) + 0.2 * log_sigmoid(-0.2)),
        -log_sigmoid(-0.1),  # p = 1: standard DPO, -log sigma(beta * margin)
        math.log(2),  # margin 0: -log sigma(0) whatever p is
    ]
    torch.testing.assert_close(trl_trainers.soft_dpo_loss(margins, p, beta), torch.tensor(expected))


def test_a_tie_has_zero_gradient_and_a_soft_label_is_matched_not_maximised():
    beta = 0.1
    margin = torch.zeros(1, requires_grad=True)
    trl_trainers.soft_dpo_loss(margin, torch.tensor([0.5]), beta).sum().backward()
    assert margin.grad.item() == 0.0  # p = 0.5 at the reference policy: nothing to learn
    # The loss is smallest where sigma(beta * margin) = p: the implicit reward matches the label's odds.
    at_optimum = torch.tensor([math.log(0.7 / 0.3) / beta], requires_grad=True)
    trl_trainers.soft_dpo_loss(at_optimum, torch.tensor([0.7]), beta).sum().backward()
    assert abs(at_optimum.grad.item()) < 1e-6


def tiny_dpo_trainer(run_dir, lora, targets):
    from transformers import AutoTokenizer

    config = make_config(algorithm="dpo", lora={"enabled": lora, "r": 4, "alpha": 8})
    tokenizer = AutoTokenizer.from_pretrained(run_dir.path("sl_cai"))
    model = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai"))
    pairs = [{"prompt": f"Human: Q{i}?\n\nAssistant:", "chosen": " Yes.", "rejected": " No, never.", "p": p,
              "source": "ai_harmlessness"} for i, p in enumerate(targets)]  # fmt: skip
    return trl_trainers.dpo_trainer(config.training, config.seed, config.rl, run_dir, model, tokenizer, pairs)


def batch_of(trainer, rows):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in rows]))


@pytest.mark.parametrize("lora", [False, True])
def test_the_trainer_reads_each_pairs_soft_target(run_dir, lora):
    """At the first step the policy is its reference (margin 0): a tie gives no gradient at all, p = 0.9 does."""
    trainer = tiny_dpo_trainer(run_dir, lora, [0.5] * 4 + [0.9] * 4)
    for rows, expected_p, gradient_is_zero in ((range(4), 0.5, True), (range(4, 8), 0.9, False)):
        batch = batch_of(trainer, rows)
        assert batch["p"].tolist() == pytest.approx([expected_p] * 4)
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        largest = max(param.grad.abs().max().item() for param in trainer.model.parameters() if param.grad is not None)
        assert (largest == 0.0) == gradient_is_zero, largest


@pytest.mark.parametrize("lora", [False, True])
def test_with_hard_labels_the_loss_is_trls_dpo_loss(run_dir, lora):
    """p = 1 everywhere: the same loss as TRL's own sigmoid DPO, on a policy moved away from its reference."""
    from trl import DPOTrainer

    trainer = tiny_dpo_trainer(run_dir, lora, [1.0] * 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and (not lora or "lora_B" in name):
                param.add_(0.05 * torch.randn_like(param))
    batch = batch_of(trainer, range(4))
    ours = trainer.compute_loss(trainer.model, batch)
    theirs = DPOTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != "p"})
    assert abs(ours.item() - math.log(2)) > 1e-3  # the margins are not zero
    torch.testing.assert_close(ours, theirs)


# ----------------------------------------------------------------------------- DPO in the stage


def test_dpo_reads_the_pm_training_mix(run_dir):
    config = make_config(algorithm="dpo")
    assert rl.reads(config, config.rl) == ["pm_train", "sl_cai"]
    with pytest.raises(UserError, match=r"data/pm_train.jsonl: not found; make it with `cai run CONFIG --stages pm`"):
        rl.run(config, config.rl, run_dir, None)


def test_dpo_learns_from_labels_that_all_lie_near_one_half(run_dir):
    """The quickstart's case: every AI label within 0.1 of 0.5, beside human helpfulness comparisons."""
    near_half = [0.52, 0.45, 0.58, 0.41, 0.6, 0.4]
    rows = [comparison(i, p) for i, p in enumerate(near_half)]
    rows += [comparison(10, 1.0, "human_helpfulness"), comparison(11, 0.0, "human_helpfulness")]
    append_records(run_dir.path("pm_train"), rows)
    config = make_config(algorithm="dpo")  # the default rl.dpo_margin
    summary = rl.run(config, config.rl, run_dir, None)
    assert summary["pairs"] == 8 and summary["dropped_near_ties"] == 0 and summary["steps"] == 2
    assert summary["pairs_by_source"] == {"ai_harmlessness": 6, "human_helpfulness": 2}
    assert math.isfinite(summary["train_loss"])
    saved = json.loads((run_dir.path("rl_cai") / "training_summary.json").read_text())
    assert saved["algorithm"] == "dpo" and saved["pairs_by_source"] == summary["pairs_by_source"]
    trained = AutoModelForCausalLM.from_pretrained(run_dir.path("rl_cai")).state_dict()
    start = AutoModelForCausalLM.from_pretrained(run_dir.path("sl_cai")).state_dict()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in start.items())


def test_dpo_with_only_ties_names_the_file(run_dir):
    append_records(run_dir.path("pm_train"), [comparison(0, 0.5), comparison(1, 0.5)])
    config = make_config(algorithm="dpo")
    with pytest.raises(UserError, match=r"pm_train.jsonl: all 2 comparisons are ties or within rl.dpo_margin"):
        rl.run(config, config.rl, run_dir, None)


# ----------------------------------------------------------------------------- RLOO and GRPO


class SpyPM:
    """A reward model that records every transcript it is asked to score."""

    def __init__(self):
        self.seen = []

    def score_transcripts(self, transcripts):
        self.seen += list(transcripts)
        return [0.0] * len(transcripts)


class Stop(Exception):
    pass


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_the_pm_never_sees_a_turn_the_policy_invents(run_dir, monkeypatch, algorithm):
    captured = {}

    def capture(*args, **kwargs):
        captured["reward"] = args[7]  # the reward function handed to TRL's trainer
        raise Stop

    monkeypatch.setattr(trl_trainers, "_group_trainer", capture)
    config = make_config(algorithm=algorithm, steps=1, rollout_batch_size=2, group_size=2)
    prompts = {"train": [{"id": "p0", "kind": "red_team", "prompt": "Question?"}], "eval": []}
    spy = SpyPM()
    with pytest.raises(Stop):
        trl_trainers.run_group(config.training, config.seed, algorithm, config.rl, run_dir, prompts, spy)
    prompt = "Human: Question?\n\nAssistant:"
    completions = [" Sure, here it is.\n\nHuman: Thanks! And more?\n\nAssistant: More.", " No.\nHuman: why", " Fine."]
    rewards = captured["reward"](prompts=[prompt] * 3, completions=completions, completion_ids=[[1]] * 3)
    assert rewards == [0.0, 0.0, 0.0]
    assert spy.seen == [prompt + " Sure, here it is.", prompt + " No.", prompt + " Fine."]
    assert all(text.count("Human:") == 1 for text in spy.seen)
