"""Transcript rendering, few-shot templates and output clean-up.

A base model has no chat template, so we render conversations in the paper's plain format:

    Human: ...

    Assistant: ...

    CritiqueRequest: ...

    Critique:

and let the model continue after the last label. A chat model is given its own template instead
(`prompt_format: chat`), with critique and revision requests as user turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from constitutional.backends.base import Backend
from constitutional.errors import UserError

# Turn roles and the label each carries in the paper's plain transcripts.
PLAIN_LABELS = {
    "human": "Human",
    "assistant": "Assistant",
    "critique_request": "CritiqueRequest",
    "critique": "Critique",
    "revision_request": "RevisionRequest",
    "revision": "Revision",
}
# In a chat template, requests are the user's turns and the model's outputs are the assistant's.
CHAT_ROLES = {
    "human": "user",
    "assistant": "assistant",
    "critique_request": "user",
    "critique": "assistant",
    "revision_request": "user",
    "revision": "assistant",
}

# A generated turn ends where the model starts writing the next one. Passed to back ends as stop
# strings (cheap, stops generation early) and applied again by `trim_at_turn_marker` (robust to
# markers at the start of the output or without a newline before them).
STOP_STRINGS = tuple(f"\n{label}:" for label in PLAIN_LABELS.values())
_TURN_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:" + "|".join(PLAIN_LABELS.values()) + r")[ \t]*:")

Turn = tuple[str, str]  # (role, text)


def render_plain(turns: Sequence[Turn], next_role: str, preamble: Sequence[str] = ()) -> str:
    """Render a plain transcript that ends with the label of the turn the model writes next.

    Args:
        turns: (role, text) pairs, roles from PLAIN_LABELS.
        next_role: the role whose label ends the prompt, e.g. "assistant" -> "...\\n\\nAssistant:".
        preamble: few-shot examples or an instruction block, placed first, separated by blank lines.

    Returns:
        The prompt string, with no trailing space after the final colon (the model writes it).
    """
    parts = [block.strip() for block in preamble if block.strip()]
    parts += [f"{PLAIN_LABELS[role]}: {text.strip()}" for role, text in turns]
    parts.append(f"{PLAIN_LABELS[next_role]}:")
    return "\n\n".join(parts)


# The chat template saved with SL-CAI and RL-CAI (`plain_chat_template`): the transcript `render_plain`
# writes, in Jinja. Every message becomes one block, the blocks are joined by a blank line, and the
# generation prompt is the bare "Assistant:" label that ends every training prompt (the model writes
# the space after it). A system message, first only, is an instruction block placed before the
# turns, as `render_plain`'s `preamble`; an empty one is left out, as an empty preamble block is.
# Whitespace control (`{%-`, `-%}`) on every tag: it renders the same with or without the
# trim_blocks/lstrip_blocks options that transformers and vLLM set.
_PLAIN_CHAT_TEMPLATE = r"""{#- The plain transcript this model was trained on: constitutional.prompts.render_plain -#}
{%- set ns = namespace(blocks=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is not string -%}
{{- raise_exception('Only text content is supported, as a string') -}}
{%- elif message['role'] == 'system' and loop.first -%}
{%- if message['content'] | trim -%}
{%- set ns.blocks = ns.blocks + [message['content'] | trim] -%}
{%- endif -%}
{%- elif message['role'] == 'user' -%}
{%- set ns.blocks = ns.blocks + ['@HUMAN@: ' + (message['content'] | trim)] -%}
{%- elif message['role'] == 'assistant' -%}
{%- set ns.blocks = ns.blocks + ['@ASSISTANT@: ' + (message['content'] | trim)] -%}
{%- elif message['role'] == 'system' -%}
{{- raise_exception('A system message must come first') -}}
{%- else -%}
{{- raise_exception('Unknown role ' + message['role'] + ': expected system, user or assistant') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt is defined and add_generation_prompt -%}
{%- set ns.blocks = ns.blocks + ['@ASSISTANT@:'] -%}
{%- endif -%}
@BOS@{{- ns.blocks | join('\n\n') -}}"""


def plain_chat_template(bos_token: bool) -> str:
    """A Jinja chat template that renders messages exactly as `render_plain` renders their turns.

    Saved with the causal LMs trained on plain transcripts (SL-CAI, RL-CAI: `training.save_model_atomic`),
    so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` and `vllm serve` give
    the prompt the model learned: for user/assistant messages (`CHAT_ROLES`), the text of
    `render_plain(turns, "assistant")`; a first system message is a `preamble` block. Other roles,
    a later system message or non-string content raise an error. No end-of-sequence token follows
    an assistant message: none does in a training prompt's history either.

    Args:
        bos_token: start with `{{ bos_token }}`; true for a tokenizer that adds a BOS token when it
            tokenises (training prompts are tokenised so). A chat template's text is tokenised
            without special tokens (`apply_chat_template(tokenize=True)`, vLLM's chat endpoint,
            `backends.base.prompt_token_ids`), so the template writes the BOS itself, and the ids
            match the training prompt's: one BOS, then the transcript.

    Returns:
        The template source.
    """
    return (
        _PLAIN_CHAT_TEMPLATE.replace("@HUMAN@", PLAIN_LABELS["human"])
        .replace("@ASSISTANT@", PLAIN_LABELS["assistant"])
        .replace("@BOS@", "{{- bos_token -}}" if bos_token else "")
    )


def is_plain_chat_template(template: object) -> bool:
    """Whether `template` (a tokenizer's `chat_template`) is `plain_chat_template`'s, with or without BOS.

    Such a tokenizer belongs to a model trained on plain transcripts (a saved SL-CAI or RL-CAI):
    a back end can treat it as having no chat template, so `prompt_format: auto` keeps rendering
    plain transcripts with their few-shot preamble for it.
    """
    return template in (plain_chat_template(bos_token=True), plain_chat_template(bos_token=False))


def render_chat(backend: Backend, turns: Sequence[Turn], next_role: str) -> str | None:
    """Render with the model's chat template, or None when the model has none.

    Consecutive turns that map to the same chat role (the assistant's answer followed by its
    critique, for instance) are never produced by our stages: each request is a user turn.
    """
    if CHAT_ROLES[next_role] != "assistant":
        raise ValueError(f"the model writes assistant turns, not {next_role!r}")
    messages = [{"role": CHAT_ROLES[role], "content": text.strip()} for role, text in turns]
    return backend.apply_chat_template(messages)


def trim_at_turn_marker(text: str) -> str:
    """Cut a completion where the model starts a new turn ("Human:", "CritiqueRequest:", ...)."""
    match = _TURN_MARKER.search(text)
    if match:
        text = text[: match.start()]
    return text.strip()


def degeneracy(text: str) -> str | None:
    """Why a generated turn is unusable, or None if it looks fine.

    Returns:
        "empty" for blank output, "repetitive" for output that loops (a small model's usual
        failure: the same line or phrase over and over), else None.
    """
    if not text.strip():
        return "empty"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 3 and len(set(lines)) <= len(lines) / 2:
        return "repetitive"
    words = text.split()
    if len(words) >= 16:
        four_grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        if len(set(four_grams)) < 0.5 * len(four_grams):
            return "repetitive"
    return None


# Reason string for output that copies a few-shot example, reported like "empty"/"repetitive".
COPIED_FEWSHOT = "copied_fewshot"
# Eight words in a row: long enough that two unrelated texts rarely share such a run by chance
# (a stock refusal like "I'm sorry, I can't help with that" is seven), short enough to catch a
# small model pasting part of a sentence of an example into its own answer.
FEWSHOT_SPAN = 8
# Anything that is neither a word character nor whitespace: removed before comparing, so a copy
# with different punctuation ("Mercury, Venus" vs "mercury venus") is still found.
_PUNCTUATION = re.compile(r"[^\w\s]")


def _normalised_words(text: str) -> list[str]:
    """Lowercase words of `text` with punctuation removed, split on any whitespace."""
    return _PUNCTUATION.sub("", text.lower()).split()


class FewshotEcho:
    """Finds generated text that reproduces a span of the few-shot examples.

    A small base model often answers by copying part of an example from its prompt (the planets
    mnemonic from a revision example, say, as the answer to an unrelated question). Such output is
    as unusable as a loop, so it is flagged like one. Every run of `span` consecutive normalised
    words of the examples is indexed once; a check is then one set lookup per word of the output.
    """

    def __init__(self, examples: Sequence[str], span: int = FEWSHOT_SPAN) -> None:
        """Index the few-shot examples.

        Args:
            examples: the few-shot texts whose spans count as copied.
            span: how many consecutive words must match; an example shorter than this never matches.
        """
        if span < 1:
            raise ValueError(f"span must be at least 1, got {span}")
        self.span = span
        self._runs: set[tuple[str, ...]] = set()
        for example in examples:
            self._runs.update(self._windows(_normalised_words(example)))

    def _windows(self, words: list[str]) -> list[tuple[str, ...]]:
        return [tuple(words[i : i + self.span]) for i in range(len(words) - self.span + 1)]

    def copies(self, text: str) -> bool:
        """Whether `text` contains `span` consecutive words of any example.

        Args:
            text: a generated turn (answer, critique or revision).

        Returns:
            True if some run of `span` normalised words of `text` appears in an example, else False.
        """
        if not self._runs:
            return False
        return any(window in self._runs for window in self._windows(_normalised_words(text)))


def render(
    backend: Backend, prompt_format: str, turns: Sequence[Turn], next_role: str, preamble: Sequence[str] = ()
) -> str:
    """Render for `backend` in the configured format (`plain`, `chat` or `auto`).

    `auto` uses the model's chat template when it has one, else the plain transcript. The plain
    `preamble` (few-shot examples) is left out of chat prompts: a chat model follows the requests
    without them.

    Raises:
        UserError: `chat` was asked for but the model has no chat template.
    """
    if prompt_format != "plain":
        chat = render_chat(backend, turns, next_role)
        if chat is not None:
            return chat
        if prompt_format == "chat":
            raise UserError(f"prompt_format 'chat': model {backend.model_id!r} has no chat template; use 'plain'")
    return render_plain(turns, next_role, preamble)


def renders_chat(tokenizer: object) -> bool:
    """Whether prompts for this tokenizer's model go through its chat template (`prompt_format: auto`).

    A model this project trained (SL-CAI, RL-CAI) carries a template of the plain Human:/Assistant:
    transcript, for users of `apply_chat_template` and `vllm serve`: inside the pipeline it is still
    prompted as the plain model it is, few-shot examples and all.
    """
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and not is_plain_chat_template(template)
