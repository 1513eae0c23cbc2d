"""What each process of a 2-process CPU launch holds when stages sl and pm load their model under
FSDP's CPU-RAM-efficient loading or DeepSpeed ZeRO-3 (started by tests/test_sharded_loading.py).

`python -m torch.distributed.run --standalone --nproc_per_node 2 sharded_loading_driver.py MODE MODEL OUT`,
gloo, with the environment `accelerate launch` gives each process for that config:

- `fsdp` (ACCELERATE_USE_FSDP, FSDP_CPU_RAM_EFFICIENT_LOADING): `sl.train` and `pm.train` run up
  to the Trainer (`build_trainer` stops them there, holding the model they loaded), then accelerate's
  own `fsdp2_prepare_model` shards the model as an FSDP2 launch does: accelerate turns FSDP on only
  for GPU processes, so it gets a stand-in accelerator holding a real `FullyShardedDataParallelPlugin`.
- `zero3` (ACCELERATE_USE_DEEPSPEED, zero stage 3, zero3_init_flag; DS_ACCELERATOR=cpu): first the
  old order (the model loaded, then the SFTConfig made), then `sl.train` and `pm.train` up to the
  Trainer, as in `fsdp`.

Every load is measured where the stage calls it: the bytes of parameter data the process holds
(not on the meta device; under ZeRO-3 its partition, `ds_tensor`), its resident memory before and
after, and its peak resident memory while loading (VmHWM, reset through /proc/self/clear_refs).
Writes `OUT/rank<N>.json`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from constitutional import distributed
from constitutional.models import resolve_model_name
from constitutional.rundir import RunDir
from constitutional.stages import pm, sl
from constitutional.training import TrainingSettings

MB = 2**20
PROBES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.11.mlp.down_proj.weight")


class Stopped(Exception):
    """Raised in place of building the Trainer: the stage's model, loaded as the stage loads it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__("stopped before the Trainer")
        self.model = model


def stop_at_trainer(training, settings, seed, model, *args, **kwargs):
    raise Stopped(model)


def memory() -> dict[str, float]:
    """Resident and peak resident memory of this process, in MB."""
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # VmHWM := VmRSS


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter data this process holds: its ZeRO-3 partition, its FSDP2 shard, or the whole."""
    total = 0
    for parameter in model.parameters():
        data = getattr(parameter, "ds_tensor", None)
        if data is None:
            data = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += 0 if data.device.type == "meta" else data.numel() * data.element_size()
    return total


def measured(load, record: dict):
    """`load`, wrapped: what the process holds before, during and after the call goes into `record`."""

    def wrapper(*args, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        reset_peak()
        before, started = memory(), time.perf_counter()
        record["zero3_config_when_loading"] = is_deepspeed_zero3_enabled()
        model = load(*args, **kwargs)
        after = memory()
        record.update(
            seconds=time.perf_counter() - started,
            held_mb=held_bytes(model) / MB,
            full_mb=sum(_numel(p) * p.element_size() for p in model.parameters()) / MB,
            rss_growth_mb=after["VmRSS"] - before["VmRSS"],
            anon_growth_mb=after["RssAnon"] - before["RssAnon"],
            peak_growth_mb=after["VmHWM"] - before["VmRSS"],
            meta_parameters=sum(p.device.type == "meta" for p in model.parameters()),
        )
        record["_baseline"] = before
        return model

    return wrapper


def _numel(parameter: torch.nn.Parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())


def stage_model(stage: str, model_dir: Path, work: Path, record: dict) -> torch.nn.Module:
    """The model `sl.train` or `pm.train` loads, caught where it would be handed to the Trainer."""
    training = TrainingSettings(device="cpu", precision="fp32")
    ref = resolve_model_name(str(model_dir))
    module, name = (sl, "load_causal_lm") if stage == "sl" else (pm, "load_sequence_classifier")
    original_load, original_build = getattr(module, name), module.build_trainer
    setattr(module, name, measured(original_load, record))
    module.build_trainer = stop_at_trainer
    try:
        if stage == "sl":
            tokenizer = sl.load_tokenizer(ref)
            example = sl.Example("Human: Hi\n\nAssistant:", " Hello." + tokenizer.eos_token, "helpful")
            sl.train(training, sl.Settings(), 0, ref, tokenizer, [example], work / "checkpoints-sl")
        else:
            pm.train(training, pm.Settings(), 0, ref, RunDir(work))
    except Stopped as stopped:
        return stopped.model
    finally:
        setattr(module, name, original_load)
        module.build_trainer = original_build
    raise AssertionError(f"{stage}.train never reached its Trainer")


def shard_fsdp2(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """accelerate's FSDP2 preparation (TRANSFORMER_BASED_WRAP, cpu_ram_efficient_loading), on the CPU mesh."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True,
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
    )  # fmt: skip
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=rank == 0,
        device=torch.device("cpu"),
    )  # fmt: skip
    return fsdp2_prepare_model(accelerator, model)


