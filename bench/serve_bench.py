"""Suites `serve` and `serve-smollm2`: continuous batching against the wave engine it replaced, on
the real pretrained stories260K base and on the real SmolLM2-135M-Instruct (measured; `SUBJECTS`
holds each one's base and sizes, the code is the same).

Engine level (no HTTP; one process, one torch thread, the same arrivals for every engine; greedy,
no EOS, so a request makes exactly its max_tokens, mixed 16-256 (SmolLM2: 16-128); real Alpaca
instructions in the Alpaca template, tokenized with the base's own tokenizer):
- closed loop, 16 clients (each sends its next request when its last one finished): tokens/s of
  one-at-a-time (1 slot), the wave engine (waves of up to 16) and continuous batching (16 slots);
  and continuous with 8 adapters of two prompt lengths (K 10 and 5) against one adapter; time to
  first token and the gaps between a request's tokens (inter-token p50 / p99);
- open loop, Poisson arrivals at several rates: time to first token (TTFT) of the short requests
  (max_tokens <= 32) and of all, wave vs continuous.
Engine-level time is the engine process's CPU time (`EngineClock`): the shared cores stretch wall
clocks unevenly. The HTTP rows are wall clock.
Over HTTP (the real Serve app, 1 replica, 16 closed-loop clients, 32 tokens each; 96 requests,
SmolLM2 48): one-at-a-time vs batched; and in the batched replica, 1 adapter vs 8 mixed adapters in
alternating rounds (3 each, the median kept).

The wave engine lives here only, as the baseline: a wave of up to `max_batch` waiting requests runs
`adapter.decoding.generate` until its longest row ends; requests that arrive meanwhile wait for
the next wave (after the 20 ms batch window of the old default).
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import heapq
import json
import random
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import bench.common as common
from bench.common import SHARED_DATA, SMOLLM2, STORIES260K, BenchBase, write_result

MAX_TOKENS_CHOICES = (16, 32, 64, 128, 256)
SHORT = 32
HTTP_ROUNDS = 3  # alternating rounds of one adapter and of eight, in one replica
HTTP_ONE, HTTP_SINGLE, HTTP_MIXED = "one-at-a-time", "batched, 1 adapter", "batched, 8 adapters mixed (K 10 and 5)"
PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park.",
    "One day, a bird",
    "Tom had a red ball.",
    "The sun was hot.",
    "A cat sat on the mat.",
    "There was a big tree.",
]


@dataclass(frozen=True)
class Subject:
    """One serve suite: the base, its sizes and the result's name (bench/results/NAME.json, .png)."""

    name: str
    base: BenchBase
    max_tokens: tuple[int, ...] = MAX_TOKENS_CHOICES
    sizes: tuple[int, int, int] = (64, 120, 3)  # closed-loop requests, open-loop requests per rate, repeats
    quick_sizes: tuple[int, int, int] = (32, 24, 1)
    rates: tuple[float, ...] = (4.0, 8.0, 16.0)  # open-loop arrivals per second of engine time
    http_requests: int = 96  # 16 closed-loop clients, 32 tokens each
    goal_batched: float = 4.0


SUBJECTS = {
    "serve": Subject("serve", STORIES260K),
    # ~15 tokens per CPU-second alone (bench/results/decode-smollm2-135m-instruct.json): fewer and shorter requests
    # so the suite fits ~15 minutes on an idle 2-core machine; its prompts (cut at 256 tokens) + 128 fit 512.
    "serve-smollm2": Subject(
        "serve-smollm2",
        replace(SMOLLM2, context=512),
        max_tokens=(16, 32, 64, 128),
        sizes=(64, 16, 1),
        quick_sizes=(4, 4, 1),
        rates=(1.0,),
        http_requests=48,
        goal_batched=5.0,
    ),
}


@dataclass
class Req:
    client: int
    prompt: list[int]
    max_tokens: int
    adapter: int
    arrival: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    last: float | None = None  # when its latest token came
    gaps: list[float] = field(default_factory=list)  # between its consecutive tokens

    def __lt__(self, other):  # heap order
        return self.arrival < other.arrival

    def got(self, n: int, now: float) -> None:
        """n new tokens at `now` (engine time)."""
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.gaps += [0.0] * (n - 1)
        self.last, self.tokens = now, self.tokens + n


