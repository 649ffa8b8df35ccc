"""The frozen base: Meta's LLaMA decoder, top to bottom in reading order.

Parameter names follow Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...), so Meta
weights load without renaming. Batches are left-padded: each row has its own first real slot
(`pad`), rotary positions count from there, and padded keys are masked out. That lets a batch of
prompts of different lengths share one prefill and one KV cache.

The only hook for the adapter is `prefixes`: per layer, extra keys/values attended to with their
own softmax and added through a gate (see adapter/adapter.py). The model has no adapter
parameters of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapter.model_args import ModelArgs
from adapter.zero_init import PromptKV, attend, gated_prompt_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Meta's reference, then return to the activation dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_freqs(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """e^(i * position * frequency) for each position (any shape) and each of the head_dim/2 pairs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3),... as Meta's complex form does: each pair is a
    complex number times its position's unit phasor (one kernel, not six: it runs at every step).

    x: (B, heads, T, head_dim); freqs: (B, T, head_dim/2) complex.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs[:, None]).flatten(-2).type_as(x)


@dataclass
class RowStarts:
    """Continuous batching: row b's new tokens go to cache slots first[b].., each row at its own
    length, and attention reads keys up to `end` (the longest row), hiding each row's unused slots."""

    first: torch.Tensor  # (B,) long
    end: int


class KVCache:
    """Pre-allocated keys/values for one layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, max_len: int, args: ModelArgs, dtype: torch.dtype, device):
        shape = (batch, args.kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int | RowStarts, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, RowStarts):
            slots = start.first[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, T)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, slots] = k.transpose(1, 2)
            self.v[rows, :, slots] = v.transpose(1, 2)
            end = start.end
        else:
            end = start + k.shape[2]
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, first: int, stop: int) -> KVCache:
        """A view of rows first..stop-1 (writes go to this cache): one engine slot or a run of them."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[first:stop], self.v[first:stop]
        return view


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, dim) -> keys and values (B, n_kv_heads, T, head_dim), no rotary."""
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        return k, v

    def forward(
        self, x, freqs, mask, start: int = 0, cache: KVCache | None = None, prefix: PromptKV | None = None
    ) -> torch.Tensor:
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k, v = self.project_kv(x)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        if cache is not None:
            k, v = cache.update(start, k, v)
        rep = self.n_heads // self.n_kv_heads
        out = attend(q, k, v, rep, mask, is_causal=mask is None)
        if prefix is not None:  # zero-init attention: the prompt's own softmax, no rotary, gated
            out = out + gated_prompt_attention(q, prefix, rep)
        return self.wo(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs, mask, start=0, cache=None, prefix=None):
        h = x + self.attention(self.attention_norm(x), freqs, mask, start, cache, prefix)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(pad: torch.Tensor, start: int, length: int, device) -> torch.Tensor:
    """Boolean (B, 1, length, start+length): causal, and padded key slots hidden.

    A padded query slot may always see itself, so no row of the softmax is empty (an empty row
    gives NaN, and 0 * NaN would leak into real rows through the values).
    """
    q_slot = torch.arange(start, start + length, device=device)[:, None]
    k_slot = torch.arange(start + length, device=device)[None, :]
    causal = k_slot <= q_slot
    real_key = k_slot[None] >= pad[:, None, None]
    return ((causal[None] & real_key) | (k_slot == q_slot)[None])[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:  # one matrix in and out; .to() and load_state_dict keep them one
            self.output.weight = self.tok_embeddings.weight

    def hidden(
        self,
        tokens: torch.Tensor,
        start: int | list[int] = 0,
        pad: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        prefixes: dict[int, PromptKV] | None = None,
        no_grad_below: int = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for `tokens` occupying slots start..start+T.

        start: one first slot for the batch, or one per row (continuous batching: every row at its
        own length, no padding; each row's slot is its position).
        pad: (B,) first real slot of each row (left padding); None means no padding.
        no_grad_below: layers below this index run without autograd: nothing trainable reaches
        them when the adapter starts above (docs/method.md).
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if isinstance(start, list):
            first = torch.tensor(start, dtype=torch.long, device=device)
            positions = first[:, None] + torch.arange(seqlen, device=device)  # (B, T)
            end = max(start) + seqlen
            mask = (torch.arange(end, device=device)[None, None, :] <= positions[:, :, None])[:, None]
            start = RowStarts(first, end)
        else:
            if pad is None:
                pad = torch.zeros(bsz, dtype=torch.long, device=device)
            # Unpadded from slot 0 is plain causal attention: no explicit mask, so fused kernels apply.
            padded = start != 0 or bool(pad.any())
            mask = attention_mask(pad, start, seqlen, device) if padded else None
            slots = torch.arange(start, start + seqlen, device=device)
            positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        freqs = rotary_freqs(self.args.head_dim, positions, self.args.rope_theta)
        prefixes = prefixes or {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and no_grad_below == 0):
            h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_below):
                h = layer(h, freqs, mask, start, caches[i] if caches else None, prefixes.get(i))
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32."""
        return self.output(self.hidden(tokens, **kw)).float()

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        w = self.tok_embeddings.weight
        return [KVCache(batch, max_len, self.args, w.dtype, w.device) for _ in self.layers]


def build_on_meta(args: ModelArgs) -> Transformer:
    """A model with shapes but no storage: for counting, or for `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        return Transformer(args)