def probes(model: torch.nn.Module) -> dict[str, float]:
    """A sum per probed weight (and the score head, if any), gathered whole: every rank must call it."""
    named = dict(model.named_parameters())
    names = [name for name in named if name.endswith(PROBES) or name.startswith("score.")]
    return {name: float(_whole(named[name]).detach().double().sum()) for name in names}


def _whole(parameter: torch.nn.Parameter) -> torch.Tensor:
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter.detach()


def run_fsdp(model_dir: Path, work: Path, rank: int) -> dict:
    from transformers import AutoModelForCausalLM

    # For comparison, transformers' own loading under the same environment (not what the stages call).
    plain: dict = {}
    model = measured(AutoModelForCausalLM.from_pretrained, plain)(str(model_dir), dtype=torch.float32)
    plain.pop("_baseline")
    del model
    report = {"plain_from_pretrained": plain}
    for stage in ("sl", "pm"):
        record: dict = {}
        model = shard_fsdp2(stage_model(stage, model_dir, work, record), rank)
        gc.collect()
        now, before = memory(), record.pop("_baseline")
        record.update(
            sharded_held_mb=held_bytes(model) / MB,
            sharded_rss_growth_mb=now["VmRSS"] - before["VmRSS"],
            sharded_anon_growth_mb=now["RssAnon"] - before["RssAnon"],
            sharded_peak_growth_mb=now["VmHWM"] - before["VmRSS"],
            sharded_types=sorted({type(p).__name__ for p in model.parameters()}),
            probes=probes(model),
        )
        report[stage] = record
        del model
    return report


def run_zero3(model_dir: Path, work: Path) -> dict:
    # DeepSpeed's CPU back end would first compile a shared-memory all-reduce kernel (minutes,
    # needs a C++ compiler); loading does not use it, so the plain gloo collectives do.
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    training = TrainingSettings(device="cpu", precision="fp32")
    old: dict = {}
    model = measured(sl.load_causal_lm, old)(resolve_model_name(str(model_dir)), torch.float32, "cpu")
    args = sl.sft_config(training, sl.Settings(), 0, work / "old-order")  # only now the DeepSpeed config
    old.pop("_baseline")
    del model, args
    report = {"old_order": old}
    for stage in ("sl", "pm"):
        record: dict = {}
        model = stage_model(stage, model_dir, work, record)
        record.pop("_baseline")
        report[stage] = record
        del model
    return report


def write_pm_rows(work: Path) -> Path:
    """A run directory `work` holding the one comparison `pm.train` reads (`data/pm_train.jsonl`)."""
    row = {"prompt": "Hi", "response_a": " Hello.", "response_b": " Go away.", "p_a": 0.9, "source": "ai"}
    path = RunDir(work).path("pm_train")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return work


def warm_up(model_dir: Path) -> None:
    """One plain load, dropped, and the datasets import: what a first load costs besides the weights
    (imports, caches: about 90 MB) is then not counted as the model's."""
    import datasets  # noqa: F401  (the stages import it after the load)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gc.collect()


def main(mode: str, model_dir: Path, out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    warm_up(model_dir)
    distributed.init("cpu")  # the pipeline joins the launch's process group before any stage
    work = write_pm_rows(out / f"work{rank}")
    report = run_fsdp(model_dir, work, rank) if mode == "fsdp" else run_zero3(model_dir, work)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
