"""The vocabulary head of TRL's fused-LM-head trainers applied only where there is a loss, on CPU too.

The embedded model's 262k-token output layer is about 60% of its compute per token; `sl` trains
under `loss_positions_only` so that layer never runs on prompt tokens whose result is thrown away.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def loss_positions_only() -> Iterator[bool]:
    """Project to the vocabulary only at positions that carry a loss, on CPU as on CUDA.

    TRL's trainers with a language-model loss (SFTTrainer among them) replace the model's forward
    with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the per-token log-probabilities
    come from vocabulary tiles, never the (batch, seq_len, vocab) logits. In that forward,
    `compact = _use_triton(hidden_states.device)` decides which rows go through the head: when
    true only the labelled ones (`hidden_states[mask]`, (n_labelled, hidden)), otherwise every
    position ((batch * (seq_len - 1), hidden)), the ignored ones zeroed afterwards. `_use_triton` is
    true only on CUDA/XPU with Triton; elsewhere TRL keeps the tile shapes fixed for compilers such
    as Neuron's, which would recompile for every new count of labelled positions. On CPU that spends
    the most expensive layer on prompt tokens whose result is thrown away: the embedded model's
    262k-token output layer is about 60% of its compute per token. The log-probabilities of the
    labelled positions, and so the loss and its gradients, are the same either way.

    This patches the name `_use_triton` in `trl.trainer.utils`, which only that decision reads:
    the kernels keep their own binding, so on CPU the tiles are still folded in torch, not Triton.

    Yields:
        True when the optimisation is active. False when TRL's internals changed (the function is
        gone or the fused forward no longer calls it): nothing is patched, training is unchanged
        and correct, only slower on CPU, and a warning says so.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    reason = _patch_unusable(trl_utils, original)
    if reason:
        log.warning("Scoring only the labelled positions on CPU is off: %s. Training is correct, but slower.", reason)
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def _patch_unusable(trl_utils: Any, original: Any) -> str | None:
    """Why patching `trl_utils._use_triton` would not reach the fused LM head (None: it would)."""
    if not callable(original):
        return "trl.trainer.utils._use_triton is missing (TRL internals changed)"
    fused = getattr(trl_utils, "add_fused_lm_head", None)
    if fused is None or not _code_reads(getattr(fused, "__code__", None), "_use_triton"):
        return "TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) no longer calls _use_triton"
    return None


def _code_reads(code: Any, name: str) -> bool:
    """Whether `code` or a function nested in it reads the global `name`."""
    if code is None:
        return False
    nested = (const for const in code.co_consts if hasattr(const, "co_names"))
    return name in code.co_names or any(_code_reads(const, name) for const in nested)
