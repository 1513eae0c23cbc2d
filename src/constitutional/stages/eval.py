"""Stage `eval`: the paper's evaluations of every model of the run, and the run report.

The models — the helpful model, SL-CAI, RL-CAI, and any `eval.models` named in config — answer
held-out prompts: red-team prompts, helpfulness prompts, and prompts that sound dangerous but are
safe to answer (over-refusal). Prompts any model of the run was trained on (those of
`data/critiques.jsonl`, which SL-CAI, the pairs and RL all come from, and those of the PM's training
comparisons) are skipped; the split is kept in `eval/prompts.jsonl`.

A judge then reads the answers:
- Elo (paper figures 2-3): per prompt and pair of models, which answer is better — by the judge model
  (`eval.judge: model`, the default: `eval.judge_model`, asked the feedback question with a
  harmlessness (red-team prompts) or helpfulness principle, both option orders averaged) or by the
  run's PM (`eval.judge: pm`, sigma of the score difference; never independent: RL-CAI was trained
  on it) — fitted to Bradley-Terry Elo scores with bootstrap intervals;
- harm: each red-team answer's expected level on the paper's 0-4 scale (judge model);
- evasiveness and over-refusal: by the judge model's engage-or-evade question and, beside it, by
  the documented refusal patterns of `evaluation.questions.REFUSAL_PATTERNS`;
- multiple-choice files (`eval.mc_files`: `prompt`, `corrects`, `incorrects`): accuracy of the judge
  model and of the PM.

The figures name their judge and say whether it is independent (`evaluation.independence`): not a
contender's model, not the reward any contender was trained on, not the feedback model whose labels
trained it. The PM's scores of the answers are reported as the reward on held-out prompts, not as a
verdict.

Answers and judgments are appended chunk by chunk (resumable like every generating stage). Outputs:
`eval/prompts.jsonl`, `eval/answers.jsonl`, `eval/judgments.jsonl`, `eval/metrics.json`,
`eval/report.html` (also rebuilt by `cai report RUN_DIR`) and a model card (`README.md`) in
`models/sl-cai/` and `models/rl-cai/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from constitutional.backends import Backend, SamplingParams
from constitutional.chunks import append_in_chunks
from constitutional.comparisons import LabelOptions
from constitutional.constitution import Constitution, load_constitution
from constitutional.errors import UserError, require, require_positive
from constitutional.evaluation import questions
from constitutional.evaluation.independence import Party, RunFacts, judge_description, verdict_fields
from constitutional.evaluation.judges import ModelJudge, PMJudge, mc_item, model_judge_tasks, pm_tasks
from constitutional.evaluation.metrics import PROMPT_SETS, compute_metrics
from constitutional.evaluation.model_card import write_model_cards
from constitutional.evaluation.prompt_sets import check_held_out, load_prompt_set, prompt_source
from constitutional.evaluation.report import write_report
from constitutional.preference import PreferenceModel
from constitutional.prompts import STOP_STRINGS, render, trim_at_turn_marker
from constitutional.records import (
    conversation,
    read_records,
    write_json_atomic,
    write_records_atomic,
)
from constitutional.rundir import ARTEFACTS, RunDir
from constitutional.sections import CoreConfig, ModelSpec, PromptFormat, runtime
from constitutional.seeding import seed_for
from constitutional.sources import PromptItem
from constitutional.training import SUMMARY, is_complete_model

log = logging.getLogger(__name__)

NAME = "eval"
CONFIG_KEYS = (
    "seed",
    "constitution",
    "data.red_team",
    "data.helpful",
    "models.helpful",
    "models.base",
    "models.feedback",
    "feedback.num_fewshot",  # the judge's few-shot examples unless eval.judge_fewshot is set
    "data.human_preferences",  # named in the model cards
)


@dataclass
class EvalModel:
    """An extra model to evaluate beside the run's own (a checkpoint, or any model a back end serves)."""

    name: str = ""  # as in models.*: a Hugging Face id, a local folder, a .gguf file, embedded, a server's name
    backend: str | None = runtime(None)
    prompt_format: PromptFormat = "auto"
    fewshot: bool = True  # prompted plain: prefix the assistant few-shot examples (a base model needs them)


