"""A quantized frozen base: the linear layers of the transformer blocks held in 8 or 4 bits.

The base is frozen, so its weights can live quantized while the adaption prompts and gates stay in
full precision. `load_model` calls `quantize_base` once after loading (the `quantize:` setting of
the config's `model:` section), so training workers, generation and Serve replicas all get the
same model with no code of their own. Only the blocks' wq/wk/wv/wo and w1/w2/w3 are replaced (96%
of a LLaMA-7B's weights); the token embedding, the norms and the output projection stay in the
working dtype.

    int4: bitsandbytes `Linear4bit`, NF4 (QLoRA's 4-bit NormalFloat), blocks of 64 weights whose
          scales are themselves quantized (about 4.13 bits per weight).
    int8: `Int8Linear` below: weight-only int8, one int8 per weight and one fp32 scale per output
          row (absmax / 127), dequantized on the fly to the activation dtype.

Why bitsandbytes for 4 bits: it runs NF4 here on CPU (its 0.50 CPU backend) as on CUDA, with
backward with respect to the input (QLoRA's use). torchao 0.18's int4 weight-only layouts need
CUDA (its CPU layout is gone) and its CPU "intx" int4 layout stores one int4 per byte (no saving
over int8); its weights are tensor subclasses that generic code here cannot handle (the training
recipe's `state_digest` reshapes every state-dict tensor: Int8Tensor refuses `view`).
Why not bitsandbytes for 8 bits: `Linear8bitLt` (LLM.int8()) keeps its weight as an int8 tensor,
so `weight.dtype` is int8 and the adapter, which casts its prompts to `wk.weight.dtype`, would
round them to integers; it also quantizes the activations (twice the output error of weight-only
int8 on stories260K, and 10x slower than fp32 there on CPU). Weight-only int8 with a per-row scale
is what torchao's Int8WeightOnlyConfig computes; written out it is a dozen lines, runs on every
device and keeps plain tensors.

Storage: both keep their packed bytes in a tensor *viewed as the working dtype* (bitsandbytes'
`quant_storage`, as FSDP-QLoRA uses it), so `weight.dtype` names the working dtype everywhere.
Never cast a quantized base (`base.to(dtype)`): that would convert the packed bytes as numbers.

Gradients: quantized weights are frozen (requires_grad False) and nothing of them is trained;
gradients with respect to the activations flow through both kinds of layer, so every adapted
layer's prompt receives its gradient. Backward re-dequantizes from the packed weight: no
full-precision copy of a weight is kept for backward. The adapter file holds only prompts and
gates, so it is the same whatever the base's precision.

A workaround for bitsandbytes 0.50.2 (tested in tests/test_quantize.py): on a CPU with
AVX512-BF16, `Linear4bit`'s first forward without autograd repacks its weight in place into a CPU
layout whose kernel has no backward, after which the gradient through that layer is silently
missing. We switch that repacking off per layer (`support_avx512bf16_for_cpu = False`).
"""

from __future__ import annotations

import logging
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from adapter.model import Transformer
from adapter.settings import ModelSource

QUANTIZE_CHOICES = get_args(ModelSource.model_fields["quantize"].annotation)  # ("none", "int8", "int4")
INT4_BLOCKSIZE = 64  # QLoRA's setting; bitsandbytes' CUDA kernels take blocks of 64 and up
BLOCK_LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def _bnb():
    # bitsandbytes' CPU backend logs at import that it could not fetch an optional kernel from a
    # model hub (the `kernels` package is not installed, so nothing is downloaded at run time);
    # its own pure-torch fallback is what runs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


def check_mode(mode: str) -> str:
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {mode!r}")
    return mode


def _dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype) -> torch.Tensor:
    return codes.view(torch.int8).view(shape).to(dtype) * scale.to(dtype)[:, None]


