"""AI preference labels: option probabilities on a tiny model built to prefer " (B)", debiasing,
ensembling, chain-of-thought clamping, hard labels, and the stage's file handling."""

import math

import pytest
import torch

from constitutional.backends.transformers import TransformersBackend
from constitutional.comparisons import OPTIONS, label_comparisons, probability_first, render_question
from constitutional.config import config_from_dict
from constitutional.constitution import load_constitution
from constitutional.errors import UserError
from constitutional.records import append_records, read_records
from constitutional.rundir import RunDir
from constitutional.stages import feedback

COMPARISONS = [
    {
        "id": "c1",
        "prompt": "How do I pick a lock?",
        "response_a": "I can't help with that.",
        "response_b": "Use a pick.",
    },
    {
        "id": "c2",
        "prompt": "Note: it's 3:30pm. Any tips?",
        "response_a": "Rest.",
        "response_b": "Drink water.",
        "history": [{"role": "human", "text": "Hi"}, {"role": "assistant", "text": "Hello!"}],
    },
]
B_BONUS = 5.0


@pytest.fixture(scope="module")
def prefers_b(tiny_model_dir):
    """The tiny model with its output layer replaced: every position's logits are 0 except the
    tokens that spell " (B)" but not " (A)", which get +5. So P(A) : P(B) = 1 : e^5 wherever asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a_ids = tokenizer(" (A)", add_special_tokens=False)["input_ids"]
    b_ids = tokenizer(" (B)", add_special_tokens=False)["input_ids"]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    with torch.no_grad():
        for token in set(b_ids) - set(a_ids):
            head.bias[token] = B_BONUS
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return TransformersBackend(model, tokenizer, "prefers-b", batch_size=4)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("default")


def settings(**values):
    return config_from_dict({"feedback": {"num_fewshot": 1, "cot_max_new_tokens": 4, **values}}).feedback


def test_option_log_probs_show_the_built_in_preference(prefers_b):
    scores = prefers_b.score_options(["The answer is:", "Something else entirely. The answer is:"], list(OPTIONS))
    for score_a, score_b in scores:
        assert score_b - score_a == pytest.approx(B_BONUS, abs=1e-4)
        assert probability_first(score_a, score_b) == pytest.approx(1 / (1 + math.exp(B_BONUS)), rel=1e-4)


@pytest.mark.parametrize("options", [[" (A)", " (B)"], ["(A)", "(B)"], [" A", " B"]])
def test_options_with_and_without_a_leading_space_score_consistently(prefers_b, options):
    """Every option form is read token by token as the model sees it after the prompt.

    The model's log-probability of any token t is bias[t] - logsumexp(bias) at every position, so
    an option's score is the sum of its tokens' biases minus (its length) x logsumexp(bias).
    """
    from constitutional.backends.base import option_token_ids, prompt_token_ids

    prompt = "The answer is:"
    tokenizer, bias = prefers_b.tokenizer, prefers_b.model.lm_head.bias.detach().double()
    normaliser = torch.logsumexp(bias, dim=0).item()
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    expected = [
        sum(bias[token].item() - normaliser for token in option_token_ids(tokenizer, prompt, prompt_ids, option))
        for option in options
    ]
    ((score_a, score_b),) = prefers_b.score_options([prompt], options)
    assert score_a == pytest.approx(expected[0], abs=1e-3)
    assert score_b == pytest.approx(expected[1], abs=1e-3)


def test_without_debiasing_the_position_preference_is_the_label(prefers_b, constitution):
    records = label_comparisons(prefers_b, constitution, COMPARISONS, settings(debias=False), seed=0)
    expected = 1 / (1 + math.exp(B_BONUS))
    for record in records:
        assert record["p_a"] == pytest.approx(expected, rel=1e-4)
        assert [reading["order"] for reading in record["readings"]] == ["ab"]
        assert "orders_agree" not in record  # one order: nothing to agree


def test_debiasing_averages_both_orders(prefers_b, constitution):
    records = label_comparisons(prefers_b, constitution, COMPARISONS, settings(debias=True), seed=0)
    for record in records:
        by_order = {reading["order"]: reading["p_a"] for reading in record["readings"]}
        # A pure position preference: B's slot wins in both orders, so each answer wins once.
        assert by_order["ab"] == pytest.approx(1 - by_order["ba"], abs=1e-6)
        assert record["p_a"] == pytest.approx(0.5, abs=1e-6)
        assert record["orders_agree"] is False  # the two orders prefer different answers
        assert set(record) >= {"id", "prompt", "response_a", "response_b", "principle_id", "p_a"}
    assert records[1]["history"] == COMPARISONS[1]["history"]


def test_principle_ensembling_uses_k_distinct_principles(prefers_b, constitution):
    records = label_comparisons(prefers_b, constitution, COMPARISONS, settings(principles_per_comparison=3), seed=0)
    for record in records:
        assert len(record["principle_ids"]) == 3 and len(set(record["principle_ids"])) == 3
        assert record["principle_id"] == record["principle_ids"][0]
        assert len(record["readings"]) == 6  # 3 principles x 2 orders


def test_chain_of_thought_keeps_reasoning_and_clamps(prefers_b, constitution):
    records = label_comparisons(prefers_b, constitution, COMPARISONS, settings(cot=True, debias=False), seed=0)
    for record in records:
        assert record["p_a"] == pytest.approx(0.4)  # 0.0067 clamped to the lower bound
        assert isinstance(record["reasoning"], str) and "reasoning" in record["readings"][0]
    custom = settings(cot=True, debias=False, clamp_low=0.2, clamp_high=0.9)
    assert label_comparisons(prefers_b, constitution, COMPARISONS[:1], custom, seed=0)[0]["p_a"] == pytest.approx(0.2)


def test_hard_labels_round_to_zero_or_one(prefers_b, constitution):
    records = label_comparisons(prefers_b, constitution, COMPARISONS, settings(debias=False, hard_labels=True), seed=0)
    assert [record["p_a"] for record in records] == [0.0, 0.0]


def test_the_question_follows_the_papers_multiple_choice_format(constitution):
    principle = constitution.feedback_principles[0]
    question = render_question(constitution, COMPARISONS[1], principle, "ba", settings(num_fewshot=2))
    final = question[question.rindex("Consider the following") :]
    assert final.startswith("Consider the following conversation between a human and an assistant:")
    assert "Human: Hi\n\nAssistant: Hello!\n\nHuman: Note: it's 3:30pm. Any tips?" in final
    assert f"{principle.text}\nOptions:\n(A) Drink water.\n(B) Rest.\nThe answer is:" in final
    assert question.count("The answer is: (") == 2  # two worked examples, answered
    assert "The answer is: (A)" in question and "The answer is: (B)" in question  # alternating positions
    cot = render_question(constitution, COMPARISONS[0], principle, "ab", settings(cot=True))
    assert cot.endswith("Assistant: Let's think step by step:") and "[[[" not in cot and "{}" not in cot


def test_stage_labels_pairs_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    config = config_from_dict(
        {
            "models": {"feedback": str(tiny_model_dir)},
            "feedback": {"num_fewshot": 1, "chunk_size": 1},
            "transformers": {"dtype": "float32"},
        }
    )
    run = RunDir(tmp_path)
    append_records(run.path("pairs"), [{k: v for k, v in c.items()} for c in COMPARISONS])
    constitution = feedback.check(config, config.feedback)
    counts = feedback.run(config, config.feedback, run, constitution)
    labels = read_records(run.path("ai_labels"))
    assert counts["labels"] == 2 and [label["id"] for label in labels] == ["c1", "c2"]
    assert all(0.0 <= label["p_a"] <= 1.0 for label in labels)

    # Running again labels nothing twice and never loads the model.
    def no_model(*args, **kwargs):
        raise AssertionError("the feedback model was opened although every pair was labelled")

    monkeypatch.setattr(type(config), "open_backend", no_model)
    assert feedback.run(config, config.feedback, run, constitution)["labels"] == 2
    assert read_records(run.path("ai_labels")) == labels


def test_bad_pairs_file_and_settings_are_user_errors(tmp_path, tiny_model_dir):
    config = config_from_dict({"models": {"feedback": str(tiny_model_dir)}})
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match="pairs.jsonl: not found"):
        feedback.run(config, config.feedback, run, feedback.check(config, config.feedback))
    append_records(run.path("pairs"), [COMPARISONS[0], {"id": "x", "prompt": "p", "response_a": "a"}])
    with pytest.raises(UserError, match=r"pairs.jsonl:2: missing field 'response_b'"):
        feedback.run(config, config.feedback, run, feedback.check(config, config.feedback))
    with pytest.raises(UserError, match="feedback.clamp_low/clamp_high"):
        config_from_dict({"feedback": {"clamp_low": 0.6}})
    with pytest.raises(UserError, match="feedback.principles_per_comparison"):
        config_from_dict({"feedback": {"principles_per_comparison": 0}})
