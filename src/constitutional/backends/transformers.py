"""The local `transformers` back end: batched generation and option scoring on CPU or GPU.

Batches are sorted by prompt length (little padding), padded on the left (generation appends on
the right), and sampled with one seeded generator per prompt, so a prompt's completion does not
depend on its batch mates. Logits are computed only where they are used: the last position while
generating, the option positions while scoring (the embedded model's 262k-token output layer is
most of its compute).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from constitutional.backends.base import Backend, SamplingParams, cut_at_stop, option_token_ids
from constitutional.models import fingerprint, load_causal_lm, load_tokenizer, resolve_model_name

log = logging.getLogger(__name__)


class SeededSampler(LogitsProcessor):
    """Temperature / top-p sampling with one torch.Generator per batch row.

    Generation runs in greedy mode and this processor leaves exactly one finite logit per row: the
    token it sampled. That keeps transformers' own loop (caches, stopping, padding) while making each
    row's randomness its own.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [batch, vocab]
        probabilities = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probabilities = _top_p_filter(probabilities, self.top_p)
        chosen = torch.stack(
            [torch.multinomial(row, 1, generator=generator) for row, generator in zip(probabilities, self.generators)]
        )  # [batch, 1]
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter_(1, chosen, 0.0)


def _top_p_filter(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out tokens outside the smallest set whose mass reaches top_p (Holtzman et al. 2020)."""
    sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
    mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
    sorted_probabilities[mass_before >= top_p] = 0.0
    return torch.zeros_like(probabilities).scatter_(-1, order, sorted_probabilities)


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string.

    Only the last few tokens are decoded each step: a stop string is short, and decoding whole
    completions every step would cost more than the stop saves.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int, min_new_tokens: int):
        self.tokenizer = tokenizer
        self.stop = [marker for marker in stop if marker]
        self.prompt_length = prompt_length
        self.min_new_tokens = min_new_tokens
        self.tail_tokens = 16

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop or generated < max(1, self.min_new_tokens):
            return done
        start = max(self.prompt_length, input_ids.shape[1] - self.tail_tokens)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        for row, tail in enumerate(tails):
            done[row] = any(marker in tail for marker in self.stop)
        return done


class TransformersBackend(Backend):
    """A Hugging Face causal LM in this process."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.generated_tokens = 0  # running count, for throughput reports
        self.last_token_counts: list[int] = []  # new tokens per prompt of the last generate call

    @property
    def device(self) -> torch.device:
        return self.model.device

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[str]:
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        encoded = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        results: list[str] = [""] * len(prompts)
        self.last_token_counts = [0] * len(prompts)
        for batch in _length_sorted_batches([len(ids) for ids in encoded], self.batch_size):
            texts, counts = self._generate_batch([encoded[i] for i in batch], params, [seeds[i] for i in batch])
            for index, text, count in zip(batch, texts, counts):
                results[index] = text
                self.last_token_counts[index] = count
        return results

    @torch.inference_mode()
    def _generate_batch(
        self, token_ids: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> tuple[list[str], list[int]]:
        """Generate for one padded batch; returns the texts and the new-token count of each row."""
        inputs = self.tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt").to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            do_sample=False,  # sampling, when asked for, is SeededSampler's job
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(SeededSampler(seeds, params.temperature, params.top_p, self.device))
        stopping = [StopOnStrings(self.tokenizer, params.stop, prompt_length, params.min_new_tokens)]
        output = self.model.generate(
            **inputs, generation_config=config, logits_processor=processors, stopping_criteria=stopping
        )
        new_tokens = output[:, prompt_length:]
        # Finished rows are filled with padding up to the batch's longest row.
        counts = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        self.generated_tokens += sum(counts)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(text, params.stop) for text in texts], counts

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        rows = []  # (prompt index, option index, prompt ids + option ids, option length)
        for prompt_index, prompt in enumerate(prompts):
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            for option_index, option in enumerate(options):
                option_ids = option_token_ids(self.tokenizer, prompt, prompt_ids, option)
                rows.append((prompt_index, option_index, prompt_ids + option_ids, len(option_ids)))
        scores = [[0.0] * len(options) for _ in prompts]
        for batch in _length_sorted_batches([len(row[2]) for row in rows], self.batch_size):
            batch_rows = [rows[i] for i in batch]
            values = self._score_batch([row[2] for row in batch_rows], [row[3] for row in batch_rows])
            for (prompt_index, option_index, _, _), value in zip(batch_rows, values):
                scores[prompt_index][option_index] = value
        return scores

    @torch.inference_mode()
    def _score_batch(self, sequences: list[list[int]], option_lengths: list[int]) -> list[float]:
        """Summed log-probabilities of the last `option_lengths[i]` tokens of each sequence."""
        inputs = self.tokenizer.pad({"input_ids": sequences}, padding=True, return_tensors="pt").to(self.device)
        mask = inputs["attention_mask"]
        # Left padding: positions count real tokens only, as if each sequence were alone.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        keep = max(option_lengths) + 1  # logits at the last `keep` positions predict the option tokens
        logits = self.model(
            input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions, logits_to_keep=keep
        ).logits.float()  # [batch, keep, vocab]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
        targets = inputs["input_ids"][:, -keep + 1 :]  # [batch, keep - 1]
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return [float(token_log_probs[row, -length:].sum()) for row, length in enumerate(option_lengths)]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding stays small)."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def choose_device(setting: str) -> str:
    """`auto` picks CUDA, then MPS, then CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(setting: str, device: str) -> torch.dtype:
    """`auto` picks bfloat16 where the device runs it (on this project's 2-core CPU it measured 2x
    faster than float32 for the embedded model), else float32."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        return torch.bfloat16
    return torch.float32


def load(model_name: str, config: Any) -> TransformersBackend:
    """Load `model_name` as configured in `config.transformers`."""
    settings = config.transformers
    ref = resolve_model_name(model_name, config.base_dir)
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)
    tokenizer = load_tokenizer(ref, settings.trust_remote_code)
    model = load_causal_lm(ref, dtype, device, settings.trust_remote_code)
    log.info("loaded %s on %s in %s", model_name, device, str(dtype).removeprefix("torch."))
    return TransformersBackend(model, tokenizer, f"transformers:{fingerprint(ref)}:{dtype}", settings.batch_size)