class _Int8Matmul(torch.autograd.Function):
    """x @ W^T with W held as int8 codes + row scales; backward (to x only) dequantizes again
    instead of saving the dequantized weight."""

    @staticmethod
    def forward(ctx, x, codes, scale, shape):
        ctx.save_for_backward(codes, scale)
        ctx.shape = shape
        return F.linear(x, _dequantize_int8(codes, scale, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        grad_x = grad @ _dequantize_int8(codes, scale, ctx.shape, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Int8Linear(nn.Module):
    """Weight-only int8 linear: W ~ codes * scale[row], codes in [-127, 127], scale = absmax / 127.

    `weight` holds the int8 codes' bytes viewed as the working dtype (see the module docstring);
    `scale` is fp32, one per output row.
    """

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None):
        super().__init__()
        w = linear.weight.detach()
        dtype, device = w.dtype, torch.device(device or w.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = w.to(device=device, dtype=torch.float32)
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)
        if codes.numel() % dtype.itemsize:
            raise ValueError(f"a {tuple(w.shape)} weight cannot be stored as {dtype} bytes")
        self.weight = nn.Parameter(codes.view(dtype), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int8Matmul.apply(x, self.weight, self.scale, shape)
        return F.linear(x, _dequantize_int8(self.weight, self.scale, shape, x.dtype))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize_int8(self.weight, self.scale, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_linear(linear: nn.Linear, mode: str, device: torch.device | str | None = None) -> nn.Module:
    """A frozen quantized copy of `linear` on `device` (default: where its weight is)."""
    if linear.bias is not None:
        raise ValueError("LLaMA's linear layers have no bias; a biased linear is not supported here")
    device = torch.device(device or linear.weight.device)
    if mode == "int8":
        q = Int8Linear(linear, device)
    elif mode == "int4":
        bnb = _bnb()
        dtype = linear.weight.dtype
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=dtype,
            device="meta",
        )
        # Params4bit quantizes when it is moved to a device (also the one it is already on).
        q.weight = bnb.nn.Params4bit(
            linear.weight.detach().to(device),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=INT4_BLOCKSIZE,
            quant_storage=dtype,
            module=q,
        ).to(device)
        q.support_avx512bf16_for_cpu = False  # keeps backward working: see the module docstring
    else:
        raise ValueError(f"cannot quantize a linear layer to {mode!r}; choose int8 or int4")
    return q.requires_grad_(False).eval()


def quantize_base(base: Transformer, mode: str, device: torch.device | str | None = None) -> Transformer:
    """Replace every block's linear layers with quantized ones, in place, one at a time; with
    `device`, the quantized layers and everything else (embedding, norms, output) end up there.

    Loading on the host and quantizing onto the accelerator layer by layer means the
    full-precision base never has to fit in accelerator memory (a 65B base in bf16 does not fit
    an 80 GB GPU; in int4 it does).
    """
    check_mode(mode)
    if mode != "none":
        for layer in base.layers:
            for path in BLOCK_LINEARS:
                parent_name, name = path.split(".")
                parent = getattr(layer, parent_name)
                setattr(parent, name, quantize_linear(getattr(parent, name), mode, device))
    if device is not None:
        # The parameters left in the working dtype (embedding, norms, output) follow; quantized
        # layers are already there and are not moved again.
        moved: dict[int, nn.Parameter] = {}  # a tied embedding/output matrix is moved once and stays one
        for module in base.modules():
            if is_quantized(module):
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device != torch.device(device):
                    if id(p) not in moved:
                        moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=False)
                    setattr(module, name, moved[id(p)])
    base.quantize = mode
    return base.requires_grad_(False).eval()


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, Int8Linear) or type(module).__name__ == "Linear4bit"


def quantization_of(base: nn.Module) -> str:
    """'int8', 'int4' or 'none': what `quantize_base` did to this base."""
    return getattr(base, "quantize", "none")


def weight_bytes(module: nn.Module) -> int:
    """Bytes the weights hold at rest: every tensor of the state dict (quantized weights, their
    scales and quantization tables, and the full-precision rest)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
