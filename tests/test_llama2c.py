"""llama2.c (version 0) checkpoints import to the same model: written here from the real
stories260K weights in llama2.c's documented order, read back, same logits."""

import struct

import numpy as np
import pytest
import torch

from adapter.base_weights import load_base
from adapter.llama2c import load_llama2c
from tests.conftest import shared_file


def write_llama2c(model, path, shared_classifier: bool):
    a = model.args
    sd = model.state_dict()
    with open(path, "wb") as f:
        vocab = a.vocab_size if shared_classifier else -a.vocab_size
        f.write(struct.pack("7i", a.dim, a.ffn_hidden_dim, a.n_layers, a.n_heads, a.kv_heads, vocab, a.max_seq_len))

        def put(t):
            f.write(t.detach().float().numpy().astype(np.float32).tobytes())

        put(sd["tok_embeddings.weight"])
        for name in (
            "attention_norm",
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "ffn_norm",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        ):
            for i in range(a.n_layers):
                put(sd[f"layers.{i}.{name}.weight"])
        put(sd["norm.weight"])
        put(torch.zeros(a.max_seq_len * a.head_dim))  # cos + sin tables
        if not shared_classifier:
            put(sd["output.weight"])


@pytest.mark.parametrize("shared", [False, True])
def test_llama2c_checkpoint_imports_to_the_same_logits(tmp_path, shared):
    ref = load_base(shared_file("stories260K/params.json").parent, max_seq_len=512)
    if shared:
        ref.output.weight.data.copy_(ref.tok_embeddings.weight.data)
    write_llama2c(ref, tmp_path / "m.bin", shared)
    got = load_llama2c(tmp_path / "m.bin")
    assert got.args.n_kv_heads == 4 and got.args.max_seq_len == 512
    tokens = torch.randint(0, 512, (2, 9))
    assert torch.equal(got(tokens), ref(tokens))


def test_truncated_llama2c_file_is_refused(tmp_path):
    ref = load_base(shared_file("stories260K/params.json").parent, max_seq_len=512)
    write_llama2c(ref, tmp_path / "m.bin", False)
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-400])
    with pytest.raises(ValueError, match="truncated"):
        load_llama2c(tmp_path / "m.bin")


def test_load_base_accepts_a_llama2c_file(tmp_path):
    ref = load_base(shared_file("stories260K/params.json").parent, max_seq_len=512)
    write_llama2c(ref, tmp_path / "stories260K.bin", False)
    tokens = torch.randint(0, 512, (1, 5))
    assert torch.equal(load_base(tmp_path / "stories260K.bin")(tokens), ref(tokens))
