"""Pushing the run's models to the Hugging Face Hub: config section `hub`, one repository per model.

`hub.sl_cai`, `hub.pm` and `hub.rl_cai` name a repository (`owner/name`) or are null. After stage
`sl`, `pm` or `rl` finishes, its model folder is uploaded whole (`HfApi.create_repo(exist_ok=True,
private=hub.private)`, then `upload_folder`; the repository mirrors the folder: files it no
longer holds are removed in the same commit, the repository's history keeps them). A folder
without a model card gets a provisional one first; after stage `eval` rewrites the cards of
`models/sl-cai` and `models/rl-cai`, each card is uploaded again (`upload_file`).

What was pushed is recorded in the making stage's manifest entry (`hub`: repository, commit, the
folder's fingerprint and the card's hash), so a push is done once: a stage found done whose folder
or card differs from what was pushed (a push that failed, a repository id set later, a new card)
is pushed when the same command runs again, without retraining. Only the main process pushes.

The token is read from the environment variable `hub.token_env` (default `HF_TOKEN`), never from
the config, and never written to a log or a message. A hub that cannot be reached or answers 5xx
or 429 is a `ServiceError` (exit 1: the trained model is kept, the same command pushes it); a
refusal (401, 403, 404, another 4xx) is a `UserError` naming the key.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from constitutional import distributed
from constitutional.errors import ServiceError, UserError
from constitutional.evaluation.model_card import DESCRIPTIONS, base_license, hub_id
from constitutional.records import file_sha256
from constitutional.registry import ARTEFACTS
from constitutional.rundir import MODEL_CARD, RunDir, now
from constitutional.sections import HUB_MODELS
from constitutional.training import is_complete_model

log = logging.getLogger(__name__)

# The stage that makes each pushable model (its config key under `hub` is the artefact's name).
PUSHED_AFTER = {"sl": "sl_cai", "pm": "pm", "rl": "rl_cai"}
CARD_STAGE = "eval"  # writes the model cards: they are pushed again after it

PM_DESCRIPTION = (
    "The preference model (Bai et al. 2022, steps 7-8): a one-output sequence classifier trained with a soft "
    "Bradley-Terry loss on AI harmlessness labels written against a constitution and on helpfulness comparisons. "
    "It scores `Human: ... Assistant: ...` transcripts; a higher score is a preferred reply."
)


def pushed_keys(config: Any, stages: list[str], shard: Any = None) -> list[str]:
    """The `hub` keys (with a repository id) that running `stages` may push, in order.

    Stages sl, pm and rl push their own model; eval pushes the cards of every model with an id (and a
    model never pushed before). A shard pushes nothing: its run is merged first.
    """
    if shard is not None:
        return []
    keys = {PUSHED_AFTER[name] for name in stages if name in PUSHED_AFTER}
    if CARD_STAGE in stages:
        keys = set(HUB_MODELS)
    return [key for key in HUB_MODELS if key in keys and getattr(config.hub, key)]


def check(config: Any, stages: list[str], shard: Any = None) -> None:
    """Before anything is written: every push this command may make has a token and a reachable hub.

    Raises:
        UserError: naming the first `hub.<model>` key whose push could not happen.
    """
    keys = pushed_keys(config, stages, shard)
    if not keys:
        return
    key, variable = keys[0], config.hub.token_env
    if not os.environ.get(variable, "").strip():
        raise UserError(
            f"hub.{key}: needs a token in {variable} (hub.token_env) to push {getattr(config.hub, key)}: "
            f"export {variable} with a token that may write to it, or set hub.{key}: null"
        )
    if hub_offline():
        raise UserError(f"hub.{key}: HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or set hub.{key}: null")


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE, read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


# ----------------------------------------------------------------------------- pushing


def push_stage(config: Any, run: RunDir, stage: str) -> None:
    """Push what `stage` (done) leaves to push: its model after sl/pm/rl, the model cards after eval.

    A no-op without repository ids, outside the main process, for a shard, and for what was pushed.

    Raises:
        ServiceError: the hub could not be reached or failed (5xx, 429).
        UserError: the hub refused the push (a bad token, no permission).
    """
    keys = [PUSHED_AFTER[stage]] if stage in PUSHED_AFTER else list(HUB_MODELS) if stage == CARD_STAGE else []
    keys = [key for key in keys if getattr(config.hub, key)]
    if not keys or run.shard is not None or not distributed.is_main_process():
        return
    if run.stage_status(stage) != "done":
        return
    for key in keys:
        push_model(config, run, key, stage)


def push_model(config: Any, run: RunDir, key: str, stage: str) -> None:
    """Push one model folder (`key`: sl_cai, pm or rl_cai) to `hub.<key>`, or only its card, as needed."""
    repo, folder = getattr(config.hub, key), run.path(key)
    maker = ARTEFACTS[key].made_by
    if not is_complete_model(folder):
        if stage != CARD_STAGE:
            log.warning("hub.%s: %s holds no finished model: nothing pushed", key, ARTEFACTS[key].path)
        return
    pushed = run.stage_entry(maker).get("hub") or {}
    fingerprint = run.fingerprint(key)
    if pushed.get("repo") == repo and pushed.get("model") == fingerprint:
        card = folder / MODEL_CARD
        if card.is_file() and pushed.get("card") != file_sha256(card)[:16]:
            _push_card(config, run, key, stage, pushed)
        return
    write_provisional_card(config, run, key)
    api = _api(config)
    what = f"{ARTEFACTS[key].path} to {repo}"
    _call(config, key, what, lambda: api.create_repo(repo, private=config.hub.private, exist_ok=True))
    message = f"{ARTEFACTS[key].path} from stage {maker} of run {_run_name(run)}"
    info = _call(
        config,
        key,
        what,
        lambda: api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            commit_message=message,
            ignore_patterns=["*.tmp", "*.partial"],
            delete_patterns=["*"],  # the repository mirrors the folder (.gitattributes is always kept)
        ),
    )
    _record(run, maker, pushed, repo=repo, model=fingerprint, card=file_sha256(folder / MODEL_CARD)[:16], info=info)
    log.info("hub.%s: pushed %s (%s)", key, what, _commit_url(info) or "no commit url")


def _push_card(config: Any, run: RunDir, key: str, stage: str, pushed: dict[str, Any]) -> None:
    repo, card = getattr(config.hub, key), run.path(key) / MODEL_CARD
    api = _api(config)
    what = f"the model card of {ARTEFACTS[key].path} to {repo}"
    message = f"model card of {ARTEFACTS[key].path} from stage {stage} of run {_run_name(run)}"
    digest = file_sha256(card)[:16]
    info = _call(
        config,
        key,
        what,
        lambda: api.upload_file(
            path_or_fileobj=str(card), path_in_repo=MODEL_CARD, repo_id=repo, commit_message=message
        ),
    )
    _record(run, ARTEFACTS[key].made_by, pushed, card=digest, info=info)
    log.info("hub.%s: pushed %s (%s)", key, what, _commit_url(info) or "no commit url")


def _record(run: RunDir, maker: str, pushed: dict[str, Any], info: Any, **fields: Any) -> None:
    """Keep what was pushed in the making stage's manifest entry (`hub`)."""
    entry = {**pushed, **fields, "commit": getattr(info, "oid", None), "url": _commit_url(info), "pushed": now()}
    run.update_stage(maker, hub=entry)


