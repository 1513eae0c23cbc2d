"""Stage `critique` (paper steps 1-3): answer red-team prompts, then critique and revise.

For every red-team prompt the helpful model writes an answer; then, for `critique.rounds` rounds,
it critiques its latest answer against a principle sampled from the constitution (a fresh one
each round) and revises it. Each helpfulness prompt is answered `critique.helpful_samples` times at
`critique.helpful_temperature` (the paper: 2 samples at T = 1), every sample an SL example. Output:
`data/critiques.jsonl`, one record per prompt.

Prompts move through the rounds in chunks: all prompts of a chunk share each generate call (the
back end batches them), and a chunk's records are appended as soon as its last round is done.
With the generation cache, an interrupted chunk costs nothing to redo.

Every generated turn is checked: empty or looping output, and output that copies a long span of
a few-shot example (small base models do), is flagged and never becomes `final_response` (nor an SL
example: `sl` skips flagged revisions and helpful samples).

When stage `augment` made prompts (`data/augmented_prompts.jsonl`), each kind's are answered after
that kind's source prompts (`data.max_*` caps the source prompts only); their records keep the
augmented ids (`aug-rt-…`, `aug-hp-…`). With `augment.red_team` or `augment.helpful` set the file
is required (stage `augment` must have run); either way a change to it makes this stage stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional.backends import Backend, SamplingParams
from constitutional.chunks import append_in_chunks
from constitutional.constitution import Constitution, CritiquePrinciple, load_constitution, sample_principles
from constitutional.errors import UserError, require, require_positive
from constitutional.prompts import (
    COPIED_FEWSHOT,
    STOP_STRINGS,
    FewshotEcho,
    Turn,
    degeneracy,
    render,
    trim_at_turn_marker,
)
from constitutional.records import numbered_records, read_records
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, runtime
from constitutional.seeding import seed_for
from constitutional.sources import PromptItem, load_prompts

NAME = "critique"
# Config keys outside its own section that shape its output (fingerprinted in the manifest).
CONFIG_KEYS = (
    "seed",
    "constitution",
    "models.helpful",
    "data.red_team",
    "data.helpful",
    "data.max_red_team",
    "data.max_helpful",
    "augment.red_team",  # whether the augmented prompts are required (they are fingerprinted either way)
    "augment.helpful",
)
# The id prefix of prompts stage `augment` wrote (`aug-rt-…`, `aug-hp-…`).
AUGMENTED_PREFIX = "aug-"
KINDS = ("red_team", "helpful")


@dataclass
class Settings:
    """Config section `critique` (paper steps 1-3)."""

    rounds: int = 4  # critique-revision rounds, a freshly sampled principle each (paper: 4)
    max_new_tokens: int = 128  # per answer, critique and revision
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_fewshot: int | None = None  # critique/revision examples in the prompt (None: all)
    helpful_samples: int = 2  # answers sampled per helpfulness prompt, each an SL example (paper: 2)
    helpful_temperature: float = 1.0  # their temperature (paper: T = 1); top_p and max_new_tokens as above
    chunk_size: int = runtime(32)  # prompts carried through all rounds together, then written out

    def validate(self) -> None:
        require(self.rounds >= 0, f"critique.rounds: expected 0 or more, got {self.rounds}")
        require_positive("critique.max_new_tokens", self.max_new_tokens)
        require_positive("critique.chunk_size", self.chunk_size)
        require(self.temperature >= 0, f"critique.temperature: expected 0 or more, got {self.temperature}")
        require_positive("critique.helpful_samples", self.helpful_samples)
        require(
            self.helpful_temperature >= 0,
            f"critique.helpful_temperature: expected 0 or more, got {self.helpful_temperature}",
        )
        require(0 < self.top_p <= 1, f"critique.top_p: expected a number in (0, 1], got {self.top_p}")
        require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            f"critique.num_fewshot: expected 0 or more, got {self.num_fewshot}",
        )


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """The augmented prompts when stage `augment` is set to make some; else none (optional_reads)."""
    return ["augmented_prompts"] if _augmenting(config) else []


def optional_reads(config: CoreConfig, settings: Settings) -> list[str]:
    """The augmented prompts, used when the file exists: fingerprinted, so new ones make the stage stale."""
    return [] if _augmenting(config) else ["augmented_prompts"]


def _augmenting(config: CoreConfig) -> bool:
    """Whether stage `augment` is set to make prompts (then they must exist before critique runs)."""
    return config.augment.red_team > 0 or config.augment.helpful > 0


@dataclass
class Inputs:
    """Everything the stage reads, loaded and validated before anything is written."""

    constitution: Constitution
    red_team: list[PromptItem]
    helpful: list[PromptItem]
    assistant_preamble: str


def check(config: CoreConfig, settings: Settings) -> Inputs:
    """Load and validate the stage's inputs (constitution, prompts, model name); writes nothing."""
    config.check_model(config.models.helpful, "models.helpful")
    constitution = load_constitution(config.constitution, config.base_dir)
    red_team = load_prompts(
        config.data.red_team,
        prefix="rt",
        limit=config.data.max_red_team,
        base_dir=config.base_dir,
        builtin="red_team_prompts.jsonl",
    )
    helpful = load_prompts(
        config.data.helpful,
        prefix="hp",
        limit=config.data.max_helpful,
        base_dir=config.base_dir,
        builtin="helpful_prompts.jsonl",
    )
    preamble = resources.files("constitutional").joinpath("assets/assistant_fewshot.txt").read_text("utf-8")
    return Inputs(constitution, red_team, helpful, preamble)


