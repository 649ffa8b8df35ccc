"""Suites `chunked-prefill` and `chunked-prefill-smollm2`: what long prompts arriving do to the
streams already running, with and without chunked prefill (serve/engine.py), on the real
stories260K (context 512) and on the real SmolLM2-135M-Instruct (context 8,192, 1,500-token
prompts; its sizes in `SUBJECTS`). The stories260K sizes:

- Running streams: 4 requests with real Alpaca prompts, 96 new tokens each, greedy, no EOS.
- Arrivals: long prompts (real Alpaca text, the longest that fit: 400 tokens, 8 new tokens), one
  arriving whenever the previous one has its first token, so a prompt is always being prefilled.
- Measured: every inter-token gap of the 4 streams (p50 / p99), with no arrivals and with arrivals,
  for an unchunked engine (the step budget holds a whole prompt: a joining prompt is prefilled in
  one go, as before chunking) and chunked engines (budgets 32, 64, 128 tokens per step). Goal: p99
  with arrivals at most 2x p99 without.
- Time to first token of short requests (the same Alpaca prompts, 8 tokens) arriving among the long
  ones, chunked vs unchunked (goal: not worse).

SmolLM2: the same with 1,500-token prompts, 48 new tokens per stream (a whole 1,500-token prefill
costs ~6 CPU-seconds there, and the unchunked engine runs one each time a slot frees, every few
stream steps), budgets 32, 128 and 256 (the default), one run. Context 8,192, the model's own: the
engine's 6 slots of KV cache take 2.3 GB (30 layers x 3 KV heads x 64 x 2 x fp32 per token).

Time is this process's CPU time (one torch thread; the 2 cores are shared, which stretches wall
clocks unevenly), as in bench/serve_bench.py.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import bench.common as common
from adapter.decoding import SamplingParams
from adapter.prompts import format_prompt
from bench.common import SHARED_DATA, SMOLLM2, STORIES260K, BenchBase, write_result
from serve.engine import Engine

MACHINE_NOTE = "2-core shared CPU (four engineers' work on the same cores), 1 torch thread, CPU-time clock"
STREAMS = 4


@dataclass(frozen=True)
class Subject:
    """One suite: the base, its sizes and the result's name (bench/results/NAME.json, .png)."""

    name: str
    base: BenchBase
    long_tokens: int = 400  # the arriving prompts
    stream_tokens: int = 96  # new tokens of each running stream
    budgets: tuple[int, ...] = (32, 64, 128)
    quick_budgets: tuple[int, ...] = (64,)
    repeats: int = 3


SUBJECTS = {
    "chunked-prefill": Subject("chunked-prefill", STORIES260K),
    "chunked-prefill-smollm2": Subject(
        "chunked-prefill-smollm2",
        replace(SMOLLM2, context=8192),
        long_tokens=1500,
        stream_tokens=48,
        budgets=(32, 128, 256),
        quick_budgets=(256,),
        repeats=1,
    ),
}


def _prompts(tok, long_tokens: int):
    records = json.loads((SHARED_DATA / "alpaca_data.json").read_text())
    short = [tok.encode(format_prompt(r["instruction"], r.get("input", "")), bos=True) for r in records[:16]]
    text = " ".join(r["output"] for r in records[:400])  # real English, cut into long_tokens-token prompts
    ids, bos = tok.encode(text, bos=False), tok.bos_prefix
    n = long_tokens - len(bos)
    long = [bos + ids[i : i + n] for i in range(0, len(ids) - long_tokens, long_tokens)]
    return short, long


