"""Base checkpoints: Meta layout (sharded), Hugging Face layout (against transformers), and the
real pretrained stories260K model."""

import json
import math

import pytest
import torch

from adapter.base_weights import load_base
from adapter.decoding import SamplingParams, generate
from adapter.model import Transformer
from adapter.model_args import ModelArgs
from adapter.tokenizer import Tokenizer
from tests.conftest import shared_file

# Written from docs/method.md, independently of the loader's own table.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")


def write_meta_shards(model: Transformer, path, n_shards: int, vocab_in_params: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    a = model.args
    params = {
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "multiple_of": a.multiple_of,
        "norm_eps": a.norm_eps,
        "vocab_size": a.vocab_size if vocab_in_params else -1,
    }
    (path / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for name, t in model.state_dict().items():
        leaf = name.split(".")[-2]
        if t.dim() == 1:
            parts = [t] * n_shards
        elif leaf in COLUMN_PARALLEL:
            parts = t.chunk(n_shards, dim=0)
        elif leaf in ROW_PARALLEL:
            parts = t.chunk(n_shards, dim=1)
        else:
            raise AssertionError(name)
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    for i, s in enumerate(shards):
        s["rope.freqs"] = torch.zeros(a.head_dim // 2)  # old checkpoints carry this; must be ignored
        torch.save(s, path / f"consolidated.{i:02d}.pth")


def test_meta_two_shards_load_to_the_unsharded_logits(tiny_model, tmp_path):
    write_meta_shards(tiny_model, tmp_path / "one", 1, vocab_in_params=True)
    write_meta_shards(tiny_model, tmp_path / "two", 2)
    one, two = load_base(tmp_path / "one"), load_base(tmp_path / "two")
    tokens = torch.randint(0, 512, (2, 10))
    ref = tiny_model(tokens)
    assert torch.equal(one(tokens), ref)
    assert torch.equal(two(tokens), ref)
    assert not any(p.requires_grad for p in two.parameters())


def test_meta_checkpoint_with_wrong_shapes_is_refused(tiny_model, tmp_path):
    write_meta_shards(tiny_model, tmp_path, 1)
    p = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**p, "n_layers": 3}))
    with pytest.raises(ValueError, match="does not match"):
        load_base(tmp_path)


def test_pickled_code_in_a_meta_shard_is_refused(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8}))
    torch.save({"x": ModelArgs()}, tmp_path / "consolidated.00.pth")  # an arbitrary object, not tensors
    with pytest.raises(ValueError, match="refused"):
        load_base(tmp_path)


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_base(tmp_path)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hf_checkpoint_matches_transformers(tmp_path, n_kv_heads):
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only oracle")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_base(tmp_path)
    assert ours.args.kv_heads == n_kv_heads
    tokens = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert torch.allclose(ours(tokens), ref, atol=1e-5), (ours(tokens) - ref).abs().max()


def test_sharded_hf_checkpoint_loads(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only oracle")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert torch.allclose(load_base(tmp_path)(tokens), hf(tokens).logits, atol=1e-5)


def _stories():
    folder = shared_file("stories260K/params.json").parent
    return load_base(folder), Tokenizer(folder / "tokenizer.model")


def test_real_pretrained_stories260k_loss_is_far_below_random():
    model, tok = _stories()
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside with her dog."
    ids = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
        torch.manual_seed(0)
        rand = Transformer(model.args).eval()
        rand_loss = torch.nn.functional.cross_entropy(rand(ids)[0, :-1], ids[0, 1:]).item()
    assert model.args.n_kv_heads == 4 and model.args.n_heads == 8
    assert loss < 1.0, loss
    assert rand_loss > 0.9 * math.log(512), rand_loss


def test_real_pretrained_stories260k_generates_english():
    model, tok = _stories()
    out = generate(model, [tok.encode("Once upon a time")], SamplingParams(60, temperature=0), tok.eos_id)
    text = tok.decode(out[0])
    words = text.replace(",", " ").replace(".", " ").split()
    common = {"the", "a", "she", "he", "was", "to", "and", "play", "her", "girl", "little", "day", "one"}
    assert len(words) > 20
    assert sum(w.lower() in common for w in words) >= 5, text