@dataclass
class Settings:
    """Config section `eval`: what is compared, on which prompts, judged by whom."""

    red_team: str | None = None  # prompt source (file, hf:, builtin); default data.red_team
    helpful: str | None = None  # default data.helpful
    over_refusal: str = "builtin"  # safe prompts that sound dangerous; "none" to skip
    prompt_field: str | None = None  # read prompts from this field (default: the usual names, see sources)
    max_red_team: int = 8  # held-out prompts per set
    max_helpful: int = 8
    max_over_refusal: int = 8
    models: dict[str, EvalModel] = field(default_factory=dict)  # extra models, by display name
    # What decides the Elo comparisons: the judge model, or the run's PM (never independent: RL-CAI
    # was trained on it; without a PM it falls back to the model).
    judge: Literal["pm", "model"] = "model"
    # The judge model (Elo with judge: model, harm, evasion, MC files), any back end; default
    # models.feedback. Independent when it is no contender's model and labelled nothing they learnt from.
    judge_model: ModelSpec | None = None
    judge_fewshot: int | None = None  # few-shot examples in the comparison question (default: feedback.num_fewshot)
    mc_files: list[str] = field(default_factory=list)  # multiple-choice eval files (prompt/corrects/incorrects)
    max_new_tokens: int = 64
    temperature: float = 0.7  # every model samples with the same seed per prompt
    top_p: float = 0.95
    bootstrap: int = 1000  # Elo bootstrap resamples
    chunk_size: int = runtime(16)

    def validate(self) -> None:
        for key in ("max_red_team", "max_helpful", "max_over_refusal", "bootstrap"):
            require(getattr(self, key) >= 0, f"eval.{key}: expected 0 or more, got {getattr(self, key)}")
        require_positive("eval.max_new_tokens", self.max_new_tokens)
        require_positive("eval.chunk_size", self.chunk_size)
        require(self.temperature >= 0, f"eval.temperature: expected 0 or more, got {self.temperature}")
        require(0 < self.top_p <= 1, f"eval.top_p: expected a number in (0, 1], got {self.top_p}")
        for name, model in self.models.items():
            require(bool(model.name.strip()), f"eval.models.{name}.name: expected a model name")
            require(name not in RUN_MODELS, f"eval.models.{name}: the name is taken by one of the run's models")


RUN_MODELS = ("helpful", "sl-cai", "rl-cai")


@dataclass
class Inputs:
    constitution: Constitution
    prompts: dict[str, list[PromptItem]]  # per prompt set, the first rows (validated; held-out filtering is in run)
    assistant_preamble: str
    mc: dict[str, list[dict[str, Any]]]  # per MC file name, its comparisons


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """Nothing is required: eval evaluates what the run has (see `optional_reads`)."""
    return []


def optional_reads(config: CoreConfig, settings: Settings) -> list[str]:
    """The run's artefacts eval uses when they exist; a change to one makes eval stale."""
    return ["critiques", "sl_cai", "pm", "pm_train", "rl_cai"]


def check(config: CoreConfig, settings: Settings) -> Inputs:
    """Load and validate the prompt sets, MC files and model names; writes nothing."""
    config.check_model(config.models.helpful, "models.helpful")
    config.check_model(settings.judge_model or config.models.feedback, "eval.judge_model", scores_options=True)
    for name, model in settings.models.items():
        config.check_model(ModelSpec(model.name, model.backend, model.prompt_format), f"eval.models.{name}")
    constitution = load_constitution(config.constitution, config.base_dir)
    # Validated here on the first `cap` rows; `run` reads on past the prompts the run trained on.
    prompts = {prompt_set: load_prompt_set(config, settings, prompt_set) for prompt_set in PROMPT_SETS}
    mc = {Path(path).name: questions.load_mc_eval(config.resolve_path(path)) for path in settings.mc_files}
    preamble = resources.files("constitutional").joinpath("assets/assistant_fewshot.txt").read_text("utf-8")
    return Inputs(constitution, prompts, preamble, mc)


