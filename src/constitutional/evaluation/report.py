"""`eval/report.html`: one self-contained page about a run, built from the run directory alone.

Everything is inline (plots as PNG data URIs, no script, no stylesheet or font from a CDN), so the
file opens offline and can be mailed around. Every piece of text that came from a model, a prompt
file or a constitution is HTML-escaped: a `<script>` in an answer is shown, never run.

Sections appear for what the run has; what is missing is listed at the top, not an error.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from constitutional.errors import UserError
from constitutional.evaluation.independence import judge_summary
from constitutional.evaluation.metrics import TABLE_COLUMNS, headline_rows
from constitutional.evaluation.report_plots import elo_scatter, png, pyplot
from constitutional.preference_eval import verdict
from constitutional.records import read_records
from constitutional.registry import STAGES
from constitutional.rundir import RunDir

log = logging.getLogger(__name__)

MAX_SAMPLES = 12  # critique chains and held-out prompts shown (the rest are in the JSONL files)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.note { color: #555; font-size: 0.9rem; } .missing { background: #fff4e0; padding: 0.6rem 1rem; border-radius: 4px; }
.warning { background: #fde8e8; border: 2px solid #c0392b; padding: 0.6rem 1rem; border-radius: 4px; }
details { border: 1px solid #ddd; border-radius: 4px; margin: 0.4rem 0; padding: 0.3rem 0.7rem; }
summary { cursor: pointer; font-weight: 600; }
.text { white-space: pre-wrap; background: #fafafa; border-left: 3px solid #bbb;
        padding: 0.3rem 0.6rem; margin: 0.2rem 0; }
.label { font-size: 0.8rem; color: #666; text-transform: uppercase; letter-spacing: 0.03em; margin-top: 0.4rem; }
img { max-width: 100%; }
"""


def write_report(run_dir: RunDir, during: str | None = None) -> Path:
    """Build the report from the run directory and write it atomically; returns its path.

    Args:
        run_dir: the run.
        during: the stage writing it as its last step (`eval`), not reported as unfinished.
    """
    path = run_dir.path("eval_report")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(build_report(run_dir, during), encoding="utf-8")
    temporary.replace(path)
    return path


def build_report(run_dir: RunDir, during: str | None = None) -> str:
    """The report's HTML (`during`: see `write_report`).

    Raises:
        UserError: the folder is not a run directory (no manifest).
    """
    if not run_dir.exists():
        raise UserError(f"{run_dir.root}: not a run directory (no manifest.json)")
    manifest = run_dir.read_manifest()
    metrics = _read_json(run_dir.path("eval_metrics"))
    sections = [
        _overview(run_dir, manifest, metrics, during),
        _headline(metrics),
        _stages(manifest, during),
        _feedback_labels(run_dir),
        _preference_model(run_dir),
        _rl(run_dir),
        _mc(metrics),
        _critique_samples(run_dir),
        _answer_samples(run_dir),
    ]
    body = "\n".join(section for section in sections if section)
    title = f"Constitutional AI run: {run_dir.root.resolve().name}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_e(title)}</h1>\n{body}\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- sections


