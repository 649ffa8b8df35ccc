"""The image side of the multimodal LLaMA-Adapter (docs/multimodal.md).

A frozen CLIP vision tower (transformers' `CLIPVisionModel`, CLIP ViT-L/14 in the paper) gives a
global feature (the CLS token, through the tower's own final LayerNorm) at several depths; the
features are concatenated and a small learnable MLP (`VisualProjection`) maps them to ONE image
token of the LLM's width. The adapter adds that token to every adapted layer's prompt
(`AdaptionPrompts.prefixes`), so gates at zero still mean "exactly the base model".

Why transformers' CLIPVisionModel and not open_clip: it is already a dependency of this project,
reads and writes safetensors folders (`save_pretrained` / `from_pretrained(use_safetensors=True)`,
never a pickle), and ships CLIP's own image preprocessing as a config file beside the weights
(`preprocessor_config.json`), read here with its PIL backend (no torchvision): resize of the
shortest edge, center crop, CLIP mean/std, exactly as the tower was trained.

An encoder is identified by the sha256 of its weights (and its folder name, for messages): an
adapter's projection is only ever used with the encoder it was trained against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, field_validator
from torch import nn

from adapter.hashing import sha256_of
from adapter.image_decode import ImageError, decode_image  # noqa: F401 (ImageError: re-exported for callers)
from adapter.settings import PathField, Section, project_path

WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"


class VisionConfig(Section):
    """The frozen encoder and the learnable projection on top of it."""

    encoder: str = PathField(
        description="folder of a transformers CLIPVisionModel (config.json, model.safetensors, "
        "preprocessor_config.json)"
    )
    feature_layers: tuple[int, ...] = Field(
        (6, 12, 18, 24), description="depths whose CLS token is taken (1 = first block; ViT-L/14 has 24)"
    )
    proj_hidden: int = Field(72, ge=1, description="MLP width: 4 x 1024 -> 72 -> 4096 is ~0.6M parameters at 7B")

    @field_validator("feature_layers")
    @classmethod
    def _positive(cls, v):
        if not v or min(v) < 1 or len(set(v)) != len(v):
            raise ValueError(f"feature_layers must be distinct depths >= 1, got {v}")
        return v


def encoder_identity(folder: str | Path, feature_layers: tuple[int, ...]) -> dict:
    """What an adapter file records about its encoder; only `sha256` and `feature_layers` must match."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"vision encoder {folder}: no {WEIGHTS_FILE} (a transformers save_pretrained folder "
            "with safetensors weights is expected)"
        )
    return {"name": folder.name, "sha256": sha256_of(weights), "feature_layers": list(feature_layers)}


def same_encoder(a: dict, b: dict) -> bool:
    return a.get("sha256") == b.get("sha256") and list(a.get("feature_layers", [])) == list(b.get("feature_layers", []))


def describe_encoder(e: dict) -> str:
    return f"{e.get('name')!r} (sha256 {str(e.get('sha256'))[:12]}, CLS at depths {e.get('feature_layers')})"


class VisualProjection(nn.Module):
    """Concatenated multi-scale CLIP features -> one image token of the LLM's width.

    The final LayerNorm puts the token on the prompts' own N(0, 1) scale, so the image neither
    drowns the prompt nor vanishes in it. It records the encoder it was built for (`encoder`).
    """

    def __init__(
        self, in_features: int, hidden: int, dim: int, encoder: dict, dtype: torch.dtype = torch.float32, device=None
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.fc1 = nn.Linear(in_features, hidden, **kw)
        self.fc2 = nn.Linear(hidden, dim, **kw)
        self.norm = nn.LayerNorm(dim, **kw)
        self.encoder = dict(encoder)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(nn.functional.gelu(self.fc1(features))))

    def shape(self) -> dict:
        return {"in_features": self.fc1.in_features, "hidden": self.fc1.out_features, "dim": self.fc2.out_features}


