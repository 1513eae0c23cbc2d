"""Stage `augment` (the paper's prompt augmentation): a pretrained model writes more prompts.

Bai et al. 2022 (section 3) added 140,335 model-generated red-team prompts to the 42,496
human-written ones by few-shot prompting a pretrained language model with the human prompts. This
stage does the same for the kinds it is asked for: `augment.red_team` new red-team prompts modelled
on `data.red_team`, `augment.helpful` new helpfulness prompts modelled on `data.helpful`. Both
default to 0: the stage then reads nothing, writes nothing and is done at once.

Each new prompt fills a slot (0, 1, ... per kind). Attempt `a` of a slot shows the model
`augment.num_fewshot` human prompts, sampled for (kind, slot, a), as a numbered list under the
header of `assets/augment_fewshot.yaml`, and samples the next item with the seed
`seed_for(seed, "augment", kind, slot, a)`. The item is cleaned (its first line, numbering and
quotes stripped, spaces collapsed) and dropped when it is empty, loops, holds a control character,
undecodable bytes or a turn marker, is outside `[min_chars, max_chars]`, or equals after
normalisation (case, punctuation, spacing) a prompt of its source or the prompt of an earlier slot.
A dropped attempt is followed by the next, up to `augment.max_attempts`; a slot whose attempts
all drop is a shortfall (counted, no record). Slots are settled in order, so the result is that of
making them one at a time: it never depends on batching, chunking or resumes.

Output: `data/augmented_prompts.jsonl`, one record per kept prompt: `id` (`aug-rt-<hash>` or
`aug-hp-<hash>`, a content hash of the prompt as a source's `rt-`/`hp-` ids are, so never equal to
one), `kind`, `prompt`, `fewshot_ids` (the source prompts shown), `slot`, and `dropped` (why each
earlier attempt of the slot was dropped). Stage `critique` answers them after the source prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from constitutional.backends import Backend, SamplingParams
from constitutional.chunks import append_in_chunks
from constitutional.constitution import sample_principles
from constitutional.errors import UserError, require, require_positive
from constitutional.prompts import PLAIN_LABELS, degeneracy
from constitutional.records import read_records
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, ModelSpec, runtime
from constitutional.seeding import seed_for
from constitutional.sources import PromptItem, _content_id, load_prompts

log = logging.getLogger(__name__)

NAME = "augment"
# models.base is the default model (its name only: the model continues raw text, so its
# prompt_format is not used); data.* the sources the examples come from.
CONFIG_KEYS = ("seed", "models.base.name", "data.red_team", "data.helpful")
# Per kind: the id prefix and built-in set of its source (as stage `critique` loads it), and the
# id prefix of the prompts made here.
SOURCES = {"red_team": ("rt", "red_team_prompts.jsonl"), "helpful": ("hp", "helpful_prompts.jsonl")}
PREFIX = {"red_team": "aug-rt", "helpful": "aug-hp"}
TEMPLATE = "assets/augment_fewshot.yaml"


@dataclass
class Settings:
    """Config section `augment` (the paper's model-generated prompts); off (0 and 0) by default."""

    red_team: int = 0  # new red-team prompts (paper: 140,335 beside 42,496 human-written); 0: none
    helpful: int = 0  # new helpfulness prompts; 0: none
    model: ModelSpec | None = None  # the pretrained model that writes them (default: models.base)
    num_fewshot: int = 8  # human prompts shown per request, sampled afresh for each
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 64  # per prompt (the line ends it sooner)
    min_chars: int = 10  # shorter prompts are dropped; so are source prompts as examples
    max_chars: int = 300  # longer prompts are dropped; so are source prompts as examples
    max_attempts: int = 4  # draws per prompt: a dropped one is drawn again with the next seed
    chunk_size: int = runtime(64)  # prompts settled together, then written out

    def validate(self) -> None:
        for key in ("red_team", "helpful"):
            value = getattr(self, key)
            require(value >= 0, f"augment.{key}: expected 0 or more, got {value}")
        for key in ("num_fewshot", "max_new_tokens", "min_chars", "max_attempts", "chunk_size"):
            require_positive(f"augment.{key}", getattr(self, key))
        require(
            self.max_chars >= self.min_chars,
            f"augment.max_chars: expected at least augment.min_chars ({self.min_chars}), got {self.max_chars}",
        )
        require(self.temperature >= 0, f"augment.temperature: expected 0 or more, got {self.temperature}")
        require(0 < self.top_p <= 1, f"augment.top_p: expected a number in (0, 1], got {self.top_p}")

    def wanted(self) -> dict[str, int]:
        """{kind: how many new prompts} for the kinds asked for."""
        return {kind: getattr(self, kind) for kind in SOURCES if getattr(self, kind) > 0}


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """Artefacts of the run directory the stage reads: none, it comes first."""
    return []


def active(config: CoreConfig, settings: Settings) -> bool:
    """Whether the stage makes anything. Off, its output depends on its own section alone (it makes
    nothing whatever `models.base` or `data.*` say), which is all its settings should then hold."""
    return bool(settings.wanted())


@dataclass
class Source:
    """One kind's human prompts: the examples new ones are modelled on, and what they must differ from.

    Attributes:
        examples: (source id, one-line text) of the prompts a few-shot list may show: each
            conversation's first Human turn, of `min_chars` to `max_chars` characters.
        known: normalised texts of every prompt of the source (first and last Human turns).
        ids: every source prompt's id, in order (fingerprinted).
    """

    examples: list[tuple[str, str]]
    known: set[str]
    ids: list[str]


@dataclass
class Inputs:
    """What `check` loaded: nothing when the stage is off (`model` None)."""

    model: ModelSpec | None
    sources: dict[str, Source]
    headers: dict[str, str]


def check(config: CoreConfig, settings: Settings) -> Inputs:
    """Load and validate the model and the sources of the kinds asked for; writes nothing.

    Raises:
        UserError: an unknown model; a source that is missing, malformed or holds no usable example.
    """
    wanted = settings.wanted()
    if not wanted:
        return Inputs(None, {}, {})
    spec = settings.model or config.models.base
    config.check_model(spec, "augment.model" if settings.model else "models.base")
    sources = {kind: load_source(config, settings, kind) for kind in wanted}
    return Inputs(spec, sources, load_headers())


def load_source(config: CoreConfig, settings: Settings, kind: str) -> Source:
    """The whole of `data.<kind>` (`data.max_<kind>` caps what critique answers, not what is shown here)."""
    spec = getattr(config.data, kind)
    prefix, builtin = SOURCES[kind]
    items = load_prompts(spec, prefix=prefix, base_dir=config.base_dir, builtin=builtin)
    examples: list[tuple[str, str]] = []
    known: set[str] = set()
    for item in items:
        first = " ".join(_first_turn(item).split())
        if settings.min_chars <= len(first) <= settings.max_chars and normalise(first) not in known:
            examples.append((item.id, first))
        known.update((normalise(first), normalise(item.prompt)))
    if not examples:
        raise UserError(
            f"data.{kind}: {spec}: no prompt of {settings.min_chars} to {settings.max_chars} characters "
            f"to show as an example for augment.{kind}"
        )
    return Source(examples, known, [item.id for item in items])


def _first_turn(item: PromptItem) -> str:
    """A conversation's first Human turn: it stands alone, where a later turn may lean on earlier ones."""
    if item.history and item.history[0][0] == "human":
        return item.history[0][1]
    return item.prompt


def load_headers() -> dict[str, str]:
    """The header of each kind's few-shot list (`assets/augment_fewshot.yaml`)."""
    headers = yaml.safe_load(resources.files("constitutional").joinpath(TEMPLATE).read_text("utf-8"))
    return {kind: " ".join(headers[kind].split()) for kind in SOURCES}


def input_hashes(inputs: Inputs) -> dict[str, str]:
    """Fingerprints of the sources' prompt ids and of the headers (nothing when the stage is off)."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    if inputs.model is None:
        return {}
    return {**{kind: digest(source.ids) for kind, source in inputs.sources.items()}, "headers": digest(inputs.headers)}


@dataclass(frozen=True)
class Slot:
    """The place of one new prompt: its kind and its number within the kind."""

    kind: str
    index: int


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Make the new prompts, resuming from those already in `data/augmented_prompts.jsonl`.

    Returns:
        Counts for the manifest, per kind: requested, kept, generated, dropped by reason, shortfall.
    """
    if inputs.model is None:
        return summarize(settings, [], {})
    spec, output = inputs.model, run_dir.path("augmented_prompts")
    existing = read_records(output, repair=True)
    writer = PromptWriter(config.seed, settings, inputs, existing)
    # A slot on disk is known by its record's (content) id; a slot still to make by its place.
    made = {(record["kind"], record["slot"]): record["id"] for record in existing}
    slots = [Slot(kind, index) for kind, count in settings.wanted().items() for index in range(count)]

    def process(backend: Backend, chunk: list[Slot], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        return writer.process(backend, chunk, advance)

    append_in_chunks(
        output,
        slots,
        lambda slot: made.get((slot.kind, slot.index), f"{PREFIX[slot.kind]}#{slot.index}"),
        lambda: config.open_backend(spec, run_dir.cache_path),
        process,
        chunk_size=settings.chunk_size,
        desc="augment",
        unit="prompt",
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.touch()  # the stage ran: even a file with no prompt says so
    counts = summarize(settings, read_records(output), writer.shortfalls)
    for kind in settings.wanted():
        if counts[kind]["shortfall"]:
            log.warning(
                "augment: %d of %d %s prompts not made (all %d draws of each dropped); dropped draws: %s",
                counts[kind]["shortfall"], counts[kind]["requested"], kind, settings.max_attempts,
                ", ".join(f"{reason} {n}" for reason, n in counts[kind]["dropped"].items()),
            )  # fmt: skip
    return counts


def summarize(settings: Settings, records: list[dict[str, Any]], shortfalls: dict[Slot, list[str]]) -> dict[str, Any]:
    """Counts per kind from the records (each carries its dropped draws) and this run's shortfalls.

    A shortfall slot has no record, so it is made again by every run that resumes the stage: the
    shortfalls of the run that finished it are all there are.
    """
    counts: dict[str, Any] = {"records": len(records)}
    for kind in SOURCES:
        mine = [record for record in records if record["kind"] == kind]
        short = [reasons for slot, reasons in shortfalls.items() if slot.kind == kind]
        dropped = Counter(reason for record in mine for reason in record["dropped"])
        dropped.update(reason for reasons in short for reason in reasons)
        counts[kind] = {
            "requested": getattr(settings, kind),
            "kept": len(mine),
            "generated": len(mine) + sum(dropped.values()),
            "dropped": dict(sorted(dropped.items())),
            "shortfall": len(short),
        }
    return counts


@dataclass
class Candidate:
    """One draw for a slot: the cleaned item and the source prompts its few-shot list showed."""

    text: str
    fewshot_ids: list[str]


class PromptWriter:
    """Settles slots in order, drawing for every slot that needs a draw in one generate call a round.

    Slot order is the contract: a slot keeps its first draw that is clean and differs from its
    source and from every earlier slot's prompt. A draw found unusable is dropped at once (that can
    only get truer as earlier slots settle); a usable one is kept only once every earlier slot of
    its kind is settled, since one of them may still take the same text.
    """

    def __init__(self, seed: int, settings: Settings, inputs: Inputs, existing: list[dict[str, Any]]) -> None:
        """
        Args:
            seed: the run seed.
            settings: the `augment` section.
            inputs: what `check` loaded (stage on).
            existing: the records already written (a resumed stage): their prompts are taken.
        """
        self.seed, self.settings, self.inputs = seed, settings, inputs
        self.taken = {kind: {normalise(r["prompt"]) for r in existing if r["kind"] == kind} for kind in SOURCES}
        self.shortfalls: dict[Slot, list[str]] = {}
        self.params = SamplingParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, stop=("\n",)
        )

    def process(self, backend: Backend, chunk: list[Slot], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        """Settle every slot of the chunk.

        Returns:
            The records of the slots that kept a prompt, in slot order.
        """
        dropped: dict[Slot, list[str]] = {slot: [] for slot in chunk}
        pending: dict[Slot, Candidate] = {}
        settled: dict[Slot, dict[str, Any] | None] = {}
        while len(settled) < len(chunk):
            asks = [slot for slot in chunk if slot not in settled and slot not in pending]
            pending.update(zip(asks, self._draw(backend, asks, dropped)))
            before = len(settled)
            self._settle(chunk, pending, settled, dropped)
            advance(len(settled) - before)
        return [record for slot in chunk if (record := settled[slot]) is not None]

    def _settle(
        self,
        chunk: list[Slot],
        pending: dict[Slot, Candidate],
        settled: dict[Slot, dict[str, Any] | None],
        dropped: dict[Slot, list[str]],
    ) -> None:
        """One pass in slot order: drop unusable draws, keep usable ones where no earlier slot is open."""
        open_kinds: set[str] = set()  # kinds with an unsettled slot before the current one
        for slot in chunk:
            if slot in settled:
                continue
            candidate = pending.pop(slot)
            reason = self._problem(slot.kind, candidate.text)
            if reason is None and slot.kind not in open_kinds:
                settled[slot] = self._keep(slot, candidate, dropped[slot])
                continue
            if reason is None:
                pending[slot] = candidate  # usable so far: wait for the earlier slots
            else:
                dropped[slot].append(reason)
                if len(dropped[slot]) >= self.settings.max_attempts:
                    settled[slot] = None
                    self.shortfalls[slot] = dropped[slot]
                    continue
            open_kinds.add(slot.kind)

    def _draw(self, backend: Backend, slots: list[Slot], dropped: dict[Slot, list[str]]) -> list[Candidate]:
        """The next draw of each slot: a fresh few-shot list and seed per (slot, attempt)."""
        if not slots:
            return []
        prompts, seeds, shown = [], [], []
        for slot in slots:
            attempt = str(len(dropped[slot]))
            examples = self._examples(slot, attempt)
            prompts.append(fewshot_prompt(self.inputs.headers[slot.kind], [text for _, text in examples]))
            seeds.append(seed_for(self.seed, NAME, slot.kind, str(slot.index), attempt))
            shown.append([source_id for source_id, _ in examples])
        texts = backend.generate(prompts, self.params, seeds)
        return [Candidate(clean(text), ids) for text, ids in zip(texts, shown)]

    def _examples(self, slot: Slot, attempt: str) -> list[tuple[str, str]]:
        """The source prompts one draw shows: `num_fewshot` distinct ones, seeded by (kind, slot, attempt)."""
        examples = self.inputs.sources[slot.kind].examples
        count = min(self.settings.num_fewshot, len(examples))
        return sample_principles(examples, count, self.seed, f"{NAME}:{slot.kind}:{slot.index}:{attempt}")

    def _problem(self, kind: str, text: str) -> str | None:
        """Why a cleaned draw cannot be kept now, or None."""
        reason = problem(text, self.settings.min_chars, self.settings.max_chars)
        if reason is not None:
            return reason
        key = normalise(text)
        if key in self.inputs.sources[kind].known:
            return "duplicate_source"
        return "duplicate" if key in self.taken[kind] else None

    def _keep(self, slot: Slot, candidate: Candidate, dropped: list[str]) -> dict[str, Any]:
        self.taken[slot.kind].add(normalise(candidate.text))
        return {
            "id": augmented_id(slot.kind, candidate.text),
            "kind": slot.kind,
            "prompt": candidate.text,
            "fewshot_ids": candidate.fewshot_ids,
            "slot": slot.index,
            "dropped": list(dropped),
        }


# ----------------------------------------------------------------------------- text

_NUMBERING = re.compile(r"^(?:\d+\s*[.)]|[-*\u2022])\s*")
_TURN_LABEL = re.compile(r"\b(?:" + "|".join(PLAIN_LABELS.values()) + r")\s*:")
_PUNCTUATION = re.compile(r"[^\w\s]")
# Control characters and U+FFFD (a byte sequence that did not decode): broken text, not a prompt.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


def fewshot_prompt(header: str, examples: list[str]) -> str:
    """The numbered list the model continues: the header, the examples, and the next number."""
    items = "\n".join(f"{number}. {text}" for number, text in enumerate(examples, start=1))
    return f"{header}\n\n{items}\n{len(examples) + 1}."


def clean(text: str) -> str:
    """A generated list item as a prompt: its first line, without numbering, quotes or extra spaces."""
    line = text.strip().split("\n", 1)[0].strip()
    line = " ".join(_NUMBERING.sub("", line, count=1).split())
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def problem(text: str, min_chars: int, max_chars: int) -> str | None:
    """Why a cleaned item is no prompt (`empty`, `repetitive`, `unprintable`, `turn_marker`, `too_short`,
    `too_long`), or None."""
    reason = degeneracy(text)
    if reason is not None:
        return reason
    if _UNPRINTABLE.search(text):
        return "unprintable"
    if _TURN_LABEL.search(text):
        return "turn_marker"
    if len(text) < min_chars:
        return "too_short"
    return "too_long" if len(text) > max_chars else None


def normalise(text: str) -> str:
    """What two prompts must differ in: words, lowercased, punctuation and spacing ignored."""
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def augmented_id(kind: str, prompt: str) -> str:
    """`aug-rt-<hash>` / `aug-hp-<hash>`: the content hash a source prompt gets, under its own prefix."""
    return _content_id(PREFIX[kind], (), prompt)