def check_run(config: CoreConfig, settings: Settings, run_dir: RunDir, stages: Sequence[str]) -> None:
    """Before any stage runs: refuse a prompt set that would have no prompt the run did not train on.

    With critique still to run (or to finish) now, a set that it would read whole
    (`check_held_out`) is refused; with critiques made, the set is read past what the run trained
    on. Eval alone on a run without critiques trains nothing away.

    Raises:
        UserError: naming `eval.<set>`.
    """
    trained = trained_prompts(run_dir)
    critique_to_run = "critique" in stages and run_dir.stage_status("critique") != "done"
    for prompt_set in ("red_team", "helpful"):
        if critique_to_run:  # what it has written so far is not what it will train on
            check_held_out(config, settings, prompt_set)
        if not trained or critique_to_run:
            continue
        asked = getattr(settings, f"max_{prompt_set}") != 0 and prompt_source(config, settings, prompt_set) != "none"
        if asked and not load_prompt_set(config, settings, prompt_set, exclude=trained):
            raise UserError(
                f"eval.{prompt_set}: no held-out prompts: every prompt of "
                f"{prompt_source(config, settings, prompt_set)} is one the run trained on; set eval.{prompt_set} "
                "to prompts the run does not train on, e.g. a test split"
            )


def input_hashes(inputs: Inputs) -> dict[str, str]:
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    constitution = inputs.constitution
    return {
        "constitution": digest(
            repr((constitution.feedback_principles, constitution.helpfulness_principles, constitution.feedback_fewshot))
        ),
        **{f"prompts.{name}": digest([item.id for item in items]) for name, items in inputs.prompts.items()},
        "mc_files": digest(inputs.mc),
    }


