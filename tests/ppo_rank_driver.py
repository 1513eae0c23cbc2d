"""Run `cai` with PPO's step instrumented: each process appends, after every step, how many prompts
it rolled out and a digest of its trainable weights to `$CAI_RANK_LOG_DIR/rank<N>.txt`.

tests/test_distributed.py runs it under `accelerate launch` to check that the processes of a launch
share each rollout batch and keep identical weights (with small gradient buckets, so the averaging
goes through many of them).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from constitutional.stages import rl

_ppo_step = rl.ppo_step


def ppo_step_with_log(accelerator, models, optimizer, kl_control, settings, prompts, *args, **kwargs):
    metrics = _ppo_step(accelerator, models, optimizer, kl_control, settings, prompts, *args, **kwargs)
    digest = hashlib.sha256()
    for _, parameter in sorted(models.policy.named_parameters()):
        if parameter.requires_grad:
            digest.update(parameter.detach().cpu().numpy().tobytes())
    log = Path(os.environ["CAI_RANK_LOG_DIR"]) / f"rank{accelerator.process_index}.txt"
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"{metrics['step']} {len(prompts)} {digest.hexdigest()}\n")
    return metrics


rl.ppo_step = ppo_step_with_log
rl.GRADIENT_BUCKET = 4096  # the tiny model's gradients then span many buckets, as a large model's do

if __name__ == "__main__":
    from constitutional.cli import main

    sys.exit(main(sys.argv[1:]))
