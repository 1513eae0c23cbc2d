"""`cai plan`: what `cai run` would do with a config, said before anything runs or is written.

The plan is the pipeline's own (`pipeline.plan_pipeline`): every check `cai run` makes before its
first write, every stage's inputs loaded and validated, stale stages found; no model is loaded.
What it refuses, `cai run` refuses with the same line. This module only puts the plan in words:
per stage its status (done, would run, would resume, stale and why), the models and back ends
it uses, the run-directory files it reads and who makes them, and the resolved path of every
input file its settings name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from constitutional.hub import pushed_keys
from constitutional.pipeline import Plan, all_reads
from constitutional.registry import ARTEFACTS, STAGES

# Setting values that name no file.
NOT_FILES = ("builtin", "none", "default", "embedded")
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".csv", ".txt", ".yaml", ".parquet")


def describe_plan(config: Any, plan: Plan) -> str:
    """The plan in words, one block per stage (the stages not asked for get one line).

    Per stage asked for: `model` lines, `reads` (run-directory files it needs) and `uses` (those it
    reads when present) with the stage that makes each, and `input` lines (files and sources its
    settings name, resolved against the config's folder); then a `hub` line per model it would push.
    """
    run = plan.run
    lines = [f"run directory: {run.root.resolve()} ({'exists' if run.exists() else 'new'})"]
    for name in STAGES:
        lines.append(f"{name}: {_status(plan, name)}")
        if name not in plan.stages:
            continue
        lines += [f"    {'model':<8} {model}" for model in _models(config, name)]
        required = plan.modules[name].reads(config, getattr(config, name))
        for artefact in all_reads(config, plan.modules[name]):
            maker = ARTEFACTS[artefact].made_by
            status = run.stage_status(maker)
            if maker in plan.affected or (maker in plan.stages and status != "done"):
                status = "made before it in this run"
            how = "reads" if artefact in required else "uses"  # uses: read when present
            lines.append(f"    {how:<8} {run.path(artefact)} (stage {maker}: {status})")
        lines += [f"    {'input':<8} {key}: {where}" for key, where in _input_files(config, name, plan.modules[name])]
    for key in pushed_keys(config, plan.stages, run.shard):
        visibility = "private" if config.hub.private else "public"
        lines.append(f"hub: {run.path(key)} -> {getattr(config.hub, key)} (hub.{key}; {visibility} if created)")
    return "\n".join(lines)


def _status(plan: Plan, name: str) -> str:
    status = plan.run.stage_status(name)
    if name not in plan.stages:
        return f"not asked ({status})"
    if name in plan.affected:
        why = "; ".join(plan.stale.get(name, [])) or "an earlier stage runs again"
        return f"would run again with --rerun ({why}); its outputs move under previous/"
    if status == "done":
        return "done: skipped"
    if status in ("running", "failed"):
        return f"would resume ({status} before: {plan.run.stage_entry(name).get('error') or 'interrupted'})"
    return "would run"


def _models(config: Any, name: str) -> list[str]:
    """The models a stage loads or asks, each as `key: name (back end)`."""
    settings = getattr(config, name)

    def spec(key: str, model: Any) -> str:
        return f"{key}: {model.name} ({config.backend_for(model)})"

    training = f"trained on {config.training.device}, precision {config.training.precision}"
    if name == "augment":
        return [spec("augment.model", settings.model) if settings.model else spec("models.base", config.models.base)]
    if name == "critique":
        return [spec("models.helpful", config.models.helpful)]
    if name == "sl":
        return [f"models.base: {config.models.base.name}, fine-tuned into SL-CAI ({training})"]
    if name == "pairs":
        if settings.model:
            return [f"pairs.model: {settings.model} ({config.backend_for(config.models.base)})"]
        return [f"SL-CAI of this run ({config.backend_for(config.models.base)})"]
    if name == "feedback":
        return [spec("models.feedback", config.models.feedback)]
    if name == "pm":
        return [f"pm.init: {settings.init}, trained into the PM ({training})"]
    if name == "rl":
        return [f"SL-CAI and the PM of this run, rl.algorithm {settings.algorithm} ({training})"]
    judge = spec("eval.judge_model", settings.judge_model or config.models.feedback)
    judged = [spec("models.helpful", config.models.helpful), "SL-CAI and RL-CAI of this run (when made)"]
    judged += [spec(f"eval.models.{key}", model) for key, model in settings.models.items()]
    return [*judged, judge if settings.judge == "model" else "eval.judge: pm (the run's PM; not independent)"]


def _input_files(config: Any, name: str, module: Any) -> list[tuple[str, str]]:
    """(key, resolved path) of each file a stage's settings (and the `data` keys it reads) name."""
    settings = getattr(config, name)
    sources = ("data.", "constitution", "eval.red_team", "eval.helpful", "eval.over_refusal")
    named = [(key, _value(config, key)) for key in module.CONFIG_KEYS if key.startswith(("data.", "constitution"))]
    named += [(f"{name}.{field.name}", getattr(settings, field.name)) for field in dataclasses.fields(settings)]
    if name == "eval":  # a prompt set left unset falls back to the run's data (prompts trained on are skipped)
        named = [(key, value) for key, value in named if key.removeprefix("eval.") not in module.PROMPT_SETS]
        named += [(f"eval.{prompt_set}", module.prompt_source(config, settings, prompt_set))
                  for prompt_set in module.PROMPT_SETS]  # fmt: skip
    found = []
    for key, value in named:
        for item in value if isinstance(value, list) else [value]:
            if _is_file(item) and (item.endswith(FILE_SUFFIXES) or config.resolve_path(item).exists()):
                path = config.resolve_path(item)
                found.append((key, f"{path}{'' if path.exists() else ' (missing)'}"))
            elif isinstance(item, str) and (item.startswith("hf:") or (item in NOT_FILES and key.startswith(sources))):
                found.append((key, item))
    return list(dict.fromkeys(found))  # a hub model id ("owner/name") is no file: left out above


def _value(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _is_file(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value not in NOT_FILES
        and not value.startswith(("hf:", "http://", "https://"))
        and ("/" in value or value.endswith(FILE_SUFFIXES))
    )