def _commit_url(info: Any) -> str | None:
    url = getattr(info, "commit_url", None)
    return str(url) if url else None


def _run_name(run: RunDir) -> str:
    return run.root.resolve().name


def _api(config: Any) -> Any:
    """An `HfApi` holding the token from `hub.token_env` (checked present before the run)."""
    import huggingface_hub

    return huggingface_hub.HfApi(token=os.environ.get(config.hub.token_env, "").strip() or None)


# ----------------------------------------------------------------------------- errors


def _call(config: Any, key: str, what: str, action: Callable[[], Any]) -> Any:
    """Run one hub request; its failure becomes a one-line ServiceError or UserError naming `hub.<key>`."""
    try:
        return action()
    except _transport_errors() as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        detail = _redact(config, _first_line(error) or type(error).__name__)
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            raise UserError(
                f"hub.{key}: the hub refused pushing {what} ({detail}): check that the token in "
                f"{config.hub.token_env} may write there; the model is kept: run the same command again to push it"
            ) from None
        raise ServiceError(f"hub.{key}: pushing {what} failed: {detail}") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: OSError (huggingface_hub's HTTP errors, offline mode, sockets) and
    the HTTP client's own errors (httpx or httpx2, whichever huggingface_hub uses)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2", "requests"):
        module = sys.modules.get(name)
        error = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _redact(config: Any, text: str) -> str:
    """`text` with the token, should a message ever hold it, replaced."""
    token = os.environ.get(config.hub.token_env, "").strip()
    return text.replace(token, "***") if token else text


# ----------------------------------------------------------------------------- cards


def write_provisional_card(config: Any, run: RunDir, key: str) -> Path | None:
    """Give a model folder without a card (README.md) a provisional one; stage eval replaces sl/rl's.

    Written beside the folder and renamed into it, so no temporary file ever lies in a model folder.
    Returns the card written, or None when the folder had one.
    """
    folder = run.path(key)
    card = folder / MODEL_CARD
    if card.exists():
        return None
    name = Path(ARTEFACTS[key].path).name
    base = config.models.base.name
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if key == "pm" else "text-generation",
    }
    if hub_id(base):
        metadata["base_model"] = hub_id(base)
    license_id = base_license(base, config.base_dir)
    if license_id:
        metadata["license"] = license_id
    metadata["tags"] = ["constitutional-ai", "harmlessness", name] + (["reward-model"] if key == "pm" else [])
    maker = ARTEFACTS[key].made_by
    after = (
        "Held-out accuracy and calibration: `eval/pm.json` of the run."
        if key == "pm"
        else "Not evaluated yet: stage `eval` replaces this card with one holding the run's evaluation."
    )
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {name.upper()}",
        "",
        PM_DESCRIPTION if key == "pm" else DESCRIPTIONS[name],
        "",
        f"- Base model: `{base}`",
        f"- Constitution: `{config.constitution}`; seed {config.seed}. Made with `constitutional`, stage `{maker}` "
        f"of run `{_run_name(run)}`.",
        "",
        after,
        "",
    ]
    temporary = folder.with_name(f".{folder.name}.{MODEL_CARD}.tmp")
    temporary.write_text("\n".join(lines), encoding="utf-8")
    temporary.replace(card)
    return card
