"""The local `transformers` back end: batched generation and option scoring on CPU or GPU.

Batches are sorted by prompt length (little padding), padded on the left (generation appends on
the right), and sampled with one seeded generator per prompt, so a prompt's completion does not
depend on its batch mates. The decode loop is our own: a row that has finished (end of sequence or
a stop string) leaves the batch and its KV cache at once, instead of being computed on as padding
until the batch's longest answer ends. Logits are computed only where they are used: the last
position while generating, the option positions while scoring (the embedded model's 262k-token
output layer is most of its compute).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchEncoding, DynamicCache

from constitutional.backends.base import (
    Backend,
    SamplingParams,
    cut_at_stop,
    prompt_and_option_ids,
    prompt_token_ids,
)
from constitutional.backends.settings import TransformersSettings
from constitutional.models import choose_dtype, fingerprint, load_causal_lm, load_tokenizer, resolve_model_name
from constitutional.prompts import renders_chat

log = logging.getLogger(__name__)

# Below this many shared tokens, prefilling the prefix separately saves less than it costs.
MIN_SHARED_PREFIX = 16
# Tokens examined first by top-p sampling before falling back to a full sort of the vocabulary.
TOP_P_CANDIDATES = 512


class SeededSampler:
    """Temperature / top-p sampling with one torch.Generator per prompt.

    Each prompt's randomness is its own: a row draws from its generator only, whatever else is in
    the batch and whenever other rows leave it.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def sample(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """One token per live row.

        Args:
            logits: [live rows, vocab] next-token logits.
            rows: each live row's prompt index (which generator it draws from).

        Returns:
            [live rows] token ids.
        """
        scaled = logits.float() / self.temperature
        if self.top_p < 1.0:
            probabilities, token_ids = nucleus(scaled, self.top_p)  # [rows, candidates] each
        else:
            probabilities, token_ids = torch.softmax(scaled, dim=-1), None
        picks = torch.stack(
            [torch.multinomial(row, 1, generator=self.generators[index]) for row, index in zip(probabilities, rows)]
        )  # [rows, 1]: indices into each row's candidates
        chosen = picks if token_ids is None else token_ids.gather(1, picks)
        return chosen.squeeze(1)


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of tokens whose probability mass reaches top_p (Holtzman et al. 2020).

    Sorting a 262k-token vocabulary for every row at every step costs more than a decoding step on
    a CPU. The nucleus nearly always lies among the few hundred most likely tokens, so those are
    taken with `topk` and normalised against the whole vocabulary; a full sort happens only when
    they do not reach `top_p`. Exact either way.

    Args:
        logits: [batch, vocab] temperature-scaled logits.
        top_p: the nucleus mass, in (0, 1).

    Returns:
        (probabilities, token_ids), both [batch, candidates]; probabilities outside the nucleus
        are 0 (not renormalised: multinomial does not need it).
    """
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # [batch, 1]
    values, token_ids = logits.topk(min(TOP_P_CANDIDATES, logits.shape[-1]), dim=-1)
    probabilities = (values - log_normalizer).exp()
    if bool((probabilities.sum(dim=-1) < top_p).any()):
        values, token_ids = logits.sort(dim=-1, descending=True)
        probabilities = (values - log_normalizer).exp()
    mass_before = probabilities.cumsum(dim=-1) - probabilities
    return probabilities.masked_fill(mass_before >= top_p, 0.0), token_ids


# A stop string is short: only the last few tokens of a row are decoded to look for one (decoding
# whole answers at every step would cost more than stopping saves).
STOP_TAIL_TOKENS = 16


class TransformersBackend(Backend):
    """A Hugging Face causal LM in this process."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, batch_size: int = 32, share_prefix: bool = True):
        self.share_prefix = share_prefix
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.generated_tokens = 0  # running count, for throughput reports
        self.last_token_counts: list[int] = []  # new tokens per prompt of the last generate call
        # The sampled token ids per prompt of the last call (end-of-sequence included, padding not),
        # before stop strings are applied to the text: RL trains on exactly what was sampled.
        self.last_token_ids: list[list[int]] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not renders_chat(self.tokenizer):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        encoded = [prompt_token_ids(self.tokenizer, prompt) for prompt in prompts]
        results: list[str] = [""] * len(prompts)
        self.last_token_counts = [0] * len(prompts)
        self.last_token_ids = [[] for _ in prompts]
        for batch in _length_sorted_batches([len(ids) for ids in encoded], self.batch_size):
            texts, rows = self._generate_batch([encoded[i] for i in batch], params, [seeds[i] for i in batch])
            for index, text, ids in zip(batch, texts, rows):
                results[index] = text
                self.last_token_counts[index] = len(ids)
                self.last_token_ids[index] = ids
        return results

    @torch.inference_mode()
    def _generate_batch(
        self, token_ids: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> tuple[list[str], list[list[int]]]:
        """Generate for one padded batch; returns the texts and the new token ids of each row."""
        shared = self._shareable_prefix_length(token_ids)
        if shared:
            inputs, cache = self._inputs_with_shared_prefix(token_ids, shared)
        else:
            inputs = self.tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt")
            cache = DynamicCache(config=self.model.config)
        input_ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        # Positions count real tokens only (padding sits on the left or after the shared prefix).
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        rows = self._decode(input_ids[:, shared:], mask, positions[:, shared:], cache, params, seeds)
        self.generated_tokens += sum(map(len, rows))
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [cut_at_stop(text, params.stop) for text in texts], rows

    def _decode(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        params: SamplingParams,
        seeds: list[int],
    ) -> list[list[int]]:
        """The decode loop: prefill, then one token per live row per step; finished rows leave.

        Args:
            input_ids: [batch, new] prompt tokens not yet in `cache`.
            mask: [batch, cached + new] attention mask over everything so far.
            positions: [batch, new] position ids of `input_ids`.
            cache: the KV cache (holding a shared prefix, or empty).
            params: sampling parameters.
            seeds: one per row.

        Returns:
            Each row's new token ids, its end-of-sequence token included.
        """
        eos = self._eos_ids()
        sampler = None
        if params.temperature > 0:
            sampler = SeededSampler(seeds, params.temperature, params.top_p, self.device)
        live = list(range(input_ids.shape[0]))  # the prompt index of each row still in the batch
        generated: list[list[int]] = [[] for _ in live]
        step_input, step_positions = input_ids, positions
        for step in range(params.max_new_tokens):
            logits = self.model(
                input_ids=step_input,
                attention_mask=mask,
                position_ids=step_positions,
                logits_to_keep=1,
                **self._cache_argument(cache),
            ).logits[:, -1]  # [live, vocab]
            if step < params.min_new_tokens and eos:
                logits[:, eos] = float("-inf")
            tokens = sampler.sample(logits, live) if sampler else logits.argmax(dim=-1)  # [live]
            keep = []
            for row, (index, token) in enumerate(zip(live, tokens.tolist())):
                generated[index].append(token)
                if not self._finished(generated[index], token, eos, params):
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                kept = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(kept)
                mask, tokens, step_positions = mask[kept], tokens[kept], step_positions[kept]
                live = [live[row] for row in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            step_input, step_positions = tokens[:, None], step_positions[:, -1:] + 1
        return generated

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def _finished(self, tokens: list[int], token: int, eos: list[int], params: SamplingParams) -> bool:
        """Whether a row is done after `token`: end of sequence, or (after min_new_tokens) a stop string."""
        if token in eos:
            return True
        stops = [marker for marker in params.stop if marker]
        if not stops or len(tokens) < max(1, params.min_new_tokens):
            return False
        tail = self.tokenizer.decode(tokens[-STOP_TAIL_TOKENS:], skip_special_tokens=True)
        return any(marker in tail for marker in stops)

    def _cache_argument(self, cache: Any) -> dict[str, Any]:
        """The KV-cache keyword: `cache` in current transformers, `past_key_values` before 5.2x."""
        if cache is None:
            return {}
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        return {name: cache}

    def _shareable_prefix_length(self, token_ids: list[list[int]], own_tokens: int = 1) -> int:
        """Length of the token prefix all rows share, when computing it once is worth it.

        Few-shot prompts share hundreds of tokens; on a CPU, prefilling them dominates. Each row
        keeps at least `own_tokens` tokens of its own. Rows are laid out [prefix][padding][own
        tokens]; positions skip the padding, so for full-attention models each row reads exactly as
        if it were alone. In a sliding-window layer (Gemma 3: 512 tokens) the window is counted in
        cache slots, padding included, so once a prompt outgrows the window a padded row sees up to
        its padding's length fewer of the window's oldest tokens. That is deterministic (the same
        batch gives the same result, and resumed chunks run the same batches), but not identical
        to the prompt run alone; `transformers.share_prefix: false` trades the speed for that.
        """
        if not self.share_prefix or len(token_ids) < 2:
            return 0
        shortest = min(len(ids) for ids in token_ids)
        length = 0
        first = token_ids[0]
        while length < shortest - own_tokens and all(ids[length] == first[length] for ids in token_ids):
            length += 1
        return length if length >= MIN_SHARED_PREFIX else 0

    def _inputs_with_shared_prefix(self, token_ids: list[list[int]], shared: int) -> tuple[dict, Any]:
        """Prefill the shared prefix once and lay rows out as [prefix][padding][own tokens].

        Positions come from the attention mask (padding does not count), so each row reads as if
        it were alone.
        """
        prefix = token_ids[0][:shared]
        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=torch.tensor([prefix], device=self.device), logits_to_keep=1, **self._cache_argument(cache)
        )
        cache.batch_repeat_interleave(len(token_ids))
        width = max(len(ids) for ids in token_ids) - shared
        pad = self.tokenizer.pad_token_id
        rows, masks = [], []
        for ids in token_ids:
            own = ids[shared:]
            gap = width - len(own)
            rows.append(prefix + [pad] * gap + own)
            masks.append([1] * shared + [0] * gap + [1] * len(own))
        inputs = BatchEncoding({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)})
        return inputs, cache

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """One forward pass per prompt, however many options.

        The options' shared leading tokens (" (" of " (A)" / " (B)") are read as part of the prompt;
        the pass over prompt + shared tokens yields their log-probabilities and the distribution of
        each option's first own token; the few tokens after that (")") are read in a second, tiny
        pass from the KV cache, one row per option.
        """
        rows = []  # (context ids, number of shared option tokens, each option's own tokens)
        for prompt in prompts:
            prompt_ids, option_ids = prompt_and_option_ids(self.tokenizer, prompt, options)
            shared = _common_prefix_length(option_ids)
            rows.append((prompt_ids + option_ids[0][:shared], shared, [ids[shared:] for ids in option_ids]))
        scores: list[list[float]] = [[] for _ in prompts]
        for batch in _length_sorted_batches([len(row[0]) for row in rows], self.batch_size):
            for index, values in zip(batch, self._score_batch([rows[i] for i in batch])):
                scores[index] = values
        return scores

    @torch.inference_mode()
    def _score_batch(self, rows: list[tuple[list[int], int, list[list[int]]]]) -> list[list[float]]:
        """Summed option log-probabilities for a batch of (context, shared, own tokens) rows."""
        contexts = [context for context, _, _ in rows]
        keep = max(shared for _, shared, _ in rows) + 1  # predicts the shared tokens and the next one
        prefix = self._shareable_prefix_length(contexts, own_tokens=keep)
        if prefix:
            inputs, cache = self._inputs_with_shared_prefix(contexts, prefix)
        else:
            inputs = self.tokenizer.pad({"input_ids": contexts}, padding=True, return_tensors="pt")
            cache = DynamicCache(config=self.model.config)
        input_ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        # Positions count real tokens only (padding sits on the left or after the shared prefix).
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids[:, prefix:],
            attention_mask=mask,
            position_ids=positions[:, prefix:],
            logits_to_keep=keep,
            **self._cache_argument(cache),
        ).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)  # [batch, keep, vocab]
        results = []
        for row, (context, shared, own_tokens) in enumerate(rows):
            # Position -1 predicts the first own token; positions -shared-1 .. -2 predict the shared ones.
            shared_sum = (
                sum(
                    float(log_probs[row, -shared - 1 + offset, token]) for offset, token in enumerate(context[-shared:])
                )
                if shared
                else 0.0
            )
            results.append(
                [shared_sum + (float(log_probs[row, -1, tokens[0]]) if tokens else 0.0) for tokens in own_tokens]
            )
        self._add_option_tails(rows, results, cache, mask, positions)
        return results

    def _add_option_tails(
        self,
        rows: list[tuple[list[int], int, list[list[int]]]],
        results: list[list[float]],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Add the log-probabilities of each option's tokens after its first own one.

        The context's KV cache is repeated once per option; every option row reads its own tokens
        (right-padded, which a causal model never looks back at).
        """
        options = len(rows[0][2])
        tails = [tokens[:-1] for _, _, own_tokens in rows for tokens in own_tokens]  # inputs
        width = max(len(tail) for tail in tails)
        if width == 0:
            return
        pad = self.tokenizer.pad_token_id
        tail_ids = torch.tensor([tail + [pad] * (width - len(tail)) for tail in tails], device=self.device)
        tail_mask = torch.tensor([[1] * len(tail) + [0] * (width - len(tail)) for tail in tails], device=self.device)
        cache.batch_repeat_interleave(options)
        full_mask = torch.cat([mask.repeat_interleave(options, dim=0), tail_mask], dim=1)
        start = positions[:, -1:].repeat_interleave(options, dim=0) + 1
        tail_positions = start + torch.arange(width, device=self.device)
        logits = self.model(
            input_ids=tail_ids, attention_mask=full_mask, position_ids=tail_positions, **self._cache_argument(cache)
        ).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)  # [batch * options, width, vocab]
        for row, (_, _, own_tokens) in enumerate(rows):
            for option, tokens in enumerate(own_tokens):
                flat = row * options + option
                results[row][option] += sum(
                    float(log_probs[flat, offset, token]) for offset, token in enumerate(tokens[1:])
                )


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all sequences share."""
    length = 0
    while all(len(sequence) > length for sequence in sequences) and len({s[length] for s in sequences}) == 1:
        length += 1
    return length


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


def load(model_name: str, settings: TransformersSettings, base_dir: str, seed: int) -> TransformersBackend:
    """Load `model_name` (resolved against the config's folder `base_dir`) with the `transformers` settings.

    The run seed is unused: every request carries its own sampling seed.
    """
    ref = resolve_model_name(model_name, base_dir)
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)
    tokenizer = load_tokenizer(ref, settings.trust_remote_code)
    model = load_causal_lm(ref, dtype, device, settings.trust_remote_code)
    log.info("loaded %s on %s in %s", model_name, device, str(dtype).removeprefix("torch."))
    model_id = f"transformers:{fingerprint(ref)}:{dtype}:share_prefix={settings.share_prefix}"
    return TransformersBackend(model, tokenizer, model_id, settings.batch_size, settings.share_prefix)
