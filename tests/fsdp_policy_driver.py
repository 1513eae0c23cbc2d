"""Two PPO-like SGD steps on PPO's models, sharded with torch's FSDP2 (`fully_shard`) or not at all.

Started by tests/test_fsdp_policy.py twice on the tiny model:

- `python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_policy_driver.py MODEL OUT`:
  gloo on CPU; the LoRA policy (`PolicyModule`) and the LoRA value model (`ValueModule`) each get
  `fully_shard` on every decoder layer and then on the root (what accelerate's
  TRANSFORMER_BASED_WRAP does); each rank trains on its half of a fixed batch of 4.
- `python fsdp_policy_driver.py MODEL OUT`: one process, no sharding, the whole batch.

Each rank's loss is its own half's loss (masked means over that half's tokens), and the
one-process loss the mean of the two halves' losses: FSDP2 reduce-scatters the mean of the ranks' gradients,
so both runs take exactly the same step. The reference log-probabilities come from the policy with
its adapters switched off, as PPO computes them.

Writes to OUT: `state.pt` (rank 0: every trainable parameter after the steps, gathered whole),
`rank<N>.pt` (that rank's rows' log-probabilities, reference log-probabilities and values at each
step, and how a decoder-layer parameter is sharded there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from constitutional.rl.policy import PolicyModule, ValueModule, encode
from constitutional.rl.ppo import clipped_policy_loss, masked_mean
from constitutional.training import LoraSettings

CONVERSATIONS = [
    [("human", "How do I bake bread?")],
    [("human", "Tell me a joke about the meeting at 3:30pm.")],
    [("human", "What is 0123?")],
    [("human", "Rewrite the response to remove harm.")],
]
ANSWER_TEXTS = [" Mix flour and water.", " The answer is: (A)", " Here is a safer answer, bring notes.", " Fine."]
STEPS = 2
LEARNING_RATE = 0.5
KL_COEF = 0.1
SHARD_PROBE = "layers.0.self_attn.q_proj.base_layer.weight"  # a frozen decoder-layer weight, 64 x 64


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules named by the model's `_no_split_modules` (LlamaDecoderLayer): accelerate's wrap policy."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(inner._no_split_modules)
    return [module for module in model.modules() if type(module).__name__ in names]


def load(model_dir: str) -> tuple[PolicyModule, ValueModule, object]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)  # no dropout: both runs see the same masks
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                            lora.peft_config("CAUSAL_LM"))  # fmt: skip
    torch.manual_seed(1)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, num_labels=1)
    value.config.pad_token_id = tokenizer.pad_token_id
    value = get_peft_model(value, lora.peft_config("SEQ_CLS"))
    return PolicyModule(policy), ValueModule(value), tokenizer


def fixed_batch(tokenizer) -> dict:
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ANSWER_TEXTS]
    batch = encode(tokenizer, CONVERSATIONS, answers, "cpu")
    generator = torch.Generator().manual_seed(7)
    width_r = batch["response_ids"].shape[1]
    batch["advantages"] = torch.randn(len(answers), width_r, generator=generator)
    batch["returns"] = torch.randn(len(answers), width_r, generator=generator)
    return batch


def rows(batch: dict, selection: slice) -> dict:
    return {key: value[selection] if torch.is_tensor(value) else value for key, value in batch.items()}


def half_loss(batch: dict, logprobs, old, reference, values) -> torch.Tensor:
    """PPO's clipped policy loss, a k1 KL penalty against the reference, and the value loss, on one half."""
    mask = batch["response_mask"]
    policy_loss, _ = clipped_policy_loss(logprobs, old, batch["advantages"], mask)
    kl = masked_mean(logprobs - reference, mask)
    value_loss = 0.5 * masked_mean((values - batch["returns"]) ** 2, mask)
    return policy_loss + KL_COEF * kl + value_loss


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective when it is a sharded DTensor: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(model_dir: str, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    policy, value, tokenizer = load(model_dir)
    batch = fixed_batch(tokenizer)
    inputs = ("input_ids", "attention_mask", "position_ids", "response_ids", "response_mask")
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for module in (policy, value):
            for layer in decoder_layers(module.model):
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
        half = len(CONVERSATIONS) // world
        batch = rows(batch, slice(rank * half, (rank + 1) * half))
        halves = [slice(None)]  # this rank's loss is the mean over its own half
    else:
        halves = [slice(0, 2), slice(2, 4)]  # the mean of the two halves' losses
    parameters = [p for module in (policy, value) for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=LEARNING_RATE)
    policy.train()
    value.train()
    with torch.no_grad():
        old = policy(**{name: batch[name] for name in inputs})[0]  # the "rollout" policy, fixed for both steps
    record: dict = {"logprobs": [], "reference": [], "values": [], "loss": []}
    for _ in range(STEPS):
        logprobs = policy(**{name: batch[name] for name in inputs})[0]
        values = value(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                       batch["response_ids"].shape[1])  # fmt: skip
        with torch.no_grad(), policy.model.disable_adapter():
            reference = policy(**{name: batch[name] for name in inputs})[0]
        losses = [half_loss(rows(batch, s), logprobs[s], old[s], reference[s], values[s]) for s in halves]
        loss = sum(losses) / len(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for key, tensor in zip(record, (logprobs, reference, values, loss)):
            record[key].append(tensor.detach().clone())
    state = {}
    for prefix, module in (("policy", policy), ("value", value)):
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                state[f"{prefix}.{name}"] = full(parameter.detach()).clone()
    probe_name, probe = next((n, p) for n, p in policy.named_parameters() if n.endswith(SHARD_PROBE))
    local = probe.to_local() if hasattr(probe, "to_local") else probe
    record["shard"] = {
        "name": probe_name, "type": type(probe).__name__, "global_numel": probe.numel(),
        "local_numel": local.numel(), "local_shape": tuple(local.shape),
        "sharded_trainable": sum(type(p).__name__ == "DTensor" for p in parameters), "trainable": len(parameters),
    }  # fmt: skip
    record["rows"] = batch["input_ids"].shape[0]
    torch.save(record, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(state, out / "state.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