def input_hashes(inputs: Inputs) -> dict[str, str]:
    """Fingerprints of what the stage read from outside the run directory, for the manifest."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    return {
        # Only the parts this stage uses: a change elsewhere in the constitution leaves it fresh.
        "constitution": digest(repr((inputs.constitution.critique_principles, inputs.constitution.critique_fewshot))),
        "red_team": digest([item.id for item in inputs.red_team]),
        "helpful": digest([item.id for item in inputs.helpful]),
        "assistant_preamble": digest(inputs.assistant_preamble),
    }


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Run the stage, resuming from the records already in `data/critiques.jsonl`.

    Returns:
        Counts for the manifest.
    """
    output = run_dir.path("critiques")
    augmented = augmented_prompts(run_dir.path("augmented_prompts"))
    sources = {"red_team": inputs.red_team, "helpful": inputs.helpful}
    items = [(item, kind) for kind in KINDS for item in sources[kind] + augmented[kind]]

    def process(
        backend: Backend, chunk: list[tuple[PromptItem, str]], advance: Callable[[int], Any]
    ) -> list[dict[str, Any]]:
        return CritiqueWriter(config, settings, inputs, backend, on_turns=advance).process(chunk)

    # The bar counts generated turns (answers, critiques, revisions): records only appear at the
    # end of each chunk, turns show steady progress with a meaningful rate and ETA.
    append_in_chunks(
        output,
        items,
        lambda pair: pair[0].id,
        lambda: config.open_backend(config.models.helpful, run_dir.cache_path),
        process,
        chunk_size=settings.chunk_size,
        desc="critique",
        unit="turn",
        units=lambda pair: 1 + 2 * settings.rounds if pair[1] == "red_team" else settings.helpful_samples,
        shard=run_dir.shard,
    )
    return summarize(read_records(output))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Record counts for the manifest: totals by kind and how many carry which flags."""
    return {
        "records": len(records),
        "red_team": sum(record["kind"] == "red_team" for record in records),
        "helpful": sum(record["kind"] == "helpful" for record in records),
        "augmented": sum(record["id"].startswith(AUGMENTED_PREFIX) for record in records),
        "helpful_samples": sum(len(record.get("helpful_samples", ())) for record in records),
        "flagged": sum(bool(record["flags"]) for record in records),
        "copied_fewshot": sum(
            any(flag.endswith(":" + COPIED_FEWSHOT) for flag in record["flags"]) for record in records
        ),
        "without_usable_final_response": sum(not record["final_response"] for record in records),
    }


def augmented_prompts(path: Path) -> dict[str, list[PromptItem]]:
    """The prompts stage `augment` wrote, by kind, in file order (none when there is no file).

    Raises:
        UserError: a record without a string `id` and a non-empty `prompt`, with another `kind`, or
            with an id seen before, naming `file:line`.
    """
    found: dict[str, list[PromptItem]] = {kind: [] for kind in KINDS}
    seen: set[str] = set()
    for number, record in numbered_records(path):
        where, kind = f"{path}:{number}", record.get("kind")
        if kind not in found:
            raise UserError(f"{where}: field 'kind': expected red_team or helpful, got {kind!r}")
        record_id, prompt = record.get("id"), record.get("prompt")
        if not (isinstance(record_id, str) and isinstance(prompt, str) and prompt.strip()):
            raise UserError(f"{where}: expected a string 'id' and a non-empty string 'prompt'")
        if record_id in seen:
            raise UserError(f"{where}: id {record_id!r} appears twice")
        seen.add(record_id)
        found[kind].append(PromptItem(record_id, prompt))
    return found


class CritiqueWriter:
    """Carries a chunk of prompts through answer, critique and revision rounds."""

    def __init__(
        self,
        config: CoreConfig,
        settings: Settings,
        inputs: Inputs,
        backend: Backend,
        on_turns: Callable[[int], Any] | None = None,
    ):
        """
        Args:
            config: the run's config (seed, models.helpful).
            settings: the `critique` section.
            inputs: what `check` loaded.
            backend: the helpful model.
            on_turns: called with the number of turns generated after each generate call (progress).
        """
        self.on_turns = on_turns or (lambda count: None)
        self.seed = config.seed
        self.rounds = settings.rounds
        self.backend = backend
        self.constitution = inputs.constitution
        self.assistant_preamble = inputs.assistant_preamble
        fewshot = inputs.constitution.critique_fewshot
        self.critique_fewshot = fewshot if settings.num_fewshot is None else fewshot[: settings.num_fewshot]
        # Spans of the examples in the prompt: output that reproduces one is flagged.
        self.echo = FewshotEcho([self.assistant_preamble, *self.critique_fewshot])
        self.prompt_format = config.models.helpful.prompt_format
        self.params = SamplingParams(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=STOP_STRINGS,
        )
        self.helpful_samples = settings.helpful_samples
        self.helpful_params = SamplingParams(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.helpful_temperature,
            top_p=settings.top_p,
            stop=STOP_STRINGS,
        )

    def process(self, chunk: Sequence[tuple[PromptItem, str]]) -> list[dict[str, Any]]:
        """Answer every prompt of the chunk, then run the critique-revision rounds on red-team ones.

        Returns:
            One finished record per prompt, in chunk order.
        """
        records = [self._new_record(item, kind) for item, kind in chunk]
        red_team = [(item, record) for (item, _), record in zip(chunk, records) if record["kind"] == "red_team"]
        helpful = [(item, record) for (item, _), record in zip(chunk, records) if record["kind"] == "helpful"]
        answers = self._generate(
            [self._render(item, [], "assistant", [self.assistant_preamble]) for item, _ in red_team],
            [seed_for(self.seed, item.id, "answer") for item, _ in red_team],
        )
        for (_, record), answer in zip(red_team, answers):
            record["initial_response"] = answer
            self._flag(record, "initial_response", answer)
        self._sample_helpful(helpful)
        principles = {
            item.id: sample_principles(self.constitution.critique_principles, self.rounds, self.seed, item.id)
            for item, _ in red_team
        }
        for round_index in range(self.rounds):
            self._critique_round(red_team, principles, round_index)
        for record in records:
            record["final_response"] = _final_response(record)
            if not record["final_response"]:
                record["flags"].append("final_response:none")
        return records

    def _sample_helpful(self, helpful: list[tuple[PromptItem, dict[str, Any]]]) -> None:
        """`helpful_samples` answers per helpfulness prompt at `helpful_temperature`, one seed per sample.

        `initial_response` is the first sample (what readers of older records read).
        """
        requests = [(item, record, index) for item, record in helpful for index in range(self.helpful_samples)]
        texts = self._generate(
            [self._render(item, [], "assistant", [self.assistant_preamble]) for item, _, _ in requests],
            [helpful_sample_seed(self.seed, item.id, index) for item, _, index in requests],
            self.helpful_params,
        )
        for (_, record, index), text in zip(requests, texts):
            record["helpful_samples"].append(text)
            self._flag(record, f"helpful_samples[{index}]", text)
        for _, record in helpful:
            record["initial_response"] = record["helpful_samples"][0]

    def _critique_round(
        self,
        red_team: list[tuple[PromptItem, dict[str, Any]]],
        principles: dict[str, list[CritiquePrinciple]],
        round_index: int,
    ) -> None:
        """One round: a critique of each latest answer, then a revision that follows it."""
        current = [_final_response(record) or record["initial_response"] for _, record in red_team]
        chosen = [principles[item.id][round_index] for item, _ in red_team]
        step = str(round_index)

        def conversation(position: int) -> list[Turn]:
            return [("assistant", current[position]), ("critique_request", chosen[position].critique_request)]

        critiques = self._generate(
            [
                self._render(item, conversation(i), "critique", self.critique_fewshot)
                for i, (item, _) in enumerate(red_team)
            ],
            [seed_for(self.seed, item.id, step, "critique") for item, _ in red_team],
        )
        revisions = self._generate(
            [
                self._render(
                    item,
                    conversation(i) + [("critique", critiques[i]), ("revision_request", chosen[i].revision_request)],
                    "revision",
                    self.critique_fewshot,
                )
                for i, (item, _) in enumerate(red_team)
            ],
            [seed_for(self.seed, item.id, step, "revision") for item, _ in red_team],
        )
        for (_, record), principle, critique, revision in zip(red_team, chosen, critiques, revisions):
            position = len(record["revisions"])
            record["revisions"].append({"principle_id": principle.id, "critique": critique, "revision": revision})
            self._flag(record, f"revisions[{position}].critique", critique)
            self._flag(record, f"revisions[{position}].revision", revision)

    def _render(self, item: PromptItem, after_prompt: list[Turn], next_role: str, preamble: Sequence[str]) -> str:
        """The conversation so far (history, the prompt, then `after_prompt`) ready for `next_role`."""
        turns = list(item.history) + [("human", item.prompt)] + after_prompt
        return render(self.backend, self.prompt_format, turns, next_role, preamble)

    def _generate(self, prompts: list[str], seeds: list[int], params: SamplingParams | None = None) -> list[str]:
        if not prompts:  # a chunk of one kind only: no call for the other
            return []
        texts = [trim_at_turn_marker(text) for text in self.backend.generate(prompts, params or self.params, seeds)]
        self.on_turns(len(texts))
        return texts

    @staticmethod
    def _new_record(item: PromptItem, kind: str) -> dict[str, Any]:
        record: dict[str, Any] = {"id": item.id, "kind": kind, "prompt": item.prompt}
        if item.history:
            record["history"] = [{"role": role, "text": text} for role, text in item.history]
        record["initial_response"] = ""
        if kind == "helpful":
            record["helpful_samples"] = []
        record.update(revisions=[], final_response="", flags=[])
        return record

    def _flag(self, record: dict[str, Any], field: str, text: str) -> None:
        problem = degeneracy(text) or (COPIED_FEWSHOT if self.echo.copies(text) else None)
        if problem:
            record["flags"].append(f"{field}:{problem}")


def helpful_sample_seed(seed: int, record_id: str, index: int) -> int:
    """The seed of helpfulness sample `index` of a prompt: its own per (prompt, index), never its batch's.

    Sample 0 keeps the seed of the single answer of before, so `helpful_samples: 1` at the critique
    temperature makes the same records (and hits the same cache entries) as then.
    """
    return seed_for(seed, record_id, "answer") if index == 0 else seed_for(seed, record_id, "answer", str(index))


def _final_response(record: dict[str, Any]) -> str:
    """The latest answer that is not flagged: the last good revision, else the initial answer, else "".

    A helpful record's is its first unflagged sample.
    """
    flagged = {flag.rsplit(":", 1)[0] for flag in record["flags"]}
    if "helpful_samples" in record:
        samples = enumerate(record["helpful_samples"])
        return next((text for index, text in samples if f"helpful_samples[{index}]" not in flagged), "")
    for position in range(len(record["revisions"]) - 1, -1, -1):
        if f"revisions[{position}].revision" not in flagged:
            return record["revisions"][position]["revision"]
    return "" if "initial_response" in flagged else record["initial_response"]
