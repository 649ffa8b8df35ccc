"""The serving forward: one new token for each of B rows (decode), a chunk of each row's prompt
(prefill), or both in one forward (`mixed`: an engine step with prompts joining), every row at its
own position in its own cache slot.

The same math as `Transformer.hidden` with a KV cache (adapter/model.py stays the readable
reference and the training path), with the per-step work cut down, because at decode time a
forward is a few small matrix products and the rest is Python and kernel launches:

- one matrix product for q, k and v and one for the FFN's two input projections: the base's
  wq/wk/wv (and w1/w3) weights are re-pointed at views of one fused tensor per layer, so no
  weight is held twice;
- rotary phasors from a table built once (looked up by position), q and k rotated in one kernel;
- `F.rms_norm`, residual adds fused into `addmm`, the new keys/values written with one indexed
  store each, one attention mask per step for all layers;
- decode rows and prompt chunks in one forward (`mixed`): the matrix products run once over all of
  a step's tokens, so a step reads the weights once, however many prompts join; rotary, cache
  writes and attention run per group;
- optionally `torch.compile` (`compile=True`) of the decode step (not `chunk` or `mixed`): one
  static graph per batch-size bucket (batch sizes are rounded up to `BUCKETS`, so shapes repeat);
  the attention length and the adapters' prompt lengths are the dynamic dimensions. `warm_up()`
  compiles every bucket for the base model, so the replica pays at start; a batch with adapters on
  a set of layers not seen before compiles its bucket once, during that step. Off by default:
  measured in bench/results/decode.json and docs/serving-performance.md.

Rows occupy cache slots first..first+B-1 (adapter/model.py's KVCache); positions are each row's
slot for its new token. Rows a caller adds only to fill a bucket must be given a position whose
slot is free to overwrite (at or beyond that slot's filled length).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from adapter.model import KVCache, Transformer
from adapter.zero_init import PromptKV, gated_prompt_attention

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class Group(NamedTuple):
    """Rows first..first+B-1 of the caches, taking tokens tok (B, T) at slots pos (B, T), attending
    to slots key_slots; logits at each row's last token, or at `last` (rows, token index)."""

    first: int
    tok: torch.Tensor
    pos: torch.Tensor
    key_slots: torch.Tensor
    prefixes: dict[int, PromptKV]
    last: tuple[torch.Tensor, torch.Tensor] | None


