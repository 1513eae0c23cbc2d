"""The back-end interface: two batch methods, generation and option scoring.

Every stage talks to models only through this interface, so a local transformers model, an
in-process vLLM engine and any OpenAI-compatible server are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion.

    Attributes:
        max_new_tokens: hard cap on generated tokens.
        temperature: 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0 disables it).
        stop: strings that end the completion; the returned text stops *before* the first one.
        min_new_tokens: generate at least this many tokens, ignoring end-of-sequence and stop
            strings until then (benchmarks use it to force equal lengths).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Backend(ABC):
    """A model behind a batch interface.

    Attributes:
        model_id: a stable identity of the weights (name plus a content fingerprint where one is
            cheap to get); the generation cache keys on it.
    """

    model_id: str
    # How score_options reads log-probabilities (recorded in the manifest beside the labels it made).
    scoring_method: str | None = "forward pass"

    @abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        """Complete each prompt.

        Args:
            prompts: raw prompt strings, already rendered (few-shot text or a chat template).
            params: sampling parameters shared by the batch.
            seeds: one sampling seed per prompt (default 0 for all). A prompt's completion depends
                only on its own prompt, parameters and seed, not on what else is in the batch.

        Returns:
            One completion per prompt, in order, cut before the first stop string.
        """

    @abstractmethod
    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Log-probabilities of given continuations after each prompt.

        Args:
            prompts: N prompt strings.
            options: K continuation strings shared by all prompts, e.g. [" (A)", " (B)"].

        Returns:
            N lists of K floats: the summed log-probability of each option's tokens after the prompt.
        """

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """Render `messages` with the model's own chat template, ready for the assistant's turn.

        Returns None when the model has no chat template (a base model): callers then render the
        paper's plain `Human:` / `Assistant:` transcript themselves.
        """
        return None

    def close(self) -> None:  # noqa: B027 (optional: a back end without resources keeps this no-op)
        """Release resources (engines, HTTP connections)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Return `text` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for marker in stop:
        if marker:
            position = text.find(marker)
            if position != -1:
                end = min(end, position)
    return text[:end]


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text, with one BOS token at the start where the tokenizer uses one.

    A chat template writes the BOS token into the text it renders (Gemma's "<bos>", Llama 3's
    "<|begin_of_text|>"); tokenising that text with special tokens added would put a second BOS in
    front, which a chat model never read in training. So text that already begins with the BOS token
    is tokenised as it is, and any other text (a plain prompt) gets the tokenizer's special tokens.
    Every back end that tokenises a prompt itself goes through here.
    """
    bos = getattr(tokenizer, "bos_token", None)  # None: the tokenizer has no BOS token
    has_bos = bool(bos) and text.startswith(bos)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


def option_token_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], option: str) -> list[int]:
    """Token ids of `option` as a model reads it right after `prompt` (`prompt_ids`: prompt_token_ids).

    Tokenising prompt+option together is what the model sees in a transcript; when the tokenizer
    merges across the boundary (the joint ids do not start with the prompt's ids), fall back to
    tokenising the option on its own.

    Raises:
        ValueError: the option tokenises to nothing.
    """
    joint = prompt_token_ids(tokenizer, prompt + option)
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids) :]
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not option_ids:
        raise ValueError(f"option {option!r} tokenises to nothing")
    return option_ids


def prompt_and_option_ids(tokenizer: Any, prompt: str, options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """A prompt's token ids (`prompt_token_ids`) and each option's ids as the model reads them after it."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    return prompt_ids, [option_token_ids(tokenizer, prompt, prompt_ids, option) for option in options]
