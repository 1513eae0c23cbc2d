"""The stages' facts in one table: their order, what each writes, whether it trains or shards.

A new stage is added here (and as a module in `stages/`): the pipeline, the run directory,
sharding, `cai merge` and the report read every fact about stages from this table. It imports
nothing of the package, so any module may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Artefact:
    """One output of a stage, by its place in the run directory."""

    path: str  # relative to the run directory
    made_by: str  # the stage that writes it


@dataclass(frozen=True)
class Stage:
    """What the rest of the package needs to know about a stage without importing it.

    Attributes:
        name: the stage's name, also its module in `stages/` and its config section.
        outputs: {artefact name: path relative to the run directory} of everything it writes.
        record_files: those outputs that are JSONL record files (what a shard writes and `cai
            merge` gathers).
        trains: it spreads over the processes of an `accelerate launch`.
        shardable: its work is a list of independent items, so `--shard i/n` can split it.
        finished_after_merge: its result needs every shard's records: `cai merge` gathers them and
            leaves the stage to finish on the merged run.
        shared_files: outputs every shard writes whole and alike, merged by checking they agree.
    """

    name: str
    outputs: dict[str, str]
    record_files: tuple[str, ...] = ()
    trains: bool = False
    shardable: bool = False
    finished_after_merge: bool = False
    shared_files: tuple[str, ...] = field(default=())


# The paper's order, then the evaluation. `augment` (the paper's model-generated prompts) is off
# unless asked for; not shardable: each new prompt must differ from every earlier one.
STAGE_TABLE: tuple[Stage, ...] = (
    Stage("augment", {"augmented_prompts": "data/augmented_prompts.jsonl"}, record_files=("augmented_prompts",)),
    Stage("critique", {"critiques": "data/critiques.jsonl"}, record_files=("critiques",), shardable=True),
    Stage("sl", {"sl_cai": "models/sl-cai"}, trains=True),
    Stage("pairs", {"pairs": "data/pairs.jsonl"}, record_files=("pairs",), shardable=True),
    Stage(
        "feedback",
        {"ai_labels": "data/ai_labels.jsonl", "feedback_report": "eval/feedback.json"},
        record_files=("ai_labels",),
        shardable=True,
    ),
    Stage(
        "pm",
        {
            "helpful_pairs": "data/helpful_pairs.jsonl",  # only with data.human_preferences: none
            "ai_helpfulness": "data/ai_helpfulness.jsonl",  # only with data.human_preferences: none
            "pm_train": "data/pm_train.jsonl",
            "pm_eval": "data/pm_eval.jsonl",
            "pm": "models/pm",
            "pm_report": "eval/pm.json",
            "pm_calibration": "eval/pm_calibration.png",
        },
        trains=True,
    ),
    Stage(
        "rl",
        {
            "rl_cai": "models/rl-cai",
            "rl_prompts": "data/rl_prompts.jsonl",
            "rl_metrics": "eval/rl_metrics.jsonl",
            "rl_curves": "eval/rl_curves.png",
            "rl_samples": "eval/rl_samples.jsonl",
        },
        trains=True,
    ),
    Stage(
        "eval",
        {
            "eval_prompts": "eval/prompts.jsonl",
            "eval_answers": "eval/answers.jsonl",
            "eval_judgments": "eval/judgments.jsonl",
            "eval_metrics": "eval/metrics.json",
            "eval_report": "eval/report.html",
        },
        record_files=("eval_answers", "eval_judgments"),
        shardable=True,
        finished_after_merge=True,
        shared_files=("eval_prompts",),
    ),
)

STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGE_TABLE)
ARTEFACTS: dict[str, Artefact] = {
    name: Artefact(path, stage.name) for stage in STAGE_TABLE for name, path in stage.outputs.items()
}
RECORD_FILES: tuple[str, ...] = tuple(name for stage in STAGE_TABLE for name in stage.record_files)
TRAINING_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGE_TABLE if stage.trains)
SHARDABLE: tuple[str, ...] = tuple(stage.name for stage in STAGE_TABLE if stage.shardable)
FINISHED_AFTER_MERGE: tuple[str, ...] = tuple(stage.name for stage in STAGE_TABLE if stage.finished_after_merge)
SHARED_FILES: dict[str, tuple[str, ...]] = {
    stage.name: stage.shared_files for stage in STAGE_TABLE if stage.shared_files
}


_BY_NAME = {stage.name: stage for stage in STAGE_TABLE}


def stage_facts(name: str) -> Stage:
    """The table's entry for stage `name` (one of STAGES)."""
    return _BY_NAME[name]


def artefacts_made_by(stage: str) -> list[str]:
    """Names of the artefacts `stage` writes."""
    return list(stage_facts(stage).outputs)
