"""Shapes of the frozen base model: named presets and readers for checkpoint configs.

A `ModelArgs` is all the model code needs; the Meta `params.json` and the Hugging Face
`config.json` are two spellings of it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU width (HF `intermediate_size`) wins over the rule
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output projection shares the token embedding's matrix (SmolLM2, ...)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled, rounded up to multiple_of (Meta's rule)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, ModelArgs] = {
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52),
    "llama-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        norm_eps=1e-5,
        max_seq_len=4096,
    ),
    # For CPU tests: small enough to run in milliseconds, GQA on so that path is always exercised.
    "tiny": ModelArgs(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, norm_eps=1e-5, max_seq_len=256
    ),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def from_meta_params(path: Path, vocab_size: int | None = None) -> ModelArgs:
    """Read Meta's params.json. LLaMA-1 files say vocab_size -1; the caller passes the real one."""
    p = json.loads(Path(path).read_text())
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{path} has vocab_size {vocab}; the vocabulary size must come from the weights")
        vocab = vocab_size
    return ModelArgs(
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads"),
        vocab_size=vocab,
        multiple_of=p.get("multiple_of", 256),
        ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
        norm_eps=p.get("norm_eps", 1e-6),
        rope_theta=p.get("rope_theta", 10000.0),
        max_seq_len=p.get("max_seq_len", 2048),
    )


def from_hf_config(path: Path) -> ModelArgs:
    """Read a Hugging Face LlamaForCausalLM config.json."""
    c = json.loads(Path(path).read_text())
    arch = c.get("architectures") or ["LlamaForCausalLM"]
    if c.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not a LLaMA ({arch})")
    if c.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling {c['rope_scaling']} is not supported")
    return ModelArgs(
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads"),
        vocab_size=c["vocab_size"],
        hidden_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", 10000.0),
        max_seq_len=c.get("max_position_embeddings", 2048),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
