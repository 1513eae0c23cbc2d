"""The in-process vLLM back end (optional extra: `pip install -e '.[vllm]'` from a checkout).

vLLM pins its own torch and transformers, so it usually lives in a separate environment; the
`openai` back end against vLLM's server is the way to reach it across that boundary. This module
is for the case where vLLM is installed beside the project. It needs a GPU.

Each stage opens its engine and closes it when it ends (`chunks.append_in_chunks`), so that
`--stages pairs,feedback` or `rl,eval` never starts a second engine, which claims
`vllm.gpu_memory_utilization` of the GPU, while the first still holds its share. `close()` was
checked against the source of vLLM 0.33.0 (the `[vllm]` extra's floor), read but never run here
(no GPU, no vLLM): there `LLM` has no shutdown of its own, and `LLM.llm_engine.engine_core.shutdown()`
stops the engine core (its process, or the in-process core's executor and distributed state).
`LLM.shutdown()` is preferred where a vLLM has it (proposed upstream, not in 0.33); the
`vllm.distributed` teardown calls are the older versions' recipe (from vLLM's issue tracker, not
checked against their source), harmless where nothing is left to tear down. Every step is
guarded, so a vLLM lacking one still frees what the others can.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Any

import vllm

from constitutional.backends.base import (
    Backend,
    SamplingParams,
    cut_at_stop,
    prompt_and_option_ids,
    prompt_token_ids,
)
from constitutional.backends.settings import VLLMSettings
from constitutional.models import fingerprint, local_weights_dir, resolve_model_name
from constitutional.prompts import renders_chat

log = logging.getLogger(__name__)


class VLLMBackend(Backend):
    """A vLLM `LLM` engine in this process."""

    scoring_method = "prompt logprobs"

    def __init__(self, engine: Any, model_id: str):
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.model_id = model_id

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back; a second call does nothing."""
        if self.engine is None:
            return
        stop_engine(self.engine)
        # The last reference to the `LLM` goes before collecting, so that its tensors can be freed.
        self.engine = None
        release_memory()

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not renders_chat(self.tokenizer):
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


def load(model_name: str, settings: VLLMSettings, base_dir: str, seed: int) -> Backend:
    """The `vllm` back end: one engine here, or `vllm.data_parallel_size` engines in worker processes."""
    if settings.data_parallel_size > 1:
        from constitutional.backends.vllm_workers import DataParallelVLLM

        return DataParallelVLLM(f"{__name__}:load_engine", model_name, settings, base_dir, seed)
    return load_engine(model_name, settings, base_dir, seed)


def load_engine(model_name: str, settings: VLLMSettings, base_dir: str, seed: int) -> VLLMBackend:
    """Start a vLLM engine for `model_name` (resolved against `base_dir`) with the `vllm` settings."""
    ref = resolve_model_name(model_name, base_dir)
    # What an earlier stage of this process freed may still sit in torch's caching allocator,
    # which vLLM would count as taken when it sizes its share of the GPU.
    _free_cached_gpu_memory()
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
    try:
        return VLLMBackend(engine, f"vllm:{fingerprint(ref)}")
    except BaseException:
        # No backend owns the engine yet, so nothing else would free it.
        stop_engine(engine)
        del engine
        release_memory()
        raise


def stop_engine(engine: Any) -> None:
    """Stop a vLLM `LLM` engine with whichever shutdown this vLLM has; log a failure, never raise.

    A public `LLM.shutdown()` where there is one, else the V1 engine core client's (vLLM >= 0.8),
    which ends the engine core process or, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), shuts
    its executor and distributed state down. Both are idempotent in vLLM.
    """
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is None:
        shutdown = getattr(getattr(getattr(engine, "llm_engine", None), "engine_core", None), "shutdown", None)
    _attempt("shut the engine down", shutdown)


def release_memory() -> None:
    """Free what a stopped engine left in this process (call it once no reference to the engine is left)."""
    # vLLM's model-parallel and distributed groups (what pre-V1 engines left behind; each call
    # returns at once where there is none). Generating stages never run under a multi-process
    # launch (`pipeline.check_launch`), so a process group here is vLLM's own.
    try:
        from vllm import distributed
    except ImportError:
        distributed = None
    _attempt("destroy the model-parallel groups", getattr(distributed, "destroy_model_parallel", None))
    _attempt("destroy the distributed environment", getattr(distributed, "destroy_distributed_environment", None))
    _free_cached_gpu_memory()


def _free_cached_gpu_memory() -> None:
    """Collect reference cycles, then hand torch's cached CUDA blocks back to the driver."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    # Only where this process has used CUDA (then it is available): one that never did has
    # nothing cached, and asking the driver (is_available) before vLLM forks could spoil the fork.
    if torch.cuda.is_initialized():
        _attempt("empty the CUDA cache", torch.cuda.empty_cache)


def _attempt(what: str, step: Any) -> None:
    """Run one teardown step if this vLLM has it (`step` is None otherwise); log a failure and go on."""
    if step is None:
        log.debug("vllm close: cannot %s with this vLLM version", what)
        return
    try:
        step()
    except Exception as error:  # a failed step must not stop the ones after it, nor hide the stage's own error
        # Logged as text: a log record holding the exception would hold, through its traceback, the engine.
        log.warning("vllm close: could not %s: %s", what, f"{type(error).__name__}: {error}")
