"""PPO trains on what it sampled: the kept prefix of the sampled ids, the sampler's own end-of-sequence
set, log-probabilities at the sampling temperature, every pass over the prompts a permutation, and
empty or one-word answers flagged. Each runs on the tiny byte-level tokenizer and, where the converted
embedded model is in the cache, on Gemma 3's SentencePiece tokenizer (the model's weights are never
loaded: a tiny model with its vocabulary stands in)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from constitutional.backends.base import cut_at_stop
from constitutional.backends.transformers import TransformersBackend
from constitutional.prompts import render_plain
from constitutional.rl import policy, rollout
from constitutional.seeding import rng_for

TOKENIZERS = ["tiny", pytest.param("embedded", marks=pytest.mark.embedded)]

# What a policy might sample after "Assistant:": a blank line first, a word split where the tokenizer
# would not split it, then the start of the next turn (which the turn-marker stop string cuts).
ANSWER_PIECES = ["\n\n", " Hel", "lo", " there", "."]
MARKER_PIECES = ["\n", "Human", ":", " more"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request, tiny_model_dir):
    """Loaded once per module: Gemma's tokenizer takes seconds to load, and no test changes it.

    The embedded model is converted into the cache on first use (the `embedded_model_dir` fixture).
    """
    if request.param == "tiny":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoTokenizer.from_pretrained(request.getfixturevalue("embedded_model_dir"))


def second_eos(tokenizer) -> int:
    """A second end-of-sequence id: Gemma's `<end_of_turn>` (its generation config lists it beside `<eos>`)."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        return end_of_turn
    return tokenizer.pad_token_id  # the tiny tokenizer has no such token; any other special id will do


def pieces_ids(tokenizer, pieces) -> list[int]:
    return [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def sample_as(monkeypatch, rows: list[list[int]]) -> None:
    """The back end "samples" these ids: text and `last_token_ids` as the real decode loop leaves them."""

    def fake_generate(self, prompts, params, seeds=None):
        self.last_token_ids = [list(ids) for ids in rows]
        return [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop) for ids in rows]

    monkeypatch.setattr(TransformersBackend, "generate", fake_generate)


def models_with(tokenizer, eos_ids) -> policy.Models:
    """A policy stub: generation goes through the (patched) back end; only the generation config is read."""
    model = SimpleNamespace(eval=lambda: None, generation_config=GenerationConfig(eos_token_id=eos_ids))
    return policy.Models(SimpleNamespace(model=model), None, tokenizer, None)


def sample(models, rows_count: int) -> rollout.Rollout:
    conversations = [[("human", f"Question {i}?")] for i in range(rows_count)]
    return rollout.generate(models, 16, 0.7, conversations, list(range(rows_count)))


# ----------------------------------------------------------------------------- 1. the kept prefix


def test_an_answer_cut_at_a_turn_marker_keeps_the_ids_it_sampled(tokenizer, monkeypatch):
    answer = pieces_ids(tokenizer, ANSWER_PIECES)
    sampled = answer + pieces_ids(tokenizer, MARKER_PIECES)
    assert tokenizer.decode(sampled, skip_special_tokens=True) == "".join(ANSWER_PIECES + MARKER_PIECES)
    sample_as(monkeypatch, [sampled])
    result = sample(models_with(tokenizer, tokenizer.eos_token_id), 1)
    assert result.texts == ["Hello there."] and result.truncated == [False]
    # The longest prefix of what was sampled that spells the kept text (the newline before the
    # marker included: it strips away like the blank line before the answer), then EOS.
    newline = pieces_ids(tokenizer, ["\n"])
    assert result.token_ids == [answer + newline + [tokenizer.eos_token_id]]
    # What the old code trained on instead: the kept text tokenised again, ids the policy never sampled.
    assert tokenizer(" Hello there.", add_special_tokens=False)["input_ids"] != answer


def test_an_uncut_answer_keeps_its_ids_and_eos(tokenizer, monkeypatch):
    ended = pieces_ids(tokenizer, ANSWER_PIECES) + [tokenizer.eos_token_id]
    endless = pieces_ids(tokenizer, [" Hel", "lo", " there"])
    sample_as(monkeypatch, [ended, endless])
    result = sample(models_with(tokenizer, tokenizer.eos_token_id), 2)
    assert result.token_ids == [ended, endless] and result.truncated == [False, True]


def test_a_cut_right_after_the_prompt_leaves_only_what_was_sampled_before_it(tokenizer, monkeypatch):
    sampled = pieces_ids(tokenizer, ["\n", "Human", ":", " hi"])
    sample_as(monkeypatch, [sampled])
    result = sample(models_with(tokenizer, tokenizer.eos_token_id), 1)
    assert result.texts == [""] and result.truncated == [False]
    assert result.token_ids == [pieces_ids(tokenizer, ["\n"]) + [tokenizer.eos_token_id]]


