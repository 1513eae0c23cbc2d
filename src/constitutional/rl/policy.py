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
                trust_remote_code: bool, device: str, bf16: bool = False) -> Models:  # fmt: skip
    """SL-CAI as the policy (LoRA when `lora.enabled`); the value model from the PM, or a head on the policy.

    With LoRA and bf16 training the frozen weights are held in bf16, as TRL and OpenRLHF load a LoRA
    policy: autocast multiplies in bf16 anyway, the weights are half the memory (1 GB less for the
    embedded model, 29 GB less for a 7B), and autocast no longer casts them on every forward. What
    trains stays fp32 (the adapters, the value model's score head, a policy value head). Without
    LoRA every weight trains, so they stay fp32 (master weights).

    Args:
        run_dir: the run directory (SL-CAI and the PM are read from it).
        lora: the `rl.lora` settings.
        value_model: `pm` or `policy_head`.
        seed: seeds the fresh LoRA adapters and value head.
        gradient_checkpointing: recompute the policy's activations in the backward pass.
        trust_remote_code: `training.trust_remote_code`.
        device: `cpu` or `cuda` (decides whether a bf16 sampler pays off).
        bf16: training runs under bf16 autocast (`training.precision`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    sl_cai = Path(run_dir.path("sl_cai"))
    tokenizer = load_tokenizer(resolve_model_name(str(sl_cai.resolve())), trust_remote_code)
    frozen = torch.bfloat16 if lora.enabled and bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=frozen)
    head, value = None, None
    if value_model == "policy_head":
        # A fresh linear value head on the policy's last hidden state; it shares the policy's body.
        head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    else:
        value = AutoModelForSequenceClassification.from_pretrained(str(run_dir.path("pm")), dtype=frozen)
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
        for model in (policy, value):
            _trainable_in_fp32(model)
    else:
        reference = PolicyModule(copy.deepcopy(policy)).eval().requires_grad_(False)
    if frozen == torch.bfloat16:
        _contiguous_head_input(policy.get_base_model())
    sampler = _bf16_sampler(sl_cai, device, policy if frozen == torch.bfloat16 else None)
    return Models(
        PolicyModule(policy, head), ValueModule(value) if value is not None else None, tokenizer, reference,
        lora.enabled, sampler,
    )  # fmt: skip


def _bf16_sampler(sl_cai: Path, device: str, bf16_policy: Any | None) -> Any | None:
    """A bf16 copy of SL-CAI to sample from, where the hardware has native bf16 (else None).

    Args:
        sl_cai: the SL-CAI folder.
        device: `cpu` or `cuda`.
        bf16_policy: the LoRA policy when its frozen weights are bf16: the sampler then shares them.
    """
    from transformers import AutoModelForCausalLM

    if choose_dtype("auto", device) != torch.bfloat16:
        return None
    sampler = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=torch.bfloat16).eval()
    if bf16_policy is not None:
        _share_frozen_weights(bf16_policy.get_base_model(), sampler)
        _contiguous_head_input(sampler)
    return sampler


def _share_frozen_weights(base: Any, sampler: Any) -> None:
    """Let the sampler use the policy's own bf16 tensors wherever no adapter changes them (the embeddings, the
    norms): only the LoRA-wrapped weights need a merged copy. For the embedded model that is 0.34 GB less."""
    for name, parameter in base.named_parameters():
        if "lora_" in name or ".base_layer." in name or "modules_to_save" in name:
            continue
        owner, _, attribute = name.rpartition(".")
        setattr(sampler.get_submodule(owner), attribute, parameter)
    sampler.tie_weights()  # a tied output head follows the shared input embeddings


def _contiguous_head_input(model: Any) -> None:
    """Hand the output head contiguous hidden states.

    transformers slices the hidden states for `logits_to_keep` (a strided view) before the head. A
    strided 3-D input times a weight that needs no gradient (a frozen bf16 head) is multiplied by
    PyTorch as a batched matmul over copies of the weight: measured on the embedded model's
    262k-token head for 8 answers, 5.6 s and 8 copies of the head, against 0.2 s for a contiguous
    input (a weight that needs a gradient takes the fast path either way).
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def _trainable_in_fp32(model: Any) -> None:
    """Trainable parameters in fp32 (the optimizer's master weights); PEFT's copy of the value model's score head
    (a module it trains in full) would otherwise keep the bf16 of the frozen weights it was copied from."""
    if model is None:
        return
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


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
    a second. The log-probabilities PPO trains on are recomputed by the policy itself. The adapters'
    update is added on the way (base + delta, rounded once into the sampler), never merged into the
    policy and taken out again: with frozen weights in bf16, merging and unmerging in place would
    round them a little further at every step.

    Args:
        policy: the causal LM (a PeftModel when `lora`).
        sampler: the bf16 copy, same architecture.
        lora: whether `policy` carries LoRA adapters.
        merge: copy the policy with its adapters merged in (else SL-CAI's own weights).
    """
    with torch.no_grad():
        source = policy.get_base_model() if lora else policy
        deltas = _adapter_deltas(source) if lora and merge else {}
        targets = dict(sampler.named_parameters())
        for name, parameter in source.named_parameters():
            if "lora_" in name:
                continue
            target, delta = targets[name.replace(".base_layer", "")], deltas.get(name)
            if target is not parameter:  # a shared frozen tensor is already what the sampler reads
                target.copy_(parameter if delta is None else parameter + delta)


def _adapter_deltas(model: Any) -> dict[str, torch.Tensor]:
    """{name of a LoRA-wrapped weight: its active adapters' update (scaled B @ A, in the adapters' fp32)}."""
    deltas = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")) or module.disable_adapters:
            continue
        active = [adapter for adapter in module.active_adapters if adapter in getattr(module, "lora_A", {})]
        if active:
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(adapter) for adapter in active)
    return deltas
