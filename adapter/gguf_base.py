"""LLaMA-architecture GGUF files (llama.cpp's format) as a frozen base.

A GGUF file carries the weights, the model's shape and its tokenizer in one file. Read with ggml's
own `gguf` package: the file is memory-mapped, each tensor is dequantized to fp32 with
`gguf.quants.dequantize` and handed over once in the working dtype (the quantized file is a
storage format here; `model.quantize` re-quantizes for memory if wanted).

The q/k row order: llama.cpp's converter permutes Hugging Face's q/k rows (rotate-half pairs)
back into Meta's interleaved rotary pairs, which is the layout `adapter/model.py` uses, so GGUF
q/k weights are taken as they are (tests/test_gguf_base.py checks logits against transformers'
own load of the same file). See docs/models.md.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from adapter.model_args import ModelArgs

# The tensor types we read (block formats dequantize exactly as ggml does); others are refused by name.
SUPPORTED_TYPES = tuple(GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"))

_GGUF_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight"}


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader, shared while the file's size and mtime stay the same: parsing the header
    (100k tokenizer strings for SmolLM2) takes seconds, and the loader needs it for the weights,
    the tokenizer and the context length."""
    st = os.stat(path)
    return _reader(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError / struct errors on anything malformed
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader: GGUFReader, key: str, default=None):
    """A metadata value as Python data (str, number, bool or list), or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_model_args(reader: GGUFReader, path: str | Path = "") -> ModelArgs:
    """The model's shape from the file's metadata; anything this decoder does not implement is refused."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def meta(key, default=None):
        value = field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata llama.{key} is missing")
        return value

    if meta("expert_count", 0):
        raise ValueError(f"{path}: a mixture-of-experts LLaMA ({meta('expert_count')} experts) is not supported")
    scaling = field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in _tensor_names(reader):
        raise ValueError(f"{path}: rope scaling ({scaling}) is not supported")
    names = _tensor_names(reader)
    dim, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    args = ModelArgs(
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        hidden_dim=int(meta("feed_forward_length")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_seq_len=int(meta("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
    )
    rope_dims = int(meta("rope.dimension_count", args.head_dim))
    if rope_dims != args.head_dim:
        raise ValueError(f"{path}: rotary over {rope_dims} of {args.head_dim} head dims is not supported")
    return args


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {t.name for t in reader.tensors}


def meta_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> our (Meta's) parameter name; None for a tensor we do not know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name == "output.weight":
        return gguf_name
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def dequantized(tensor) -> np.ndarray:
    """One GGUF tensor as fp32 in numpy order (rows first: (out, in) for a matrix)."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which is not supported "
            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest dimension first
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def read_gguf(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """fp32 state dict in our names (without `output.weight` when the embedding is tied) + shape."""
    reader = open_gguf(path)
    args = gguf_model_args(reader, path)
    state, unknown = {}, []
    for t in reader.tensors:
        name = meta_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        try:
            # A copy: the reader's arrays are read-only views of the memory-mapped file.
            state[name] = torch.from_numpy(np.array(dequantized(t), copy=True))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if unknown:
        raise ValueError(f"{path}: tensors this LLaMA does not have: {unknown[:5]}")
    return state, args


def gguf_context_length(path: str | Path) -> int:
    return gguf_model_args(open_gguf(path), path).max_seq_len
