"""Run `cai` with PPO's step instrumented: each process appends, after every step, how many prompts
it rolled out and a digest of its trainable weights to `$CAI_RANK_LOG_DIR/rank<N>.txt`.

tests/test_distributed.py runs it under `accelerate launch` to check that the processes of a launch
share each rollout batch and keep identical weights (the gradients averaged by DDP's own all-reduce,
through the wrapper `accelerator.prepare` puts on the models).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from constitutional.rl import trainer

_ppo_step = trainer.ppo_step


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


trainer.ppo_step = ppo_step_with_log

if __name__ == "__main__":
    from constitutional.cli import main

    sys.exit(main(sys.argv[1:]))
