"""Rollouts: which prompts a step samples, and the answers the policy samples for them.

Sampling goes through the back-end generation interface (batched, one seed per row, so a rollout
batch is reproducible); PPO then trains on the token ids that were sampled, and only on those: an
answer cut at a stop string or a turn marker keeps a prefix of its sampled ids (never a new
tokenisation of the kept text, which on SentencePiece tokenizers gives ids the policy did not
sample), ended with end-of-sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from constitutional.backends import SamplingParams
from constitutional.prompts import STOP_STRINGS, Turn, render_plain, trim_at_turn_marker
from constitutional.rl.policy import Models, causal_lm, sync_sampler
from constitutional.seeding import rng_for


@dataclass
class Rollout:
    """Sampled answers: their text, the token ids the policy sampled, and which never ended."""

    texts: list[str]
    token_ids: list[list[int]]  # end-of-sequence included where the answer ended
    truncated: list[bool]


def rollout_prompts(train: list[dict[str, Any]], size: int, step: int, seed: int) -> list[dict[str, Any]]:
    """The prompts of one rollout batch: the training prompts in a seeded shuffle per pass, pass after pass.

    Batch `step` takes positions step·size … step·size + size − 1 of the endless sequence pass 0,
    pass 1, …, each pass its own permutation: a batch that spans the end of a pass takes the rest of
    pass k, then the start of pass k + 1, so over every pass each prompt is sampled exactly once.

    Args:
        train: the training prompt records.
        size: `rl.rollout_batch_size`.
        step: the PPO step (0-based).
        seed: the run seed (each pass's order derives from it).

    Returns:
        `size` prompt records.
    """
    count, orders = len(train), {}
    batch = []
    for position in range(step * size, (step + 1) * size):
        number = position // count
        if number not in orders:
            orders[number] = _pass_order(count, number, seed)
        batch.append(train[orders[number][position % count]])
    return batch


def _pass_order(count: int, number: int, seed: int) -> list[int]:
    """The order of pass `number` over `count` prompts (a seeded shuffle, the same on every machine)."""
    return sorted(range(count), key=lambda i: rng_for(seed, f"rl-order:{number}:{i}").random())


def sampler_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the same set the sampler stops on.

    Mirrors `TransformersBackend._eos_ids` (backends/transformers.py): the model's generation config
    (Gemma's lists both `<eos>` and `<end_of_turn>`), else the tokenizer's end-of-sequence. An answer
    that stopped on any of them ended properly and must not be penalised as never-ending.

    Args:
        model: the causal LM that samples (what the back end wraps).
        tokenizer: its tokenizer.

    Returns:
        The end-of-sequence ids in the config's order (empty when neither names one).
    """
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# Decoded prefixes grow with each token, except that the bytes of an unfinished UTF-8 character
# (byte-fallback tokens) decode to replacement characters that later merge into one: a prefix this
# many characters longer than the kept text can no longer shrink back to it.
CUT_SLACK = 8


def cut_sampled_ids(tokenizer: Any, ids: Sequence[int], kept: str, eos_ids: Sequence[int]) -> list[int]:
    """The longest prefix of the sampled ids whose text is the kept text (a cut answer's ids).

    Decoded prefixes are compared after stripping, as `kept` was: trailing whitespace the model
    sampled before a turn marker stays in. Where a token straddles the cut (part answer, part
    marker), no prefix decodes to `kept` exactly; then the longest whose text `kept` starts with.

    Args:
        tokenizer: decodes ids (special tokens skipped, as the back end does).
        ids: the sampled ids of one answer.
        kept: its text after stop strings and turn markers were cut, stripped.
        eos_ids: end-of-sequence ids (never part of the kept prefix: the caller ends it).

    Returns:
        A prefix of `ids` (no end-of-sequence), possibly empty.
    """
    body = list(ids[:-1] if ids and ids[-1] in eos_ids else ids)
    exact, within = None, 0
    for length in range(1, len(body) + 1):
        text = tokenizer.decode(body[:length], skip_special_tokens=True).strip()
        if len(text) > len(kept) + CUT_SLACK:
            break  # past the cut for good: longer prefixes only decode to longer text
        if text == kept:
            exact = length
        elif kept.startswith(text) and exact is None:
            within = length
    return body[: exact if exact is not None else within]


def short_answers(texts: Sequence[str], min_words: int) -> list[bool]:
    """Which answers have fewer than `min_words` words (`rl.min_answer_words`): empty, blank, one word.

    Such answers are reward hacks a PM may score well (a bare refusal, nothing at all) but the paper's
    setting would not reward; PPO subtracts `rl.empty_answer_penalty` from their score. Words are
    runs of non-whitespace.

    Args:
        texts: the answers' texts.
        min_words: the fewest words an answer needs to count as an answer.

    Returns:
        One flag per answer.
    """
    return [len(text.split()) < min_words for text in texts]


def generate(
    models: Models, max_new_tokens: int, temperature: float, conversations: Sequence[Sequence[Turn]],
    seeds: list[int], adapters: bool = True,
) -> Rollout:  # fmt: skip
    """Sample answers through the back-end interface (batched, one seed per row).

    PPO trains on the tokens that were sampled. Where the text was cut (a stop string, or the model
    starting the next turn), the answer keeps the prefix of its sampled ids that spells the kept
    text, ended with end-of-sequence: the answer ended there. An answer ended when its last id is
    one of the sampler's end-of-sequence ids.

    Args:
        models: the policy (and its bf16 sampler, if any).
        max_new_tokens, temperature: `rl.max_new_tokens`, `rl.temperature`.
        conversations: the prompts, as turns.
        seeds: one sampling seed per prompt.
        adapters: sample with the LoRA adapters on (RL-CAI) or off (SL-CAI).

    Returns:
        The answers' texts, token ids and which never ended.
    """
    from constitutional.backends.transformers import TransformersBackend

    policy, tokenizer = causal_lm(models), models.tokenizer
    switch_off = policy.disable_adapter() if not adapters and models.lora else contextlib.nullcontext()
    policy.eval()
    if models.sampler is not None:
        sync_sampler(policy, models.sampler, models.lora, merge=adapters)
        policy, switch_off = models.sampler, contextlib.nullcontext()
    backend = TransformersBackend(policy, tokenizer, "rl-policy", batch_size=len(conversations), share_prefix=False)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=STOP_STRINGS)
    with switch_off:
        raw = backend.generate([render_plain(turns, "assistant") for turns in conversations], params, seeds)
    eos_ids = sampler_eos_ids(policy, tokenizer)
    # A cut answer ends with the tokenizer's end-of-sequence, provided sampling stops on it (a
    # model whose generation config names other ids is taught the first of those instead).
    end = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_ids or not eos_ids else eos_ids[0]
    texts, token_ids, truncated = [], [], []
    for text, sampled in zip(raw, backend.last_token_ids):
        kept, ids = trim_at_turn_marker(text), list(sampled)
        ended = bool(ids) and ids[-1] in eos_ids
        if kept != tokenizer.decode(ids, skip_special_tokens=True).strip():
            ids = cut_sampled_ids(tokenizer, ids, kept, eos_ids)
            kept = tokenizer.decode(ids, skip_special_tokens=True).strip()  # what the ids say (a straddled cut)
            ids, ended = ids + [end], True  # the answer ended at the cut
        texts.append(kept)
        token_ids.append(ids or [end])
        truncated.append(not ended)
    return Rollout(texts, token_ids, truncated)
