"""A chat model reads exactly one BOS token (issue 18, item 4).

Gemma's and Llama 3's chat templates write the BOS token into the rendered text ("<bos>",
"<|begin_of_text|>"); tokenising that text with special tokens added puts a second BOS in front.
Every back-end path that turns a prompt into token ids is checked here, on a chat-rendered prompt
and on a plain one: `transformers` generation and option scoring (the ids the model's forward pass
receives) and `vllm` generation and scoring (the ids a stand-in engine receives). The tokenizers are
real: Gemma 3's SentencePiece tokenizer where the converted embedded model is in the cache, and the
tests' tiny byte-level one, each given a Gemma-style chat template that begins with `{{ bos_token }}`.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from constitutional.backends.base import SamplingParams
from constitutional.backends.transformers import TransformersBackend

# Gemma's template, shortened: BOS first, then the turns, then the model's turn opened.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]
PLAIN_PROMPT = "Human: How do I bake bread?\n\nAssistant:"
OPTIONS = [" (A)", " (B)"]


@pytest.fixture(scope="module", params=[pytest.param("gemma", marks=pytest.mark.embedded), "tiny"])
def tokenizer(request, tiny_model_dir, tmp_path_factory):
    """A real tokenizer, saved into a folder whose tokenizer_config.json holds a chat template.

    Gemma's comes from the embedded model, converted into the cache on first use.
    """
    if request.param == "gemma":
        source = request.getfixturevalue("embedded_model_dir")
    else:
        source = tiny_model_dir
    folder = tmp_path_factory.mktemp(f"{request.param}-chat-tokenizer")
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.bos_token_id is not None
    # The premise of the issue: tokenising the rendered text the default way yields two BOS tokens.
    rendered = loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert loaded(rendered)["input_ids"][:2] == [loaded.bos_token_id] * 2
    return loaded


def tiny_model(tokenizer) -> LlamaForCausalLM:
    """A one-layer model over the tokenizer's vocabulary (what it computes does not matter here)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def prompts(backend) -> list[str]:
    chat = backend.apply_chat_template(MESSAGES)
    assert chat.startswith(backend.tokenizer.bos_token)
    return [chat, PLAIN_PROMPT]


def assert_one_leading_bos(rows: list[list[int]], tokenizer) -> None:
    bos = tokenizer.bos_token_id
    for ids in rows:
        assert ids[0] == bos and ids.count(bos) == 1, f"{ids.count(bos)} BOS tokens in {tokenizer.decode(ids)!r}"


@pytest.fixture
def transformers_backend(tokenizer):
    """The `transformers` back end, recording the rows (padding dropped) of each forward pass."""
    model = tiny_model(tokenizer)
    backend = TransformersBackend(model, tokenizer, "single-bos-test", batch_size=4)
    backend.passes = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        # The mask covers the KV cache too: its last columns are the positions read now.
        mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1] :]
        backend.passes.append([row[keep.bool()].tolist() for row, keep in zip(ids, mask)])

    model.register_forward_pre_hook(record, with_kwargs=True)
    return backend


def test_transformers_generation_feeds_one_bos(transformers_backend):
    backend = transformers_backend
    backend.generate(prompts(backend), SamplingParams(max_new_tokens=2))
    first = backend.passes[0]  # the prefill: both prompts, padded into one batch
    assert len(first) == 2
    assert_one_leading_bos(first, backend.tokenizer)


def test_transformers_option_scoring_feeds_one_bos(transformers_backend):
    backend = transformers_backend
    scores = backend.score_options(prompts(backend), OPTIONS)
    first = backend.passes[0]  # prompt + the options' shared tokens
    assert len(first) == 2
    assert_one_leading_bos(first, backend.tokenizer)
    assert all(len(row) == len(OPTIONS) for row in scores)


class RecordingEngine:
    """Stands in for `vllm.LLM`: records the token ids of every request.

    A text prompt is tokenised as vLLM tokenises one (special tokens added), so text that already
    holds a BOS would show up here as two.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: list[object] = []
        self.token_ids: list[list[int]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, requests, params, use_tqdm=False):
        outputs = []
        for request in requests:
            self.requests.append(request)
            ids = request["prompt_token_ids"] if isinstance(request, dict) else self.tokenizer(request)["input_ids"]
            self.token_ids.append(ids)
            # Prompt log-probs: none for the first token, then -1.0 for each token as read.
            logprobs = [None] + [{token: SimpleNamespace(logprob=-1.0)} for token in ids[1:]]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text="ok")], prompt_logprobs=logprobs))
        return outputs


@pytest.fixture
def vllm_module(monkeypatch):
    """`constitutional.backends.vllm` imported against a stand-in `vllm` package (not installed here)."""
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delitem(sys.modules, "constitutional.backends.vllm", raising=False)
    yield importlib.import_module("constitutional.backends.vllm")
    # Forget the module bound to the stand-in, so later tests see the real import (or its absence).
    sys.modules.pop("constitutional.backends.vllm", None)


def test_vllm_generation_passes_token_ids_with_one_bos(vllm_module, tokenizer):
    engine = RecordingEngine(tokenizer)
    backend = vllm_module.VLLMBackend(engine, "vllm:single-bos-test")
    assert backend.generate(prompts(backend), SamplingParams(max_new_tokens=2)) == ["ok", "ok"]
    assert_one_leading_bos(engine.token_ids, tokenizer)
    assert all(isinstance(request, dict) for request in engine.requests), "vLLM was given text to tokenise"


def test_vllm_option_scoring_passes_token_ids_with_one_bos(vllm_module, tokenizer):
    engine = RecordingEngine(tokenizer)
    backend = vllm_module.VLLMBackend(engine, "vllm:single-bos-test")
    scores = backend.score_options(prompts(backend), OPTIONS)
    assert len(engine.token_ids) == 2 * len(OPTIONS)
    assert_one_leading_bos(engine.token_ids, tokenizer)
    # After its one BOS, each request is the prompt followed by one option, read back as that text.
    bos = tokenizer.bos_token
    texts = [(prompt + option).removeprefix(bos) for prompt in prompts(backend) for option in OPTIONS]
    assert [tokenizer.decode(ids[1:]) for ids in engine.token_ids] == texts
    assert all(len(row) == len(OPTIONS) for row in scores)
