"""The in-process vLLM back end (optional extra: `pip install 'constitutional[vllm]'`).

vLLM pins its own torch and transformers, so it usually lives in a separate environment; the
`openai` back end against vLLM's server is the way to reach it across that boundary. This module
is for the case where vLLM is installed beside the project. It needs a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import vllm

from constitutional.backends.base import Backend, SamplingParams, cut_at_stop, prompt_and_option_ids, prompt_token_ids
from constitutional.backends.settings import VLLMSettings
from constitutional.models import fingerprint, local_weights_dir, resolve_model_name


class VLLMBackend(Backend):
    """A vLLM `LLM` engine in this process."""

    scoring_method = "prompt logprobs"

    def __init__(self, engine: Any, model_id: str):
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.model_id = model_id

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        # One SamplingParams per prompt: vLLM seeds each request on its own, so a completion does
        # not depend on the rest of the batch.
        per_prompt = [
            vllm.SamplingParams(
                max_tokens=params.max_new_tokens,
                min_tokens=params.min_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop),
                seed=seed,
            )
            for seed in seeds
        ]
        # Token ids, not text: vLLM tokenises a text prompt with special tokens added, which would
        # put a second BOS before the one a chat template wrote. A dict is vLLM's `TokensPrompt`.
        requests = [{"prompt_token_ids": prompt_token_ids(self.tokenizer, prompt)} for prompt in prompts]
        outputs = self.engine.generate(requests, per_prompt, use_tqdm=False)
        return [cut_at_stop(output.outputs[0].text, params.stop) for output in outputs]

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        requests, option_lengths = [], []
        for prompt in prompts:
            prompt_ids, each_option_ids = prompt_and_option_ids(self.tokenizer, prompt, options)
            for option_ids in each_option_ids:
                requests.append({"prompt_token_ids": prompt_ids + option_ids})
                option_lengths.append(len(option_ids))
        # prompt_logprobs=0 returns the log-probability of each prompt token as it was read.
        scoring = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.engine.generate(requests, scoring, use_tqdm=False)
        sums = []
        for request, output, length in zip(requests, outputs, option_lengths):
            token_ids = request["prompt_token_ids"]
            positions = range(len(token_ids) - length, len(token_ids))
            sums.append(sum(output.prompt_logprobs[t][token_ids[t]].logprob for t in positions))
        width = len(options)
        return [sums[i * width : (i + 1) * width] for i in range(len(prompts))]


def load(model_name: str, settings: VLLMSettings, base_dir: str, seed: int) -> VLLMBackend:
    """Start a vLLM engine for `model_name` (resolved against `base_dir`) with the `vllm` settings."""
    ref = resolve_model_name(model_name, base_dir)
    engine = vllm.LLM(
        model=local_weights_dir(ref),
        dtype=settings.dtype,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len,
        trust_remote_code=settings.trust_remote_code,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=seed,
    )
    return VLLMBackend(engine, f"vllm:{fingerprint(ref)}")