def fuse_projections(base: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (wqkv, w13): one tensor each, the base's own Linear weights re-pointed at views."""
    fused = []
    for layer in base.layers:
        attn, ffn = layer.attention, layer.feed_forward
        groups = []
        for linears in ((attn.wq, attn.wk, attn.wv), (ffn.w1, ffn.w3)):
            if all(lin.weight.data_ptr() == linears[0].weight.data_ptr() for lin in linears[1:]):
                raise RuntimeError("already fused")  # never: each base is fused once (see _FUSED)
            w = torch.cat([lin.weight.detach() for lin in linears])
            at = 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight = torch.nn.Parameter(w[at : at + n], requires_grad=False)
                at += n
            groups.append(w)
        fused.append((groups[0], groups[1]))
    return fused


_FUSED: dict[int, list] = {}  # id(base) -> its fused tensors: several engines on one base share them


def fused_weights(base: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if id(base) not in _FUSED:
        with torch.no_grad():
            _FUSED[id(base)] = fuse_projections(base)
    return _FUSED[id(base)]


class DecodeStep:
    def __init__(self, base: Transformer, caches: list[KVCache], compile: bool = False):
        args = base.args
        self.base, self.caches, self.compiled = base, caches, compile
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.eps = args.norm_eps
        self.fused = fused_weights(base)
        w = base.tok_embeddings.weight
        inv_freq = 1.0 / (
            args.rope_theta ** (torch.arange(0, self.head_dim, 2, device=w.device).float() / self.head_dim)
        )
        angles = torch.arange(args.max_seq_len, device=w.device).float()[:, None] * inv_freq
        self.phasors = torch.polar(torch.ones_like(angles), angles)  # (max_seq_len, head_dim/2), as rotary_freqs
        self.max_batch = caches[0].k.shape[0]
        self.buckets = [b for b in BUCKETS if b < self.max_batch] + [self.max_batch]
        # dynamic=False: one static graph per bucket. With automatic dynamic shapes, the second bucket
        # compiled would turn the batch dimension symbolic and every bucket would run generic code
        # (measured: 1.4k instead of 3.4k tokens per CPU-second at batch 8 on stories260K).
        self._run = torch.compile(self._step, dynamic=False) if compile else self._step
        if compile:  # graphs: a bucket for each set of adapter layers served (dynamo's default allows 8 in all)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(self.buckets))

    def bucket(self, n: int) -> int:
        """The batch size a step of n rows runs at (n itself when not compiled)."""
        return next(b for b in self.buckets if b >= n) if self.compiled else n

    def warm_up(self) -> None:
        """Run (and compile) every bucket once on scratch positions; the caches' first slots are
        overwritten, so call it before any row is admitted."""
        for b in self.buckets if self.compiled else [1]:
            # Attention lengths 3 then 4: a length of 0 or 1 would be specialised by the compiler.
            for end in (3, 4):
                self(0, [0] * b, [end - 1] * b, {})

    @torch.inference_mode()
    def __call__(self, first: int, tokens: list[int], positions: list[int], prefixes: dict[int, PromptKV]):
        """Logits (B, vocab), fp32, for one new token per row."""
        tok, pos, key_slots = self._decode_inputs(tokens, positions)
        if self.compiled and first == 0:
            torch._dynamo.mark_dynamic(key_slots, 0)  # one graph per bucket, whatever the length
            for p in prefixes.values():  # ... and whatever the adapters' prompt lengths
                for t in (p.k, p.v):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                if p.mask is not None:
                    torch._dynamo.maybe_mark_dynamic(p.mask, 1)
            return self._run(tok, pos, key_slots, prefixes)
        return self._step(tok, pos, key_slots, prefixes, first)

    @torch.inference_mode()
    def chunk(
        self,
        first: int,
        tokens: torch.Tensor,
        starts: list[int],
        prefixes: dict[int, PromptKV],
        out_rows: list[int],
        out_at: list[int],
    ) -> torch.Tensor:
        """Prefill: tokens (B, T) at slots starts[b].. of rows first..first+B-1 (right padding
        allowed: its keys land beyond the real ones and are never attended to by them). Logits
        (len(out_rows), vocab) at token out_at[k] of row out_rows[k]."""
        tok, pos, key_slots, last = self._chunk_inputs(tokens, starts, out_rows, out_at)
        return self._step(tok, pos, key_slots, prefixes, first, last)

    @torch.inference_mode()
    def mixed(
        self,
        tokens: list[int],
        positions: list[int],
        prefixes: dict[int, PromptKV],
        chunk_tokens: torch.Tensor,
        starts: list[int],
        chunk_prefixes: dict[int, PromptKV],
        out_rows: list[int],
        out_at: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step for rows 0..B-1 and a prefill chunk for the rows after them, in ONE forward:
        every matrix product runs once over both groups' tokens (the weights are read once per
        step, not twice); rotary, the cache writes and attention run per group. Never compiled.
        Returns (decode logits, chunk logits), as `__call__` and `chunk` would."""
        tok, pos, key_slots = self._decode_inputs(tokens, positions)
        c_tok, c_pos, c_key_slots, last = self._chunk_inputs(chunk_tokens, starts, out_rows, out_at)
        decode_logits, chunk_logits = self._forward(
            [
                Group(0, tok, pos, key_slots, prefixes, None),
                Group(len(tokens), c_tok, c_pos, c_key_slots, chunk_prefixes, last),
            ]
        )
        return decode_logits, chunk_logits

    def _decode_inputs(self, tokens: list[int], positions: list[int]):
        device = self.phasors.device
        tok = torch.tensor(tokens, device=device)[:, None]
        pos = torch.tensor(positions, device=device)[:, None]
        key_slots = torch.arange(max(positions) + 1, device=device)  # its length: the attention length
        return tok, pos, key_slots

    def _chunk_inputs(self, tokens: torch.Tensor, starts: list[int], out_rows: list[int], out_at: list[int]):
        device = self.phasors.device
        t = tokens.shape[1]
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)
        key_slots = torch.arange(max(starts) + t, device=device)
        last = (torch.tensor(out_rows, device=device), torch.tensor(out_at, device=device))
        return tokens.to(device), pos, key_slots, last

    def _step(self, tok, pos, key_slots, prefixes: dict[int, PromptKV], first: int = 0, last=None) -> torch.Tensor:
        """tok, pos: (B, T). Logits at the last token of each row, or at `last` (rows, token index)."""
        return self._forward([Group(first, tok, pos, key_slots, prefixes, last)])[0]

    def _forward(self, groups: list[Group]) -> list[torch.Tensor]:
        """The groups' tokens form one (N, dim) matrix for every product; rotary, the cache writes
        and attention run per group, each over its own rows' cache slots. Logits per group."""
        base, h, kv, hd = self.base, self.n_heads, self.n_kv, self.head_dim
        one = len(groups) == 1  # the decode step's case: no split or concatenation at all
        sizes = [g.tok.numel() for g in groups]
        per_group = []  # what attention needs, computed once for all layers
        for g in groups:
            b = g.tok.shape[0]
            rows = torch.arange(b, device=g.tok.device)[:, None]
            mask = (g.key_slots[None, None] <= g.pos[:, :, None])[:, None]  # (B, 1, T, end)
            per_group.append((rows, self.phasors[g.pos][:, :, None], mask, g.key_slots.shape[0]))
        embedded = [base.tok_embeddings(g.tok).flatten(0, 1) for g in groups]  # (B*T, dim): 2-D rows
        x = embedded[0] if one else torch.cat(embedded)
        dim = x.shape[-1]
        for i, layer in enumerate(base.layers):
            wqkv, w13 = self.fused[i]
            qkv_all = F.linear(F.rms_norm(x, (dim,), layer.attention_norm.weight, self.eps), wqkv)
            outs = []
            for g, (rows, freqs, mask, end), qkv in zip(groups, per_group, (qkv_all,) if one else qkv_all.split(sizes)):
                qkv = qkv.unflatten(0, g.tok.shape)
                qk = torch.view_as_complex(qkv[..., : (h + kv) * hd].float().unflatten(-1, (h + kv, hd // 2, 2)))
                qk = torch.view_as_real(qk * freqs).flatten(-2).type_as(x)  # (B, T, h + kv, hd)
                q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:]
                v = qkv[..., (h + kv) * hd :].unflatten(-1, (kv, hd))
                cache, rows_end = self.caches[i], g.first + g.tok.shape[0]
                ck, cv = cache.k[g.first : rows_end], cache.v[g.first : rows_end]
                ck[rows, :, g.pos] = k
                cv[rows, :, g.pos] = v
                out = F.scaled_dot_product_attention(
                    q, ck[:, :, :end], cv[:, :, :end], attn_mask=mask, enable_gqa=h != kv
                )  # (B, h, T, hd)
                prefix = g.prefixes.get(i)
                if prefix is not None:  # zero-init attention (adapter/zero_init.py)
                    out = out + gated_prompt_attention(q, prefix, h // kv)
                outs.append(out.transpose(1, 2).flatten(0, 1).flatten(1))
            x = torch.addmm(x, outs[0] if one else torch.cat(outs), layer.attention.wo.weight.t())
            gu = F.linear(F.rms_norm(x, (dim,), layer.ffn_norm.weight, self.eps), w13)
            gate, up = gu.chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, layer.feed_forward.w2.weight.t())
        picked = []
        for g, part in zip(groups, (x,) if one else x.split(sizes)):
            part = part.unflatten(0, g.tok.shape)
            picked.append(part[:, -1] if g.last is None else part[g.last])
        y = picked[0] if one else torch.cat(picked)
        logits = base.output(F.rms_norm(y, (dim,), base.norm.weight, self.eps)).float()
        return [logits] if one else list(logits.split([p.shape[0] for p in picked]))
