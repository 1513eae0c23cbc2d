"""Converting a GGUF parses it once: transformers opens it for the tokenizer, the config and the
weights, each time with a new `gguf.GGUFReader` (`models.one_gguf_parse` shares one)."""

import gguf
import numpy as np
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from constitutional import models


def tiny_gguf(path):
    """A one-layer Llama GGUF with one tensor: enough for transformers to read its config."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_transformers_reads_a_gguf_three_times_on_one_parse(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    parses = []
    original = gguf.GGUFReader

    def counting_reader(*args, **kwargs):
        parses.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    alone = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert len(parses) == 1  # transformers looks the reader up at each call: the name our context replaces
    with models.one_gguf_parse():
        configs = [load_gguf_checkpoint(str(path), return_tensors=False)["config"] for _ in range(3)]
        reader = gguf.GGUFReader(tmp_path / "." / "tiny.gguf")  # the same file by another spelling
    assert len(parses) == 2 and configs == [alone] * 3
    assert np.array_equal(reader.tensors[0].data, np.arange(32, dtype=np.float32).reshape(4, 8))
    assert gguf.GGUFReader is counting_reader  # put back on leaving
    gguf.GGUFReader(path)
    assert len(parses) == 3
