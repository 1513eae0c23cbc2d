"""The models PPO trains, as modules whose `forward` returns what PPO reads.

The policy (SL-CAI, with LoRA adapters when `rl.lora.enabled`) and the value model (initialised
from the PM, or a linear head on the policy) are wrapped so that one `forward` gives the answer
tokens' log-probabilities (and entropy, and with a value head the values) or the values: PPO never
reaches past a forward into hidden states. That is what lets `accelerator.prepare` wrap them in
DDP (gradients averaged by the wrapper's own bucketed all-reduce) or shard them with FSDP, whose
hooks fire only on a module's forward.

Batches come from `encode`: prompts left-padded to width P, answers right-padded to width R, so
the logits that predict answer tokens are the last R + 1 positions (minus the very last) and the
vocabulary head runs on those only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from constitutional.models import choose_dtype, load_tokenizer, resolve_model_name
from constitutional.prompts import Turn, render_plain
from constitutional.rl.ppo import entropy_from_logits


class PolicyModule(torch.nn.Module):
    """A causal LM whose forward returns the answer tokens' log-probabilities [B, R].

    With `value_head` (rl.value_model: policy_head) the same pass also gives the values [B, R]:
    the head on the hidden state that precedes each answer token.
    """

    def __init__(self, model: Any, value_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        response_ids: torch.Tensor, response_mask: torch.Tensor, with_entropy: bool = False,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """The answer tokens' log-probabilities under the distribution they were sampled from.

        Args:
            input_ids, attention_mask, position_ids: the [B, P + R] batch of `encode`.
            response_ids, response_mask: its answer part [B, R].
            with_entropy: also return the mean entropy of the answer positions (no gradient).
            temperature: `rl.temperature`. Rollouts sample from softmax(logits / T), so the PPO ratio
                and the KL are taken over that same distribution (as TRL and OpenRLHF do), for the
                policy and the reference alike; at T = 1 nothing changes.

        Returns:
            (log-probabilities [B, R], mean entropy or None, values [B, R] or None).
        """
        width_r = response_ids.shape[1]
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            logits_to_keep=width_r + 1, use_cache=False, output_hidden_states=self.value_head is not None,
        )  # fmt: skip
        logits = output.logits[:, :-1].float()  # [B, R, V]: position P-1+t predicts answer token t
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # [B, R]
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits, response_mask)
        values = None
        if self.value_head is not None:
            hidden = output.hidden_states[-1][:, -width_r - 1 : -1]  # [B, R, H]
            values = self.value_head(hidden).squeeze(-1).float()  # [B, R]
        return logprobs, entropy, values


class ValueModule(torch.nn.Module):
    """The PM-initialised value model: its score head on the hidden state before each answer token."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model  # a sequence-classification model, LoRA-wrapped or not

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_width: int
    ) -> torch.Tensor:
        """Returns the values [B, R]."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = inner.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )[0]  # [B, P + R, H]
        return inner.score(hidden[:, -response_width - 1 : -1]).squeeze(-1).float()  # [B, R]


@dataclass
class Models:
    """What PPO trains and reads: the policy, its reference, the value model, the tokenizer."""

    policy: Any  # a PolicyModule (after `accelerator.prepare`, maybe wrapped)
    value: Any | None  # a ValueModule; None with rl.value_model: policy_head (the policy gives values)
    tokenizer: Any
    reference: Any | None  # a PolicyModule of frozen SL-CAI; None: the policy with its adapters switched off
    lora: bool = False
    sampler: Any | None = None  # a bf16 copy of the policy for rollouts, where the hardware has native bf16


def load_models(run_dir: Any, lora: Any, value_model: str, seed: int, gradient_checkpointing: bool,
                trust_remote_code: bool, device: str) -> Models:  # fmt: skip
    """SL-CAI as the policy (LoRA when `lora.enabled`); the value model from the PM, or a head on the policy.

    Args:
        run_dir: the run directory (SL-CAI and the PM are read from it).
        lora: the `rl.lora` settings.
        value_model: `pm` or `policy_head`.
        seed: seeds the fresh LoRA adapters and value head.
        gradient_checkpointing: recompute the policy's activations in the backward pass.
        trust_remote_code: `training.trust_remote_code`.
        device: `cpu` or `cuda` (decides whether a bf16 sampler pays off).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    sl_cai = Path(run_dir.path("sl_cai"))
    tokenizer = load_tokenizer(resolve_model_name(str(sl_cai.resolve())), trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=torch.float32)
    head, value = None, None
    if value_model == "policy_head":
        # A fresh linear value head on the policy's last hidden state; it shares the policy's body.
        head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    else:
        value = AutoModelForSequenceClassification.from_pretrained(str(run_dir.path("pm")), dtype=torch.float32)
        value.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        # Non-reentrant: it needs no gradient on the inputs, which LoRA's frozen embeddings lack.
        policy.activation_checkpointing_enable({"use_reentrant": False})
    reference = None
    if lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora.peft_config("CAUSAL_LM"))
        if value is not None:
            value = get_peft_model(value, lora.peft_config("SEQ_CLS"))
    else:
        reference = PolicyModule(copy.deepcopy(policy)).eval().requires_grad_(False)
    sampler = None
    if choose_dtype("auto", device) == torch.bfloat16:
        sampler = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=torch.bfloat16).eval()
    return Models(
        PolicyModule(policy, head), ValueModule(value) if value is not None else None, tokenizer, reference,
        lora.enabled, sampler,
    )  # fmt: skip