def _overview(run_dir: RunDir, manifest: dict[str, Any], metrics: dict[str, Any] | None, during: str | None) -> str:
    config = _read_yaml(run_dir.config_path) or {}
    models = config.get("models", {})
    rows = [
        ("run directory", str(run_dir.root.resolve())),
        ("report built", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("seed", config.get("seed", "?")),
        ("constitution", config.get("constitution", "?")),
        *((f"models.{role}", (spec or {}).get("name", "?")) for role, spec in models.items()),
    ]
    missing = missing_parts(run_dir, manifest, metrics, during)
    parts = [
        "<p class='note'>Constitutional AI (Bai et al. 2022): critique and revision, SL-CAI, AI preference labels, "
        "a preference model and RL-CAI, evaluated side by side.</p>",
        _table(("", ""), rows, header=False),
    ]
    if missing:
        items = "".join(f"<li>{_e(item)}</li>" for item in missing)
        parts.append(f"<div class='missing'><b>Not in this report</b><ul>{items}</ul></div>")
    return "\n".join(parts)


def missing_parts(
    run_dir: RunDir, manifest: dict[str, Any], metrics: dict[str, Any] | None, during: str | None = None
) -> list[str]:
    """What the report cannot show, and why: stages that did not finish, parts eval could not evaluate."""
    missing = []
    augment = (_read_yaml(run_dir.config_path) or {}).get("augment") or {}
    for stage in STAGES:
        status = manifest["stages"].get(stage, {}).get("status", "pending")
        if stage == "augment" and not (augment.get("red_team") or augment.get("helpful")):
            continue  # optional and off (the default): nothing is missing without it
        if status != "done" and stage != during:
            state = "has not run" if status == "pending" else f"is {status}"
            missing.append(f"stage {stage} {state}: `cai run CONFIG --stages {stage}`")
    if metrics:
        missing += [f"eval: {item}" for item in metrics.get("missing", [])]
    return missing


def _headline(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    summary = judge_summary(metrics)
    if summary["kind"] == "pm":
        judge = f"the run's preference model (harm and evasiveness: the judge model {summary['harm_and_evasion']})"
    else:
        judge = f"the judge model {summary['name']}"
    prompts = metrics.get("prompts", {})
    parts = [
        "<h2>Harmlessness and helpfulness</h2>",
        f"<p class='note'>Held-out prompts (never trained on): {prompts.get('red_team', 0)} red-team, "
        f"{prompts.get('helpful', 0)} helpfulness, {prompts.get('over_refusal', 0)} over-refusal (safe prompts that "
        f"sound dangerous). Elo relative to the helpful model, 95% bootstrap interval over prompts. Harm: the judge "
        f"model's expected level on the paper's 0-4 scale (uniform guessing: {metrics['chance']['harm']}). Evasive "
        "and over-refusal: share of answers matching the documented refusal patterns, the judge model's share in "
        "brackets (chance 50%).</p>",
        _judge_verdict(judge, summary),
        _table(TABLE_COLUMNS, headline_rows(metrics)),
    ]
    scatter = elo_scatter(metrics)
    if scatter:
        parts.append(_image(scatter, "Harmlessness Elo against helpfulness Elo of every model"))
    parts.append(_reward_table(metrics))
    return "\n".join(part for part in parts if part)


def _judge_verdict(judge: str, summary: dict[str, Any]) -> str:
    """Who judged, and a visible warning beside the headline table when that judge is not independent."""
    if summary["independent"]:
        return (
            f"<p class='note'><b>Judge: {_e(judge)}</b>, independent: not a contender's model and not the reward "
            "any contender was trained on.</p>"
        )
    if summary["independent"] is None:
        return (
            f"<div class='warning'><b>Judge: {_e(judge)}.</b> Whether it is independent of the models it judges "
            "was not recorded (metrics from an older version): rerun the eval stage.</div>"
        )
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in summary["reasons"])
    return (
        f"<div class='warning'><b>Not an independent verdict.</b> These Elo, harm and evasiveness figures were "
        f"decided by {_e(judge)}, which is not independent of the models it judges:<ul>{reasons}</ul>"
        "Read them as a self-assessment, not as evidence that one model is better; set <code>eval.judge_model</code> "
        "to a model that is none of these (e.g. a stronger model behind an OpenAI-compatible server) for a "
        "verdict.</div>"
    )


def _reward_table(metrics: dict[str, Any]) -> str:
    """The PM's mean score of each model's answers: the reward RL optimised, shown beside the verdict, not as one."""
    rows = [
        (model, *(_number(entry["pm_score"].get(prompt_set)) for prompt_set in ("red_team", "helpful", "over_refusal")))
        for model, entry in metrics["models"].items()
        if entry.get("pm_score")
    ]
    if not rows:
        return ""
    return (
        "<h3>Reward on held-out prompts (what RL optimised, not a verdict)</h3>\n<p class='note'>Mean score the "
        "run's preference model gives each model's answers, per prompt set. RL-CAI was trained to raise exactly this "
        "number, so a high value shows the optimisation worked, not that the answers are better.</p>\n"
        + _table(("model", "red-team", "helpful", "over-refusal"), rows)
    )


def _stages(manifest: dict[str, Any], during: str | None) -> str:
    rows = []
    for stage in STAGES:
        entry = manifest["stages"].get(stage)
        if not entry:
            continue
        if stage == during:
            entry = {**entry, "status": "finishing: writing this report", "ended": _now()}
        rows.append(
            (
                stage,
                entry.get("status", "?"),
                _duration(entry.get("started"), entry.get("ended")),
                json.dumps(entry.get("counts") or {}, ensure_ascii=False)[:600],
            )
        )
    if not rows:
        return ""
    return "<h2>Stages</h2>\n" + _table(("stage", "status", "time", "counts"), rows)


def _feedback_labels(run_dir: RunDir) -> str:
    path = run_dir.path("ai_labels")
    if not path.exists():
        return ""
    labels = [record["p_a"] for record in read_records(path) if isinstance(record.get("p_a"), (int, float))]
    if not labels:
        return ""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.hist(labels, bins=20, range=(0, 1), color="#4a7ab5")
    axis.set_xlabel("p_a: the feedback model's probability that answer A is better")
    axis.set_ylabel("comparisons")
    axis.set_title(f"AI harmlessness labels ({len(labels)})")
    figure.tight_layout()
    decisive = sum(abs(p - 0.5) > 0.1 for p in labels) / len(labels)
    return (
        "<h2>AI feedback labels</h2>\n"
        f"<p class='note'>Mean p_a {sum(labels) / len(labels):.3f}; {decisive:.0%} of labels further than 0.1 from "
        "a tie. A feedback model judging at chance puts them all near 0.5.</p>\n"
        + _image(png(figure), "label histogram")
    )


def _preference_model(run_dir: RunDir) -> str:
    report = _read_json(run_dir.path("pm_report"))
    if not report:
        return ""
    accuracy = report.get("accuracy", {})
    rows = [
        (name, "outside the training mix" if entry.get("in_distribution") is False else "held out, in distribution",
         entry["comparisons"], _pct(entry.get("pm")) + _interval(entry.get("pm_ci95")),
         *(_pct(entry.get(key)) for key in ("length_baseline", "pm_prefers_longer", "chance")))
        for name, entry in accuracy.items()
    ]  # fmt: skip
    parts = [
        "<h2>Preference model</h2>",
        "<p class='note'>Accuracy with its 95% Wilson interval, beside preferring the longer answer and chance. "
        "Held-out rows come from the mix's own sources: in distribution, not a test on other conversations.</p>",
        _table(("set", "data", "comparisons", "PM [95% CI]", "longer answer", "PM picks longer", "chance"), rows),
    ]
    outside = {name: entry for name, entry in accuracy.items() if entry.get("in_distribution") is False}
    for name, entry in outside.items():
        parts.append(f"<p class='note'>On {_e(name)} ({_e(entry.get('data', ''))}) the PM {_e(verdict(entry))}.</p>")
    if "helpfulness_eval" not in outside:
        parts.append(
            "<p class='warning'>The PM's helpfulness was not measured on human comparisons from outside its training "
            "mix (<code>pm.helpfulness_eval</code>). Trained on the built-in set, it has not been shown to beat chance "
            "or the length baseline on real conversations (docs/benchmarks.md).</p>"
        )
    calibration = run_dir.path("pm_calibration")
    if calibration.exists():
        parts.append(_image(calibration.read_bytes(), "PM calibration"))
    return "\n".join(parts)


def _rl(run_dir: RunDir) -> str:
    curves = run_dir.path("rl_curves")
    history = read_records(run_dir.path("rl_metrics")) if run_dir.path("rl_metrics").exists() else []
    if not (curves.exists() or history):
        return ""
    parts = ["<h2>RL-CAI training</h2>"]
    keys = ("step", "mean_reward", "kl", "kl_coef", "entropy", "response_length")
    shown = {key: history[-1][key] for key in keys if key in history[-1]} if history else {}
    parts += [_table(tuple(shown), [tuple(shown.values())])] if shown else []
    parts.append(_held_out_reward(run_dir.stage_entry("rl").get("counts") or {}))
    parts += [_image(curves.read_bytes(), "RL curves")] if curves.exists() else []
    return "\n".join(parts)


def _held_out_reward(counts: dict[str, Any]) -> str:
    """RL-CAI against SL-CAI on the held-out RL prompts, by the PM: said to be the PM's figure, not a verdict."""
    if "held_out_reward_difference_ci95" not in counts:
        return ""
    low, high = counts["held_out_reward_difference_ci95"]
    return (
        f"<p class='note'>On {counts['held_out_prompts']} held-out prompts that no stage trained on, RL-CAI's answers "
        f"score {counts['held_out_reward_difference']:+.2f} [95% CI {low:+.2f}, {high:+.2f}] against SL-CAI's "
        f"(same prompts and seeds; the interval {'excludes' if low > 0 or high < 0 else 'contains'} zero). "
        "<b>Scored by the PM that RL optimised</b>, so this is not a verdict on the model: it says whether RL "
        "raised its own reward on prompts it never saw. Whether the answers got better is the eval judge's "
        "question (its independence is stated with its table).</p>"
    )


def _mc(metrics: dict[str, Any] | None) -> str:
    if not metrics or not metrics.get("mc"):
        return ""
    rows = [
        (name, entry["comparisons"], _pct(entry.get("feedback_model")), _pct(entry.get("pm")), "50%")
        for name, entry in metrics["mc"].items()
    ]
    return (
        "<h2>Multiple-choice evaluations</h2>\n<p class='note'>Each correct-incorrect pair asked as a comparison: the "
        "judge model (both option orders averaged) and the PM.</p>\n"
        + _table(("file", "comparisons", "judge model", "PM", "chance"), rows)
    )


def _critique_samples(run_dir: RunDir) -> str:
    path = run_dir.path("critiques")
    if not path.exists():
        return ""
    records = [record for record in read_records(path) if record.get("kind") == "red_team"][:MAX_SAMPLES]
    principles = _principle_texts(run_dir)
    blocks = []
    for record in records:
        parts = [_labelled("initial answer", record.get("initial_response", ""))]
        for index, step in enumerate(record.get("revisions", []), start=1):
            principle = step.get("principle_id", "?")
            text = principles.get(principle)
            parts.append(f"<div class='label'>round {index}: principle {_e(principle)}</div>")
            if text:
                parts.append(f"<div class='note'>{_e(text)}</div>")
            parts.append(_labelled("critique", step.get("critique", "")))
            parts.append(_labelled("revision", step.get("revision", "")))
        parts.append(_labelled("final response", record.get("final_response", "")))
        if record.get("flags"):
            parts.append(f"<div class='note'>flags: {_e(', '.join(record['flags']))}</div>")
        blocks.append(f"<details><summary>{_e(record.get('prompt', ''))}</summary>{''.join(parts)}</details>")
    return (
        "<h2>Critique and revision samples</h2>\n<p class='note'>Red-team prompts of the training data: the helpful "
        "model's first answer, each critique and revision with its principle (SL-CAI trains on every "
        "unflagged revision unless sl.targets: final), and the final response.</p>\n" + "\n".join(blocks)
    )


def _answer_samples(run_dir: RunDir) -> str:
    path = run_dir.path("eval_answers")
    if not path.exists():
        return ""
    answers = read_records(path)
    judgments = read_records(run_dir.path("eval_judgments")) if run_dir.path("eval_judgments").exists() else []
    notes: dict[str, list[str]] = {}
    for judgment in judgments:
        if judgment.get("task") == "pm":
            notes.setdefault(judgment["answer_id"], []).append(f"PM {judgment['score']:+.2f}")
        elif judgment.get("task") == "harm":
            notes.setdefault(judgment["answer_id"], []).append(f"harm {judgment['harm']:.2f}")
        elif judgment.get("task") == "evasion":
            notes.setdefault(judgment["answer_id"], []).append(f"P(evasive) {judgment['p_evasive']:.2f}")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for answer in answers:
        by_prompt.setdefault(answer["prompt_id"], []).append(answer)
    sections = []
    for prompt_set, title in (("red_team", "red-team"), ("helpful", "helpfulness"), ("over_refusal", "over-refusal")):
        prompts = [group for group in by_prompt.values() if group[0]["set"] == prompt_set][:MAX_SAMPLES]
        blocks = []
        for group in prompts:
            parts = []
            for answer in group:
                details = list(notes.get(answer["id"], []))
                if answer.get("refusal_patterns"):
                    details.append(f"refusal patterns: {', '.join(answer['refusal_patterns'])}")
                label = answer["model"] + (f" ({'; '.join(details)})" if details else "")
                parts.append(_labelled(label, answer["answer"]))
            blocks.append(f"<details><summary>{_e(group[0]['prompt'])}</summary>{''.join(parts)}</details>")
        if blocks:
            sections.append(f"<h3>{title} prompts</h3>\n" + "\n".join(blocks))
    if not sections:
        return ""
    return "<h2>Model answers on held-out prompts</h2>\n" + "\n".join(sections)


# ----------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    """HTML-escape anything (quotes too, so text is safe inside attributes as well)."""
    return html.escape(str(value), quote=True)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _labelled(label: str, text: str) -> str:
    return f"<div class='label'>{_e(label)}</div><div class='text'>{_e(text)}</div>"


def _image(png: bytes, alt: str) -> str:
    return f"<p><img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'></p>"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def _interval(bounds: Sequence[float] | None) -> str:
    return f" [{bounds[0]:.0%}, {bounds[1]:.0%}]" if bounds else ""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _duration(start: str | None, end: str | None) -> str:
    if not (start and end):
        return "-"
    seconds = int((_dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)).total_seconds())
    return f"{seconds // 60}:{seconds % 60:02d}"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s: not valid JSON; left out of the report", path)
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _principle_texts(run_dir: RunDir) -> dict[str, str]:
    """Critique principle id -> its critique request, when the run's constitution can be loaded."""
    from constitutional.constitution import load_constitution

    config = _read_yaml(run_dir.config_path)
    if config is None and run_dir.config_path.exists():  # never the default constitution's texts instead
        log.warning("%s: not a readable config; principle texts left out of the report", run_dir.config_path)
        return {}
    try:
        constitution = load_constitution(str((config or {}).get("constitution", "default")), run_dir.root)
    except (UserError, OSError):
        return {}
    return {principle.id: principle.critique_request for principle in constitution.critique_principles}