# ----------------------------------------------------------------------------- the stage


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Answer, judge, score, report. Resumes answers and judgments already written.

    Returns:
        Counts and headline figures for the manifest.
    """
    contenders, missing = find_models(config, settings, run_dir)
    trained = trained_prompts(run_dir)  # read once: the split below and the count in the metrics
    prompts = held_out_prompts(config, settings, run_dir, trained)
    missing += exhausted_prompt_sets(config, settings, prompts)
    mc = inputs.mc
    shard = run_dir.shard
    if shard is not None:  # this machine's share of the prompts and MC rows (`cai run --shard i/n`)
        prompts = {name: [row for row in rows if shard.holds(row["id"])] for name, rows in prompts.items()}
        mc = {name: [row for row in rows if shard.holds(mc_item(name, row))] for name, rows in mc.items()}
    for contender in contenders:
        answer_prompts(config, settings, run_dir, contender, prompts, inputs.assistant_preamble)
    names = [contender.name for contender in contenders]
    answers = [answer for answer in read_records(run_dir.path("eval_answers")) if answer["model"] in names]
    judge = settings.judge
    if judge == "pm" and not is_complete_model(run_dir.path("pm")):
        missing.append("models/pm (the Elo judge falls back to the model judge)")
        judge = "model"
    judge_answers(config, settings, run_dir, inputs.constitution, mc, answers, names, judge)
    if shard is not None:  # the figures need every shard: `cai merge`, then `cai run --stages eval`
        return {"answers": len(answers), "judgments": len(read_records(run_dir.path("eval_judgments")))}
    judgments = read_records(run_dir.path("eval_judgments"))
    metrics = compute_metrics(answers, judgments, names, judge, settings.bootstrap, config.seed)
    metrics.update(judge_fields(config, settings, run_dir, contenders, judge))
    metrics["model_paths"] = {contender.name: contender.spec.name for contender in contenders}
    metrics["prompts"] = {name: len(items) for name, items in prompts.items()}
    # The split: held-out prompts per set are in eval/prompts.jsonl; these texts were never eligible.
    metrics["trained_prompts_excluded"] = len(trained)
    metrics["missing"] = missing
    write_json_atomic(run_dir.path("eval_metrics"), metrics)
    write_model_cards(run_dir, config, metrics)
    report = write_report(run_dir, during=NAME)
    log.info("eval: report written to %s", report)
    if not metrics["judge_independent"]:
        log.warning("eval: judged by %s", judge_description(metrics))
    return headline_counts(metrics)


def judge_fields(
    config: CoreConfig, settings: Settings, run_dir: RunDir, contenders: list[Contender], judge: str
) -> dict[str, Any]:
    """`judge`, `judge_model`, `judge_independent` and `judge_not_independent_because` for metrics.json."""
    spec = settings.judge_model or config.models.feedback

    def party(role: str, model: ModelSpec) -> Party:
        return Party(role, model.name, config.backend_for(model))

    facts = RunFacts(
        contenders=tuple(party(f"the contender `{c.name}` ({c.source})", c.spec) for c in contenders),
        base=party("models.base", config.models.base),
        feedback=party("models.feedback", config.models.feedback),
        pm=str(run_dir.path("pm")) if is_complete_model(run_dir.path("pm")) else None,
        rl_algorithms=tuple((c.name, c.algorithm) for c in contenders if c.algorithm),
        fine_tuned=any(c.source.startswith(("models/", "previous/")) for c in contenders),
    )
    fields = verdict_fields(judge, party("eval.judge_model", spec), facts, config.base_dir)
    return {**fields, "judge_model": spec.name}


@dataclass
class Contender:
    """A model being evaluated: its display name, how to load it, and how to prompt it."""

    name: str
    spec: ModelSpec
    fewshot: bool
    source: str = ""  # where it comes from: its config key, or its folder in the run directory
    algorithm: str | None = None  # an RL-CAI model's RL algorithm (its training summary)


def find_models(config: CoreConfig, settings: Settings, run_dir: RunDir) -> tuple[list[Contender], list[str]]:
    """The models to compare (the helpful model first: the Elo anchor), and what is missing."""
    base_backend = config.models.base.backend
    contenders = [Contender("helpful", config.models.helpful, fewshot=True, source="models.helpful")]
    missing = []
    for name, artefact in (("sl-cai", "sl_cai"), ("rl-cai", "rl_cai")):
        path = run_dir.path(artefact)
        if is_complete_model(path):
            spec = ModelSpec(name=str(path.resolve()), backend=base_backend, prompt_format="plain")
            source = ARTEFACTS[artefact].path
            algorithm = rl_algorithm(path) if name == "rl-cai" else None
            contenders.append(Contender(name, spec, fewshot=False, source=source, algorithm=algorithm))
        else:
            missing.append(f"{path.relative_to(run_dir.root)} (stage {'sl' if name == 'sl-cai' else 'rl'} has not run)")
    contenders += archived_rl_models(run_dir, base_backend)
    for name, model in settings.models.items():
        spec = ModelSpec(model.name, model.backend, model.prompt_format)
        contenders.append(Contender(name, spec, model.fewshot, source=f"eval.models.{name}"))
    return contenders, missing


def rl_algorithm(folder: Path) -> str:
    """The RL algorithm that made an RL-CAI folder (its training summary; ppo, the default, if unsaid)."""
    summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    return str(summary.get("algorithm") or "ppo")


def archived_rl_models(run_dir: RunDir, backend: str | None) -> list[Contender]:
    """RL-CAI models that `--rerun` replaced (another algorithm, or other labels), named by algorithm and archive.

    Each algorithm that ran on this run directory is compared, not only the latest.
    """
    contenders = []
    for folder in sorted((run_dir.root / "previous").glob(f"*/{ARTEFACTS['rl_cai'].path}")):
        if is_complete_model(folder):
            summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
            archive = folder.relative_to(run_dir.root / "previous").parts[0]
            name = f"rl-cai-{summary.get('algorithm', 'unknown')}@{archive}"
            spec = ModelSpec(name=str(folder.resolve()), backend=backend, prompt_format="plain")
            source = str(folder.relative_to(run_dir.root))
            contenders.append(Contender(name, spec, fewshot=False, source=source, algorithm=rl_algorithm(folder)))
    return contenders


def held_out_prompts(
    config: CoreConfig, settings: Settings, run_dir: RunDir, trained: set[str]
) -> dict[str, list[dict[str, Any]]]:
    """The prompts of each set that no model of the run trained on, capped; kept in eval/prompts.jsonl.

    Written once: a resumed eval answers exactly the prompts it started with.
    """
    path = run_dir.path("eval_prompts")
    if not path.exists():
        rows = []
        for prompt_set in PROMPT_SETS:
            for item in load_prompt_set(config, settings, prompt_set, exclude=trained):
                row = {"id": item.id, "set": prompt_set, "prompt": item.prompt}
                if item.history:
                    row["history"] = [{"role": role, "text": text} for role, text in item.history]
                rows.append(row)
        log.info("eval: %d held-out prompts (%d prompts the run trained on are never used)", len(rows), len(trained))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_records_atomic(path, rows)
    rows = read_records(path)
    return {prompt_set: [row for row in rows if row["set"] == prompt_set] for prompt_set in PROMPT_SETS}


def exhausted_prompt_sets(config: CoreConfig, settings: Settings, prompts: dict[str, list[dict]]) -> list[str]:
    """Prompt sets asked for that came out empty because the run trained on every prompt of their source."""
    notes = []
    for prompt_set, rows in prompts.items():
        source = prompt_source(config, settings, prompt_set)
        if not rows and getattr(settings, f"max_{prompt_set}") and source != "none":
            notes.append(f"{prompt_set} prompts: every prompt of {source} was trained on; set eval.{prompt_set}")
    return notes


def trained_prompts(run_dir: RunDir) -> set[str]:
    """Prompt texts some model of the run was trained on (critiques feed SL, pairs, PM and RL; pm_train the PM)."""
    trained = set()
    for artefact in ("critiques", "pm_train"):
        path = run_dir.path(artefact)
        if path.exists():
            trained.update(record["prompt"] for record in read_records(path))
    return trained


def answer_prompts(
    config: CoreConfig,
    settings: Settings,
    run_dir: RunDir,
    contender: Contender,
    prompts: dict[str, list[dict]],
    assistant_preamble: str,
) -> None:
    """One answer per prompt from `contender`, appended to eval/answers.jsonl (resumable)."""
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop=STOP_STRINGS,
    )
    rows = [row for items in prompts.values() for row in items]
    # The helpful model answers with the few-shot preamble it has in stage `critique`.
    preamble = [assistant_preamble] if contender.fewshot else []

    def process(backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict]:
        texts = backend.generate(
            [render(backend, contender.spec.prompt_format, conversation(row), "assistant", preamble) for row in chunk],
            params,
            # The same seed per prompt for every model: differences come from the models, not the dice.
            [seed_for(config.seed, "eval", row["id"]) for row in chunk],
        )
        records = []
        for row, text in zip(chunk, texts):
            answer = trim_at_turn_marker(text)
            record = {
                "id": f"{contender.name}:{row['id']}",
                "item": row["id"],  # what decides the record's shard (sharding.shard_key)
                "model": contender.name,
                "set": row["set"],
                "prompt_id": row["id"],
                "prompt": row["prompt"],
            }
            if row.get("history"):
                record["history"] = row["history"]
            record.update(answer=answer, refusal_patterns=questions.refusal_patterns(answer))
            records.append(record)
        return records

    append_in_chunks(
        run_dir.path("eval_answers"),
        rows,
        lambda row: f"{contender.name}:{row['id']}",
        lambda: config.open_backend(contender.spec, run_dir.cache_path),
        process,
        chunk_size=settings.chunk_size,
        desc=f"eval answers ({contender.name})",
        unit="answer",
    )


# ----------------------------------------------------------------------------- judging


def judge_answers(
    config: CoreConfig,
    settings: Settings,
    run_dir: RunDir,
    constitution: Constitution,
    mc: dict[str, list[dict[str, Any]]],
    answers: list[dict[str, Any]],
    models: list[str],
    judge: str,
) -> None:
    """PM scores (when the run has a PM) and the model judge's readings, appended to eval/judgments.jsonl.

    Every judgment carries the `item` it belongs to (the prompt id, or the MC row), which decides
    its shard.
    """
    output = run_dir.path("eval_judgments")
    pm_path = run_dir.path("pm")
    if is_complete_model(pm_path):
        append_in_chunks(
            output,
            pm_tasks(answers, mc),
            lambda task: task["id"],
            lambda: PMJudge(PreferenceModel.load(pm_path)),
            lambda pm, chunk, advance: pm.judge(chunk),
            chunk_size=64,
            desc="eval PM scores",
            unit="answer",
        )
    spec = settings.judge_model or config.models.feedback
    fewshot = settings.judge_fewshot if settings.judge_fewshot is not None else config.feedback.num_fewshot
    options = LabelOptions(debias=True, num_fewshot=fewshot)
    model_judge = ModelJudge(constitution, options, config.seed)
    append_in_chunks(
        output,
        model_judge_tasks(answers, mc, models, compare=judge == "model"),
        lambda task: task["id"],
        lambda: config.open_backend(spec, run_dir.cache_path),
        model_judge.judge,
        chunk_size=settings.chunk_size,
        desc="eval judge",
        unit="question",
    )


def headline_counts(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's counts: prompts per set and the Elo scores."""
    counts: dict[str, Any] = {"prompts": metrics["prompts"], "models": list(metrics["models"])}
    counts["judge"] = metrics["judge"]
    counts["judge_independent"] = metrics["judge_independent"]
    for dimension, scores in metrics["elo"].items():
        counts[f"elo_{dimension}"] = {name: entry["elo"] for name, entry in scores.items()}
    if metrics["missing"]:
        counts["missing"] = metrics["missing"]
    return counts
