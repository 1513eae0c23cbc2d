"""Whether the eval's judge is independent of the models it judges.

A figure that reads as a verdict (Elo, harm, evasiveness) is only a verdict when its judge is
neither one of the contenders nor the reward any contender was trained on: RL-CAI maximised the
run's PM, so the PM prefers RL-CAI by construction, and a model asked to compare its own answers
with others' is not a neutral reader either. This module names the judge and lists, in words a
report can show, every reason it is not independent.

Models are compared by what their names stand for (`model_identity`): a local folder or `.gguf`
file by its resolved path, the embedded model by the hub id it was quantised from, anything else
(a hub id, a server's model name) by its name. Two copies of the same weights in different folders
are not recognised as the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.models import resolve_model_name

# The embedded default is a Q4_K_M GGUF of this hub model: the same model under either name.
EMBEDDED_HUB_ID = "google/gemma-3-270m"

# RL algorithms whose policy was trained to maximise the PM's score (DPO trains on the AI labels).
PM_REWARD_ALGORITHMS = ("ppo", "rloo", "grpo")


@dataclass(frozen=True)
class Party:
    """A model the judge must not be: who it is in the run, and its name as configured.

    Attributes:
        role: how a reason names it, e.g. "the contender `helpful` (models.helpful)".
        name: the model name (a path, hub id, `embedded`, a server's model name).
        backend: the back end that serves it (`openai` names are not resolved as paths).
    """

    role: str
    name: str
    backend: str = "transformers"


@dataclass(frozen=True)
class RunFacts:
    """What the independence of a judge depends on, gathered by the eval stage.

    Attributes:
        contenders: the models being evaluated.
        base: `models.base`, the pretrained model SL-CAI (and so RL-CAI) was fine-tuned from.
        feedback: `models.feedback`, the model whose AI labels trained the PM (and DPO).
        pm: the run's PM folder, when it exists.
        rl_algorithms: per RL-CAI contender (display name), the algorithm that trained it.
        fine_tuned: whether a contender was fine-tuned from `models.base` (SL-CAI or RL-CAI).
    """

    contenders: tuple[Party, ...]
    base: Party
    feedback: Party
    pm: str | None
    rl_algorithms: tuple[tuple[str, str], ...]
    fine_tuned: bool


def model_identity(name: str, backend: str, base_dir: str | Path = ".") -> str:
    """What a model name stands for, comparable across config keys.

    Args:
        name: the model name as configured.
        backend: its back end; a server's (`openai`) names are the server's, never paths.
        base_dir: the folder relative paths resolve against.

    Returns:
        A resolved path, the embedded model's hub id, or the lower-cased name.
    """
    if backend != "openai":
        try:
            ref = resolve_model_name(name, base_dir)
        except UserError:
            ref = None
        if ref is not None and ref.kind == "embedded":
            return EMBEDDED_HUB_ID.lower()
        if ref is not None and ref.kind in ("local", "gguf"):
            return str(Path(ref.location).resolve())
    return name.strip().rstrip("/").lower()


def judge_reasons(kind: str, judge: Party, facts: RunFacts, base_dir: str | Path = ".") -> list[str]:
    """Every reason the judge is not independent; empty when it is.

    Args:
        kind: `pm` (the run's PM decides the Elo comparisons) or `model`.
        judge: the judge model (it answers the harm and evasion questions in either case).
        facts: the run's contenders, PM and training history.
        base_dir: the folder relative model paths resolve against.
    """
    reasons = []
    if kind == "pm":
        reasons.append(pm_reason(facts))
    same = model_identity(judge.name, judge.backend, base_dir)

    def matches(party: Party) -> bool:
        return model_identity(party.name, party.backend, base_dir) == same

    what = "the harm and evasion judge" if kind == "pm" else "the judge"
    for party in facts.contenders:
        if matches(party):
            reasons.append(f"{what} is {party.role}")
    if facts.pm is not None and same == str(Path(facts.pm).resolve()):
        reasons.append(f"{what} is the run's PM, the reward RL-CAI was trained on")
    if facts.fine_tuned and matches(facts.base):
        reasons.append(f"{what} is models.base, the pretrained model SL-CAI and RL-CAI were fine-tuned from")
    if matches(facts.feedback):
        reasons += feedback_reasons(what, facts)
    return reasons


def pm_reason(facts: RunFacts) -> str:
    """Why the run's PM is never an independent Elo judge."""
    trained = [name for name, algorithm in facts.rl_algorithms if algorithm in PM_REWARD_ALGORITHMS]
    if trained:
        return (
            f"the Elo judge is the run's PM, the reward {', '.join(trained)} was trained to maximise "
            "(its Elo is inflated by construction)"
        )
    return "the Elo judge is the run's PM, trained on this run's own AI labels (the reward stage rl optimises)"


def feedback_reasons(what: str, facts: RunFacts) -> list[str]:
    """The judge is models.feedback: its labels trained the PM that RL optimised (or DPO directly)."""
    reasons = []
    via_pm = [model for model, algorithm in facts.rl_algorithms if algorithm in PM_REWARD_ALGORITHMS]
    direct = [model for model, algorithm in facts.rl_algorithms if algorithm not in PM_REWARD_ALGORITHMS]
    if via_pm:
        reasons.append(
            f"{what} is models.feedback, which labelled the PM's training data "
            f"(the reward {', '.join(via_pm)} optimised)"
        )
    if direct:
        reasons.append(
            f"{what} is models.feedback, which labelled the preference data {', '.join(direct)} was trained on"
        )
    return reasons


def verdict_fields(kind: str, judge: Party, facts: RunFacts, base_dir: str | Path = ".") -> dict[str, Any]:
    """The `metrics.json` fields that name the judge and say whether it is independent.

    Returns:
        `judge` ({kind, name, backend, decides}), `judge_independent`, `judge_not_independent_because`.
    """
    reasons = judge_reasons(kind, judge, facts, base_dir)
    if kind == "pm":
        entry = {"kind": "pm", "name": "models/pm", "decides": ["elo"], "harm_and_evasion": judge.name}
    else:
        entry = {"kind": "model", "name": judge.name, "backend": judge.backend, "decides": ["elo", "harm", "evasion"]}
    return {"judge": entry, "judge_independent": not reasons, "judge_not_independent_because": reasons}


def judge_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The judge fields of a `metrics.json`, also from one written before they existed.

    Returns:
        {"kind", "name", "independent" (None when not recorded), "reasons"}.
    """
    judge = metrics.get("judge")
    if isinstance(judge, dict):
        return {
            "kind": judge.get("kind", "?"),
            "name": judge.get("name", "?"),
            "harm_and_evasion": judge.get("harm_and_evasion", judge.get("name", "?")),
            "independent": metrics.get("judge_independent"),
            "reasons": list(metrics.get("judge_not_independent_because", [])),
        }
    kind = judge if isinstance(judge, str) else "?"
    model = metrics.get("judge_model", "?")
    return {
        "kind": kind,
        "name": "models/pm" if kind == "pm" else model,
        "harm_and_evasion": model,
        "independent": None,
        "reasons": [],
    }


def judge_description(metrics: dict[str, Any]) -> str:
    """One line naming the judge and whether it is independent (report, model cards, CLI)."""
    summary = judge_summary(metrics)
    if summary["kind"] == "pm":
        who = f"the run's preference model (Elo), {summary['harm_and_evasion']} (harm and evasiveness)"
    else:
        who = f"the model judge {summary['name']}"
    if summary["independent"] is None:
        return f"{who}; whether it is independent was not recorded (rerun eval)"
    if summary["independent"]:
        return f"{who}: independent (not a contender's model, not the reward any contender was trained on)"
    return f"{who}: NOT independent: " + "; ".join(summary["reasons"])
