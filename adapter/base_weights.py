"""Loading frozen base weights from the formats users hold (docs/models.md): Meta and
Hugging Face checkpoint folders, llama2.c `.bin` files and GGUF files (adapter/gguf_base.py).

Memory-conscious: the model is built on the meta device (no storage), shards are opened with
`mmap` where torch allows, and tensors are assigned into the model rather than copied into a
freshly initialised one. Nothing is unpickled: Meta shards go through
`torch.load(weights_only=True)`, Hugging Face weights through safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from adapter.gguf_base import gguf_context_length, is_gguf, read_gguf
from adapter.llama2c import load_llama2c, read_header
from adapter.model import Transformer, build_on_meta
from adapter.model_args import ModelArgs, from_hf_config, from_meta_params

# Meta's model-parallel layout: which dimension each weight was split on across shards.
_SPLIT_DIM_0 = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.", "output.")
_SPLIT_DIM_1 = ("attention.wo.", "feed_forward.w2.", "tok_embeddings.")


def detect_format(path: Path) -> str:
    path = Path(path)
    if is_gguf(path):
        return "gguf"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    if path.is_file():
        raise ValueError(f"{path}: not a checkpoint this loader reads (a .gguf, a llama2.c .bin, or a folder)")
    raise FileNotFoundError(f"{path}: no params.json (Meta layout) or config.json (Hugging Face layout) found")


def load_base(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """Load a frozen LLaMA from a Meta or Hugging Face checkpoint folder, a GGUF file or a llama2.c
    `.bin` file, in eval mode, no grads."""
    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        model = load_llama2c(path, dtype=dtype, device=device)
        if max_seq_len is not None:
            model.args = ModelArgs.from_dict({**model.args.to_dict(), "max_seq_len": max_seq_len})
        return model
    fmt = detect_format(path)
    state, args = {"meta": _read_meta, "hf": _read_hf, "gguf": read_gguf}[fmt](path)
    if max_seq_len is not None:
        args = ModelArgs.from_dict({**args.to_dict(), "max_seq_len": max_seq_len})
    model = build_on_meta(args)
    expected = model.state_dict()
    if args.tie_embeddings:  # the output shares the embedding; it is tied again after loading
        expected.pop("output.weight")
        state.pop("output.weight", None)  # some HF checkpoints store the tied copy too
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match a LLaMA of shape {args}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True gave each key its own Parameter
    model.requires_grad_(False)
    return model.eval()


def context_length(path: str | Path) -> int:
    """The base's context (max_seq_len) from its config alone, without reading any weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        return read_header(path).max_seq_len
    fmt = detect_format(path)
    if fmt == "gguf":
        return gguf_context_length(path)
    if fmt == "meta":
        return int(json.loads((path / "params.json").read_text()).get("max_seq_len", ModelArgs.max_seq_len))
    return from_hf_config(path / "config.json").max_seq_len


def _torch_load(file: Path) -> dict:
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Old-style (non-zip) torch files cannot be memory-mapped.
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: refused to load (not a plain tensor checkpoint: {e})") from None


def _read_meta(path: Path) -> tuple[dict, ModelArgs]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth shards")
    parts = [_torch_load(f) for f in shards]
    state = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):  # precomputed rotary table in old checkpoints; we recompute
            continue
        tensors = [p[name] for p in parts]
        if len(tensors) == 1 or tensors[0].dim() == 1:
            state[name] = tensors[0]  # unsharded, or a replicated norm
        elif any(s in name for s in _SPLIT_DIM_0):
            state[name] = torch.cat(tensors, dim=0)
        elif any(s in name for s in _SPLIT_DIM_1):
            state[name] = torch.cat(tensors, dim=1)
        else:
            raise ValueError(f"{path}: do not know how to merge sharded weight {name}")
    args = from_meta_params(path / "params.json", vocab_size=state["tok_embeddings.weight"].shape[0])
    return state, args


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation (rotate-half form) back to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _read_hf(path: Path) -> tuple[dict, ModelArgs]:
    args = from_hf_config(path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: config.json but no model.safetensors or model.safetensors.index.json")
    state = {}
    for fname in files:
        try:
            with safe_open(path / fname, framework="pt") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    state[_hf_to_meta_name(key)] = f.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{path / fname}: not a readable safetensors file: {e}") from None
    for i in range(args.n_layers):
        q, k = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        if q in state:
            state[q] = _unpermute(state[q], args.n_heads)
        if k in state:
            state[k] = _unpermute(state[k], args.kv_heads)
    return state, args


def _hf_to_meta_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if key == "model.norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    if key.startswith("model.layers."):
        _, _, i, rest = key.split(".", 3)
        module, _, leaf = rest.rpartition(".")
        return f"layers.{i}.{_HF_NAMES.get(module, module)}.{leaf}"
    return key
