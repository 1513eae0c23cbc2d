"""Stage `pairs` (paper step 5): SL-CAI samples two answers per red-team prompt.

Both answers come from the same prompt at `pairs.temperature` (the paper: T = 1), each with its own
seed. Pairs whose two answers are identical carry no preference signal and are dropped (counted
in the manifest). Output: `data/pairs.jsonl` with `id`, `prompt`, `response_a`, `response_b`
(and `history` for multi-turn prompts).
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

from constitutional.backends import SamplingParams, import_backend, open_backend
from constitutional.config import Config, ModelSpec
from constitutional.errors import UserError
from constitutional.models import resolve_model_name
from constitutional.prompts import STOP_STRINGS, render_plain, trim_at_turn_marker
from constitutional.records import RunDir, append_records, file_sha256, read_records
from constitutional.stages.critique import OUTPUT as CRITIQUES, seed_for

log = logging.getLogger(__name__)

NAME = "pairs"
OUTPUT = "pairs.jsonl"


def check(config: Config) -> ModelSpec | None:
    """Validate settings; the SL-CAI model itself is only there once stage `sl` has run."""
    settings = config.pairs
    if settings.temperature <= 0:
        raise UserError(f"pairs.temperature: expected a positive number (two samples must differ), got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise UserError(f"pairs.top_p: expected a number in (0, 1], got {settings.top_p}")
    for key in ("max_new_tokens", "chunk_size"):
        if getattr(settings, key) <= 0:
            raise UserError(f"pairs.{key}: expected a positive number, got {getattr(settings, key)}")
    backend = config.backend_for(config.models.base)
    import_backend(backend)
    if settings.model is None:
        return None
    if backend != "openai":
        resolve_model_name(settings.model, config.base_dir)
    return ModelSpec(name=settings.model, backend=config.models.base.backend, prompt_format="plain")


def input_hashes(inputs: ModelSpec | None) -> dict[str, str]:
    return {"model": inputs.name if inputs else "models/sl-cai"}


def run(config: Config, run_dir: RunDir, inputs: ModelSpec | None) -> dict[str, Any]:
    """Sample two answers per red-team prompt, resuming from the pairs already written.

    Returns:
        Counts for the manifest.
    """
    spec = inputs or sl_cai_spec(config, run_dir)
    prompts = red_team_prompts(run_dir)
    output = run_dir.data(OUTPUT)
    done = {record["id"] for record in read_records(output, repair=True)}
    todo = [record for record in prompts if record["id"] not in done]
    log.info("pairs: %d red-team prompts, %d to sample", len(prompts), len(todo))
    if todo:
        params = SamplingParams(
            max_new_tokens=config.pairs.max_new_tokens,
            temperature=config.pairs.temperature,
            top_p=config.pairs.top_p,
            stop=STOP_STRINGS,
        )
        backend = open_backend(spec, config, run_dir.root / "cache" / "generations.sqlite")
        try:
            with tqdm(total=len(todo), desc="pairs", unit="prompt") as bar:
                for start in range(0, len(todo), config.pairs.chunk_size):
                    chunk = todo[start : start + config.pairs.chunk_size]
                    append_records(output, sample_pairs(backend, chunk, params, config.seed))
                    bar.update(len(chunk))
        finally:
            backend.close()
    written = read_records(output)
    return {
        "prompts": len(prompts),
        "pairs": len(written),
        "dropped_identical": len(prompts) - len(written),
        "critiques_sha256": file_sha256(run_dir.data(CRITIQUES))[:16],
    }


def sl_cai_spec(config: Config, run_dir: RunDir) -> ModelSpec:
    """The run's SL-CAI model, served by the base model's back end."""
    path = run_dir.model("sl-cai")
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no SL-CAI model; run stage 'sl' first or set pairs.model")
    return ModelSpec(name=str(path.resolve()), backend=config.models.base.backend, prompt_format="plain")


def red_team_prompts(run_dir: RunDir) -> list[dict[str, Any]]:
    """The red-team records of `data/critiques.jsonl` (id, prompt, history)."""
    path = run_dir.data(CRITIQUES)
    if not path.exists():
        raise UserError(f"{path}: not found; run stage 'critique' first")
    records = read_records(path)
    for number, record in enumerate(records, start=1):
        for field in ("id", "kind", "prompt"):
            if field not in record:
                raise UserError(f"{path}:{number}: missing field {field!r}")
    return [record for record in records if record["kind"] == "red_team"]


def sample_pairs(backend: Any, records: list[dict[str, Any]], params: SamplingParams, seed: int) -> list[dict[str, Any]]:
    """Two answers per record in one batched call; identical pairs are dropped.

    SL-CAI was fine-tuned on plain `Human:`/`Assistant:` transcripts, so it is prompted that way,
    without few-shot examples.
    """
    prompts = [render_plain(conversation(record), "assistant") for record in records]
    seeds = [seed_for(seed, record["id"], side) for record in records for side in ("a", "b")]
    texts = backend.generate([prompt for prompt in prompts for _ in ("a", "b")], params, seeds)
    answers = [trim_at_turn_marker(text) for text in texts]
    pairs = []
    for index, record in enumerate(records):
        response_a, response_b = answers[2 * index], answers[2 * index + 1]
        if response_a == response_b:
            continue
        pair = {"id": record["id"], "prompt": record["prompt"]}
        if record.get("history"):
            pair["history"] = record["history"]
        pair.update(response_a=response_a, response_b=response_b)
        pairs.append(pair)
    return pairs


def conversation(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A record's turns up to and including the red-team prompt, as (role, text) pairs."""
    return [(turn["role"], turn["text"]) for turn in record.get("history", [])] + [("human", record["prompt"])]
