"""Batched generation with a KV cache, for the base model and any mix of adapters.

Prompts of different lengths are left-padded into one batch and prefilled in one forward pass;
then one token per step for every row. Each row may carry its own adapter (or none): the
adapter's prompt keys/values do not depend on the tokens, so they are computed once per
request (`AdaptionPrompts.prefixes`) and reused at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapter.adapter import AdaptionPrompts, batch_prefixes
from adapter.model import PromptKV, Transformer

DEFAULT_TEMPERATURE = 0.1  # docs/method.md: instruction following
DEFAULT_TOP_P = 0.75


@dataclass
class SamplingParams:
    max_gen_len: int = 256
    temperature: float = DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = DEFAULT_TOP_P

    def __post_init__(self) -> None:
        if self.max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {self.max_gen_len}")
        # Written so that NaN fails too (every comparison with NaN is false).
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else nucleus sampling."""
    n = logits.shape[0]
    return sample_rows(logits, torch.full((n,), float(temperature)), torch.full((n,), float(top_p)), generator)


def prefixes_for(base: Transformer, adapter: AdaptionPrompts | None) -> dict[int, PromptKV] | None:
    if adapter is None:
        return None
    with torch.no_grad():
        return adapter.prefixes(base)


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Like sample_top_p, with each row's own temperature and top_p (rows at 0 are greedy)."""
    greedy = logits.argmax(-1)
    if bool((temperature == 0).all()):
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p[:, None], 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    return torch.where(temperature == 0, greedy, idx.gather(-1, choice[:, None]).squeeze(-1))


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> int:
    """One row's next token (logits: (vocab,)), drawn with that row's own generator: the draw
    depends only on the row and its seed, never on what else is in the batch."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = probs.sort(descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(idx[choice])


def stack_prefixes(rows: list[dict[int, PromptKV] | None]) -> dict[int, PromptKV]:
    """Per-request prefixes stacked into one batch, adapters of different prompt lengths included:
    each layer is padded to its longest prompt and `mask` hides a row's padded slots. A row with
    no prompt at a layer gets zero keys/values (all visible: a softmax needs one finite key) and
    gate 0, which adds exactly nothing. The mask is always set, so a row takes the same attention
    path alone as in any batch."""
    present = [r for r in rows if r]
    out = {}
    for i in sorted({i for r in present for i in r}):
        ref = next(r[i] for r in present if i in r)
        width = max(r[i].k.shape[2] for r in present if i in r)
        ks, vs, gs, ms = [], [], [], []
        for r in rows:
            p = r.get(i) if r else None
            k = ref.k.new_zeros(1, *ref.k.shape[1:2], width, ref.k.shape[3])
            v = ref.v.new_zeros(1, *ref.v.shape[1:2], width, ref.v.shape[3])
            m = torch.ones(1, width, dtype=torch.bool, device=ref.k.device)
            if p is None:
                g = torch.zeros_like(ref.gate)
            else:
                n = p.k.shape[2]
                k[:, :, :n], v[:, :, :n], m[:, n:] = p.k, p.v, False
                g = p.gate
            ks.append(k)
            vs.append(v)
            gs.append(g)
            ms.append(m)
        out[i] = PromptKV(k=torch.cat(ks), v=torch.cat(vs), gate=torch.cat(gs), mask=torch.cat(ms))
    return out


@torch.inference_mode()
def generate(
    base: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    eos_id: int,
    adapters: list[dict[int, PromptKV] | None] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), EOS not included.

    params: one for the whole batch, or one per row (each row its own length limit and sampling).
    adapters: per row, prefixes from `prefixes_for` (None = base model).
    on_token(row, token) is called as each token is produced (for streaming).
    use_cache=False recomputes the whole sequence every step: slow, only for checking the cache.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    bsz = len(prompts)
    rows = params if isinstance(params, list) else [params] * bsz
    adapters = adapters or [None] * bsz
    if len(adapters) != bsz or len(rows) != bsz:
        raise ValueError(f"{len(adapters)} adapter and {len(rows)} params entries for {bsz} prompts")
    longest = max(len(p) for p in prompts)
    total = min(base.args.max_seq_len, longest + max(r.max_gen_len for r in rows))
    if longest >= total:
        raise ValueError(f"prompt of {longest} tokens leaves no room within max_seq_len {base.args.max_seq_len}")
    device = base.tok_embeddings.weight.device
    prefixes = batch_prefixes(adapters)
    temperature = torch.tensor([r.temperature for r in rows], device=device)
    top_p = torch.tensor([r.top_p for r in rows], device=device)
    limit = [r.max_gen_len for r in rows]

    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) : longest] = torch.tensor(p, device=device)
    caches = base.new_caches(bsz, total) if use_cache else None
    done = [False] * bsz
    out: list[list[int]] = [[] for _ in range(bsz)]
    prev = 0
    for cur in range(longest, total):
        if use_cache:
            h = base.hidden(tokens[:, prev:cur], start=prev, pad=pad, caches=caches, prefixes=prefixes)
        else:
            h = base.hidden(tokens[:, :cur], start=0, pad=pad, prefixes=prefixes)
        nxt = sample_rows(base.output(h[:, -1]).float(), temperature, top_p, generator)
        tokens[:, cur] = nxt
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t == eos_id:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            done[i] = len(out[i]) >= limit[i]
        prev = cur
        if all(done):
            break
    return out
