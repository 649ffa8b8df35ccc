"""GGUF bases: our load of a GGUF file against transformers' own load of the same file (logits,
greedy generation), every tensor type we claim against its source weights, refusals by name, and
the real SmolLM2-135M-Instruct end to end."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from adapter.base_weights import _unpermute, context_length, detect_format, load_base
from adapter.decoding import SamplingParams, generate
from adapter.loader import load_model
from adapter.settings import ModelSource
from adapter.tokenizer import load_tokenizer
from tests.gguf_files import CONTEXT, DIM, EPS, FFN, N_HEADS, N_KV_HEADS, N_LAYERS, THETA, write_tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is the oracle for GGUF loading")

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time there was a little cat",
    "def add(a, b):\n    return a + b",
    "Café, naïve 東京 🎉",
]


def hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # greedy comparisons run the full 32 steps
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(hf, ids: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :].tolist()


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("F32", False), ("Q8_0", True), ("Q4_1", False), ("Q4_0", True)])
def test_tiny_gguf_logits_match_transformers(tmp_path, qtype, tied):
    """transformers dequantizes with its own kernels and reads q/k through HF's permutation: equal
    logits mean our dequantization, names, shape and q/k row order are all right."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, qtype, tied)
    ours, tok, hf = load_base(path), load_tokenizer(path), hf_load(path)
    assert ours.args.tie_embeddings == tied and (ours.output.weight is ours.tok_embeddings.weight) == tied
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            ref, got = hf(ids).logits, ours(ids)
        assert (got - ref).abs().max().item() < 1e-4, text


