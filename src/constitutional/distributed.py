"""One run, several processes: what changes when training stages run under `accelerate launch`.

`accelerate launch` (or `torchrun`) starts one process per GPU, each running the same `cai run`
command with `WORLD_SIZE` and `RANK` set. The Trainer of each training stage spreads its work over
them (DDP, DeepSpeed or FSDP, as the accelerate config says); everything else must happen once:
- process 0 (the main process) alone writes the manifest, the config, records and the model;
- data that a stage prepares before training is made by process 0 first (`main_process_first`),
  then the others run the same resumable code and find it done;
- the weights are gathered from all processes when DeepSpeed ZeRO-3 or FSDP shards them.

In a single process every helper here is a no-op, so the stages read the same either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# What `accelerate launch` sets in each process when its config selects a sharded strategy.
_SHARDING_ENV = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def world_size() -> int:
    """How many processes run this command (1 without a distributed launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def sharding_strategy() -> str | None:
    """ "DeepSpeed" or "FSDP" when the launch shards the weights over the processes, else None (DDP or one process)."""
    for variable, name in _SHARDING_ENV.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            return name
    return None


def init(device: str) -> None:
    """Join the process group of a multi-process launch (gloo on CPU, NCCL on GPUs); no-op in one process.

    The Trainer would join it too, but the pipeline waits on the other processes before its first
    training stage starts, so it joins first, on the device the Trainer will use.

    Args:
        device: `training.device` (auto or cpu under a launch).
    """
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def shutdown() -> None:
    """Leave the launch's process group once every process is done; no-op in one process.

    A process that exits with its gloo or NCCL group still alive can abort at interpreter exit
    ("terminate called without an active exception", SIGABRT) after its work is done, and the
    launcher then reports the whole run as failed.
    """
    if world_size() > 1:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            wait_for_everyone()
            torch.distributed.destroy_process_group()


def wait_for_everyone() -> None:
    """A barrier across the processes of the launch; no-op in one process."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on the main process, then on the others (which find its results written)."""
    if not is_main_process():
        wait_for_everyone()
    yield
    if is_main_process():
        wait_for_everyone()
