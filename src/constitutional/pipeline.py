"""Running stages in order: validate everything first, then write, skip what is done, resume the rest.

Each stage's manifest entry records the settings it ran with (its config section and the other
keys it reads) and fingerprints of its inputs. When a later run of the same directory changes
them, that stage and every stage after it that has outputs are stale: the run is refused unless
`--rerun` is given, in which case their outputs move under `previous/<time>/` and they run again;
the outputs of earlier stages are reused untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from constitutional import distributed, hub, memory, trackers
from constitutional.config import stage_settings
from constitutional.errors import UserError
from constitutional.records import read_records
from constitutional.registry import ARTEFACTS, RECORD_FILES, SHARDABLE, STAGES, TRAINING_STAGES
from constitutional.rundir import RunDir
from constitutional.stages import stage_modules
from constitutional.training import check_precision, resolved_precision

log = logging.getLogger(__name__)


def parse_stages(text: str | None) -> list[str]:
    """`critique,sl` -> ["critique", "sl"] in pipeline order; None -> every stage.

    Raises:
        UserError: an unknown stage.
    """
    if text is None:
        return list(STAGES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--stages: expected a comma-separated list of stages")
    for name in names:
        if name not in STAGES:
            raise UserError(f"--stages: unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    return [name for name in STAGES if name in names]


@dataclass
class Plan:
    """What `cai run` would do, decided and checked before anything is written (`cai plan` prints it).

    Attributes:
        run: the run directory.
        stages: the stages asked for, in pipeline order.
        modules: every stage's module, by name.
        inputs: each asked stage's validated inputs (its `check` result).
        stale: stages whose outputs were made with other settings or inputs, with what changed.
        affected: the stages `--rerun` runs again (their outputs move under previous/).
    """

    run: RunDir
    stages: list[str]
    modules: dict[str, ModuleType]
    inputs: dict[str, Any]
    stale: dict[str, list[str]]
    affected: list[str]


def plan_pipeline(config: Any, run_dir: Path, stages: list[str], rerun: bool = False, shard: Any = None) -> Plan:
    """Check everything `run_pipeline` checks, and load every stage's inputs, without writing.

    Raises:
        UserError: as `run_pipeline`.
    """
    modules = stage_modules()
    run = RunDir(run_dir, shard=shard)
    check_launch(stages, shard)
    check_shards(run, stages, modules, config)
    hub.check(config, stages, shard)  # a push this command makes has a token: refused now, not after training
    if rerun and not run.exists():
        raise UserError(f"{run.root}: --rerun: there is no run here to rerun (no manifest.json)")
    inputs = {name: modules[name].check(config, getattr(config, name)) for name in stages}
    for name in stages:  # checks that need what the run directory holds
        if hasattr(modules[name], "check_run"):
            modules[name].check_run(config, getattr(config, name), run, stages)
    if any(name in TRAINING_STAGES and run.stage_status(name) != "done" for name in stages):
        check_precision(config.training)  # bf16 where this machine would emulate it
    stale = find_stale(config, run, modules, inputs)
    affected = affected_stages(run, stale)
    if stale and not rerun:
        raise UserError(describe_stale(run, stale, affected))
    check_upstream(config, run, modules, stages, set(affected))
    return Plan(run, stages, modules, inputs, stale, affected)


def run_pipeline(config: Any, run_dir: Path, stages: list[str], rerun: bool = False, shard: Any = None) -> RunDir:
    """Run `stages` of `config` in `run_dir`.

    Every stage's inputs are loaded and validated, and the plan is checked against what the run
    directory holds, before anything is written (`plan_pipeline`): bad input leaves nothing
    half-written. Stages already `done` with the same settings and inputs are skipped; an
    interrupted stage resumes.

    Args:
        config: the loaded config.
        run_dir: the run directory (created if needed).
        stages: the stages to run, in pipeline order.
        rerun: run stale stages again (their outputs are archived) instead of refusing.
        shard: a `sharding.Shard`: make only this shard's records (generating stages only; see
            `cai merge`).

    Raises:
        UserError: bad input; stale stages without `rerun`; `rerun` where there is no run; a stage
            whose upstream artefacts no stage has made or will make; the hub refused a push.
        ServiceError: the hub could not take a push (`hub.py`): what is done stays done, and the
            same command pushes it.
    """
    plan = plan_pipeline(config, run_dir, stages, rerun, shard)
    run = plan.run
    memory.map_large_allocations()
    distributed.init(config.training.device)
    if distributed.is_main_process():  # under a multi-process launch, only process 0 writes
        if plan.affected:
            run.archive(plan.affected)
        write_config(run, config)
    # A stage's models go to the hub once it is done (or, found done, if their push is still owed). Under
    # a launch the other processes would wait at the next stage's barrier meanwhile: push after the last.
    push_now = distributed.world_size() == 1
    for name in stages:
        _run_stage(config, run, plan.modules[name], plan.inputs[name])
        if push_now:
            hub.push_stage(config, run, name)
    if not push_now:
        for name in stages:
            hub.push_stage(config, run, name)
    return run


def _run_stage(config: Any, run: RunDir, module: ModuleType, inputs: Any) -> None:
    name = module.NAME
    distributed.wait_for_everyone()  # every process reads the manifest as process 0 left it
    if run.stage_status(name) == "done":
        log.info("%s: already done with these settings, skipping", name)
        return
    settings = getattr(config, name)
    main = distributed.is_main_process()
    if main:
        upstream = {artefact: run.fingerprint(artefact) for artefact in all_reads(config, module)}
        extra: dict[str, Any] = {}
        remote_code = config.remote_code_keys()
        if remote_code:
            log.warning("%s: %s on: code from model repositories may run", name, ", ".join(remote_code))
            extra["trust_remote_code"] = remote_code
        if run.shard is not None:
            extra["shard"] = str(run.shard)
        if config.training.report_to != "none":  # an interrupted stage logs on to the run it began
            extra["tracker_run"] = run.stage_entry(name).get("tracker_run") or trackers.new_run_id(name)
        run.start_stage(name, stage_settings(config, module), {**module.input_hashes(inputs), **upstream}, **extra)
        trackers.open_stage(config.training, run.root, name, extra.get("tracker_run"), stage_settings(config, module))
    memory.reset_peak()
    try:
        counts = module.run(config, settings, run, inputs)
    except BaseException as error:
        if main:
            trackers.close_stage(run.root, None, failed=True)
            run.fail_stage(name, _describe(error))
        raise
    finally:
        peak = memory.peak_rss_mb()
        memory.release()  # the next stage starts without this one's models
    if not main:
        return
    run.update_stage(name, peak_rss_mb=peak)
    if run.shard is not None:  # what `cai merge` checks each shard's files against
        records = {
            artefact: len(read_records(run.path(artefact)))
            for artefact in RECORD_FILES
            if ARTEFACTS[artefact].made_by == name and run.path(artefact).exists()
        }
        run.update_stage(name, records=records)
    if name in TRAINING_STAGES:  # what `precision: auto` came to on this machine
        run.update_stage(name, precision=resolved_precision(config.training))
    run.finish_stage(name, counts)
    trackers.close_stage(run.root, counts)
    log.info("%s: done %s", name, counts)


# ----------------------------------------------------------------------------- staleness


def find_stale(
    config: Any, run: RunDir, modules: dict[str, ModuleType], inputs: dict[str, Any]
) -> dict[str, list[str]]:
    """Stages that have outputs made with other settings or inputs than now, each with what changed.

    Settings are compared for every stage that ran; inputs from outside the run directory (prompt
    files, constitution, base model) only for the stages being run now (they were just loaded);
    upstream artefacts by fingerprint.

    Returns:
        {stage: ["feedback.cot: False -> True", "data/pairs.jsonl changed", ...]} in pipeline order.
    """
    stale: dict[str, list[str]] = {}
    for name, module in modules.items():
        entry = run.stage_entry(name)
        if entry.get("status", "pending") == "pending":
            continue
        recorded, current = entry.get("settings", {}), stage_settings(config, module)
        reasons = [
            f"{key}: {recorded[key]!r} -> {current[key]!r}"
            for key in current
            if key in recorded and recorded[key] != current[key]
        ]
        recorded_inputs = entry.get("inputs", {})
        for artefact in all_reads(config, module):
            if artefact in recorded_inputs and run.fingerprint(artefact) != recorded_inputs[artefact]:
                reasons.append(f"{ARTEFACTS[artefact].path} changed")
        if name in inputs:
            for key, value in module.input_hashes(inputs[name]).items():
                if key in recorded_inputs and recorded_inputs[key] != value:
                    reasons.append(f"{name} input {key!r} changed")
        if reasons:
            stale[name] = reasons
    return stale


def affected_stages(run: RunDir, stale: dict[str, list[str]]) -> list[str]:
    """The first stale stage and every later stage that has outputs: all of them must be redone."""
    if not stale:
        return []
    first = STAGES.index(next(iter(stale)))
    return [name for name in STAGES[first:] if run.stage_status(name) != "pending"]


def describe_stale(run: RunDir, stale: dict[str, list[str]], affected: list[str]) -> str:
    """The one-line refusal: what changed, and which stages `--rerun` would run again."""
    # A changed model is read by several stages: each change is named once.
    changes = "; ".join(dict.fromkeys(reason for reasons in stale.values() for reason in reasons))
    return (
        f"{run.root}: changed since the last run: {changes}; stages that would run again: {', '.join(affected)}. "
        "Add --rerun to rerun them (their current outputs are kept under previous/), or use another --run-dir"
    )


def check_upstream(
    config: Any, run: RunDir, modules: dict[str, ModuleType], stages: list[str], archived: set[str]
) -> None:
    """Every artefact a stage reads must come from a stage run now, before it, or one already done.

    An artefact placed by hand (its stage never ran here) counts as there.

    Raises:
        UserError: naming the stage, the missing artefact and the stage that makes it.
    """
    for name in stages:
        for artefact in modules[name].reads(config, getattr(config, name)):
            maker = ARTEFACTS[artefact].made_by
            if maker in stages and STAGES.index(maker) < STAGES.index(name):
                continue
            status = "pending" if maker in archived else run.stage_status(maker)
            if status == "done" or (status == "pending" and maker not in archived and run.path(artefact).exists()):
                continue
            state = (
                "would be rerun" if maker in archived else "has not finished" if status != "pending" else "has not run"
            )
            raise UserError(
                f"stage {name!r} reads {run.path(artefact)}, which stage {maker!r} makes, and {maker!r} {state} "
                f"in {run.root}: add it to --stages (e.g. --stages {maker},{name})"
            )


# ----------------------------------------------------------------------------- launches


def check_launch(stages: list[str], shard: Any) -> None:
    """Under a multi-process launch (`accelerate launch`, `torchrun`) only the training stages run.

    Raises:
        UserError: a generating stage or `--shard` with more than one process: generation scales
            out with `--shard` across machines and with the back ends' own parallelism instead.
    """
    processes = distributed.world_size()
    if processes == 1:
        return
    others = [name for name in stages if name not in TRAINING_STAGES]
    if others or shard is not None:
        what = f"stage(s) {', '.join(others)}" if others else "--shard"
        raise UserError(
            f"this launch has {processes} processes, and {what} would run once in each: under accelerate launch "
            f"run only the training stages ({', '.join(TRAINING_STAGES)}), e.g. --stages sl; run the others in one "
            "process (vllm or a server fleet spreads generation over GPUs; --shard over machines)"
        )


# ----------------------------------------------------------------------------- shards


def check_shards(run: RunDir, stages: list[str], modules: dict[str, ModuleType], config: Any) -> None:
    """A sharded run makes only generating stages, one shard per run directory, never from unmerged shards.

    Raises:
        UserError: a stage that cannot be sharded; a run directory holding another shard (or an
            unsharded run of the stage); a stage that would read a shard's records before `cai merge`.
    """
    if run.shard is not None:
        for name in stages:
            if name not in SHARDABLE:
                raise UserError(f"--shard: stage {name!r} cannot be sharded (sharded stages: {', '.join(SHARDABLE)})")
    for name in stages:
        entry = run.stage_entry(name)
        recorded, wanted = entry.get("shard"), (str(run.shard) if run.shard is not None else None)
        if entry.get("status", "pending") != "pending" and recorded != wanted:
            held = f"shard {recorded}" if recorded else "an unsharded run"
            raise UserError(f"{run.root}: stage {name} there holds {held}; use one run directory per shard")
        for artefact in all_reads(config, modules[name]):
            maker = ARTEFACTS[artefact].made_by
            if maker != name and run.stage_entry(maker).get("shard") and run.stage_entry(maker).get("status") == "done":
                raise UserError(
                    f"{run.root}: stage {name} reads {ARTEFACTS[artefact].path}, which holds only shard "
                    f"{run.stage_entry(maker)['shard']} of {maker}: `cai merge` the shards first"
                )


# ----------------------------------------------------------------------------- helpers


def all_reads(config: Any, module: ModuleType) -> list[str]:
    """What a stage reads: its required artefacts, then those it uses when present (`optional_reads`)."""
    settings = getattr(config, module.NAME)
    optional = getattr(module, "optional_reads", None)
    return module.reads(config, settings) + (optional(config, settings) if optional else [])


def _describe(error: BaseException) -> str:
    """One line for the manifest about why a stage stopped."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def write_config(run: RunDir, config: Any) -> None:
    """Write the resolved config of this run (atomically); each stage's own settings are in the manifest."""
    run.root.mkdir(parents=True, exist_ok=True)
    temporary = run.config_path.with_name("config.yaml.tmp")
    temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    temporary.replace(run.config_path)