def test_gguf_q_k_rows_are_taken_as_stored(tmp_path):
    """The same file with q/k rows read in Hugging Face's (rotate-half) order gives other logits:
    the order matters for these weights, and the stored one is Meta's."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    ours, hf = load_base(path), hf_load(path)
    ids = torch.tensor([load_tokenizer(path).encode(PROMPTS[0])])
    with torch.no_grad():
        ref = hf(ids).logits
        for layer in ours.layers:
            layer.attention.wq.weight.copy_(_unpermute(layer.attention.wq.weight.clone(), N_HEADS))
            layer.attention.wk.weight.copy_(_unpermute(layer.attention.wk.weight.clone(), N_KV_HEADS))
        assert (ours(ids) - ref).abs().max().item() > 1e-2


def test_shape_comes_from_the_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    args = load_base(path).args
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.ffn_hidden_dim) == (
        DIM,
        N_LAYERS,
        N_HEADS,
        N_KV_HEADS,
        FFN,
    )
    assert (args.rope_theta, args.norm_eps, args.max_seq_len) == (THETA, pytest.approx(EPS), CONTEXT)
    assert detect_format(path) == "gguf" and context_length(path) == CONTEXT


def test_tiny_gguf_greedy_32_tokens_equal_transformers_generate(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, "Q8_0", tied=True, seed=3)
    ours, tok, hf = load_base(path), load_tokenizer(path), hf_load(path)
    for text in PROMPTS[:2]:
        ids = tok.encode(text)
        # No EOS inside the 32 steps: both must produce all 32 tokens for a full comparison.
        got = generate(ours, [ids], SamplingParams(max_gen_len=32, temperature=0.0), eos_id=-1)[0]
        assert got == hf_greedy(hf, ids), text


# Worst error of one weight against its source, as a fraction of the block's largest magnitude
# (symmetric types) or of the block's range (types with a minimum): half a quantization step, plus
# the fp16 rounding of the scale, with a little room. Q4_0 / Q5_0 map the block's largest magnitude
# to -8 / -16, so a weight of the other sign near it is clamped to 7 / 15: a whole step there.
TOLERANCE = {
    "F32": 0.0,
    "F16": 2.0**-11,  # relative: fp16 keeps 11 significant bits (below 2**-14 a fixed step of 2**-24)
    "BF16": 2.0**-8,  # relative: bf16 keeps 8
    "Q8_0": 0.5 / 127 + 2e-3,
    "Q5_0": 1 / 16 + 2e-3,
    "Q5_1": 0.5 / 31 + 2e-3,
    "Q4_0": 1 / 8 + 2e-3,
    "Q4_1": 0.5 / 15 + 2e-3,
}


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_each_claimed_tensor_type_dequantizes_to_its_source(tmp_path, qtype):
    path = tmp_path / f"{qtype}.gguf"
    source = write_tiny_llama(path, qtype, tied=False)
    model = load_base(path)
    pairs = [
        (model.layers[1].attention.wq.weight, source["blk.1.attn_q.weight"]),
        (model.layers[0].feed_forward.w2.weight, source["blk.0.ffn_down.weight"]),
        (model.tok_embeddings.weight, source["token_embd.weight"]),
    ]
    for got, want in pairs:
        got, want = got.numpy(), want
        assert got.shape == want.shape
        err = np.abs(got - want)
        if qtype in ("F32", "F16", "BF16"):
            floor = 2.0**-25 if qtype == "F16" else 1e-30  # half of fp16's subnormal step
            assert (err <= TOLERANCE[qtype] * np.abs(want) + floor).all(), err.max()
            continue
        blocks_err = err.reshape(-1, 32).max(axis=1)
        w = want.reshape(-1, 32)
        scale = (w.max(axis=1) - w.min(axis=1)) if qtype.endswith("_1") else np.abs(w).max(axis=1)
        assert (blocks_err <= TOLERANCE[qtype] * scale).all(), (blocks_err / scale).max()
        assert err.max() > 0  # it really was quantized


def test_other_tensor_types_are_refused_by_name(tmp_path):
    path = tmp_path / "k.gguf"
    # K-quants need rows of 256; the tiny model's rows are 64 wide, so a 32-wide-block type stands in.
    write_tiny_llama(path, raw_types={"blk.0.ffn_gate.weight": "IQ4_NL"})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight is stored as IQ4_NL, which is not supported"):
        load_base(path)


def test_other_architectures_are_refused_by_name(tmp_path):
    path = tmp_path / "g.gguf"
    write_tiny_llama(path, arch="gemma")
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported"):
        load_base(path)


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_base(path)


def test_model_source_takes_a_gguf_without_tokenizer_and_quantizes_it(tmp_path):
    """A GGUF base carries its tokenizer; int8 keeps the tied embedding one matrix."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, "Q8_0", tied=True)
    plain = load_model(ModelSource(base=str(path)))
    int8 = load_model(ModelSource(base=str(path), quantize="int8"))
    assert plain.tokenizer.vocab_size == plain.base.args.vocab_size
    assert int8.base.output.weight is int8.base.tok_embeddings.weight
    ids = torch.tensor([plain.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        a, b = plain.base(ids), int8.base(ids)
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


# --- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_file):
    return load_base(smollm2_file), load_tokenizer(smollm2_file), hf_load(smollm2_file)


def test_real_smollm2_logits_match_transformers(smollm2):
    ours, tok, hf = smollm2
    assert (ours.args.n_layers, ours.args.dim, ours.args.n_heads, ours.args.kv_heads) == (30, 576, 9, 3)
    assert ours.args.rope_theta == 1e5 and ours.args.tie_embeddings and ours.args.vocab_size == 49152
    for text in PROMPTS[:2] + [tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])]:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            diff = (ours(ids) - hf(ids).logits).abs().max().item()
        assert diff < 1e-4, (text, diff)


def test_real_smollm2_greedy_chat_equals_transformers_generate(smollm2):
    ours, tok, hf = smollm2
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "Name three primary colours."}]))
    got = generate(ours, [prompt], SamplingParams(max_gen_len=32, temperature=0.0), eos_id=-1)[0]
    ref = hf_greedy(hf, prompt)
    assert got == ref, (tok.decode(got), tok.decode(ref))


def test_real_smollm2_answers_the_capital_of_france(smollm2):
    ours, tok, _ = smollm2
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    out = generate(ours, [prompt], SamplingParams(max_gen_len=24, temperature=0.0), tok.eos_id)[0]
    assert "Paris" in tok.decode(out)


def test_gguf_types_named_in_the_refusal_are_real_ggml_types():
    from adapter.gguf_base import SUPPORTED_TYPES

    assert {t.name for t in SUPPORTED_TYPES} == set(TOLERANCE)
    assert all(t in gguf.GGMLQuantizationType for t in SUPPORTED_TYPES)


def test_model_context_caps_the_bases_context(tmp_path):
    """`model.context` caps a long context (a Serve replica's KV cache is rows x context)."""
    from adapter.loader import model_context

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    capped = ModelSource(base=str(path), context=64)
    assert load_model(capped).base.args.max_seq_len == model_context(capped) == 64
    assert model_context(ModelSource(base=str(path), context=10_000)) == CONTEXT  # never extended