def _instructions(tok, n: int, seed: int) -> list[list[int]]:
    from adapter.prompts import format_prompt

    records = json.loads((SHARED_DATA / "alpaca_data_first200.json").read_text())
    rng = random.Random(seed)
    rng.shuffle(records)
    return [tok.encode(format_prompt(r["instruction"], r.get("input", "")), bos=True)[:256] for r in records[:n]]


def _requests(prompts, n: int, n_adapters: int, seed: int, choices=MAX_TOKENS_CHOICES) -> list[Req]:
    rng = random.Random(seed)
    return [Req(i % 16, prompts[i % len(prompts)], rng.choice(choices), i % n_adapters) for i in range(n)]


def _adapter_prefixes(base, n: int, lengths=(10, 5)) -> list[dict]:
    from adapter.adapter import AdapterConfig, AdaptionPrompts

    out = []
    for i in range(n):
        torch.manual_seed(i)
        p = AdaptionPrompts(base.args, AdapterConfig(lengths[i % len(lengths)], 30))
        with torch.no_grad():
            p.gate.uniform_(0.05, 0.2)
            out.append(p.prefixes(base))
    return out


class Arrivals:
    """Closed loop (a client's next request arrives when its last one is done) or open loop (fixed times)."""

    def __init__(self, reqs: list[Req], closed: bool):
        self.closed = closed
        self.heap: list[Req] = []
        self.later: dict[int, list[Req]] = {}
        if closed:
            for r in reqs:
                self.later.setdefault(r.client, []).append(r)
            for queue in self.later.values():
                heapq.heappush(self.heap, queue.pop(0))
        else:
            for r in reqs:
                heapq.heappush(self.heap, r)

    def due(self, now: float) -> list[Req]:
        out = []
        while self.heap and self.heap[0].arrival <= now:
            out.append(heapq.heappop(self.heap))
        return out

    def finished(self, r: Req, now: float) -> None:
        if self.closed and self.later.get(r.client):
            nxt = self.later[r.client].pop(0)
            nxt.arrival = now
            heapq.heappush(self.heap, nxt)

    def next_time(self) -> float | None:
        return self.heap[0].arrival if self.heap else None


class EngineClock:
    """The engines' time: this process's CPU seconds (one torch thread, nothing else running in it),
    plus idle gaps skipped straight to the next arrival. The 2 cores are shared with other work,
    which stretches wall-clock runs 2-4x unevenly; CPU time is what that load does not distort, so
    arrivals, TTFT and tokens/s at the engine level are all in this time."""

    def __init__(self):
        self.cpu0, self.skipped = time.process_time(), 0.0

    def now(self) -> float:
        return time.process_time() - self.cpu0 + self.skipped

    def wait_until(self, t: float | None) -> None:
        if t is not None and t > self.now():
            self.skipped += t - self.now()


def run_continuous(base, reqs: list[Req], prefixes: list, slots: int, closed: bool) -> float:
    from adapter.decoding import SamplingParams
    from serve.engine import Engine

    gc.collect()  # the previous engine's KV cache, kept by its reference cycles until a collection
    engine = Engine(base, eos_id=-1, max_running=slots, max_waiting=10_000)
    arrivals, by_seq, left = Arrivals(reqs, closed), {}, len(reqs)
    clock = EngineClock()
    while left:
        for r in arrivals.due(clock.now()):
            seq = engine.add(r.prompt, SamplingParams(r.max_tokens, temperature=0), prefixes[r.adapter])
            by_seq[seq] = r
        if not engine.has_work():
            clock.wait_until(arrivals.next_time())
            continue
        touched = engine.step()
        now = clock.now()
        for seq in touched:
            r = by_seq[seq]
            r.got(len(seq.tokens) - r.tokens, now)
            if seq.done and r.done is None:
                r.done, left = now, left - 1
                arrivals.finished(r, now)
    return time.process_time() - clock.cpu0


