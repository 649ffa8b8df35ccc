"""Tiny GGUF files written with ggml's own `gguf.GGUFWriter`, for fast oracle tests: a 2-layer LLaMA
(GQA, rope theta 5e4) with a small byte-level BPE vocabulary trained here on a few sentences, a
chat template, and every block matrix stored in the tensor type asked for."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Once upon a time there was a little cat who liked to play in the garden.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Café, naïve, résumé: accents are common in French and Spanish words like señor.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji are fun 🎉🚀 and numbers like 2024 or 3.14159 appear in text.",
]
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, FFN, CONTEXT, THETA, EPS = 64, 2, 4, 2, 128, 512, 50000.0, 1e-5


def tiny_bpe(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on CORPUS; the special tokens take ids 0..2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_llama(
    path: Path,
    qtype: str = "F32",
    tied: bool = True,
    seed: int = 0,
    pre: str = "gpt2",
    arch: str = "llama",
    raw_types: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write the file; returns the source fp32 weights by GGUF tensor name (numpy order: rows first).

    qtype: the type of every block matrix (embedding and output too when it is a block type the
    width allows); norms stay F32 as llama.cpp writes them. raw_types: {tensor name: type} written as
    random bytes of that type (for refusal tests)."""
    tokens, merges = vocab_and_merges(tiny_bpe())
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(DIM // N_HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    shapes = {"token_embd.weight": (vocab, DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (vocab, DIM)
    hd = DIM // N_HEADS
    for i in range(N_LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (DIM,),
            f"blk.{i}.attn_q.weight": (N_HEADS * hd, DIM),
            f"blk.{i}.attn_k.weight": (N_KV_HEADS * hd, DIM),
            f"blk.{i}.attn_v.weight": (N_KV_HEADS * hd, DIM),
            f"blk.{i}.attn_output.weight": (DIM, N_HEADS * hd),
            f"blk.{i}.ffn_norm.weight": (DIM,),
            f"blk.{i}.ffn_gate.weight": (FFN, DIM),
            f"blk.{i}.ffn_up.weight": (FFN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, FFN),
        }
    source = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(name, data)
        elif raw_types and name in raw_types:
            t = gguf.GGMLQuantizationType[raw_types[name]]
            block, nbytes = gguf.GGML_QUANT_SIZES[t]
            data = rng.integers(0, 255, (shape[0], shape[1] // block * nbytes), dtype=np.uint8)
            w.add_tensor(name, data, raw_dtype=t)
        else:
            data = (0.15 * rng.standard_normal(shape)).astype(np.float32)
            t = gguf.GGMLQuantizationType[qtype]
            if t == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
        source[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return source
