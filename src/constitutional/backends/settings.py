"""Each back end's config section (`transformers:`, `openai:`, `vllm:`), validated on load.

They live apart from the back ends themselves so that reading a config imports neither torch,
vLLM nor an HTTP client. A back end's `load` receives its own section, the config's folder and the
run seed, never the whole config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from constitutional.errors import require, require_positive

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class TransformersSettings:
    """The local `transformers` back end."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 where the hardware has it
    batch_size: int = 32  # sequences per forward pass
    # Prefill a batch's shared prompt prefix (few-shot examples) once. Exact for full-attention
    # models; for sliding-window models with prompts longer than the window, see
    # TransformersBackend._shareable_prefix_length.
    share_prefix: bool = True
    trust_remote_code: bool = False

    def validate(self) -> None:
        require(
            bool(DEVICE_PATTERN.match(self.device)),
            f"transformers.device: expected auto, cpu, mps, cuda or cuda:N, got {self.device!r}",
        )
        require_positive("transformers.batch_size", self.batch_size)


@dataclass
class OpenAISettings:
    """Any OpenAI-compatible completions server (vLLM, llama.cpp, TGI, hosted)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    # A fleet: several servers of the same model (overrides base_url). Requests go to the least busy
    # server in rotation; a failing one is out for server_cooldown_s, then tried again.
    base_urls: list[str] = field(default_factory=list)
    server_cooldown_s: float = 30.0
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from the config
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6  # on 429, 5xx, timeouts and connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # `completions`: raw prompts to /completions; `chat`: /chat/completions, with chat-formatted
    # prompts sent as messages (the server applies the model's template).
    endpoint: Literal["completions", "chat"] = "completions"
    # How option log-probabilities are read: `echo` (prompt log-probs of prompt + option, one
    # request per option; vLLM), `top_logprobs` (the first answer tokens' top-k log-probs, one
    # request per prompt; llama.cpp, hosted and chat-only APIs), or `auto` (echo if the server
    # answers it, else top_logprobs, decided on the first scoring call).
    scoring: Literal["auto", "echo", "top_logprobs"] = "auto"
    # k of top_logprobs scoring. OpenAI's chat allows at most 20, its legacy /completions 5: after a
    # 400 that names the limit the request is sent once more with 5, and so are the later ones.
    top_logprobs: int = 20

    def validate(self) -> None:
        for key, url in [("base_url", self.base_url)] + [(f"base_urls[{i}]", u) for i, u in enumerate(self.base_urls)]:
            require(url.startswith(("http://", "https://")), f"openai.{key}: expected an http(s) URL, got {url!r}")
        require(
            self.server_cooldown_s >= 0, f"openai.server_cooldown_s: expected 0 or more, got {self.server_cooldown_s}"
        )
        require_positive("openai.top_logprobs", self.top_logprobs)
        require(
            not (self.endpoint == "chat" and self.scoring == "echo"),
            "openai.scoring: 'echo' needs openai.endpoint 'completions' (chat endpoints do not echo prompts)",
        )
        for key in ("backoff_initial_s", "backoff_max_s"):
            require(getattr(self, key) >= 0, f"openai.{key}: expected 0 or more, got {getattr(self, key)}")
        require_positive("openai.max_concurrency", self.max_concurrency)
        require_positive("openai.timeout_s", self.timeout_s)
        require(self.max_retries >= 0, f"openai.max_retries: expected 0 or more, got {self.max_retries}")


@dataclass
class VLLMSettings:
    """The in-process vLLM engine (optional extra `vllm`: `pip install -e '.[vllm]'` from a checkout)."""

    # GPUs per engine: tensor parallelism, for a model that does not fit one GPU (a 70B in bf16
    # needs 2-4 x 80 GB). Engines side by side: data parallelism, one worker process per engine
    # (`vllm_workers.py`), each batch split between them; dp x tp GPUs must be visible.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    max_model_len: int | None = None
    trust_remote_code: bool = False
    # The few-shot examples every critique prompt starts with are computed once and their KV
    # blocks reused (vLLM's automatic prefix caching). vLLM skips the cache for requests with
    # prompt log-probs, so option scoring (feedback, eval's judge) prefills every prompt whole.
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        require_positive("vllm.tensor_parallel_size", self.tensor_parallel_size)
        require_positive("vllm.data_parallel_size", self.data_parallel_size)
        require(
            0 < self.gpu_memory_utilization <= 1,
            f"vllm.gpu_memory_utilization: expected a number in (0, 1], got {self.gpu_memory_utilization}",
        )
        require_positive("vllm.max_model_len", self.max_model_len)
        dtypes = ("auto", "bfloat16", "float16", "float32", "half", "float")
        require(self.dtype in dtypes, f"vllm.dtype: expected one of {', '.join(dtypes)}, got {self.dtype!r}")
