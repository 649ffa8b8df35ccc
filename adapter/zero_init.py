"""Zero-init attention (docs/method.md and docs/encoders.md): the one piece LLaMA, ViT and RoBERTa share.

An adapted attention layer attends to its learnable prompt with a SEPARATE softmax and adds the
result scaled by a per-head gate that starts at zero:

    out = softmax(q k_T^T) v_T  +  gate_h * softmax(q k_P^T) v_P

The prompt's keys/values go through the layer's own frozen key/value projections; each backbone
says how (LLaMA: wk/wv without rotary; ViT: the in_proj slices; RoBERTa: key/value). With the
gate at 0 the added term is exactly zero, so the layer is exactly the frozen layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATE_ACTIVATIONS = ("tanh", "identity")


@dataclass
class PromptKV:
    """Keys/values of an adaption prompt for one layer, and its already-activated gate.

    k, v: (B or 1, n_kv_heads, K, head_dim); gate: (B or 1, n_heads). Rows with gate 0 get
    exactly nothing from the prompt, which is how a mixed batch includes plain base-model rows.
    mask: optional (B, K) bool, the prompt slots each row attends to: adapters with different
    prompt lengths share a batch by padding to the longest K and masking the rest per row.
    """

    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor
    mask: torch.Tensor | None = None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: each kv head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# torch >= 2.5 attends grouped-query heads itself: no copy of the whole cache per step.
_NATIVE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attend(q, k, v, rep: int = 1, mask=None, is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, (B, heads, T, head_dim), with `rep` query heads per kv head."""
    if rep == 1 or not _NATIVE_GQA:
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask, is_causal=is_causal
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def gated_prompt_attention(q: torch.Tensor, prefix: PromptKV, rep: int = 1) -> torch.Tensor:
    """gate * softmax(q k_P^T / sqrt(d)) v_P for queries q (B, n_heads, T, head_dim): the term a
    zero-init attention layer adds to its ordinary attention output. No mask but the prompt's own
    slot mask, no positions: every query sees the whole prompt."""
    pk, pv = prefix.k.type_as(q), prefix.v.type_as(q)
    if pk.shape[0] != q.shape[0]:  # one prompt for the whole batch (training): fused kernels want equal batches
        pk, pv = (t.expand(q.shape[0], -1, -1, -1).contiguous() for t in (pk, pv))
    p = attend(q, pk, pv, rep, None if prefix.mask is None else prefix.mask[:, None, None, :])
    return prefix.gate[:, :, None, None].type_as(p) * p


class GatedPrompts(nn.Module):
    """The trainable tables: prompts (L, K, dim) and per-head gates (L, n_heads), gates at zero.

    Prompts start N(0, init_std^2) (the authors' prompts are an nn.Embedding: N(0, 1)).
    gate_activation "tanh" for our adapters; "identity" reproduces the authors' released v1
    inference code, which multiplies by the raw gate.
    """

    def __init__(
        self,
        n_layers: int,
        prompt_len: int,
        dim: int,
        n_heads: int,
        init_std: float = 1.0,
        gate_activation: str = "tanh",
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
        self.gate_activation = gate_activation
        self.prompt = nn.Parameter(torch.empty(n_layers, prompt_len, dim, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.zeros(n_layers, n_heads, dtype=dtype, device=device))
        if self.prompt.device.type != "meta":
            nn.init.normal_(self.prompt, std=init_std)

    def activated_gate(self) -> torch.Tensor:
        return torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate
