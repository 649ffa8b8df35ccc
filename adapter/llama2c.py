"""Importer for llama2.c checkpoints (`stories260K.bin`, `stories15M.bin`, ... from
karpathy/tinyllamas): the legacy (version 0) format of llama2.c's `export.py`.

Layout: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
max_seq_len; a negative vocab_size means the classifier is not shared with the embedding), then
float32 arrays: token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3 (each for
all layers), final norm, the rotary cos / sin tables (ignored), and the classifier if not shared.
Weights are in Meta's layout, so they load into our model unchanged.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from adapter.model import Transformer, build_on_meta
from adapter.model_args import ModelArgs

HEADER = struct.Struct("7i")


def _parse_header(path: Path, raw: bytes) -> tuple[ModelArgs, bool]:
    """The model's shape, and whether the classifier shares the embedding."""
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack(raw[: HEADER.size])
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len) <= 0 or dim % n_heads:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv, vocab})")
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=abs(vocab),
        hidden_dim=hidden,
        norm_eps=1e-5,
        max_seq_len=seq_len,
    )
    return args, vocab > 0


def read_header(path: str | Path) -> ModelArgs:
    with open(path, "rb") as f:
        return _parse_header(Path(path), f.read(HEADER.size))[0]


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    args, shared = _parse_header(path, bytes(data[: HEADER.size]))
    dim, hidden, n_layers, vocab, seq_len = (
        args.dim,
        args.ffn_hidden_dim,
        args.n_layers,
        args.vocab_size,
        args.max_seq_len,
    )
    head, kv_dim = args.head_dim, args.kv_heads * args.head_dim
    floats = np.frombuffer(data, dtype=np.float32, offset=HEADER.size)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > len(floats):
            raise ValueError(f"{path}: truncated (needs more than {len(floats)} floats)")
        out = torch.from_numpy(floats[pos : pos + n].copy()).view(*shape)
        pos += n
        return out

    state = {"tok_embeddings.weight": take(vocab, dim)}
    per_layer = [
        ("attention_norm.weight", (dim,)),
        ("attention.wq.weight", (dim, dim)),
        ("attention.wk.weight", (kv_dim, dim)),
        ("attention.wv.weight", (kv_dim, dim)),
        ("attention.wo.weight", (dim, dim)),
        ("ffn_norm.weight", (dim,)),
        ("feed_forward.w1.weight", (hidden, dim)),
        ("feed_forward.w2.weight", (dim, hidden)),
        ("feed_forward.w3.weight", (hidden, dim)),
    ]
    for name, shape in per_layer:  # llama2.c stores each weight for all layers together
        for i in range(n_layers):
            state[f"layers.{i}.{name}"] = take(*shape)
    state["norm.weight"] = take(dim)
    take(seq_len * head // 2)  # rotary cos table: we compute our own
    take(seq_len * head // 2)  # rotary sin table
    state["output.weight"] = state["tok_embeddings.weight"].clone() if shared else take(vocab, dim)
    if pos != len(floats):
        raise ValueError(f"{path}: {len(floats) - pos} unexpected trailing floats; not a version-0 llama2.c file")
    model = build_on_meta(args)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.requires_grad_(False).eval()