class PieceTokenizer:
    """A tokenizer whose ids are fixed strings: for a token that straddles the cut."""

    pieces = {1: "Hello", 2: " world", 3: ".\nHu", 4: "man:", 5: " hi"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_a_token_that_straddles_the_cut_is_dropped_with_what_follows():
    kept = "Hello world."  # the text cut at "\nHuman:"; token 3 holds its "." and the marker's start
    assert rollout.cut_sampled_ids(PieceTokenizer(), [1, 2, 3, 4, 5], kept, [0]) == [1, 2]
    assert rollout.cut_sampled_ids(PieceTokenizer(), [1, 2, 3, 4, 5, 0], "Hello world", [0]) == [1, 2]


# ----------------------------------------------------------------------------- 2. the sampler's EOS set


def test_an_answer_that_ends_on_any_eos_of_the_sampler_has_ended(tokenizer, monkeypatch):
    other = second_eos(tokenizer)
    on_other = pieces_ids(tokenizer, ANSWER_PIECES) + [other]
    sample_as(monkeypatch, [on_other])
    result = sample(models_with(tokenizer, [tokenizer.eos_token_id, other]), 1)
    assert result.truncated == [False]  # the old code penalised it as never ending
    assert result.token_ids == [on_other]  # nothing appended: it ended as sampled


def test_the_eos_set_is_the_backends():
    tokenizer = SimpleNamespace(eos_token_id=7)
    for config_eos, expected in [([1, 106], [1, 106]), (3, [3]), (None, [7])]:
        model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=config_eos))
        backend = TransformersBackend(model, tokenizer, "x")
        assert rollout.sampler_eos_ids(model, tokenizer) == backend._eos_ids() == expected


# ----------------------------------------------------------------------------- 3. the sampling temperature


def tiny_lm(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer model with the tokenizer's vocabulary (Gemma's: 262k rows, width 16)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probabilities_are_those_of_the_tempered_distribution_that_sampled(tokenizer, temperature):
    model = tiny_lm(tokenizer)
    conversations = [[("human", "How do I bake bread?")], [("human", "Hi?")]]
    answers = [pieces_ids(tokenizer, ANSWER_PIECES) + [tokenizer.eos_token_id], pieces_ids(tokenizer, [" Hel"])]
    batch = policy.encode(tokenizer, conversations, answers, "cpu")
    models = policy.Models(policy.PolicyModule(model), None, tokenizer, policy.PolicyModule(model))
    with torch.no_grad():
        logprobs, entropy, _ = policy.policy_outputs(models, batch, with_entropy=True, temperature=temperature)
        reference = policy.reference_logprobs(models, batch, temperature)
    for row, (turns, answer) in enumerate(zip(conversations, answers)):
        prompt = tokenizer(render_plain(turns, "assistant"))["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(answer)[:, None])[:, 0]
        torch.testing.assert_close(logprobs[row, : len(answer)], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reference[row, : len(answer)], expected, atol=1e-4, rtol=1e-4)
    assert entropy is not None and torch.isfinite(entropy)


# ----------------------------------------------------------------------------- 5. passes over the prompts


@pytest.mark.parametrize(("count", "size"), [(7, 3), (5, 5), (4, 10), (6, 4)])
def test_every_pass_over_the_training_prompts_is_a_permutation(count, size):
    train = [{"id": f"p{i}"} for i in range(count)]
    steps = 6 * count  # whole passes, several of them, batches spanning their boundaries
    sampled = [row["id"] for step in range(steps) for row in rollout.rollout_prompts(train, size, step, seed=3)]
    passes = [sampled[start : start + count] for start in range(0, len(sampled), count)]
    assert all(sorted(ids) == sorted(row["id"] for row in train) for ids in passes)
    assert len({tuple(ids) for ids in passes}) > 1  # each pass its own shuffle


def test_a_batch_inside_one_pass_is_as_before():
    train, size, seed = [{"id": f"p{i}"} for i in range(12)], 4, 5
    for step in range(9):  # 12 prompts, batches of 4: no batch spans a boundary
        order = sorted(range(12), key=lambda i: rng_for(seed, f"rl-order:{(step * size) // 12}:{i}").random())
        before = [train[order[((step * size) % 12 + i) % 12]] for i in range(size)]
        assert rollout.rollout_prompts(train, size, step, seed) == before


# ----------------------------------------------------------------------------- 7. empty and one-word answers


def test_empty_blank_and_one_word_answers_are_short():
    texts = ["", "   \n", "No.", "I can't help.", "Sure, here it is"]
    assert rollout.short_answers(texts, 2) == [True, True, True, False, False]
    assert rollout.short_answers(texts, 1) == [True, True, False, False, False]
    assert rollout.short_answers(texts, 0) == [False] * 5
