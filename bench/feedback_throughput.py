"""Benchmark: comparisons/s of the feedback stage vs a generation-based judge and a raw forward pass.

On the same comparisons (HH-RLHF harmlessness pairs from ../shared/data) and the same loaded model:

1. our labelling (`feedback.label_comparisons`: option log-probabilities, both orders);
2. a generation-based judge: the same questions, the model *writes* its answer and "(A)"/"(B)"
   is parsed from the text (how TRL's former judges worked), both orders;
3. the raw forward-pass throughput: one batched forward per question (logits at the last position
   only), the floor any log-prob labeller pays.

    python bench/feedback_throughput.py [--comparisons 48] [--num-fewshot 2]

Target (issue 3): labelling within 15% of the raw forward pass per ordering, and faster than the
generation-based judge. Also prints how often our label and the judge's pick agree.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch

from constitutional.backends import SamplingParams
from constitutional.backends.base import prompt_token_ids
from constitutional.backends.transformers import _length_sorted_batches
from constitutional.backends.transformers import load as load_transformers
from constitutional.comparisons import ORDERS, label_comparisons, question_principles, render_question
from constitutional.config import config_from_dict
from constitutional.constitution import load_constitution
from constitutional.sources import load_preference_pairs

REPO = Path(__file__).resolve().parents[1]
HARMLESS = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def comparisons_from_hh(count: int, seed: int) -> tuple[list[dict], list[bool]]:
    """HH-RLHF pairs as comparisons, the human-preferred answer put at A or B at random.

    Returns:
        (comparisons, chosen_is_a) in the same order.
    """
    rng = random.Random(seed)
    comparisons, chosen_is_a = [], []
    for pair in load_preference_pairs(str(HARMLESS), limit=count * 2):
        if pair["chosen"] == pair["rejected"] or not pair["chosen"] or not pair["rejected"]:
            continue
        a_is_chosen = rng.random() < 0.5
        a, b = (pair["chosen"], pair["rejected"]) if a_is_chosen else (pair["rejected"], pair["chosen"])
        history = [{"role": role, "text": text} for role, text in pair["history"]]
        comparisons.append(
            {"id": pair["id"], "prompt": pair["prompt"], "history": history, "response_a": a, "response_b": b}
        )
        chosen_is_a.append(a_is_chosen)
        if len(comparisons) == count:
            break
    return comparisons, chosen_is_a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", type=int, default=48)
    parser.add_argument("--num-fewshot", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    config = config_from_dict(
        {
            "feedback": {"num_fewshot": args.num_fewshot, "debias": True},
            "transformers": {"batch_size": args.batch_size},
        }
    )
    backend = load_transformers("embedded", config.transformers, config.base_dir, config.seed)
    constitution = load_constitution("default")
    comparisons, _ = comparisons_from_hh(args.comparisons, seed=0)
    orderings = len(comparisons) * len(ORDERS)
    print(
        f"{len(comparisons)} comparisons x {len(ORDERS)} orders, embedded model, {backend.model.dtype}, "
        f"batch {args.batch_size}, {args.num_fewshot} few-shot examples"
    )

    label_comparisons(backend, constitution, comparisons[:2], config.feedback, seed=1)  # warm-up
    started = time.perf_counter()
    labels = label_comparisons(backend, constitution, comparisons, config.feedback, seed=0)
    ours = time.perf_counter() - started

    questions = []
    for comparison in comparisons:
        principle = question_principles(constitution.feedback_principles, 1, 0, comparison["id"])[0]
        questions += [render_question(constitution, comparison, principle, order, config.feedback) for order in ORDERS]

    started = time.perf_counter()
    texts = backend.generate(questions, SamplingParams(max_new_tokens=4))
    judge = time.perf_counter() - started
    picks = [_parse_pick(text) for text in texts]

    started = time.perf_counter()
    _raw_forward(backend, questions)
    raw = time.perf_counter() - started

    print(
        f"ours (log-probs, one pass per order): {len(comparisons) / ours:.2f} comparisons/s, "
        f"{orderings / ours:.2f} orderings/s ({ours:.1f} s)"
    )
    print(
        f"raw forward pass, same questions:     {len(comparisons) / raw:.2f} comparisons/s, "
        f"{orderings / raw:.2f} orderings/s ({raw:.1f} s)"
    )
    print(f"generation-based judge (parse text):  {len(comparisons) / judge:.2f} comparisons/s ({judge:.1f} s)")
    print(f"ours / raw forward: {raw / ours:.2f} (target >= 0.85); ours / judge: {judge / ours:.2f}x (target > 1)")

    judged = agree = 0
    unparsed = sum(pick is None for pick in picks)
    for index, label in enumerate(labels):
        ab, ba = picks[2 * index], picks[2 * index + 1]
        if ab is None or ba is None:
            continue
        votes_for_a = (ab == "A") + (ba == "B")  # in order "ba", option (B) is response_a
        if votes_for_a == 1:
            continue  # the judge contradicts itself across orders: no label
        judged += 1
        agree += (votes_for_a == 2) == (label["p_a"] > 0.5)
    print(
        f"agreement with the judge: {agree}/{judged} comparisons where the judge was consistent across "
        f"orders ({unparsed} of {len(picks)} judge outputs had no parseable (A)/(B))"
    )


def _parse_pick(text: str) -> str | None:
    match = re.search(r"\(?\b([AB])\b\)?", text)
    return match.group(1) if match else None


@torch.inference_mode()
def _raw_forward(backend, prompts: list[str]) -> None:
    """Plain batched forward passes (left padded, logits at the last position), no tricks."""
    encoded = [prompt_token_ids(backend.tokenizer, prompt) for prompt in prompts]
    for batch in _length_sorted_batches([len(ids) for ids in encoded], backend.batch_size):
        inputs = backend.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
        positions = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        backend.model(**inputs, position_ids=positions, logits_to_keep=1)


if __name__ == "__main__":
    main()
