"""Suite `gpu-check`: one prepared, self-contained measurement of adapter training and generation on
one GPU, for the day a GPU is lent (device time is short and counted, so everything runs in one go).

`python -m bench.gpu_check [--tiny] [--steps N] [--out DIR] [--time-limit-s S]` (or bench/gpu_check.sh;
also --warmup N, --micro-batches 4,8,16, --mem-cap-gib G)

It needs only torch and this repo's `adapter/` (no Ray, DeepSpeed, pyarrow, numpy or weights): a
LLaMA-7B-shaped base with RANDOM bf16 weights made directly on the GPU (speed and memory depend
on shapes, not values), the adaption prompts (K=10, L=30) in fp32, AdamW over the adapter only.
Batches have the real Alpaca length distribution, length-grouped and padded to their longest row
as the training job forms them, with the prompt positions left out of the loss. It measures
training per micro-batch (tokens/s, step time, MFU, peak memory, whether a worst-case batch fits
an A100-40GB), which attention kernel runs, generation tokens/s, the fixed costs of a run, and
recomputes the 8-GPU projection from the measured rate. The JSON is rewritten after each section,
so a run cut short still leaves what it measured.

`--tiny` (and any run without CUDA) uses the "tiny" shape in fp32 on the CPU in a few seconds: a
smoke check of this script, not a measurement (no memory or MFU figures; the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from adapter.adapter import IGNORE_INDEX, AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.flops import generation_flops_per_token, mfu, peak_flops_per_device, training_flops_per_token
from adapter.model import attention_mask, build_on_meta
from adapter.model_args import ModelArgs, preset

try:  # bench.common is light (no Ray), but keep the script runnable from a bare copy of the repo
    from bench.common import RESULTS, SHARED_DATA
except Exception:  # pragma: no cover
    RESULTS = Path(__file__).resolve().parent / "results"
    SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ADAPTER = AdapterConfig(adapter_len=10, adapter_layers=30)
BUCKET_MICRO_BATCHES = 32  # pipelines/batching.py: sort a bucket of 32 micro-batches by length
MAX_SEQ_LEN = 512

# The recipe the projection is for (configs/llama7b-alpaca-8xa100.yaml, 2026-11-30): 4 per GPU x
# 8 GPUs, 5 epochs, a checkpoint (with a held-out pass) every epoch and every 500 steps, samples
# of 3 instructions x 128 tokens on rank 0 at step 0 and each epoch end.
GPUS, EPOCHS, RECIPE_MICRO_BATCH, CHECKPOINT_EVERY = 8, 5, 4, 500
SAMPLE_INSTRUCTIONS, SAMPLE_PROMPT_LEN, SAMPLE_GEN_LEN = 3, 45, 128
STRAGGLER = 1.09  # the slowest of 8 ranks sets the pace of every synchronous step
# Token counts of the real train split, from bench/results/projection.json (2026-11-29), used when
# that file is absent: LLaMA tokenizer, cut at 512; padded = our length-grouped batches of 4 per
# GPU on 8 workers.
FALLBACK_TOKENS = {
    "train_records": 50933,
    "val_records": 1040,
    "real_tokens_per_epoch": 6467219,
    "ours_padded_tokens_per_epoch": 6724792,
}

# (tokens, prompt tokens) of 200 real Alpaca records: the 0.25%, 0.75%, ..., 99.75% quantiles by
# length of all 51,973 usable records of ../shared/data/alpaca_data.json, computed 2026-11-30 with
# the LLaMA tokenizer (../shared/data/tokenizer.model) exactly as pipelines/preprocess.py does:
# BOS + format_prompt(instruction, input) + output + EOS, cut at 512; the prompt part (BOS +
# template) is left out of the loss. Mean 127.0 tokens (all records: 126.9), median 110.5,
# response share 51.3% (all: 51.5%). The quantiles miss the 0.2% of records cut at 512.
ALPACA_LENGTHS = [
    (48, 45),
    (51, 46),
    (53, 45),
    (54, 50),
    (56, 41),
    (57, 43),
    (58, 43),
    (59, 41),
    (59, 54),
    (60, 51),
    (61, 48),
    (62, 46),
    (63, 42),
    (63, 52),
    (64, 48),
    (65, 44),
    (65, 55),
    (66, 48),
    (67, 43),
    (67, 54),
    (68, 49),
    (69, 43),
    (69, 52),
    (70, 45),
    (70, 63),
    (71, 49),
    (71, 66),
    (72, 51),
    (72, 68),
    (73, 52),
    (73, 69),
    (74, 52),
    (74, 71),
    (75, 58),
    (75, 72),
    (76, 62),
    (76, 74),
    (77, 61),
    (77, 73),
    (78, 57),
    (78, 71),
    (79, 52),
    (79, 71),
    (80, 46),
    (80, 69),
    (80, 76),
    (81, 66),
    (81, 74),
    (82, 51),
    (82, 72),
    (83, 47),
    (83, 71),
    (83, 76),
    (84, 63),
    (84, 74),
    (85, 48),
    (85, 73),
    (86, 42),
    (86, 71),
    (86, 81),
    (87, 68),
    (87, 77),
    (88, 58),
    (88, 77),
    (89, 49),
    (89, 76),
    (90, 48),
    (90, 77),
    (91, 46),
    (91, 76),
    (92, 46),
    (92, 76),
    (93, 46),
    (93, 78),
    (94, 53),
    (94, 81),
    (95, 66),
    (95, 85),
    (96, 72),
    (97, 45),
    (97, 78),
    (98, 48),
    (98, 80),
    (99, 50),
    (99, 87),
    (100, 72),
    (101, 47),
    (101, 87),
    (102, 66),
    (103, 45),
    (103, 88),
    (104, 73),
    (105, 49),
    (106, 45),
    (106, 87),
    (107, 64),
    (108, 48),
    (109, 43),
    (109, 87),
    (110, 72),
    (111, 50),
    (112, 46),
    (112, 101),
    (113, 80),
    (114, 67),
    (115, 49),
    (116, 46),
    (117, 43),
    (117, 95),
    (118, 80),
    (119, 52),
    (120, 50),
    (121, 47),
    (122, 45),
    (122, 101),
    (123, 82),
    (124, 63),
    (125, 49),
    (126, 48),
    (127, 46),
    (128, 45),
    (128, 84),
    (129, 76),
    (130, 70),
    (131, 53),
    (132, 50),
    (133, 48),
    (134, 46),
    (135, 45),
    (135, 84),
    (136, 88),
    (137, 68),
    (138, 52),
    (139, 50),
    (140, 48),
    (141, 47),
    (142, 47),
    (143, 47),
    (144, 45),
    (145, 45),
    (146, 46),
    (147, 44),
    (148, 44),
    (149, 44),
    (150, 42),
    (150, 120),
    (151, 129),
    (152, 116),
    (154, 43),
    (155, 46),
    (156, 46),
    (157, 47),
    (158, 49),
    (159, 52),
    (160, 74),
    (161, 85),
    (163, 45),
    (164, 48),
    (165, 50),
    (166, 73),
    (168, 43),
    (169, 49),
    (170, 77),
    (172, 47),
    (173, 51),
    (174, 83),
    (176, 47),
    (177, 82),
    (179, 49),
    (180, 120),
    (182, 76),
    (184, 53),
    (186, 48),
    (187, 133),
    (190, 44),
    (192, 44),
    (194, 47),
    (196, 52),
    (198, 123),
    (201, 51),
    (204, 48),
    (206, 102),
    (209, 77),
    (212, 144),
    (216, 64),
    (220, 46),
    (224, 45),
    (228, 48),
    (233, 46),
    (238, 50),
    (244, 157),
    (252, 70),
    (261, 78),
    (272, 50),
    (284, 89),
    (301, 45),
    (320, 55),
    (345, 80),
    (385, 50),
    (484, 48),
]


class TimeGuard:
    """Stops adding measurements when the time limit nears, and remembers what it skipped."""

    def __init__(self, limit_s: float):
        self.t0, self.limit_s, self.skipped = time.perf_counter(), limit_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def allows(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"what": what, "needed_s": round(need_s, 1), "left_s": round(self.left(), 1)})
        print(f"[gpu-check] skipped {what}: {self.left():.0f} s left, ~{need_s:.0f} s needed", flush=True)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": "cpu",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            total_memory_gib=round(p.total_memory / 2**30, 2),
            multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            devices_visible=torch.cuda.device_count(),
        )
    return info


# ----------------------------------------------------------------------------------------------
# Data: real Alpaca lengths, batched as the training job batches them


def alpaca_lengths(max_len: int, n: int = 4000, seed: int = 0) -> tuple[list[tuple[int, int]], str]:
    """(tokens, prompt tokens) per record: tokenized now from the real file where it and the
    tokenizer are at hand, else the embedded quantiles. Cut at max_len as preprocessing does."""
    data, tok_path = SHARED_DATA / "alpaca_data.json", SHARED_DATA / "tokenizer.model"
    pairs, source = ALPACA_LENGTHS, "embedded quantiles of the real file (ALPACA_LENGTHS)"
    if data.is_file() and tok_path.is_file():
        try:
            from adapter.prompts import format_prompt
            from adapter.tokenizer import Tokenizer

            tok = Tokenizer(tok_path)
            records = [r for r in json.loads(data.read_text()) if r.get("instruction") and r.get("output")]
            records = random.Random(seed).sample(records, min(n, len(records)))
            prompts = tok.encode_batch([format_prompt(r["instruction"], r.get("input", "")) for r in records])
            outputs = tok.encode_batch([r["output"] for r in records])
            pairs = [(2 + len(p) + len(o), 1 + len(p)) for p, o in zip(prompts, outputs)]
            source = f"{len(pairs)} records of {data} tokenized now with {tok_path}"
        except Exception as e:  # sentencepiece missing, or a bad file: the embedded figures are real too
            source += f" (tokenizing the file failed: {type(e).__name__}: {e})"
    cut = [(min(t, max_len), p) for t, p in pairs if p < min(t, max_len)]
    return cut, source


def grouped_batches(pairs: list[tuple[int, int]], micro_batch: int, n: int, rng: random.Random) -> list[list]:
    """n micro-batches formed like pipelines/batching.py's: buckets of 32 micro-batches of random
    records, sorted by length, cut into micro-batches. The n kept are evenly spaced in width over
    all those formed, so a short run sees short and long batches in their real proportion."""
    formed = []
    while len(formed) < max(n, BUCKET_MICRO_BATCHES):
        bucket = sorted(rng.choices(pairs, k=micro_batch * BUCKET_MICRO_BATCHES))
        formed += [bucket[i : i + micro_batch] for i in range(0, len(bucket), micro_batch)]
    formed.sort(key=lambda b: b[-1][0])
    picked = [formed[int((i + 0.5) * len(formed) / n)] for i in range(n)]
    rng.shuffle(picked)
    return picked


def padding_ratio(pairs: list[tuple[int, int]], micro_batch: int, seed: int = 0, buckets: int = 50) -> float:
    """Padded / real tokens of length-grouped batches of this size, over many simulated buckets."""
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(buckets):
        bucket = sorted(rng.choices(pairs, k=micro_batch * BUCKET_MICRO_BATCHES))
        for i in range(0, len(bucket), micro_batch):
            rows = bucket[i : i + micro_batch]
            real += sum(t for t, _ in rows)
            padded += rows[-1][0] * len(rows)
    return padded / real


def make_batch(rows: list[tuple[int, int]], vocab: int, device, gen: torch.Generator):
    """Right-padded random token ids (as pipelines/batching.collate pads) and labels with the
    prompt and padding positions ignored. Returns ids, labels and the batch's token counts."""
    width = max(t for t, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (t, p) in enumerate(rows):
        x = torch.randint(3, vocab, (t,), generator=gen)
        ids[i, :t] = x
        labels[i, p:t] = x[p:]
    counts = {
        "real": sum(t for t, _ in rows),
        "padded": width * len(rows),
        "labelled": sum(t - p for t, p in rows),
        "width": width,
    }
    return ids.to(device), labels.to(device), counts


# ----------------------------------------------------------------------------------------------
# The model


def build(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[AdaptedLlama, float]:
    """Frozen random base in `dtype` made directly on the device (shapes on the meta device, then
    storage on the device: never a full fp32 copy on the CPU), adapter in fp32."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = build_on_meta(args).to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    base.requires_grad_(False).eval()
    prompts = AdaptionPrompts(args, ADAPTER, dtype=torch.float32, device=device)
    model = AdaptedLlama(base, prompts)
    sync(device)
    return model, time.perf_counter() - t0


def make_optimizer(model: AdaptedLlama, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """The recipe's AdamW (betas 0.9/0.95, wd 0.02) over the adapter only; fused where available.
    The real job wraps it in DeepSpeed ZeRO-2, whose gradient all-reduce is not measured here."""
    params = model.trainable_parameters()
    kw = dict(lr=1.125e-3, betas=(0.9, 0.95), weight_decay=0.02)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, fused=True, **kw), True
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, **kw), False


def train_step(model: AdaptedLlama, opt: torch.optim.Optimizer, ids, labels) -> float:
    """One step as the training job takes it: loss at response positions, backward, clip, step."""
    loss, _ = model.loss(ids, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_steps(
    model: AdaptedLlama, opt, batches: list, device, guard: TimeGuard | None = None
) -> tuple[list[float], list[float]]:
    """Run the batches; step times and losses. Stops early if the time guard runs out."""
    times, losses = [], []
    for ids, labels, _ in batches:
        if guard is not None and guard.left() < 5:
            break
        sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, ids, labels))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses


# ----------------------------------------------------------------------------------------------
# Measurements


def measure_training(ctx: dict, micro_batch: int) -> dict:
    model, opt, args, device = ctx["model"], ctx["opt"], ctx["args"], ctx["device"]
    rng = random.Random(micro_batch)
    gen = torch.Generator().manual_seed(micro_batch)
    rows = grouped_batches(ctx["pairs"], micro_batch, ctx["warmup"] + ctx["steps"], rng)
    batches = [make_batch(r, args.vocab_size, device, gen) for r in rows]
    warm, timed = batches[: ctx["warmup"]], batches[ctx["warmup"] :]
    train_steps(model, opt, warm, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = train_steps(model, opt, timed, device, ctx["guard"])
    if not times:
        raise RuntimeError("no timed step ran: time limit")
    timed = timed[: len(times)]
    counts = [c for _, _, c in timed]
    total_s = sum(times)
    real, padded, labelled = (sum(c[k] for c in counts) for k in ("real", "padded", "labelled"))
    # FLOPs of what the GPU computed (padding included), each batch at its own width.
    flops = sum(
        c["padded"]
        * training_flops_per_token(
            args, ADAPTER.layers_for(args), ADAPTER.adapter_len, c["width"], logits_fraction=c["labelled"] / c["padded"]
        )
        for c in counts
    )
    row = {
        "micro_batch": micro_batch,
        "warmup_steps": len(warm),
        "timed_steps": len(times),
        "real_tokens": real,
        "padded_tokens": padded,
        "labelled_tokens": labelled,
        "padding_fraction": 1 - real / padded,
        "widths": [c["width"] for c in counts],
        "tokens_per_s_real": real / total_s,
        "tokens_per_s_padded": padded / total_s,
        "step_time_s": {
            "mean": total_s / len(times),
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
        },
        "loss_first_last": [losses[0], losses[-1]],  # finite: the bf16 path computes numbers
        "flop_per_step_mean": flops / len(times),
        "mfu": mfu(flops / total_s, 1.0, ctx["peak"]),
        "mfu_real_tokens_only": mfu(flops / total_s * real / padded, 1.0, ctx["peak"]),  # padding not counted
        "peak_memory_gib": None,
        "reserved_memory_gib": None,
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved_memory_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if len(times) < ctx["steps"]:
        row["note"] = f"stopped after {len(times)} of {ctx['steps']} timed steps: time limit"
    return row


def worst_case_memory(ctx: dict, micro_batch: int) -> dict:
    """One step of micro_batch rows all at the longest length (512): the batch that decides whether
    a run fits. Run twice: uncapped, for what it needs; then with the allocator capped to what an
    A100-40GB leaves (set_per_process_memory_fraction, where this GPU is larger), so the fit is
    enforced, not inferred. An OOM there is a result, not a crash."""
    model, opt, args, device = ctx["model"], ctx["opt"], ctx["args"], ctx["device"]
    cap_gib = ctx["mem_cap_gib"]
    total = torch.cuda.get_device_properties(device).total_memory
    gen = torch.Generator().manual_seed(0)
    ids, labels, c = make_batch(
        [(MAX_SEQ_LEN, ALPACA_LENGTHS[len(ALPACA_LENGTHS) // 2][1])] * micro_batch, args.vocab_size, device, gen
    )
    out = {"micro_batch": micro_batch, "width": c["width"], "cap_gib": cap_gib, "cap_enforced": total > cap_gib * 2**30}
    for label, capped in (("uncapped", False), ("capped", out["cap_enforced"])):
        if label == "capped" and not capped:
            break
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if capped:
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            sync(device)
            t0 = time.perf_counter()
            train_step(model, opt, ids, labels)
            sync(device)
            out[label] = {
                "oom": False,
                "step_time_s": time.perf_counter() - t0,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "reserved_memory_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            }
        except torch.cuda.OutOfMemoryError as e:
            out[label] = {
                "oom": True,
                "error": str(e).splitlines()[0][:300],
                "peak_memory_gib_before_oom": torch.cuda.max_memory_allocated(device) / 2**30,
            }
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
    if "capped" in out:
        out["fits_cap"] = not out["capped"]["oom"]
    elif not out["uncapped"]["oom"]:  # this GPU is no larger than the cap: its own limit decided
        out["fits_cap"] = out["uncapped"]["reserved_memory_gib"] <= cap_gib
    else:
        out["fits_cap"] = False
    return out


def measure_generation(ctx: dict, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Greedy generation with the adapter, prompts of prompt_len +- 10 tokens (left-padded into one
    batch, as serving does); EOS is never emitted (eos_id -1), so every row makes new_tokens."""
    model, args, device = ctx["model"], ctx["args"], ctx["device"]
    g = torch.Generator().manual_seed(batch)
    lens = [max(2, prompt_len + int(torch.randint(-10, 11, (1,), generator=g))) for _ in range(batch)]
    prompts = [[1] + torch.randint(3, args.vocab_size, (n - 1,), generator=g).tolist() for n in lens]
    t0 = time.perf_counter()
    pre = prefixes_for(model.base, model.adapter)
    sync(device)
    prefix_s = time.perf_counter() - t0
    generate(model.base, prompts, SamplingParams(2, temperature=0.0), -1, adapters=[pre] * batch)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = generate(model.base, prompts, SamplingParams(new_tokens, temperature=0.0), -1, adapters=[pre] * batch)
    sync(device)
    dt = time.perf_counter() - t0
    n_new = sum(len(o) for o in out)
    longest = max(lens)
    L, K = ADAPTER.layers_for(args), ADAPTER.adapter_len
    flops = (
        batch * longest * generation_flops_per_token(args, L, K, longest / 2)  # prefill, padding included
        + n_new * generation_flops_per_token(args, L, K, longest + new_tokens / 2)
    )
    return {
        "batch": batch,
        "prompt_tokens": lens,
        "new_tokens": n_new,
        "seconds": dt,
        "new_tokens_per_s": n_new / dt,
        "per_row_tokens_per_s": n_new / dt / batch,
        "ms_per_step": dt / new_tokens * 1000,
        "adapter_prefix_s": prefix_s,
        "mfu": mfu(flops / dt, 1.0, ctx["peak"]),
    }


SDPA_OPS = re.compile(r"aten::_(scaled_dot_product\w*|flash_attention\w*|efficient_attention\w*|cudnn_attention\w*)")


def sdpa_ops_seen(fn) -> list[str]:
    """The aten attention ops a call dispatches to (flash / efficient / cudnn / math), read from the
    profiler's CPU-side op names: which kernel runs, without guessing from the enabled flags."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if SDPA_OPS.fullmatch(e.key)})


def attention_check(ctx: dict) -> dict:
    """Which scaled_dot_product_attention backends accept the model's own calls: each forced in
    turn with sdpa_kernel, on the shapes, masks and dtype the model uses; then which op the
    default dispatch picks, in a real training step and a real generation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args, device, dtype, mb = ctx["args"], ctx["device"], ctx["dtype"], ctx["micro_batches"][0]
    H, D, K, T, P = args.n_heads, args.head_dim, ADAPTER.adapter_len, 256, 100

    def t(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    pad = torch.arange(16, device=device) % 8  # left padding of 0..7 slots, as a mixed-length batch has
    cases = {
        "train_words_causal_no_mask_fwd_bwd": (
            lambda: (t(mb, H, T, D, grad=True), t(mb, H, T, D, grad=True), t(mb, H, T, D, grad=True)),
            {"is_causal": True},
            True,
        ),
        "train_prompt_batch1_keys_no_mask_fwd_bwd": (
            lambda: (t(mb, H, T, D, grad=True), t(1, H, K, D, grad=True), t(1, H, K, D, grad=True)),
            {},
            True,
        ),
        "generate_prefill_left_padded_bool_mask": (
            lambda: (t(16, H, P, D), t(16, H, P, D), t(16, H, P, D)),
            {"attn_mask": attention_mask(pad, 0, P, device)},
            False,
        ),
        "generate_decode_1_query_bool_mask": (
            lambda: (t(16, H, 1, D), t(16, H, P + 1, D), t(16, H, P + 1, D)),
            {"attn_mask": attention_mask(pad, P, 1, device)},
            False,
        ),
    }
    backends = {
        n: getattr(SDPBackend, n)
        for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
        if hasattr(SDPBackend, n)
    }
    result = {"dtype": str(dtype).replace("torch.", ""), "head_dim": D, "heads": H, "cases": {}}
    if device.type == "cuda":
        result["enabled_flags"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
            "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
        }
    for name, (make, kw, backward) in cases.items():
        row = {}

        def call():
            q, k, v = make()
            out = F.scaled_dot_product_attention(q, k, v, **kw)
            if backward:
                out.float().sum().backward()
            sync(device)

        for bname, backend in backends.items():
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # each refusal also warns why: the row records it
                    call()
                row[bname.lower()] = "ok"
            except Exception as e:
                row[bname.lower()] = "fails: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        try:
            row["default_dispatch"] = sdpa_ops_seen(call)
        except Exception as e:
            row["default_dispatch"] = f"profiler failed: {e}"[:200]
        result["cases"][name] = row

    model, opt = ctx["model"], ctx["opt"]
    gen = torch.Generator().manual_seed(1)
    ids, labels, _ = make_batch(ctx["pairs"][:mb], args.vocab_size, device, gen)
    result["model_training_step_ops"] = sdpa_ops_seen(lambda: (train_step(model, opt, ids, labels), sync(device)))
    prompts = [[1] + list(range(3, 43)), [1] + list(range(3, 33))]  # two lengths: left padding, as served
    pre = prefixes_for(model.base, model.adapter)
    result["model_generation_ops"] = sdpa_ops_seen(
        lambda: generate(model.base, prompts, SamplingParams(3, temperature=0.0), -1, adapters=[pre] * 2)
    )
    return result


def fixed_costs(ctx: dict, eval_batches: int, sample_gen_len: int) -> dict:
    """Costs a run pays besides its training steps: the adapter's prompt keys/values (once per
    step, or once per request when generating), a held-out pass, a sample generation."""
    model, args, device = ctx["model"], ctx["args"], ctx["device"]
    out = {"build_base_s": ctx["build_s"]}
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        prefixes_for(model.base, model.adapter)
        sync(device)
        times.append(time.perf_counter() - t0)
    out["adapter_prefixes_s"] = statistics.median(times)

    # Held-out pass: records in file order, batches of the recipe's size, no length grouping.
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    mb = RECIPE_MICRO_BATCH if RECIPE_MICRO_BATCH in ctx["micro_batches"] else ctx["micro_batches"][0]
    batches = [make_batch(rng.choices(ctx["pairs"], k=mb), args.vocab_size, device, gen) for _ in range(eval_batches)]
    model.eval()
    for label, grad in (("no_grad", False), ("grad_enabled_as_train_worker", True)):
        # pipelines/train_worker.evaluate (2026-11-30) runs the loss without torch.no_grad(): timed
        # both ways, the second is what the projection uses.
        with torch.set_grad_enabled(grad):
            model.loss(*batches[0][:2])  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for ids, labels, _ in batches:
                model.loss(ids, labels)[0].item()
            sync(device)
            dt = time.perf_counter() - t0
        out[f"eval_{label}"] = {
            "batches": eval_batches,
            "micro_batch": mb,
            "seconds": dt,
            "s_per_record": dt / (eval_batches * mb),
        }
    model.train()

    g = torch.Generator().manual_seed(3)
    prompts = [
        [1] + torch.randint(3, args.vocab_size, (SAMPLE_PROMPT_LEN - 1,), generator=g).tolist()
        for _ in range(SAMPLE_INSTRUCTIONS)
    ]
    pre = prefixes_for(model.base, model.adapter)
    sync(device)
    t0 = time.perf_counter()
    generate(model.base, prompts, SamplingParams(sample_gen_len, temperature=0.0), -1, adapters=[pre] * len(prompts))
    sync(device)
    out["sample_generation"] = {
        "instructions": SAMPLE_INSTRUCTIONS,
        "prompt_tokens": SAMPLE_PROMPT_LEN,
        "new_tokens": sample_gen_len,
        "seconds": time.perf_counter() - t0,
    }
    return out


def projection_tokens() -> tuple[dict, str]:
    path = RESULTS / "projection.json"
    try:
        m = json.loads(path.read_text())["measured"]
        tokens = {k: m[k] for k in ("train_records", "real_tokens_per_epoch", "ours_padded_tokens_per_epoch")}
        return {**FALLBACK_TOKENS, **tokens}, f"{path} (measured on the real file)"
    except Exception:
        return dict(FALLBACK_TOKENS), "embedded figures of bench/results/projection.json, 2026-11-29"


def project(ctx: dict, training: list[dict], fixed: dict) -> dict:
    """The 5-epoch, 8-GPU run recomputed from the measured single-GPU rate."""
    tokens, source = projection_tokens()
    rows = {r["micro_batch"]: r for r in training if "tokens_per_s_padded" in r}
    if RECIPE_MICRO_BATCH not in rows:
        return {"what": "not computed: no measured rate at the recipe's micro-batch of 4"}
    rate = rows[RECIPE_MICRO_BATCH]["tokens_per_s_padded"]
    per_rank = tokens["ours_padded_tokens_per_epoch"] / GPUS
    train_s = EPOCHS * per_rank / rate * STRAGGLER
    steps_per_epoch = tokens["train_records"] // GPUS // RECIPE_MICRO_BATCH
    total_steps = EPOCHS * steps_per_epoch
    ckpt_steps = (
        {s for s in range(steps_per_epoch, total_steps + 1, steps_per_epoch)}
        | {s for s in range(CHECKPOINT_EVERY, total_steps + 1, CHECKPOINT_EVERY)}
        | {total_steps}
    )
    n_evals = len(ckpt_steps) + 1  # plus the step-0 pass
    val_per_rank = math.ceil(tokens["val_records"] / GPUS)
    ev = fixed.get("eval_grad_enabled_as_train_worker") or {}
    gen = fixed.get("sample_generation") or {}
    fixed_s = {
        "build_base_s (random init on the device; reading real weights not measured)": fixed.get("build_base_s"),
        f"held_out_passes_s ({n_evals} passes x {val_per_rank} records per rank)": n_evals
        * val_per_rank
        * ev["s_per_record"]
        if ev
        else None,
        f"sample_generations_s ({EPOCHS + 1} x {SAMPLE_INSTRUCTIONS} instructions x {SAMPLE_GEN_LEN} tokens, rank 0)": (
            EPOCHS + 1
        )
        * gen["seconds"]
        * SAMPLE_GEN_LEN
        / gen["new_tokens"]
        if gen
        else None,
    }
    total_s = train_s + sum(v for v in fixed_s.values() if v)
    device, peak = ctx["machine"]["device"], ctx["peak"]
    out = {
        "what": f"PROJECTED from a measured single-GPU rate: {EPOCHS} epochs of the real Alpaca train split on "
        f"{GPUS} x {device}, micro-batch {RECIPE_MICRO_BATCH} per GPU (configs/llama7b-alpaca-8xa100.yaml)",
        "tokens_source": source,
        "tokens": tokens,
        "measured_tokens_per_s_padded_per_gpu": rate,
        "straggler_factor": STRAGGLER,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "training_minutes": train_s / 60,
        "fixed_costs_s": fixed_s,
        "total_minutes": total_s / 60,
        "not_included": [
            "DeepSpeed ZeRO-2 gradient all-reduce and loss all-reduce per step (1.2M fp32 values)",
            "checkpoint saves (DeepSpeed state of every rank + the adapter, to shared storage)",
            "Ray start-up, dataset reading, reading the 13.5 GB of base weights",
        ],
    }
    if ctx["measured_on"] != "cuda":
        out["what"] = "TINY CPU SMOKE RUN, meaningless as a projection: " + out["what"]
    else:
        a100 = peak_flops_per_device("NVIDIA A100", ctx["dtype"])
        if peak and a100 and "A100" not in device.upper():
            out["training_minutes_on_8xA100_if_same_mfu"] = train_s / 60 * peak / a100
            out["a100_note"] = "ASSUMPTION: an A100 reaching the MFU measured here; not measured"
    # Other micro-batches: a different recipe (global batch 8 x m), same epochs; padded tokens per
    # epoch scaled by the simulated padding of length-grouped batches of that size.
    real = tokens["real_tokens_per_epoch"]
    out["training_minutes_by_micro_batch"] = {
        str(m): EPOCHS * real * padding_ratio(ctx["pairs"], m) / GPUS / r["tokens_per_s_padded"] * STRAGGLER / 60
        for m, r in rows.items()
    }
    return out


# ----------------------------------------------------------------------------------------------


def run(
    quick: bool = False,
    tiny: bool | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    out: str | Path | None = None,
    time_limit_s: float = 420.0,
    mem_cap_gib: float = 38.5,
    micro_batches: list[int] | None = None,
    eval_batches: int | None = None,
) -> dict:
    """Run every measurement the time allows; write and return the result. quick or no CUDA: tiny."""
    cuda = torch.cuda.is_available()
    tiny = (quick or not cuda) if tiny is None else tiny
    threads = torch.get_num_threads()
    if tiny:
        # The tiny shape gains nothing from threads, and on a shared machine spinning threads
        # make it several times slower.
        torch.set_num_threads(1)
    try:
        return _run(cuda, tiny, steps, warmup, out, time_limit_s, mem_cap_gib, micro_batches, eval_batches)
    finally:
        torch.set_num_threads(threads)


def _run(cuda: bool, tiny: bool, steps, warmup, out, time_limit_s, mem_cap_gib, micro_batches, eval_batches) -> dict:
    guard = TimeGuard(time_limit_s)
    device = torch.device("cuda" if cuda and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = preset("tiny" if tiny else "llama-7b")
    max_len = min(MAX_SEQ_LEN, args.max_seq_len)
    out_dir = Path(out) if out else RESULTS
    path = out_dir / "gpu-check.json"
    mach = machine(device)
    pairs, source = alpaca_lengths(max_len)
    ctx = {
        "args": args,
        "device": device,
        "dtype": dtype,
        "guard": guard,
        "pairs": pairs,
        "machine": mach,
        "measured_on": device.type,
        "mem_cap_gib": mem_cap_gib,
        "peak": peak_flops_per_device(mach["device"] if device.type == "cuda" else None, dtype),
        "micro_batches": micro_batches or ([2, 4] if tiny else [4, 8, 16]),
        "steps": steps or (3 if tiny else 20),
        "warmup": warmup if warmup is not None else (1 if tiny else 3),
    }
    gen_len = 16 if tiny else 64
    result = {
        "suite": "gpu-check",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": mach,
        "measured_on": device.type,
        "note": (
            "measured on one GPU; base weights are RANDOM (speed and memory depend on shapes only)"
            if device.type == "cuda"
            else "CPU SMOKE RUN of the tiny shape: these are NOT GPU figures and say nothing about GPU speed; "
            "memory and MFU are null on CPU"
        ),
        "settings": {
            "preset": "tiny" if tiny else "llama-7b",
            "base_dtype": str(dtype).replace("torch.", ""),
            "adapter_dtype": "float32",
            "adapter": ADAPTER.to_dict(),
            "micro_batches": ctx["micro_batches"],
            "warmup_steps": ctx["warmup"],
            "timed_steps": ctx["steps"],
            "max_seq_len": max_len,
            "mem_cap_gib": mem_cap_gib,
            "time_limit_s": time_limit_s,
            "peak_flops": ctx["peak"],
            "generation": {
                "batches": [1, 16],
                "prompt_tokens": 100,
                "new_tokens": gen_len,
                "why": "tiny: 16 new tokens instead of 64 (batch 16 kept)" if tiny else None,
            },
        },
        "lengths": {
            "source": source,
            "records": len(pairs),
            "mean": statistics.mean(t for t, _ in pairs),
            "median": statistics.median(t for t, _ in pairs),
            "response_share": sum(t - p for t, p in pairs) / sum(t for t, _ in pairs),
        },
        "training": [],
        "generation": [],
        "errors": [],
        "skipped": guard.skipped,
    }

    def save() -> None:
        result["wall_s"] = guard.elapsed()
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))

    def section(name: str, need_s: float, fn):
        if not guard.allows(name, need_s):
            return None
        print(f"[gpu-check] {name} ({guard.elapsed():.0f} s)", flush=True)
        try:
            return fn()
        except Exception as e:  # one failed measurement must not lose the others
            result["errors"].append({"what": name, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"[gpu-check] {name} failed: {type(e).__name__}: {e}", flush=True)
            if "opt" in ctx:  # a step cut short leaves gradients behind
                ctx["opt"].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    built = section("build", 60, lambda: build(args, device, dtype))
    if built is None:
        save()
        return result
    ctx["model"], ctx["build_s"] = built
    ctx["opt"], fused = make_optimizer(ctx["model"], device)
    result["build"] = {
        "seconds": ctx["build_s"],
        "optimizer": "AdamW" + (" (fused)" if fused else ""),
        "trainable": sum(p.numel() for p in ctx["model"].trainable_parameters()),
        "frozen": sum(p.numel() for p in ctx["model"].base.parameters()),
    }
    if device.type == "cuda":
        result["build"]["memory_after_build_gib"] = torch.cuda.memory_allocated(device) / 2**30

    need = 30.0
    for m in ctx["micro_batches"]:
        t0 = time.perf_counter()
        row = section(f"training micro-batch {m}", need, lambda: measure_training(ctx, m))
        if row is not None:
            result["training"].append(row)
            need = 2 * (time.perf_counter() - t0) + 5  # the next, larger batch takes about this much
    if device.type == "cuda":
        result["worst_case_memory"] = []
        for m in ctx["micro_batches"]:
            row = section(f"worst-case memory micro-batch {m}", 20, lambda: worst_case_memory(ctx, m))
            if row is not None:
                result["worst_case_memory"].append(row)
                for r in result["training"]:
                    if r["micro_batch"] == m:
                        r["fits_cap_at_512"] = row["fits_cap"]
    for b in (1, 16):
        row = section(f"generation batch {b}", 30, lambda: measure_generation(ctx, b, 100, gen_len))
        if row is not None:
            result["generation"].append(row)
    result["fixed_costs"] = section(
        "fixed costs", 30, lambda: fixed_costs(ctx, eval_batches or (2 if tiny else 8), 8 if tiny else SAMPLE_GEN_LEN)
    )
    result["projection"] = section(
        "projection", 1, lambda: project(ctx, result["training"], result["fixed_costs"] or {})
    )
    # Last: the profiler it uses slows the next steps for a while, and forcing each backend is the
    # likeliest call to fail hard.
    result["attention"] = section("attention kernels", 30, lambda: attention_check(ctx))
    save()
    print(f"[gpu-check] done in {guard.elapsed():.0f} s: {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape, fp32, on the CPU (smoke check, not a measurement)")
    ap.add_argument("--steps", type=int, help="timed training steps per micro-batch (default 20; tiny 3)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per micro-batch (default 3; tiny 1)")
    ap.add_argument("--micro-batches", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 4,8,16")
    ap.add_argument("--out", help="folder for gpu-check.json (default bench/results)")
    ap.add_argument("--time-limit-s", type=float, default=420.0, help="stop adding measurements near this")
    ap.add_argument(
        "--mem-cap-gib",
        type=float,
        default=38.5,
        help="memory an A100-40GB leaves the allocator (39.4 GiB total less the CUDA context)",
    )
    a = ap.parse_args(argv)
    result = run(
        tiny=True if a.tiny else None,
        steps=a.steps,
        warmup=a.warmup,
        out=a.out,
        time_limit_s=a.time_limit_s,
        mem_cap_gib=a.mem_cap_gib,
        micro_batches=a.micro_batches,
    )
    brief = {
        "measured_on": result["measured_on"],
        "device": result["machine"]["device"],
        "training": [
            {
                k: r.get(k)
                for k in (
                    "micro_batch",
                    "tokens_per_s_real",
                    "tokens_per_s_padded",
                    "mfu",
                    "peak_memory_gib",
                    "fits_cap_at_512",
                )
            }
            for r in result["training"]
        ],
        "generation": [{k: r[k] for k in ("batch", "new_tokens_per_s")} for r in result["generation"]],
        "projection_total_minutes": (result.get("projection") or {}).get("total_minutes"),
        "skipped": result["skipped"],
        "errors": result["errors"],
    }
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
