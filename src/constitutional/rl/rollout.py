"""Rollouts: which prompts a step samples, and the answers the policy samples for them.

Sampling goes through the back-end generation interface (batched, one seed per row, so a rollout
batch is reproducible); PPO then trains on the token ids that were sampled.
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
    """The prompts of one rollout batch: a seeded shuffle of the training prompts per pass, cycled."""
    order = sorted(
        range(len(train)), key=lambda i: rng_for(seed, f"rl-order:{(step * size) // len(train)}:{i}").random()
    )
    offset = (step * size) % len(train)
    return [train[order[(offset + i) % len(train)]] for i in range(size)]


def generate(
    models: Models, max_new_tokens: int, temperature: float, conversations: Sequence[Sequence[Turn]],
    seeds: list[int], adapters: bool = True,
) -> Rollout:  # fmt: skip
    """Sample answers through the back-end interface (batched, one seed per row).

    PPO trains on the tokens that were sampled. Where the text was cut (a stop string, or the model
    starting the next turn), the kept text is tokenised again and ended with end-of-sequence: the
    answer ended there.

    Args:
        models: the policy (and its bf16 sampler, if any).
        max_new_tokens, temperature: `rl.max_new_tokens`, `rl.temperature`.
        conversations: the prompts, as turns.
        seeds: one sampling seed per prompt.
        adapters: sample with the LoRA adapters on (RL-CAI) or off (SL-CAI).
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
    texts, token_ids, truncated = [], [], []
    for text, ids in zip(raw, backend.last_token_ids):
        kept = trim_at_turn_marker(text)
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        if kept != tokenizer.decode(ids, skip_special_tokens=True).strip():
            ids = tokenizer(" " + kept, add_special_tokens=False)["input_ids"] if kept else []
            ended = True
        if ended and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        texts.append(kept)
        token_ids.append(ids or [tokenizer.eos_token_id])
        truncated.append(not ended)
    return Rollout(texts, token_ids, truncated)
