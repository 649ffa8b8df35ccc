"""FLOPs of adapter training and generation, and model FLOP utilisation (MFU), as nanoGPT's
`estimate_mfu` does it: count the matmuls from the shapes, divide achieved FLOP/s by the chip's
dense peak.

What is counted, per token (a multiply-add is 2 FLOPs; norms, rotary, softmax, the embedding
lookup and the optimizer step are left out, as nanoGPT leaves them out):

- forward: 2 x the matmul parameters of every block (wq, wk, wv, wo, w1, w2, w3), the attention
  scores and values 4 x n_layers x dim x context, the adaption-prompt attention
  4 x adapted_layers x dim x adapter_len, and the output projection 2 x dim x vocab;
- backward: the base is frozen, so no weight gradients, only activation gradients, and only
  where a gradient flows: the adapted (top) layers and the output head (layers below the first
  adapted layer run without autograd). Through a frozen linear layer that is one matmul
  (dX = dY W^T), as many FLOPs as its forward; attention's QK^T and PV multiply two
  activations, so their backward is 2 x their forward. Forward + backward of the adapted part
  is therefore about 2 x its forward, and for LLaMA-7B with L = 30 of 32 layers the whole step
  is about 4 x parameters per token (docs/training.md), not the 6 x of full training.

The adapter's own FLOPs (prompt keys/values through wk/wv, once per step, not per token) are
below 0.2% of a 7B step and are not counted.
"""

from __future__ import annotations

import re

import torch

from adapter.model_args import ModelArgs


def block_matmul_params(args: ModelArgs) -> int:
    """Weights of one block's matmuls: wq, wo (dim x dim), wk, wv (dim x kv_dim), w1, w2, w3."""
    kv_dim = args.kv_heads * args.head_dim
    return 2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * args.ffn_hidden_dim


def _forward_parts(args: ModelArgs, adapted_layers: int, adapter_len: int, context: float) -> dict:
    """Forward FLOPs per token, split into what lives in every layer and what is per layer."""
    per_layer_linear = 2 * block_matmul_params(args)
    per_layer_attn = 4 * args.dim * context  # q.k over `context` keys, then p.v: 2 FLOPs each
    return {
        "linear": per_layer_linear,
        "attention": per_layer_attn,
        "prompt": 4 * args.dim * adapter_len,  # the same two products over the K prompt slots
        "head": 2 * args.dim * args.vocab_size,
        "adapted_layers": min(adapted_layers, args.n_layers),
    }


def training_flops_per_token(
    args: ModelArgs, adapted_layers: int, adapter_len: int, seq_len: float, logits_fraction: float = 1.0
) -> float:
    """Forward + backward FLOPs per token of a batch padded to `seq_len`.

    Causal attention: a query at position t sees t+1 keys, so the mean context is ~seq_len/2
    (the count a flash kernel with is_causal actually does; a kernel given an explicit mask
    computes the full square and throws half away, which this does not count).
    logits_fraction: share of positions where the output projection runs (our loss computes
    logits only at response positions, ~half of an Alpaca batch); 1.0 counts every position.
    adapted_layers == 0 means nothing is trainable, so there is no backward at all, not even
    through the head: the result is the forward alone.
    """
    p = _forward_parts(args, adapted_layers, adapter_len, seq_len / 2)
    n, a = args.n_layers, p["adapted_layers"]
    head = p["head"] * logits_fraction
    forward = n * (p["linear"] + p["attention"]) + a * p["prompt"] + head
    if a == 0:
        return float(forward)
    # Activation gradients only: 1x for frozen linears and the head, 2x for the activation-by-
    # activation products (scores and values, prompt scores and values).
    backward = a * (p["linear"] + 2 * p["attention"] + 2 * p["prompt"]) + head
    return float(forward + backward)


def generation_flops_per_token(args: ModelArgs, adapted_layers: int, adapter_len: int, context: float) -> float:
    """Forward FLOPs for one new token attending to `context` cached keys (prefill: use the mean
    context of the prompt, ~its length / 2)."""
    p = _forward_parts(args, adapted_layers, adapter_len, context)
    return float(args.n_layers * (p["linear"] + p["attention"]) + p["adapted_layers"] * p["prompt"] + p["head"])


# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, by matmul dtype. Patterns are matched
# as whole words in the upper-cased device name (so "L4" is not an "L40S"); the first match wins,
# so the more specific names come first. "fp32" is plain FP32 (CUDA cores), not TF32:
# torch runs fp32 matmuls without TF32 unless torch.backends.cuda.matmul.allow_tf32 is set
# (A100 TF32 would be 156e12, H100 SXM 495e12).
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # same compute as the H100 SXM
    ("H100 PCIE", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # SXM4 and PCIe alike
    # NVIDIA publishes the A10's figures; the A10G (AWS) is usually quoted with them, its real
    # tensor peak may be lower.
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores: bf16 gives None
]

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def peak_flops_per_device(device_name: str | None, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`, or None for a CPU, an unknown
    device, or a dtype the device has no figure for (e.g. bf16 on a V100)."""
    if not device_name or device_name.lower() == "cpu":
        return None
    key = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    name = device_name.upper()
    for pattern, peaks in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", name):
            return peaks.get(key)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved FLOP/s as a fraction of the peak; None where the peak is unknown (CPU)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak
