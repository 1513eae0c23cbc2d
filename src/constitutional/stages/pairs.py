"""Stage `pairs` (paper step 5): SL-CAI samples two answers per red-team prompt.

Both answers come from the same prompt at `pairs.temperature` (the paper: T = 1), each with its own
seed. Pairs whose two answers are identical carry no preference signal and are dropped (counted
in the manifest). Output: `data/pairs.jsonl` with `id`, `prompt`, `response_a`, `response_b`
(and `history` for multi-turn prompts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from constitutional.backends import Backend, SamplingParams, import_backend
from constitutional.chunks import append_in_chunks
from constitutional.comparisons import sample_pairs
from constitutional.errors import UserError, require, require_positive
from constitutional.prompts import STOP_STRINGS
from constitutional.records import read_critiques, read_records
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, ModelSpec, runtime

NAME = "pairs"
CONFIG_KEYS = ("seed",)  # SL-CAI (or pairs.model) is fingerprinted as an input


@dataclass
class Settings:
    """Config section `pairs` (paper step 5): SL-CAI samples two answers per red-team prompt."""

    model: str | None = None  # default: the run's models/sl-cai
    temperature: float = 1.0  # the paper: T = 1
    top_p: float = 1.0
    max_new_tokens: int = 128
    chunk_size: int = runtime(32)

    def validate(self) -> None:
        require(
            self.temperature > 0,
            f"pairs.temperature: expected a positive number (two samples must differ), got {self.temperature}",
        )
        require(0 < self.top_p <= 1, f"pairs.top_p: expected a number in (0, 1], got {self.top_p}")
        require_positive("pairs.max_new_tokens", self.max_new_tokens)
        require_positive("pairs.chunk_size", self.chunk_size)


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """The critiques (for the red-team prompts) and SL-CAI, unless `pairs.model` names another model."""
    return ["critiques"] if settings.model else ["critiques", "sl_cai"]


def check(config: CoreConfig, settings: Settings) -> ModelSpec | None:
    """Validate the model; SL-CAI itself only exists once stage `sl` has run."""
    if settings.model is None:
        import_backend(config.backend_for(config.models.base))  # SL-CAI is served by the base model's back end
        return None
    spec = ModelSpec(name=settings.model, backend=config.models.base.backend, prompt_format="plain")
    config.check_model(spec, "pairs.model")
    return spec


def input_hashes(inputs: ModelSpec | None) -> dict[str, str]:
    """The model named by `pairs.model` (SL-CAI is fingerprinted as a run artefact)."""
    return {"model": inputs.name} if inputs else {}


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: ModelSpec | None) -> dict[str, Any]:
    """Sample two answers per red-team prompt, resuming from the pairs already written.

    Returns:
        Counts for the manifest.
    """
    spec = inputs or sl_cai_spec(config, run_dir)
    prompts = [record for record in read_critiques(run_dir.path("critiques")) if record["kind"] == "red_team"]
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop=STOP_STRINGS,
    )

    def process(backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        return sample_pairs(backend, chunk, params, config.seed)

    output = run_dir.path("pairs")
    append_in_chunks(
        output,
        prompts,
        lambda record: record["id"],
        lambda: config.open_backend(spec, run_dir.cache_path),
        process,
        chunk_size=settings.chunk_size,
        desc="pairs",
        unit="prompt",
        shard=run_dir.shard,
    )
    written = read_records(output)
    return {"prompts": len(prompts), "pairs": len(written), "dropped_identical": len(prompts) - len(written)}


def sl_cai_spec(config: CoreConfig, run_dir: RunDir) -> ModelSpec:
    """The run's SL-CAI model, served by the base model's back end."""
    path = run_dir.path("sl_cai")
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no SL-CAI model; run stage 'sl' first or set pairs.model")
    return ModelSpec(name=str(path.resolve()), backend=config.models.base.backend, prompt_format="plain")
