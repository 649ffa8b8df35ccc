"""ViT-B/16 as torchvision builds it: the frozen image backbone of the encoder adapter (docs/encoders.md).

Why our own module: torchvision cannot be installed beside this project's torch build (its
compiled ops fail to import), yet torchvision's `vit_b_16` checkpoints are the weights people
have. So this is torchvision's `VisionTransformer` (torchvision/models/vision_transformer.py)
written again from its code, keeping its module names, state-dict layout, initialisation and
forward exactly: a file saved from `torchvision.models.vit_b_16().state_dict()` loads here with
a strict key check, and gives the same outputs.

    conv_proj (patchify) -> [class_token; patches] + encoder.pos_embedding -> encoder.dropout
    -> encoder.layers.encoder_layer_{i}: x + MHA(ln_1 x); x + mlp(ln_2 x)  (pre-norm)
    -> encoder.ln (eps 1e-6) -> CLS token -> heads.head

Preprocessing is torchvision's ViT_B_16 weights transform (resize 256 bilinear, center crop 224,
ImageNet mean/std), done with PIL and torch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn

from adapter.settings import Section

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # torchvision's ViT_B_16 transform: resize 256, crop 224


class ViTShape(Section):
    """The hyper-parameters torchvision's `VisionTransformer` takes (no representation layer)."""

    image_size: int = Field(224, ge=1)
    patch_size: int = Field(16, ge=1)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    hidden_dim: int = Field(768, ge=1)
    mlp_dim: int = Field(3072, ge=1)
    num_classes: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _divisible(self):
        if self.image_size % self.patch_size or self.hidden_dim % self.num_heads:
            raise ValueError(f"image_size must be a multiple of patch_size and hidden_dim of num_heads: {self}")
        return self

    @classmethod
    def vit_b_16(cls) -> ViTShape:
        return cls(
            image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=1000
        )

    @property
    def seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token


class MLPBlock(nn.Sequential):
    """torchvision's MLPBlock (an ops.MLP): keys `0` and `3` are the two Linear layers."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__(
            nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout)
        )
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; the adapter hooks `self_attention` (adapter/backbones/adapted.py)."""

    def __init__(
        self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))  # from BERT
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout))
                for i in range(num_layers)
            )
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's VisionTransformer: (B, 3, S, S) normalised pixels -> (B, num_classes) logits."""

    def __init__(self, shape: ViTShape, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.image_size, self.patch_size, self.hidden_dim = shape.image_size, shape.patch_size, shape.hidden_dim
        self.conv_proj = nn.Conv2d(3, shape.hidden_dim, kernel_size=shape.patch_size, stride=shape.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, shape.hidden_dim))
        self.encoder = Encoder(
            shape.seq_length,
            shape.num_layers,
            shape.num_heads,
            shape.hidden_dim,
            shape.mlp_dim,
            dropout,
            attention_dropout,
        )
        self.seq_length = shape.seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(shape.hidden_dim, shape.num_classes)))
        fan_in = self.conv_proj.in_channels * self.patch_size**2
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    @property
    def blocks(self) -> list[EncoderBlock]:
        return list(self.encoder.layers)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, patches, hidden): one token per patch, row by row."""
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {h}x{w}")
        x = self.conv_proj(x)
        return x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the class token after the final LayerNorm, what `heads` classifies."""
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x))


# --- weights ------------------------------------------------------------------------------------
class ViTWeightsError(ValueError):
    """A weights file that is not a torchvision ViT state dict of the expected shape; the message says why."""


def _legacy_mlp_keys(state: dict) -> dict:
    """Older torchvision checkpoints name the MLP `linear_1` / `linear_2`; torchvision renames them
    to `0` / `3` when it loads them (MLPBlock._load_from_state_dict), and so do we."""
    return {k.replace("mlp.linear_1.", "mlp.0.").replace("mlp.linear_2.", "mlp.3."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision state dict from `.safetensors`, or `.pth` / `.pt` read with weights_only
    (tensors and plain containers only: a pickle is never run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ViT weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        elif path.suffix in (".pth", ".pt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ViTWeightsError(f"{path}: unknown weights format (expected .safetensors, .pth or .pt)")
    except ViTWeightsError:
        raise
    except Exception as e:  # corrupt file, or a pickle holding more than tensors
        raise ViTWeightsError(f"{path}: cannot read as a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ViTWeightsError(f"{path}: not a state dict of tensors")
    return _legacy_mlp_keys(state)


def load_vit(
    path: str | Path, shape: ViTShape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> VisionTransformer:
    """A frozen ViT in eval mode from a torchvision state-dict file; every key must match."""
    path = Path(path)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = VisionTransformer(shape)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ViTWeightsError(
            f"{path}: not a torchvision ViT state dict for {shape} "
            f"(missing keys {missing}, unexpected keys {unexpected})"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(t.shape)}" for k, t in expected.items() if state[k].shape != t.shape
    ]
    if wrong:
        raise ViTWeightsError(f"{path}: tensor shapes differ from {shape}: {'; '.join(wrong)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def save_random_vit(path: str | Path, shape: ViTShape, seed: int = 0) -> Path:
    """A randomly initialised ViT as a torchvision-format safetensors file: what tests and tiny
    configs use, as no pretrained weights are reachable there. The head is random too (torchvision
    starts it at zero), so its logits are not all equal."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = VisionTransformer(shape)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --- preprocessing ------------------------------------------------------------------------------
def preprocess_images(images: list, shape: ViTShape) -> torch.Tensor:
    """PIL images -> (B, 3, S, S), as torchvision's ViT_B_16 weights transform: shorter edge resized
    bilinearly to S * 256/224 (256 at S=224; the same ratio for toy sizes), center crop S x S,
    scaled to [0, 1], ImageNet mean/std."""
    from PIL import Image

    size = shape.image_size
    short = round(size * RESIZE_RATIO)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        # torchvision: the shorter edge becomes `short`, the longer one int(short * long / short_edge)
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        px = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append((px.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="python -m adapter.backbones.vit random FILE: a toy random ViT in torchvision's "
        "vit_b_16 layout (safetensors), for the tiny CPU configs"
    )
    ap.add_argument("command", choices=["random"])
    ap.add_argument("path")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    a = ap.parse_args()
    print(
        save_random_vit(
            a.path,
            ViTShape(
                image_size=a.image_size,
                patch_size=a.patch_size,
                num_layers=a.layers,
                num_heads=a.heads,
                hidden_dim=a.width,
                mlp_dim=2 * a.width,
                num_classes=a.classes,
            ),
        )
    )
