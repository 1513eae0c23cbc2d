"""Eval's prompt sets (red_team, helpful, over_refusal): where each comes from, and what is held out.

A set is `eval.<set>`, or else the run's `data.<set>` (over_refusal: the built-in set); `eval`
skips the prompts the run trained on when it reads one, and refuses before any stage runs a set
that critique would train on whole.
"""

from __future__ import annotations

from typing import Any

from constitutional.errors import UserError
from constitutional.sections import CoreConfig
from constitutional.sources import PromptItem, load_prompts

# `builtin` for each prompt set: the project's own prompt files (never trained on when eval's cap and
# data.max_* leave enough of them over).
BUILTIN = {
    "red_team": "red_team_prompts.jsonl",
    "helpful": "helpful_prompts.jsonl",
    "over_refusal": "over_refusal_prompts.jsonl",
}
PREFIX = {"red_team": "rt", "helpful": "hp", "over_refusal": "or"}


def load_prompt_set(
    config: CoreConfig, settings: Any, prompt_set: str, exclude: set[str] | frozenset[str] = frozenset()
) -> list[PromptItem]:
    """Up to `eval.max_<set>` prompts of a set, skipping the texts in `exclude`."""
    spec, cap = prompt_source(config, settings, prompt_set), getattr(settings, f"max_{prompt_set}")
    if spec == "none" or cap == 0:
        return []
    return load_prompts(
        spec,
        prefix=PREFIX[prompt_set],
        limit=cap,
        base_dir=config.base_dir,
        builtin=BUILTIN[prompt_set],
        field=settings.prompt_field if spec != "builtin" else None,
        exclude=exclude,
    )


def check_held_out(config: CoreConfig, settings: Any, prompt_set: str) -> None:
    """Refuse a prompt set that is the run's training source read whole: none of it is held out.

    Raises:
        UserError: `eval.<set>` is (or falls back to) `data.<set>` and `data.max_<set>` is null, so
            critique trains on every prompt of it and eval, which skips those, would have none.
    """
    spec, training = prompt_source(config, settings, prompt_set), getattr(config.data, prompt_set)
    if spec == "none" or getattr(settings, f"max_{prompt_set}") == 0:
        return
    files = not any(value.startswith("hf:") or value == "builtin" for value in (spec, training))
    same = spec == training or (files and config.resolve_path(spec) == config.resolve_path(training))
    if same and getattr(config.data, f"max_{prompt_set}") is None:
        raise UserError(
            f"eval.{prompt_set}: no held-out prompts: it {'is' if getattr(settings, prompt_set) else 'falls back to'} "
            f"data.{prompt_set} ({spec}), all of which critique trains on (data.max_{prompt_set}: null); set "
            f"eval.{prompt_set} to prompts the run does not train on, e.g. a test split"
        )


def prompt_source(config: CoreConfig, settings: Any, prompt_set: str) -> str:
    """The source of a prompt set: `eval.<set>`, else the run's `data.<set>`."""
    own = getattr(settings, prompt_set)
    if own is not None:
        return own
    return getattr(config.data, prompt_set) if prompt_set != "over_refusal" else "builtin"
