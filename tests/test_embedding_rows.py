"""The PM's input embedding trains only at the rows its data uses (`embedding_rows.py`): the same
optimisation as training the whole table, an ordinary model once merged, Gemma's scaled embedding
on its real tokenizer, and the table trained whole where its output is not a scaled lookup."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Gemma3TextConfig

from constitutional import preference_trainer
from constitutional.config import config_from_dict
from constitutional.embedding_rows import UPDATE, train_used_rows
from constitutional.stages import pm

PROMPTS = ["How do I bake bread?", "Is tea good for me?", "Why is the sky blue?", "How do kites fly?"]


def comparisons(count):
    rows = []
    for index in range(count):
        prompt = PROMPTS[index % len(PROMPTS)]
        rows.append({
            "prompt": prompt, "response_a": "Here is a careful answer.", "response_b": "No.",
            "p_a": 0.9 if index % 2 else 0.2,
        })  # fmt: skip
    return rows


def train_pm(tiny_model_dir, tmp_path, name):
    """Stage pm's trainer for 3 steps on the tiny model in float64 (rounding does not blur the comparison)."""
    from transformers import AutoTokenizer as Tokenizers

    config = config_from_dict({
        "seed": 0, "models": {"base": str(tiny_model_dir)}, "training": {"precision": "fp32"},
        "pm": {"batch_size": 2, "max_length": 128, "learning_rate": 1e-3, "save_steps": 100, "logging_steps": 1},
    }, base_dir=tmp_path)  # fmt: skip
    tokenizer = Tokenizers.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).double()
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = pm.build_trainer(config.training, config.pm, 0, model, tokenizer, pm.to_dataset(comparisons(6)),
                               tmp_path / name)  # fmt: skip
    trainer.train()
    return trainer


def test_training_the_used_rows_is_training_the_whole_table(tiny_model_dir, tmp_path, monkeypatch):
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    initial_table = initial.get_input_embeddings().weight.double()
    rows_only = train_pm(tiny_model_dir, tmp_path, "rows").model
    monkeypatch.setattr(preference_trainer, "train_used_rows", lambda model, token_ids: None)
    whole = train_pm(tiny_model_dir, tmp_path, "whole").model

    # Merged: an ordinary classifier again, nothing added to what it saves.
    assert set(rows_only.state_dict()) == set(whole.state_dict())
    assert rows_only.get_input_embeddings().weight.requires_grad
    trained_rows = (whole.get_input_embeddings().weight != initial_table).any(dim=1)
    assert 0 < trained_rows.sum() < len(trained_rows)  # some rows trained, others never seen
    for (name, mine), (_, theirs) in zip(rows_only.named_parameters(), whole.named_parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-10), name
    # Rows the data never used are exactly as loaded.
    assert torch.equal(rows_only.get_input_embeddings().weight[~trained_rows], initial_table[~trained_rows])


@pytest.mark.embedded
def test_gemmas_scaled_embedding_on_its_real_tokenizer(embedded_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    embedding = model.get_input_embeddings()
    assert float(embedding.embed_scale) == pytest.approx(16**0.5)  # Gemma scales its rows by sqrt(width)
    ids = tokenizer(["Human: Is tea good for me?\n\nAssistant: In moderation, yes."], return_tensors="pt").input_ids
    data_ids = set(ids[0].tolist()) | {tokenizer.pad_token_id}
    unseen = torch.tensor([[5, 7, tokenizer.pad_token_id]])
    table_alone = embedding(ids).detach()
    rows = train_used_rows(model, data_ids)
    assert rows.used == len(data_ids) - 1  # the padding row never trains (nn.Embedding's padding_idx)
    with torch.no_grad():
        getattr(embedding, UPDATE)[:-1].normal_()  # as if trained
    before_merge = [embedding(ids).detach(), embedding(unseen).detach()]
    rows.merge()
    assert not hasattr(embedding, UPDATE)
    after_merge = [embedding(ids), embedding(unseen)]
    assert torch.allclose(before_merge[0], after_merge[0], atol=1e-5)  # the update scaled as Gemma scales
    assert not torch.allclose(before_merge[0], table_alone, atol=1e-3)  # (the update did change them)
    assert torch.equal(before_merge[1], after_merge[1])  # unseen tokens: the table's rows alone


def test_an_embedding_that_is_not_a_scaled_lookup_trains_whole(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    embedding = model.get_input_embeddings()
    embedding.register_forward_hook(lambda module, args, output: output + 1.0)  # not rows times a scale
    assert train_used_rows(model, {1, 2, 3}) is None
    assert embedding.weight.requires_grad and not hasattr(embedding, UPDATE)
