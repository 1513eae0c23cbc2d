"""A tiny causal LM and tokenizer built in-process, so tests never download anything."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, knead, let it rise, then bake.",
    "CritiqueRequest: Identify ways the response is harmful.\n\nCritique: The response is fine.",
    "RevisionRequest: Rewrite the response to remove harm.\n\nRevision: Here is a safer answer.",
    "Options: (A) first answer (B) second answer. The answer is: (A) (B)",
    "Note: the meeting is at 3:30pm, bring notes. 0123456789 abcdefghijklmnopqrstuvwxyz",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on a few lines and save it with a 2-layer Llama (width 64).

    Returns:
        `directory`, now loadable with `from_pretrained`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
