"""Quality: agreement of AI feedback labels with the human labels of HH-RLHF harmlessness pairs.

In `harmless-base-test` the human `chosen` answer is the less harmful one. Each comparison puts
the chosen answer at (A) or (B) at random; a label agrees when p_a > 0.5 exactly when A is the
chosen answer (p_a = 0.5 counts as half). Chance is 50%.

One debiased run yields two figures: the A/B reading alone (no debiasing) and the average of both
orders (debiased). `--cot N` adds a chain-of-thought run on the first N comparisons.

    python bench/feedback_agreement.py [--comparisons 200] [--cot 60] [--model embedded]
"""

from __future__ import annotations

import argparse
import time

from constitutional.backends.transformers import load as load_transformers
from constitutional.comparisons import label_comparisons
from constitutional.config import config_from_dict
from constitutional.constitution import load_constitution

from feedback_throughput import comparisons_from_hh


def agreement(probabilities: list[float], chosen_is_a: list[bool]) -> float:
    """Share of comparisons where the label prefers the human's choice (ties count half)."""
    score = 0.0
    for p_a, a_is_chosen in zip(probabilities, chosen_is_a):
        score += 0.5 if p_a == 0.5 else float((p_a > 0.5) == a_is_chosen)
    return score / len(probabilities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", type=int, default=200)
    parser.add_argument("--cot", type=int, default=60, help="comparisons for the chain-of-thought run (0: skip)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--num-fewshot", type=int, default=2)
    parser.add_argument("--constitution", default="default")
    args = parser.parse_args()

    config = config_from_dict({"feedback": {"num_fewshot": args.num_fewshot, "cot_max_new_tokens": 64}})
    backend = load_transformers(args.model, config.transformers, config.base_dir, config.seed)
    constitution = load_constitution(args.constitution)
    comparisons, chosen_is_a = comparisons_from_hh(args.comparisons, seed=0)
    print(
        f"{len(comparisons)} HH-RLHF harmlessness comparisons, model {args.model}, constitution "
        f"{constitution.name}, {args.num_fewshot} few-shot examples; chance = 50%"
    )

    started = time.perf_counter()
    labels = label_comparisons(backend, constitution, comparisons, config.feedback, seed=0)
    seconds = time.perf_counter() - started
    first_order = [next(r["p_a"] for r in label["readings"] if r["order"] == "ab") for label in labels]
    print(f"without debiasing (A/B order only): {agreement(first_order, chosen_is_a):.1%}")
    print(
        f"with debiasing (both orders averaged): {agreement([label['p_a'] for label in labels], chosen_is_a):.1%} "
        f"({seconds:.0f} s)"
    )
    picks_a = sum(p > 0.5 for p in first_order) / len(first_order)
    print(f"position bias: the A/B reading picks (A) {picks_a:.1%} of the time")

    if args.cot:
        cot_settings = config_from_dict(
            {"feedback": {"num_fewshot": args.num_fewshot, "cot": True, "debias": False, "cot_max_new_tokens": 64}}
        ).feedback
        started = time.perf_counter()
        cot_labels = label_comparisons(backend, constitution, comparisons[: args.cot], cot_settings, seed=0)
        seconds = time.perf_counter() - started
        cot_p = [label["p_a"] for label in cot_labels]
        print(
            f"with chain-of-thought (A/B order, clamped to [0.4, 0.6]), first {len(cot_labels)}: "
            f"{agreement(cot_p, chosen_is_a[: args.cot]):.1%} ({seconds:.0f} s); same comparisons without: "
            f"{agreement(first_order[: args.cot], chosen_is_a[: args.cot]):.1%}"
        )
        print(f"sample reasoning: {cot_labels[0]['reasoning'][:300]!r}")


if __name__ == "__main__":
    main()