def unwrapped(module: Any) -> Any:
    """The module inside a DDP (or FSDP 1) wrapper; the module itself otherwise (FSDP 2 shards in place)."""
    return getattr(module, "module", module)


def causal_lm(models: Models) -> Any:
    """The policy's causal LM (LoRA-wrapped when LoRA is on): what samples and what is saved."""
    return unwrapped(models.policy).model


def policy_outputs(
    models: Models, batch: dict[str, Any], with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Any, Any, Any]:
    """The batch's answers under the current policy.

    Args:
        models: the policy and value model.
        batch: from `encode`.
        with_entropy: also compute the mean entropy.
        temperature: the sampling temperature the log-probabilities are taken at (`rl.temperature`).

    Returns:
        (log-probabilities [B, R], entropy or None, values [B, R]).
    """
    logprobs, entropy, values = models.policy(
        **_policy_inputs(batch), with_entropy=with_entropy, temperature=temperature
    )
    if models.value is not None:
        values = models.value(
            batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["response_ids"].shape[1]
        )
    return logprobs, entropy, values


def reference_logprobs(models: Models, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
    """The frozen SL-CAI's log-probabilities of the same tokens: the policy without its adapters.

    Args:
        models: the reference (or the LoRA policy, whose adapters are switched off).
        batch: from `encode`.
        temperature: as for the policy, so the KL compares the same tempered distributions.

    Returns:
        [B, R] log-probabilities.
    """
    if models.reference is not None:
        return models.reference(**_policy_inputs(batch), temperature=temperature)[0]
    with causal_lm(models).disable_adapter():
        return models.policy(**_policy_inputs(batch), temperature=temperature)[0]


def _policy_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    names = ("input_ids", "attention_mask", "position_ids", "response_ids", "response_mask")
    return {name: batch[name] for name in names}


def encode(
    tokenizer: Any, conversations: Sequence[Sequence[Turn]], answers: list[list[int]], device: Any
) -> dict[str, Any]:
    """Prompts left-padded to width P, answers right-padded to width R, in one [B, P + R] batch."""
    prompts = [tokenizer(render_plain(turns, "assistant"))["input_ids"] for turns in conversations]
    width_p, width_r = max(map(len, prompts)), max(map(len, answers))
    input_ids = torch.full((len(prompts), width_p + width_r), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        input_ids[row, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        input_ids[row, width_p : width_p + len(answer)] = torch.tensor(answer)
        attention[row, width_p - len(prompt) : width_p + len(answer)] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),  # [B, P + R]
        "attention_mask": attention.to(device),  # [B, P + R]
        "position_ids": position_ids.to(device),  # [B, P + R]
        "response_ids": input_ids[:, width_p:].to(device),  # [B, R]
        "response_mask": attention[:, width_p:].float().to(device),  # [B, R]
        "prompt_width": width_p,
    }


def sync_sampler(policy: Any, sampler: Any, lora: bool, merge: bool = True) -> None:
    """Copy the policy's current weights (LoRA merged in when `merge`, else SL-CAI's) into the bf16 sampler.

    Sampling in bf16 is about twice as fast on hardware that has it; a copy per step costs well under
    a second. The log-probabilities PPO trains on are recomputed in the policy's own precision.

    Args:
        policy: the causal LM (a PeftModel when `lora`).
        sampler: the bf16 copy, same architecture.
        lora: whether `policy` carries LoRA adapters.
        merge: copy the policy with its adapters merged in (else SL-CAI's own weights).
    """
    with torch.no_grad():
        if lora and merge:
            policy.merge_adapter()
        source = policy.get_base_model() if lora else policy
        targets = dict(sampler.named_parameters())
        for name, parameter in source.named_parameters():
            if "lora_" in name:
                continue
            targets[name.replace(".base_layer", "")].copy_(parameter)
        if lora and merge:
            policy.unmerge_adapter()
