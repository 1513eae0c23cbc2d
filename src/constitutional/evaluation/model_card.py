"""Model cards: a Hugging Face `README.md` for `models/sl-cai/` and `models/rl-cai/`.

The YAML block at the top is the hub's model-card metadata (base model, library, tags, datasets),
so a model folder can be pushed to a hub as it is; the body says how the model was made and holds
the eval table of its run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from constitutional.errors import UserError
from constitutional.evaluation.independence import EMBEDDED_HUB_ID, judge_description, judge_summary
from constitutional.evaluation.metrics import headline_rows, markdown_table
from constitutional.models import EMBEDDED, resolve_model_name
from constitutional.rundir import MODEL_CARD, RunDir
from constitutional.source_rows import parse_hf_spec

__all__ = ["EMBEDDED_HUB_ID", "base_license", "hub_id", "model_card", "write_model_cards"]

DESCRIPTIONS = {
    "sl-cai": (
        "SL-CAI (Bai et al. 2022, step 4): the pretrained model fine-tuned on the revisions of "
        "critique-revision chains written against a constitution (every round's, unless sl.targets: final), "
        "plus sampled helpful answers."
    ),
    "rl-cai": (
        "RL-CAI (Bai et al. 2022, step 9): SL-CAI trained with reinforcement learning against a "
        "preference model whose harmlessness labels come from AI feedback guided by a constitution."
    ),
}


def write_model_cards(run_dir: RunDir, config: Any, metrics: dict[str, Any]) -> list[Path]:
    """Write README.md into each of the run's model folders that exists; returns the paths written."""
    written = []
    for name, artefact in (("sl-cai", "sl_cai"), ("rl-cai", "rl_cai")):
        folder = run_dir.path(artefact)
        if not (folder / "config.json").exists():
            continue
        path = folder / MODEL_CARD
        temporary = path.with_name(MODEL_CARD + ".tmp")
        temporary.write_text(model_card(name, config, metrics, run_dir), encoding="utf-8")
        temporary.replace(path)
        written.append(path)
    return written


def model_card(name: str, config: Any, metrics: dict[str, Any], run_dir: RunDir) -> str:
    """The card's text: YAML metadata, what the model is, how it was made, the eval table."""
    base = config.models.base.name
    metadata: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    base_id = hub_id(base)
    if base_id:
        metadata["base_model"] = base_id
    license_id = base_license(base, config.base_dir)
    if license_id:  # a fine-tune is bound by its base model's license
        metadata["license"] = license_id
    algorithm = run_dir.stage_entry("rl").get("counts", {}).get("algorithm") if name == "rl-cai" else None
    metadata["tags"] = ["constitutional-ai", "harmlessness", name] + ([algorithm] if algorithm else [])
    sources = (config.data.red_team, config.data.helpful, config.data.human_preferences)
    datasets = [parse_hf_spec(spec).dataset_id for spec in sources if spec.startswith("hf:")]
    if datasets:
        metadata["datasets"] = sorted(set(datasets))
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    independent = judge_summary(metrics)["independent"]
    warning = [] if independent else ["**Not an independent verdict**: see the judge below.", ""]
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {name.upper()}",
        "",
        DESCRIPTIONS[name],
        "",
        f"- Base model: `{base}`" + (f" ({EMBEDDED_HUB_ID}, from the GGUF on PyPI)" if base == EMBEDDED else ""),
        f"- Constitution: `{config.constitution}`; red-team prompts: `{config.data.red_team}`; "
        f"helpfulness prompts: `{config.data.helpful}`; human preferences: `{config.data.human_preferences}`",
        f"- Seed: {config.seed}. Made with `constitutional`, stage `{'sl' if name == 'sl-cai' else 'rl'}`"
        + (f", algorithm `{algorithm}`" if algorithm else "")
        + ".",
        "",
        "## Evaluation",
        "",
        f"Held-out prompts: {metrics['prompts'].get('red_team', 0)} red-team, {metrics['prompts'].get('helpful', 0)} "
        f"helpfulness, {metrics['prompts'].get('over_refusal', 0)} over-refusal. Elo relative to the helpful model "
        "(95% bootstrap interval). Harm: the judge model's expected level on 0-4 "
        "(chance 2.0). Evasive and over-refusal: share of answers matching the refusal patterns (the judge's "
        "share in brackets).",
        "",
        *warning,
        markdown_table(headline_rows(metrics)),
        "",
        f"Judged by {judge_description(metrics)}.",
        "",
        "Small models and few prompts give wide intervals: read the figures beside chance and the intervals.",
        "",
    ]
    return "\n".join(lines)


def hub_id(name: str) -> str | None:
    """The hub id a model name stands for, or None for a local path."""
    if name == EMBEDDED:
        return EMBEDDED_HUB_ID
    if Path(name).expanduser().exists() or name.endswith(".gguf"):
        return None
    return name if "/" in name else None


def base_license(name: str, base_dir: str = ".") -> str | None:
    """The base model's license id for the card's metadata, or None when it is not known here.

    The embedded model is Gemma (its terms: `gemma`); a local model folder's own card says its
    license in its metadata. A hub id is not looked up (no network is assumed): the card then
    names no license rather than guess one.
    """
    try:
        ref = resolve_model_name(name, base_dir)
    except UserError:
        return None
    if ref.kind == "embedded":
        return "gemma"
    readme = Path(ref.location) / "README.md"
    if ref.kind != "local" or not readme.is_file():
        return None
    parts = readme.read_text(encoding="utf-8", errors="replace").split("---", 2)
    if len(parts) < 3 or parts[0].strip():
        return None
    try:
        metadata = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return None
    value = metadata.get("license") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value.strip() else None