class ImageEncoder:
    """The frozen CLIP tower with its own preprocessing: images -> (B, n_scales x width) features."""

    def __init__(self, config: VisionConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPVisionModel
        from transformers.utils import logging as hf_logging

        folder = Path(project_path(config.encoder))
        if not (folder / PROCESSOR_FILE).is_file():
            raise FileNotFoundError(
                f"vision encoder {folder}: no {PROCESSOR_FILE} (CLIP's preprocessing must come "
                "with the weights it belongs to)"
            )
        self.identity = encoder_identity(folder, config.feature_layers)
        hf_logging.set_verbosity_error()  # no progress bars from every worker
        self.model = CLIPVisionModel.from_pretrained(folder, use_safetensors=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        depth = self.model.config.num_hidden_layers
        if max(config.feature_layers) > depth:
            raise ValueError(
                f"vision.feature_layers {list(config.feature_layers)} reach past the encoder's {depth} "
                f"layers ({folder})"
            )
        self.processor = _processor(folder)
        self.layers = list(config.feature_layers)
        self.width = self.model.config.hidden_size
        self.out_features = self.width * len(self.layers)
        self.device, self.dtype = torch.device(device), dtype
        tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests it, 5 does not
        self.final_norm = tower.post_layernorm

    def shrink_rule(self) -> tuple[int, int] | None:
        """(shortest edge, PIL filter) of the preprocessing's first resize, which a decoder may apply
        early (`adapter.image_decode.shrink_for_encoder`) without changing the features; None where
        the preprocessing resizes otherwise."""
        p = self.processor

        def size(key):  # a dict in transformers 4, a SizeDict in 5
            return p.size.get(key) if isinstance(p.size, dict) else getattr(p.size, key, None)

        edge = size("shortest_edge")
        if not p.do_resize or not edge or size("longest_edge") or size("height"):
            return None
        return int(edge), int(p.resample)

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) normalised as CLIP expects (resize, center crop, mean/std)."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        """(B, n_scales x width) fp32: the CLS token at each configured depth, through the final norm."""
        px = self.pixels(images).to(self.device, self.dtype)
        hidden = self.model(pixel_values=px, output_hidden_states=True).hidden_states
        return torch.cat([self.final_norm(hidden[d][:, 0]) for d in self.layers], dim=-1).float()

    def projection(self, hidden: int, dim: int, device=None) -> VisualProjection:
        return VisualProjection(self.out_features, hidden, dim, self.identity, device=device)


def _processor(folder: Path):
    try:  # transformers 5: the PIL backend by name (the default one wants torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL/numpy processor is the default
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder)


def features_for(encoder: ImageEncoder, images: list[bytes | None], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features for a batch where some rows have no image: (B, F) with zeros there, and (B,) present mask.

    Raises ImageError for an unreadable image (callers set that row aside)."""
    present = torch.tensor([b is not None for b in images])
    feats = torch.zeros(len(images), encoder.out_features)
    if present.any():
        decoded = [decode_image(b) for b in images if b is not None]
        feats[present] = encoder.features(decoded).cpu()
    return feats.to(device or encoder.device), present.to(device or encoder.device)


def save_random_encoder(
    folder: str | Path,
    width: int = 32,
    layers: int = 3,
    heads: int = 2,
    image_size: int = 32,
    patch: int = 8,
    seed: int = 0,
) -> Path:
    """A random CLIP vision tower of ViT-L/14's architecture at toy size, with CLIP's preprocessing,
    in transformers' format: what tests and the tiny CPU configs use, as no pretrained CLIP is
    reachable there. Features of a random tower carry little about the image: plumbing, not skill."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
    )
    CLIPVisionModel(cfg).save_pretrained(folder)
    Processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="python -m adapter.image_encoder random-encoder FOLDER: a toy random CLIP "
        "tower for the tiny CPU configs"
    )
    ap.add_argument("command", choices=["random-encoder"])
    ap.add_argument("folder")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=32)
    a = ap.parse_args()
    print(save_random_encoder(a.folder, width=a.width, layers=a.layers))
