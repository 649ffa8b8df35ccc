"""Adapter files: safetensors with the adapter config and base shape in the metadata.

A file is only ever loaded against a base model: any mismatch (layers, width, heads, prompt
length) is refused with the names of what differs, and anything that is not a safetensors file
(a pickle, a truncated download) is refused by name, never unpickled.

A multimodal adapter (docs/multimodal.md) also carries its visual projection (`projection.*`
tensors) and, in the metadata, the identity of the image encoder it was trained with: loading it
for another encoder, or loading a text-only file where images are expected, is refused by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.image_encoder import VisualProjection, describe_encoder, same_encoder
from adapter.model_args import ModelArgs

FORMAT = "llama-adapter"
FORMAT_VERSION = "1"
ADAPTER_FILENAME = "adapter.safetensors"


class AdapterFileError(ValueError):
    """The file is not an adapter for this base model; the message says why."""


def save_adapter(prompts: AdaptionPrompts, args: ModelArgs, path: str | Path, extra: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a crash mid-save never leaves a half file behind."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / ADAPTER_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_config": json.dumps(prompts.config.to_dict()),
        "base_shape": json.dumps(
            {
                "dim": args.dim,
                "n_layers": args.n_layers,
                "n_heads": args.n_heads,
                "n_kv_heads": args.kv_heads,
                "vocab_size": args.vocab_size,
            }
        ),
        "dtype": str(prompts.prompt.dtype).removeprefix("torch."),
        "extra": json.dumps(extra or {}),
    }
    tensors = {"prompt": prompts.prompt.detach().cpu().contiguous(), "gate": prompts.gate.detach().cpu().contiguous()}
    if prompts.projection is not None:
        proj = prompts.projection
        meta["vision"] = json.dumps({"encoder": proj.encoder, **proj.shape()})
        tensors.update({f"projection.{k}": t.detach().cpu().contiguous() for k, t in proj.state_dict().items()})
    return write_atomically(tensors, meta, path)


def write_atomically(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    """safetensors to a temp file beside `path`, then renamed: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file, checked to be ours; raises AdapterFileError otherwise."""
    path = _resolve(path)
    with open(path, "rb") as f:
        return metadata_of(f, path.stat().st_size, path)


def metadata_of(f, size: int, path: str | Path) -> dict:
    """`read_metadata` for an open binary file of `size` bytes (a remote one: only the header is
    read); `path` names it in messages."""
    raw = _header(f, size, path)
    meta = raw.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise AdapterFileError(
            f"{path}: a safetensors file but not a LLaMA-Adapter file (format={meta.get('format')!r})"
        )
    try:
        out = {
            "adapter_config": json.loads(meta["adapter_config"]),
            "base_shape": json.loads(meta["base_shape"]),
            "dtype": meta.get("dtype"),
            "extra": json.loads(meta.get("extra", "{}")),
        }
        if not all(isinstance(out[k], dict) for k in ("adapter_config", "base_shape", "extra")):
            raise ValueError("adapter_config, base_shape and extra must be JSON objects")
        out["config"] = AdapterConfig(**out["adapter_config"])
        out["vision"] = json.loads(meta["vision"]) if "vision" in meta else None
        if out["vision"] is not None and not isinstance(out["vision"], dict):
            raise ValueError("vision must be a JSON object")
    except KeyError as e:
        raise AdapterFileError(f"{path}: adapter metadata lacks {e}") from None
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid adapter settings
        raise AdapterFileError(f"{path}: bad adapter metadata ({e})") from None
    return out


def load_adapter(
    path: str | Path,
    args: ModelArgs,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    encoder: dict | None = None,
) -> AdaptionPrompts:
    """encoder: the identity of the image encoder in use (`ImageEncoder.identity`) when the adapter
    will see images; a text-only file or a file trained with another encoder is then refused."""
    path = _resolve(path)
    meta = read_metadata(path)
    _check_encoder(path, meta["vision"], encoder)
    expected = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
    }
    diffs = [
        f"{k}: adapter {meta['base_shape'].get(k)} vs base {v}"
        for k, v in expected.items()
        if meta["base_shape"].get(k) != v
    ]
    if diffs:
        raise AdapterFileError(f"{path}: adapter was trained for a different base model ({'; '.join(diffs)})")
    config = meta["config"]
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{path}: corrupt adapter file ({e})") from None
    prompts = AdaptionPrompts(args, config, dtype=dtype, device="meta", projection=_projection(path, meta, args))
    expected = prompts.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise AdapterFileError(f"{path}: unexpected tensors {unknown}")
    for name, t in expected.items():
        want = tuple(t.shape)
        if name not in tensors:
            raise AdapterFileError(f"{path}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != want:
            raise AdapterFileError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {want} for this base and config {config}"
            )
        if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            raise AdapterFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
    # The projection stays fp32 beside fp32 prompts, whatever `dtype` the prompts are asked in.
    prompts.load_state_dict(
        {k: tensors[k].to(device=device, dtype=dtype if k in ("prompt", "gate") else torch.float32) for k in expected},
        assign=True,
    )
    prompts.requires_grad_(True)
    return prompts


def _check_encoder(path: Path, vision: dict | None, encoder: dict | None) -> None:
    if encoder is None:
        return
    if vision is None:
        raise AdapterFileError(
            f"{path}: a text-only adapter (no visual projection); it cannot take images from "
            f"encoder {describe_encoder(encoder)}"
        )
    if not same_encoder(vision.get("encoder") or {}, encoder):
        raise AdapterFileError(
            f"{path}: trained with image encoder {describe_encoder(vision.get('encoder') or {})}, "
            f"not {describe_encoder(encoder)}"
        )


def _projection(path: Path, meta: dict, args: ModelArgs):
    vision = meta["vision"]
    if vision is None:
        return None
    try:
        if vision["dim"] != args.dim:
            raise AdapterFileError(f"{path}: visual projection outputs width {vision['dim']}, base is {args.dim}")
        return VisualProjection(
            int(vision["in_features"]), int(vision["hidden"]), args.dim, vision["encoder"], device="meta"
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: bad vision metadata ({e!r})") from None


def import_v1_adapter(path: str | Path, args: ModelArgs, adapter_len: int = 10) -> AdaptionPrompts:
    """The authors' released v1 adapter (a plain torch dict of `adapter_query.weight` (L*K, C) and
    `layers.N.attention.gate` (1, H, 1, 1)); their inference code uses the raw gate, so we do too."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFileError(f"{path}: refused to load as a v1 adapter ({e})") from None
    if "adapter_query.weight" not in sd:
        raise AdapterFileError(f"{path}: no adapter_query.weight; not a LLaMA-Adapter v1 file")
    q = sd["adapter_query.weight"]
    n_adapted = q.shape[0] // adapter_len
    if q.shape[0] % adapter_len or q.shape[1] != args.dim or n_adapted > args.n_layers:
        raise AdapterFileError(
            f"{path}: adapter_query.weight {tuple(q.shape)} does not fit K={adapter_len}, dim={args.dim}"
        )
    prompts = AdaptionPrompts(args, AdapterConfig(adapter_len, n_adapted, gate_activation="identity"))
    gates = []
    for i in prompts.adapted_layers:
        key = f"layers.{i}.attention.gate"
        if key not in sd:
            raise AdapterFileError(f"{path}: missing {key}")
        gates.append(sd[key].reshape(-1).float())
    with torch.no_grad():
        prompts.prompt.copy_(q.float().view(n_adapted, adapter_len, args.dim))
        prompts.gate.copy_(torch.stack(gates))
    return prompts


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILENAME
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    return path


def _header(f, size: int, path: str | Path) -> dict:
    """Parse the safetensors header ourselves, so a pickle or truncated file gets a clear name."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    plausible = 0 < n and 8 + n <= size  # a header length of 128 + 256k also starts with 0x80
    if not plausible and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise AdapterFileError(f"{path}: a pickle / torch.save file, refused (adapters are safetensors only)")
    if len(head) < 8:
        raise AdapterFileError(f"{path}: truncated or empty adapter file ({size} bytes)")
    if not plausible:
        raise AdapterFileError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    try:
        data_end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise AdapterFileError(f"{path}: corrupt safetensors header (a tensor without valid data_offsets)") from None
    if 8 + n + data_end > size:
        raise AdapterFileError(f"{path}: truncated adapter file ({size} bytes, needs {8 + n + data_end})")
    return header
