"""Stage `feedback` (paper step 6): AI preference labels from a multiple-choice question.

The feedback model reads a conversation, one principle sampled from the constitution's feedback
principles, and two answers as options (A) and (B), after a few worked examples, and the soft
label is the normalised probability of " (A)" versus " (B)" read from the model's log-probabilities
(one scoring pass per option order), never from parsing generated text.

Options, all studied in the paper or after it:
- `feedback.debias`: ask in both orders, A/B and B/A, and average (language models favour a
  position);
- `feedback.principles_per_comparison` = k > 1: average over k sampled principles (the paper's
  ensembling);
- `feedback.cot`: the model first writes its reasoning ("Let's think step by step"), then the
  option probabilities are read after it and clamped to [clamp_low, clamp_high] (the paper: 40-60%,
  since chain-of-thought makes the model overconfident);
- `feedback.hard_labels`: round to 0/1 (ablation).

Each comparison's principle is drawn from a stream of its own ("feedback:<id>"), apart from the
critique principles of the same prompt, and each few-shot example is shown with its own,
independently drawn principle (the paper, section 4.1).

Output: `data/ai_labels.jsonl`, one record per pair with `p_a`, the principle ids, with both orders
`orders_agree`, and every reading (principle, order, probability, reasoning); `eval/feedback.json`,
the labels' position-flip rate and length bias with 95% intervals (`label_diagnostics`), also in the
manifest's counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from constitutional.backends import Backend
from constitutional.chunks import append_in_chunks
from constitutional.comparisons import LabelOptions, label_comparisons
from constitutional.constitution import Constitution, load_constitution
from constitutional.errors import require_positive
from constitutional.label_diagnostics import label_diagnostics
from constitutional.records import read_pairs, read_records, write_json_atomic
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, runtime

NAME = "feedback"
CONFIG_KEYS = ("seed", "constitution", "models.feedback")


@dataclass
class Settings(LabelOptions):
    """Config section `feedback` (paper step 6): how the feedback model is asked (see LabelOptions)."""

    chunk_size: int = runtime(32)

    def validate(self) -> None:
        self.check("feedback")
        require_positive("feedback.chunk_size", self.chunk_size)


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    return ["pairs"]


def check(config: CoreConfig, settings: Settings) -> Constitution:
    """Validate the feedback model and load the constitution; writes nothing."""
    config.check_model(config.models.feedback, "models.feedback", scores_options=True)
    return load_constitution(config.constitution, config.base_dir)


def input_hashes(constitution: Constitution) -> dict[str, str]:
    """A fingerprint of the parts of the constitution this stage uses (principles and examples)."""
    used = (constitution.feedback_principles, constitution.feedback_fewshot, constitution.cot_fewshot)
    return {"constitution": hashlib.sha256(repr(used).encode("utf-8")).hexdigest()[:16]}


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, constitution: Constitution) -> dict[str, Any]:
    """Label every pair of `data/pairs.jsonl`, resuming from the labels already written."""
    pairs = read_pairs(run_dir.path("pairs"))

    def process(backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        return label_comparisons(backend, constitution, chunk, settings, config.seed)

    output = run_dir.path("ai_labels")
    append_in_chunks(
        output,
        pairs,
        lambda pair: pair["id"],
        lambda: config.open_backend(config.models.feedback, run_dir.cache_path),
        process,
        chunk_size=settings.chunk_size,
        desc="feedback",
        unit="pair",
        shard=run_dir.shard,
    )
    labels = read_records(output)
    diagnostics = label_diagnostics(labels)
    if run_dir.shard is None:  # a shard's figures cover its share only; the report rebuilds them after a merge
        write_json_atomic(run_dir.path("feedback_report"), diagnostics)
    return {
        "pairs": len(pairs),
        "labels": len(labels),
        "mean_p_a": round(sum(label["p_a"] for label in labels) / max(1, len(labels)), 4),
        # Which way the option log-probs were read (a server's echo or top_logprobs, a forward pass).
        "scoring_methods": sorted({str(label.get("scoring_method")) for label in labels}),
        "position_flip": diagnostics["position_flip"],
        "length_bias": diagnostics["length_bias"],
    }
