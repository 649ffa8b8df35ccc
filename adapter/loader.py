"""One way to get a ready frozen base: weights + tokenizer + device + dtype + vocabulary check.

Generation, serving and every training worker call `load_model`, so a setting in the config's
`model:` section means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapter.base_weights import context_length, load_base
from adapter.model import Transformer, build_on_meta
from adapter.model_args import ModelArgs, preset
from adapter.models import resolve_model
from adapter.quantize import quantize_base
from adapter.settings import ModelSource
from adapter.tokenizer import TextTokenizer, load_tokenizer


@dataclass
class LoadedModel:
    base: Transformer
    tokenizer: TextTokenizer  # carries the base's chat template, if it has one
    device: torch.device
    dtype: torch.dtype
    note: str  # where the weights came from, in words (says RANDOM in capitals for a preset)


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Frozen weights: bf16 on GPU, fp32 on CPU unless the config says otherwise."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def random_base(name: str, dtype: torch.dtype, device: torch.device, seed: int = 1234) -> Transformer:
    """A random-initialised base of a preset shape, built on the meta device and materialised
    once, in the working dtype, on the target device (a 7B shape never exists in fp32 on the host)."""
    model = build_on_meta(preset(name)).to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.requires_grad_(False).eval()


def base_path_of(source: ModelSource) -> str | None:
    """The base's path: a catalogue name is fetched into the model cache first (adapter/models.py)."""
    return None if source.base is None else str(resolve_model(source.base))


def tokenizer_for(source: ModelSource) -> TextTokenizer:
    """`model.tokenizer` when set, else the one the base carries (a GGUF file, or tokenizer.json /
    tokenizer.model in its folder). Preprocessing, training, generation and serving all call this."""
    if source.tokenizer is not None:
        return load_tokenizer(resolve_model(source.tokenizer))
    base_path = base_path_of(source)
    if base_path is None or not Path(base_path).exists():
        raise FileNotFoundError(
            f"model.tokenizer is not set and the base ({base_path or 'preset ' + str(source.preset)}) "
            "is not there to take it from: set model.tokenizer"
        )
    try:
        return load_tokenizer(base_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model.tokenizer is not set and the base {base_path} carries no tokenizer: set model.tokenizer"
        ) from None


def load_model(source: ModelSource, device: str | torch.device | None = None) -> LoadedModel:
    dev = pick_device(str(device) if device is not None else source.device)
    dtype = pick_dtype(source.dtype, dev)
    base_path = base_path_of(source)
    tokenizer = tokenizer_for(source)
    # A quantized base is read on the host and quantized onto the device layer by layer, so the
    # full-precision base never has to fit there (adapter/quantize.py).
    load_dev = torch.device("cpu") if source.quantize != "none" else dev
    if base_path and Path(base_path).exists():
        base = load_base(base_path, dtype=dtype, device=load_dev)
        note = f"pretrained base from {base_path}"
    elif source.preset:
        base = random_base(source.preset, dtype, load_dev)
        why = f"base {base_path} not found; " if base_path else ""
        note = f"RANDOM-INITIALISED base of preset {source.preset!r} ({why}a last resort: outputs are noise)"
    else:
        raise FileNotFoundError(f"model.base {base_path} not found and no model.preset fallback given")
    if source.context is not None and source.context < base.args.max_seq_len:  # a cap, never an extension
        base.args = ModelArgs.from_dict({**base.args.to_dict(), "max_seq_len": source.context})
    if tokenizer.vocab_size != base.args.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
            f"vocabulary is {base.args.vocab_size}: they do not belong together"
        )
    if source.quantize != "none":
        base = quantize_base(base, source.quantize, dev)
        note += f"; blocks' linear layers quantized to {source.quantize}"
    return LoadedModel(base, tokenizer, dev, dtype, note)


def model_context(source: ModelSource) -> int:
    """The context length of the configured base, from its config file alone (no weights)."""
    base_path = base_path_of(source)
    if base_path and Path(base_path).exists():
        own = context_length(base_path)
    elif source.preset:
        own = preset(source.preset).max_seq_len
    else:
        raise FileNotFoundError(f"model.base {base_path} not found and no model.preset fallback given")
    return min(own, source.context) if source.context else own
