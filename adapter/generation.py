"""Batched generation with a KV cache, for the base model and any mix of adapters.

Prompts of different lengths are left-padded into one batch and prefilled in one forward pass;
then one token per step for every row. Each row may carry its own adapter (or none): the
adapter's prompt keys/values do not depend on the tokens, so they are computed once per
request (`AdaptionPrompts.prefixes`) and reused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapter.adapter import AdaptionPrompts, batch_prefixes
from adapter.model import PromptKV, Transformer

DEFAULT_TEMPERATURE = 0.1  # METHOD.md section 6: instruction following
DEFAULT_TOP_P = 0.75


@dataclass
class SamplingParams:
    max_gen_len: int = 256
    temperature: float = DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = DEFAULT_TOP_P

    def __post_init__(self) -> None:
        if self.max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {self.max_gen_len}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice).squeeze(-1)


def prefixes_for(base: Transformer, adapter: AdaptionPrompts | None) -> dict[int, PromptKV] | None:
    if adapter is None:
        return None
    with torch.no_grad():
        return adapter.prefixes(base)


@torch.inference_mode()
def generate(base: Transformer, prompts: list[list[int]], params: SamplingParams, eos_id: int,
             adapters: list[dict[int, PromptKV] | None] | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), EOS not included.

    adapters: per row, prefixes from `prefixes_for` (None = base model).
    use_cache=False recomputes the whole sequence every step: slow, only for checking the cache.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    bsz = len(prompts)
    adapters = adapters or [None] * bsz
    if len(adapters) != bsz:
        raise ValueError(f"{len(adapters)} adapter entries for {bsz} prompts")
    longest = max(len(p) for p in prompts)
    total = min(base.args.max_seq_len, longest + params.max_gen_len)
    if longest >= total:
        raise ValueError(f"prompt of {longest} tokens leaves no room within max_seq_len {base.args.max_seq_len}")
    device = base.tok_embeddings.weight.device
    prefixes = batch_prefixes(adapters)

    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(p, device=device)
    caches = base.new_caches(bsz, total) if use_cache else None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(bsz)]
    prev = 0
    for cur in range(longest, total):
        if use_cache:
            h = base.hidden(tokens[:, prev:cur], start=prev, pad=pad, caches=caches, prefixes=prefixes)
        else:
            h = base.hidden(tokens[:, :cur], start=0, pad=pad, prefixes=prefixes)
        logits = base.output(h[:, -1]).float()
        nxt = sample_top_p(logits, params.temperature, params.top_p, generator)
        tokens[:, cur] = nxt
        for i in range(bsz):
            if not done[i] and int(nxt[i]) != eos_id:
                out[i].append(int(nxt[i]))
        done |= nxt == eos_id
        prev = cur
        if bool(done.all()):
            break
    return out
