"""Training a preference model on soft labels with TRL (stage `pm`).

`soft_label_trainer_class` is TRL's `RewardTrainer` with the Bradley-Terry loss on soft labels
(`preference.soft_bradley_terry_loss`): each comparison carries `p_a`, the probability that
transcript A (TRL's `chosen` column) is better than B (`rejected`). Its input embedding trains
only at the rows the training data uses (`embedding_rows.py`: the same optimisation in a third of
the memory). torch and trl are imported inside the function: importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional.distributed import sharding_strategy
from constitutional.embedding_rows import UsedRows, holds_used_rows, train_used_rows
from constitutional.preference import soft_bradley_terry_loss


def soft_label_trainer_class() -> type:
    """TRL's `RewardTrainer` taught soft labels: it keeps the `p_a` column and uses the soft loss.

    TRL 1.16's trainer knows hard labels only (with an optional margin) and drops every column
    outside its hard-coded signature; three small overrides keep the rest of it (tokenising,
    padding, checkpoints, logging) as it is, and `train` trains the embedding's used rows only.
    """
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch["p_a"] = torch.tensor([example["p_a"] for example in examples], dtype=torch.float)  # [batch]
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        def __init__(self, *args: Any, processing_class: Any, **kwargs: Any):
            collator = SoftLabelCollator(pad_token_id=processing_class.pad_token_id)
            super().__init__(*args, processing_class=processing_class, data_collator=collator, **kwargs)

        def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
            rows = used_embedding_rows(self, resume_from_checkpoint)
            try:
                return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                if rows is not None:
                    rows.merge()  # the model is an ordinary one again, to save or to evaluate

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_a"]

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            mode = "train" if self.model.training else "eval"
            p_a = inputs.pop("p_a")  # [batch]
            outputs = model(**inputs, use_cache=False)
            # The collator stacks the A transcripts, then the B ones: [2 * batch, 1] -> two [batch].
            rewards_a, rewards_b = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_bradley_terry_loss(rewards_a, rewards_b, p_a)
            with torch.no_grad():
                agree = ((rewards_a > rewards_b) == (p_a > 0.5)).float()[p_a != 0.5]
                if len(agree):
                    self._metrics[mode]["accuracy"].append(agree.mean().item())
                self._metrics[mode]["margin"].append((rewards_a - rewards_b).abs().mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


def used_embedding_rows(trainer: Any, checkpoint: str | Path | None) -> UsedRows | None:
    """Let the trainer's model train only the embedding rows its data uses, where that is the same optimisation.

    Not where the table does not train (LoRA), where each process holds a part of it (ZeRO-3,
    FSDP), under weight decay, which would move the unused rows too, or when resuming a checkpoint
    that trained the whole table (an earlier version's: its optimizer state is the table's).
    """
    embedding = trainer.model.get_input_embeddings()
    if not embedding.weight.requires_grad or sharding_strategy() or trainer.args.weight_decay:
        return None
    if isinstance(checkpoint, (str, Path)) and not holds_used_rows(Path(checkpoint)):
        return None
    data = trainer.train_dataset
    token_ids = {token for column in ("chosen_ids", "rejected_ids") for ids in data[column] for token in ids}
    return train_used_rows(trainer.model, token_ids)