def run_waves(base, reqs: list[Req], prefixes: list, max_batch: int, closed: bool, window_s: float = 0.02) -> float:
    from adapter.decoding import SamplingParams, generate

    arrivals, waiting, left = Arrivals(reqs, closed), [], len(reqs)
    clock = EngineClock()
    while left:
        waiting += arrivals.due(clock.now())
        if not waiting:
            clock.wait_until(arrivals.next_time())
            continue
        deadline = waiting[0].arrival + window_s  # the old engine waited this long for others to join
        while len(waiting) < max_batch and clock.now() < deadline:
            clock.wait_until(min(deadline, arrivals.next_time() or deadline))
            waiting += arrivals.due(clock.now())
        wave, waiting = waiting[:max_batch], waiting[max_batch:]

        def on_token(row: int, token: int, wave=wave) -> None:
            nonlocal left
            r, now = wave[row], clock.now()
            r.got(1, now)
            if r.tokens == r.max_tokens:
                r.done, left = now, left - 1
                arrivals.finished(r, now)

        generate(
            base,
            [r.prompt for r in wave],
            [SamplingParams(r.max_tokens, temperature=0) for r in wave],
            -1,
            adapters=[prefixes[r.adapter] for r in wave],
            on_token=on_token,
        )
    return time.process_time() - clock.cpu0


def summarize(reqs: list[Req], cpu_s: float) -> dict:
    """Wall-clock figures, and tokens per CPU-second of this (single-threaded) process: the 2 cores
    are shared, and CPU time is what a neighbour's load does not take from the comparison."""
    start, end = min(r.arrival for r in reqs), max(r.done for r in reqs)
    tokens = sum(r.tokens for r in reqs)
    ttft = np.array([r.first - r.arrival for r in reqs])
    short = np.array([r.first - r.arrival for r in reqs if r.max_tokens <= SHORT])
    lat = np.array([r.done - r.arrival for r in reqs])
    gaps = np.array([g for r in reqs for g in r.gaps])
    return {
        "requests": len(reqs),
        "completion_tokens": tokens,
        "wall_s": end - start,
        "tokens_per_s": tokens / (end - start),
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": tokens / cpu_s,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "short_ttft_p50_s": float(np.percentile(short, 50)),
        "short_ttft_p99_s": float(np.percentile(short, 99)),
        "inter_token_p50_s": float(np.percentile(gaps, 50)),
        "inter_token_p99_s": float(np.percentile(gaps, 99)),
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
    }


def _fresh(reqs: list[Req]) -> list[Req]:
    return [Req(r.client, r.prompt, r.max_tokens, r.adapter, r.arrival) for r in reqs]


