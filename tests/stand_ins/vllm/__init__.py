"""A stand-in `vllm` package for processes a test spawns (tests/test_vllm_data_parallel.py).

Put on PYTHONPATH, it is what `import vllm` finds in a worker process. `LLM` answers the way vLLM's
outputs are shaped, as a pure function of each request (token ids and seed), so answers do not
depend on the engine or batch; each engine appends one JSON line per call to the file named by
$STAND_IN_VLLM_LOG: its process id, the GPUs it saw, the call and its request count.
"""

from __future__ import annotations

import json
import os
import zlib
from types import SimpleNamespace

from transformers import AutoTokenizer


def SamplingParams(**kwargs):  # noqa: N802 (vLLM's name)
    return SimpleNamespace(**kwargs)


class LLM:
    def __init__(self, model: str, **kwargs):
        if os.environ.get("STAND_IN_VLLM_FAIL_ON") == os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError("CUDA out of memory (stand-in)")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.kwargs = kwargs
        self._log("start", 0)

    def _log(self, call: str, requests: int) -> None:
        path = os.environ.get("STAND_IN_VLLM_LOG")
        if path:
            line = {"pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "call": call, "n": requests}
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps(line) + "\n")

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        self._log("shutdown", 0)

    def generate(self, requests, params, use_tqdm=True):
        self._log("generate", len(requests))
        per_request = params if isinstance(params, list) else [params] * len(requests)
        outputs = []
        for request, param in zip(requests, per_request):
            ids = request["prompt_token_ids"]
            text = f" Answer {zlib.crc32(repr((ids, getattr(param, 'seed', None))).encode()) % 1000}."
            logprobs = [None] + [{token: SimpleNamespace(logprob=-0.1 - token % 7 / 7)} for token in ids[1:]]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)], prompt_logprobs=logprobs))
        return outputs
