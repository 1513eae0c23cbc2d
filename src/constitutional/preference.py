"""The preference model (PM): its loss, its input format, and scoring with a saved PM.

A PM is a sequence classifier with one output: it reads a whole transcript (the conversation in the
paper's plain format, then the assistant's answer and an end-of-sequence token) and returns a
scalar score; the score of the last real token is the transcript's score. The probability that
answer A is better than answer B is sigma(r_A - r_B) (Bradley-Terry).

`PreferenceModel` is the one way to score with a saved PM: stage `rl` uses it as the reward,
stage `eval` as a judge, and `cai score` on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional.prompts import Turn, render_plain


def pm_transcript(turns: Sequence[Turn], response: str) -> str:
    """The text a PM scores: the conversation in plain format, then the answer.

    The end-of-sequence token is added at tokenisation (TRL's reward trainer does the same), so
    training and scoring read exactly the same tokens.
    """
    return render_plain(turns, "assistant") + " " + response.strip()


def soft_bradley_terry_loss(rewards_a: Any, rewards_b: Any, p_a: Any) -> Any:
    """Bradley-Terry loss on soft labels, averaged over the batch.

    loss = -[p * log sigma(r_a - r_b) + (1 - p) * log sigma(r_b - r_a)], the cross-entropy between
    the label p (the probability that A is better, e.g. the feedback model's normalised option
    probability, paper step 6) and the PM's sigma(r_a - r_b). With p in {0, 1} it is the standard
    Bradley-Terry loss -log sigma(r_chosen - r_rejected).

    Args:
        rewards_a, rewards_b: [batch] scores of answers A and B.
        p_a: [batch] labels in [0, 1].

    Returns:
        A scalar tensor.
    """
    import torch.nn.functional as F

    margin = rewards_a - rewards_b  # [batch]
    return -(p_a * F.logsigmoid(margin) + (1 - p_a) * F.logsigmoid(-margin)).mean()


class PreferenceModel:
    """A saved PM (a `save_pretrained` folder with a one-output classification head), for scoring."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 1024, batch_size: int = 8):
        """
        Args:
            model: a sequence-classification model with one label.
            tokenizer: its tokenizer (with a pad token).
            max_length: longer transcripts keep their last `max_length` tokens (the answer).
            batch_size: transcripts per forward pass.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", bf16: bool = False, **kwargs: Any) -> PreferenceModel:
        """Load a PM saved by stage `pm`, in fp32 (or bf16: half the memory, for a frozen scorer), on `device`."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype).to(device)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, **kwargs)

    def score(self, conversations: Sequence[Sequence[Turn]], responses: Sequence[str]) -> list[float]:
        """Scores of (conversation, response) pairs, in order.

        A pair's score does not depend on its batch mates: sequences are padded on the right (a
        causal model's real tokens never see padding) and each is read at its own last real token.

        Args:
            conversations: per pair, the turns up to and including the last human turn.
            responses: per pair, the assistant's answer.
        """
        if len(conversations) != len(responses):
            raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
        return self._score_ids(
            [self._encode(pm_transcript(turns, text)) for turns, text in zip(conversations, responses)]
        )

    def _score_ids(self, token_ids: list[list[int]]) -> list[float]:
        """Scores of tokenised transcripts, batched by length, right-padded."""
        import torch

        scores = [0.0] * len(token_ids)
        order = sorted(range(len(token_ids)), key=lambda index: len(token_ids[index]))  # little padding
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(token_ids[index]) for index in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(token_ids[index])] = torch.tensor(token_ids[index])
                mask[row, : len(token_ids[index])] = 1
            with torch.no_grad():
                # The model's own forward, as in training: it reads each row at its last non-pad token.
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [batch, 1]
                values = logits.squeeze(-1).float()  # [batch]
            for index, value in zip(batch, values.tolist()):
                scores[index] = value
        return scores

    def score_transcripts(self, transcripts: Sequence[str]) -> list[float]:
        """Scores of ready-made transcripts (`pm_transcript` output), for callers that hold text only."""
        return self._score_ids([self._encode(text) for text in transcripts])

    def close(self) -> None:
        """Nothing to release (the interface of back ends, so the chunk loop can hold a PM)."""

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text + self.tokenizer.eos_token)["input_ids"]
        return ids[-self.max_length :]
