"""Training a preference model on soft labels with TRL (stage `pm`).

`soft_label_trainer_class` is TRL's `RewardTrainer` with the Bradley-Terry loss on soft labels
(`preference.soft_bradley_terry_loss`): each comparison carries `p_a`, the probability that
transcript A (TRL's `chosen` column) is better than B (`rejected`). torch and trl are imported
inside the function: importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

from constitutional.preference import soft_bradley_terry_loss


def soft_label_trainer_class() -> type:
    """TRL's `RewardTrainer` taught soft labels: it keeps the `p_a` column and uses the soft loss.

    TRL 1.16's trainer knows hard labels only (with an optional margin) and drops every column
    outside its hard-coded signature; three small overrides keep the rest of it (tokenising,
    padding, checkpoints, logging) as it is.
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