def engine_level(
    base, tok, n_closed: int, n_open: int, rates: tuple[float, ...], repeats: int, choices=MAX_TOKENS_CHOICES
) -> dict:
    """The closed-loop runs are repeated, interleaved, and the median run (by tokens/s) is kept: the
    2 cores are shared, and a neighbour's load moves single runs by 2x or more."""
    prompts = _instructions(tok, 64, seed=0)
    adapters = _adapter_prefixes(base, 8)
    one = [adapters[0]] * 8
    closed = _requests(prompts, n_closed, 8, seed=1, choices=choices)
    configs = (
        ("one-at-a-time (1 slot)", run_continuous, {"slots": 1}, one),
        ("wave engine (16 per wave)", run_waves, {"max_batch": 16}, one),
        ("continuous (16 slots)", run_continuous, {"slots": 16}, one),
        ("continuous, 8 adapters (K 10 and 5)", run_continuous, {"slots": 16}, adapters),
    )
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for label, fn, kw, pre in configs:
            reqs = _fresh(closed)
            cpu = fn(base, reqs, pre, closed=True, **kw)
            runs.setdefault(label, []).append(summarize(reqs, cpu))
            print(f"closed loop, {label}: {runs[label][-1]['tokens_per_cpu_s']:.1f} tokens/CPU-s", flush=True)
    rows = {}
    for label, trials in runs.items():
        trials = sorted(trials, key=lambda r: r["tokens_per_cpu_s"])
        rows[label] = {
            **trials[len(trials) // 2],
            "tokens_per_s_every_run": [r["tokens_per_s"] for r in trials],
            "tokens_per_cpu_s_every_run": [r["tokens_per_cpu_s"] for r in trials],
        }
    open_loop = {}
    for rate in rates:
        rng = np.random.default_rng(int(rate * 1000))
        arrivals = np.cumsum(rng.exponential(1 / rate, n_open))
        reqs = _requests(prompts, n_open, 1, seed=2, choices=choices)
        for r, t in zip(reqs, arrivals):
            r.arrival = float(t)
        for label, fn, kw in (("wave", run_waves, {"max_batch": 16}), ("continuous", run_continuous, {"slots": 16})):
            trial = _fresh(reqs)
            cpu = fn(base, trial, one, closed=False, **kw)
            open_loop.setdefault(label, {})[str(rate)] = summarize(trial, cpu)
            print(f"open loop {rate}/s, {label}: {open_loop[label][str(rate)]}", flush=True)
    return {"closed_loop_16_clients": rows, "open_loop_poisson": open_loop}


def _http_load(url: str, models: list[str], n_requests: int, clients: int, max_tokens: int) -> dict:
    import httpx

    def one(k: int):
        t0 = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=300,
            json={
                "model": models[k % len(models)],
                "prompt": PROMPTS[k % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"], int(r.headers["x-batch-size"])

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {
        "requests": n_requests,
        "clients": clients,
        "completion_tokens": tokens,
        "wall_s": wall,
        "mean_max_batch_seen_by_requests": float(np.mean([r[2] for r in results])),
        "tokens_per_s": tokens / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
    }


def http_level(base: BenchBase, n_requests: int, clients: int, max_tokens: int) -> dict:
    import ray
    from ray import serve

    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.adapter_file import save_adapter
    from serve.app import build_app

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = base.load().base.args
        names = []
        for i in range(8):
            torch.manual_seed(i)
            p = AdaptionPrompts(args, AdapterConfig((10, 5)[i % 2], args.n_layers))
            with torch.no_grad():
                p.gate.uniform_(0.05, 0.2)
            save_adapter(p, args, Path(tmp) / f"a{i}")
            names.append(f"a{i}")
        model = {"base": base.path, "context": base.context, "tokenizer": base.tokenizer, "device": "cpu"}
        for slots, plan in ((1, {HTTP_ONE: names[:1]}), (16, {HTTP_SINGLE: names[:1], HTTP_MIXED: names})):
            cfg = {
                "model": {k: v for k, v in model.items() if v is not None},
                "adapters": tmp,
                "max_batch_size": slots,
                "max_waiting": 64,
                "max_tokens_limit": 256,
            }
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            # Not timed: load the adapters, then one round at full concurrency, so a fresh replica's
            # first full batch (allocation, thread pools) is not in the timed rows.
            _http_load(url, names, len(names), 1, 2)
            _http_load(url, names, clients, clients, 4)
            # One adapter vs eight in the SAME replica, alternating rounds, the median round kept:
            # a fresh replica per row mixed the cost of mixing with warm-up and drift (10% here).
            rounds: dict[str, list[dict]] = {label: [] for label in plan}
            for _ in range(HTTP_ROUNDS if len(plan) > 1 else 1):
                for label, models in plan.items():
                    rounds[label].append(_http_load(url, models, n_requests, clients, max_tokens))
            for label, got in rounds.items():
                median = sorted(got, key=lambda r: r["tokens_per_s"])[len(got) // 2]
                rows[label] = {**median, "tokens_per_s_every_round": [r["tokens_per_s"] for r in got]}
                print(f"HTTP {label}: {rows[label]}", flush=True)
            serve.delete("bench")
    serve.shutdown()
    return rows


def _chart(path: Path, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    closed = result["engine"]["closed_loop_16_clients"]
    http = result.get("http", {})
    labels = [f"engine: {k} (per CPU-s)" for k in closed] + [f"HTTP: {k} (wall)" for k in http]
    values = [r["tokens_per_cpu_s"] for r in closed.values()] + [r["tokens_per_s"] for r in http.values()]
    bars = a.barh(
        labels,
        values,
        color=(["#999999", "#e07b39", "#4878a8", "#6aa84f"] + ["#bbbbbb", "#4878a8", "#6aa84f"])[: len(values)],
    )
    a.bar_label(bars, fmt="%.0f")
    a.invert_yaxis()
    a.set_xlabel("tokens / s (engine: per CPU-second; HTTP: wall clock)" if http else "tokens per CPU-second")
    a.set_title("Throughput, 16 closed-loop clients")
    open_loop = result["engine"]["open_loop_poisson"]
    for label, color in (("wave", "#e07b39"), ("continuous", "#4878a8")):
        rates = sorted(open_loop[label], key=float)
        b.plot(
            [float(r) for r in rates],
            [open_loop[label][r]["short_ttft_p99_s"] for r in rates],
            "o-",
            color=color,
            label=f"{label}: p99 TTFT, max_tokens <= {SHORT}",
        )
        b.plot(
            [float(r) for r in rates],
            [open_loop[label][r]["ttft_p50_s"] for r in rates],
            "x--",
            color=color,
            label=f"{label}: p50 TTFT, all",
        )
    b.set_yscale("log")
    choices = result["settings"]["engine"]["max_tokens_mixed"]
    b.set_xlabel(f"Poisson arrivals / s (engine time; max_tokens {min(choices)}-{max(choices)})")
    b.set_ylabel("time to first token (s of engine CPU time)")
    b.set_title("Short requests under long ones")
    b.legend(fontsize=8, loc="center right")
    b.grid(alpha=0.3)
    fig.suptitle(f"Serving {title} on a 2-core CPU (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, subject: str = "serve", rates: tuple[float, ...] | None = None) -> dict:
    sub = SUBJECTS[subject]
    rates = sub.rates if rates is None else rates
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a replica with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)
    try:
        loaded = sub.base.load()
        n_closed, n_open, repeats = sub.quick_sizes if quick else sub.sizes
        engine = engine_level(
            loaded.base, loaded.tokenizer, n_closed, n_open, rates[:1] if quick else rates, repeats, sub.max_tokens
        )
    finally:
        torch.set_num_threads(threads)
    http_tokens = 8 if quick else 32
    http = http_level(sub.base, 16 if quick else sub.http_requests, 16, http_tokens)
    closed = engine["closed_loop_16_clients"]
    short = {
        label: {rate: r["short_ttft_p99_s"] for rate, r in rows.items()}
        for label, rows in engine["open_loop_poisson"].items()
    }
    what = f"continuous batching vs the wave engine, {sub.base.title} base, greedy (measured)"
    result = {
        "what": what,
        "settings": {
            "engine": {
                "torch_threads": 1,
                "context": loaded.base.args.max_seq_len,
                "slots_or_wave": 16,
                "max_tokens_mixed": sub.max_tokens,
                "closed_loop_requests": n_closed,
                "closed_loop_repeats_median_kept": repeats,
                "open_loop_requests_per_rate": n_open,
                "short_means_max_tokens_at_most": SHORT,
                "wave_window_s": 0.02,
                "time": "engine process CPU seconds, idle gaps skipped to the next arrival",
            },
            "http": {"max_tokens": http_tokens, "clients": 16, "replicas": 1},
        },
        "engine": engine,
        "http": http,
        "batched_vs_one_at_a_time_engine": closed["continuous (16 slots)"]["tokens_per_cpu_s"]
        / closed["one-at-a-time (1 slot)"]["tokens_per_cpu_s"],
        "continuous_vs_wave_tokens_per_cpu_s": closed["continuous (16 slots)"]["tokens_per_cpu_s"]
        / closed["wave engine (16 per wave)"]["tokens_per_cpu_s"],
        "short_ttft_p99_wave_over_continuous": {
            rate: short["wave"][rate] / short["continuous"][rate] for rate in short["wave"]
        },
        "mixed_vs_single_adapter_engine": closed["continuous, 8 adapters (K 10 and 5)"]["tokens_per_cpu_s"]
        / closed["continuous (16 slots)"]["tokens_per_cpu_s"],
        "engine_ratios_are": "tokens per CPU-second of the engine process (the median of the repeats)",
        "goals": {
            "batched_vs_one_at_a_time": f">= {sub.goal_batched:g}",
            "short_ttft_p99_wave_over_continuous": ">= 3",
            "mixed_vs_single_adapter": ">= 0.9",
        },
    }
    result["batched_vs_one_at_a_time_http"] = http[HTTP_SINGLE]["tokens_per_s"] / http[HTTP_ONE]["tokens_per_s"]
    result["mixed_vs_single_adapter_http"] = http[HTTP_MIXED]["tokens_per_s"] / http[HTTP_SINGLE]["tokens_per_s"]
    name = f"{sub.name}-quick" if quick else sub.name  # quick results are not kept (.gitignore)
    path = write_result(name, result)
    _chart(common.RESULTS / f"{name}.png", result, sub.base.title)
    return json.loads(path.read_text())
