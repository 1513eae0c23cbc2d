"""Fully fine-tune a preference model's input embedding while holding only the rows its data uses.

A sequence classifier has no vocabulary head, so its embedding is an input table and nothing
else. Under AdamW without weight decay a row whose token never occurs in the training data gets a
zero gradient at every step, hence zero moments and a zero update: training only the rows the data
uses is the same optimisation as training the whole table. The Trainer then keeps gradients and
two AdamW moments for those rows alone. For the embedded model (262,144 tokens x 640, 63% of the
PM's parameters) that is 2 GB of fp32 the full fine-tune no longer holds, and its steps are a
fifth quicker (the quickstart's `pm` in a fresh process: a peak of 5.1 GB instead of 7.2 GB,
training 64 s instead of 83 s; `docs/benchmarks.md`).

How: the table is frozen and a trainable `used_row_update` ([used rows + 1, width], zeros) sits
beside it on the embedding module; a forward hook adds the update of each token's row to the
table's output (scaled as the module scales its output, e.g. Gemma's sqrt(width)). Unused tokens
(and the padding token, whose row nn.Embedding never updates) point at the last row, zero and
without gradient. `merge()` writes the trained rows into the table and removes the rest, so the
saved model is an ordinary one. The update is an ordinary parameter, so checkpoints hold it and a
resumed run continues it.

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UPDATE, SLOTS = "used_row_update", "used_row_slots"  # the names added to the embedding module


class UsedRows:
    """The trainable rows beside a frozen embedding table; `merge()` puts them into the table."""

    def __init__(self, embedding: Any, hook: Any, used: int):
        self.embedding, self.hook, self.used = embedding, hook, used

    def merge(self) -> None:
        """Add the trained rows into the table, drop the hook, the update and the slots; the table trains again."""
        import torch

        embedding = self.embedding
        update, slots = getattr(embedding, UPDATE), getattr(embedding, SLOTS)
        with torch.no_grad():
            trained = (slots < self.used).nonzero().squeeze(1)  # [used] token ids
            embedding.weight[trained] += update[slots[trained]].to(embedding.weight.dtype)
        self.hook.remove()
        delattr(embedding, UPDATE)
        delattr(embedding, SLOTS)
        embedding.weight.requires_grad_(True)


def train_used_rows(model: Any, token_ids: Iterable[int]) -> UsedRows | None:
    """Let `model`'s input embedding train only at the rows of `token_ids` (see the module's docstring).

    Args:
        model: a sequence classifier whose input embedding trains (not under LoRA or sharding: the
            caller checks), on one device.
        token_ids: every token id of the training data.

    Returns:
        The `UsedRows` to `merge()` before saving; None where the embedding's output is not its
        table's row times one scale (a custom embedding): it then trains whole, as before.
    """
    import torch

    embedding = model.get_input_embeddings()
    weight = embedding.weight
    scale = _output_scale(embedding)
    if scale is None:
        log.info("the input embedding is not a scaled table lookup: training all of its rows")
        return None
    padding = getattr(embedding, "padding_idx", None)
    used_ids = sorted(set(token_ids) - {padding})
    slots = torch.full((weight.shape[0],), len(used_ids), dtype=torch.long, device=weight.device)
    slots[torch.tensor(used_ids, dtype=torch.long, device=weight.device)] = torch.arange(
        len(used_ids), device=weight.device
    )
    weight.requires_grad_(False)
    embedding.register_buffer(SLOTS, slots, persistent=False)
    update = torch.zeros(len(used_ids) + 1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    setattr(embedding, UPDATE, torch.nn.Parameter(update))  # the table's dtype: its optimisation, row for row
    hook = embedding.register_forward_hook(_add_update(scale, len(used_ids)))
    log.info("input embedding: training the %d of %d rows the data uses", len(used_ids), weight.shape[0])
    return UsedRows(embedding, hook, len(used_ids))


def holds_used_rows(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint's weights hold a `used_row_update` (it trained the used rows only)."""
    from safetensors import safe_open

    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
            names = list(weights.keys())
    return any(name.endswith(UPDATE) for name in names)


def _add_update(scale: float, unused_slot: int) -> Any:
    def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        import torch.nn.functional as F

        rows = F.embedding(getattr(module, SLOTS)[args[0]], getattr(module, UPDATE), padding_idx=unused_slot)
        return output + (rows * scale).to(output.dtype)

    return hook


def _output_scale(embedding: Any) -> float | None:
    """The factor by which `embedding` scales its table's rows (1 for nn.Embedding), or None if it does otherwise."""
    import torch

    weight = embedding.weight
    ids = torch.arange(min(4, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        rows, output = weight[ids].double(), embedding(ids).double()  # float64: the scale to the last bit
    if output.shape != rows.shape:
        return None
    scale = float((output * rows).sum() / (rows * rows).sum())
    return scale if torch.allclose(output, rows * scale, rtol=1e-5, atol=1e-6) else None