def _run(
    base, short, long, step_tokens: int, arrivals: bool, short_probe: bool = False, stream_tokens: int = 96
) -> dict:
    engine = Engine(base, eos_id=-1, max_running=STREAMS + 2, step_tokens=step_tokens)
    engine.warm_up()
    clock = time.process_time
    streams = [engine.add(p, SamplingParams(stream_tokens, temperature=0)) for p in short[:STREAMS]]
    seen = {id(s): 0 for s in streams}
    last: dict[int, float] = {}
    gaps: list[float] = []
    ttft: list[float] = []
    k = 0
    joining, joined_at, probe = None, 0.0, False
    while any(not s.done for s in streams):
        if arrivals and (joining is None or joining.tokens or joining.done):
            if joining is not None and short_probe and probe:
                ttft.append(clock() - joined_at)
            probe = short_probe and k % 2 == 1  # alternate long prompts and short probe requests
            p = short[4 + k % 12] if probe else long[k % len(long)]
            joining, joined_at = engine.add(p, SamplingParams(8, temperature=0)), clock()
            k += 1
        engine.step()
        now = clock()
        for s in streams:
            if len(s.tokens) > seen[id(s)]:
                if id(s) in last:
                    gaps.append(now - last[id(s)])
                last[id(s)], seen[id(s)] = now, len(s.tokens)
    out = {
        "inter_token_p50_ms": 1e3 * float(np.percentile(gaps, 50)),
        "inter_token_p99_ms": 1e3 * float(np.percentile(gaps, 99)),
        "gaps": len(gaps),
        "arrivals": k,
    }
    if ttft:
        out |= {
            "short_probes": len(ttft),
            "short_ttft_p50_ms": 1e3 * float(np.median(ttft)),
            "short_ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        }
    return out


def run(quick: bool = False, subject: str = "chunked-prefill") -> dict:
    sub = SUBJECTS[subject]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = sub.base.load()
        short, long = _prompts(loaded.tokenizer, sub.long_tokens)
        unchunked = sub.long_tokens + STREAMS + 2  # a whole long prompt fits one step: no chunking
        budgets = {"unchunked": unchunked, **{f"chunked {b}": b for b in (sub.quick_budgets if quick else sub.budgets)}}
        repeats = 1 if quick else sub.repeats
        rows: dict[str, dict] = {}
        t0 = time.perf_counter()
        for _ in range(repeats):  # interleaved repeats; the median run by p99 is kept
            for label, budget in budgets.items():
                for mode, kw in (
                    ("no arrivals", {"arrivals": False}),
                    ("long prompts arriving", {"arrivals": True}),
                    ("long + short arriving", {"arrivals": True, "short_probe": True}),
                ):
                    trial = _run(loaded.base, short, long, budget, stream_tokens=sub.stream_tokens, **kw)
                    # The engine and its sequences hold reference cycles: free its KV cache (2.3 GB for
                    # SmolLM2 at 8,192) now, not at some later collection (17 GB piled up once).
                    gc.collect()
                    rows.setdefault(label, {}).setdefault(mode, []).append(trial)
                    print(f"{label}, {mode}: {trial} ({time.perf_counter() - t0:.0f} s wall so far)", flush=True)
    finally:
        torch.set_num_threads(threads)
    med = {}
    for label, modes in rows.items():
        med[label] = {}
        for mode, trials in modes.items():
            trials = sorted(trials, key=lambda r: r["inter_token_p99_ms"])
            med[label][mode] = {
                **trials[len(trials) // 2],
                "inter_token_p99_ms_every_run": [r["inter_token_p99_ms"] for r in trials],
            }
        med[label]["p99_ratio_arrivals_over_none"] = (
            med[label]["long prompts arriving"]["inter_token_p99_ms"] / med[label]["no arrivals"]["inter_token_p99_ms"]
        )
    result = {
        "what": f"p99 inter-token latency of {STREAMS} running streams while {sub.long_tokens}-token prompts keep "
        f"arriving, chunked prefill vs unchunked; short-request TTFT among them ({sub.base.title}, measured)",
        "machine_note": MACHINE_NOTE,
        "settings": {
            "streams": STREAMS,
            "stream_tokens": sub.stream_tokens,
            "long_prompt_tokens": sub.long_tokens,
            "context": loaded.base.args.max_seq_len,
            "budgets": budgets,
            "repeats": repeats,
        },
        "results": med,
        "goal": "p99 inter-token with arrivals <= 2x without; short TTFT not worse than unchunked",
    }
    name = f"{sub.name}-quick" if quick else sub.name  # quick results are not kept (.gitignore)
    path = write_result(name, result)
    _chart(med, sub, name)
    return json.loads(path.read_text())


def _chart(med: dict, sub: Subject, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(med)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, (mode, color) in enumerate((("no arrivals", "#999999"), ("long prompts arriving", "#4878a8"))):
        vals = [med[label][mode]["inter_token_p99_ms"] for label in labels]
        bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=f"p99 inter-token, {mode}", color=color)
        ax.bar_label(bars, fmt="%.2g")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms of engine CPU time")
    ax.set_title(
        f"Running streams while {sub.long_tokens}-token prompts arrive ({sub.base.title})\n{MACHINE_NOTE}", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
