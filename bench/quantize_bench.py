"""Suite `quantize`: the same trained adapter on a frozen base held in fp32, bf16, int8 and int4
(adapter/quantize.py), on the real stories260K base and on the tiny benchmark shape (random
weights, bench/train_vs_peft.py's SHAPE), CPU, measured; and the memory of the 7B/13B/65B shapes
per precision, computed.

Per subject: an adapter is trained on the fp32 base (AdaptedLlama + AdamW, no Ray) on real Alpaca
records (../shared/data/alpaca_data_first200.json, the base's tokenizer), then, per precision:
bytes of base weights (all of them, and the block linears alone), held-out loss of that adapter,
greedy agreement of the first 32 generated tokens with fp32, training and generation tokens/s.

Memory table (computed, not measured: no GPU here): base weights per precision from the shapes,
with each format's exact per-layer overhead (checked against the measured bytes of the two small
bases); peak training memory = weights + adapter (fp32 params, grads, AdamW moments) + activations
saved for backward + the largest transients + a fixed allowance for the CUDA context. Saved
activations per token per adapted layer are counted from this model's own autograd graph
(saved-tensor hooks) on one real-shaped block of each model in bf16, on CPU; they do not depend on
the base's precision (the quantized layers save their input, as a plain linear does, and backward
re-dequantizes the weight).
"""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pyarrow as pa
import torch

from adapter.adapter import IGNORE_INDEX, AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.loader import load_model
from adapter.model import Transformer, build_on_meta
from adapter.model_args import ModelArgs, preset
from adapter.quantize import BLOCK_LINEARS, INT4_BLOCKSIZE, quantize_base, weight_bytes
from adapter.settings import ModelSource
from bench import common
from bench.common import SHARED_DATA, write_result
from bench.train_vs_peft import SHAPE
from pipelines.data.instructions import TokenizeBatch
from pipelines.training.batching import collate, epoch_order

PRECISIONS = ("fp32", "bf16", "int8", "int4")
GOALS = {"int8": {"loss_within": 0.01, "bytes_below_fp32": 4.0}, "int4": {"loss_within": 0.03, "bytes_below_fp32": 8.0}}
GIB = 1024**3
# Nominal memory of common GPUs (GiB), smallest first.
GPUS = [
    (16, "16 GB (T4, V100-16GB)"),
    (24, "24 GB (RTX 3090/4090, A10G, L4)"),
    (40, "40 GB (A100-40GB)"),
    (48, "48 GB (RTX A6000, L40S)"),
    (80, "80 GB (A100-80GB, H100)"),
    (141, "141 GB (H200)"),
]
CUDA_CONTEXT_GIB = 1.0  # assumed: CUDA context + allocator slack


# --- data -----------------------------------------------------------------------------------------
def alpaca_records(tokenizer: str, max_seq_len: int, val_fraction: float = 0.2) -> tuple[list, list]:
    raw = [json.dumps(r) for r in json.loads((SHARED_DATA / "alpaca_data_first200.json").read_text())]
    out = TokenizeBatch(tokenizer, max_seq_len, val_fraction=val_fraction, seed=0)(
        pa.table({"idx": list(range(len(raw))), "raw": raw})
    ).to_pylist()
    rows = [r for r in out if not r["reject_reason"]]
    return (
        [(r["input_ids"], r["labels"]) for r in rows if r["split"] == "train"],
        [(r["input_ids"], r["labels"]) for r in rows if r["split"] == "val"],
    )


def batches(rows: list, batch_size: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lengths = np.array([len(x) for x, _ in rows])
    return [
        collate([rows[i][0] for i in b], [rows[i][1] for i in b])
        for b in epoch_order(lengths, batch_size, seed=seed, epoch=epoch, group_by_length=True)
    ]


# --- the adapter and what it does on each base ----------------------------------------------------
def train_adapter(
    base: Transformer, config: AdapterConfig, train: list, steps: int, batch_size: int, lr: float
) -> tuple[AdaptionPrompts, list[float]]:
    torch.manual_seed(0)
    prompts = AdaptionPrompts(base.args, config)
    model = AdaptedLlama(base, prompts)
    opt = torch.optim.AdamW(prompts.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    losses, epoch = [], 0
    while len(losses) < steps:
        for x, y in batches(train, batch_size, seed=0, epoch=epoch):
            if len(losses) == steps:
                break
            frac = len(losses) / steps  # short warm-up, then cosine to 10%
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (len(losses) + 1) / (0.05 * steps)) * (0.55 + 0.45 * math.cos(math.pi * frac))
            loss, _ = model.loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        epoch += 1
    return prompts, losses


@torch.no_grad()
def held_out_loss(base: Transformer, prompts: AdaptionPrompts, val: list) -> float:
    model = AdaptedLlama(base, prompts)
    total = n = 0.0
    for i in range(0, len(val), 8):
        loss, k = model.loss(*collate([x for x, _ in val[i : i + 8]], [y for _, y in val[i : i + 8]]))
        total += float(loss) * int(k)
        n += int(k)
    return total / n


def prompt_tokens(val: list, n: int) -> list[list[int]]:
    """The prompt part (BOS + template + instruction) of the first n held-out records."""
    return [[t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX] for ids, labels in val[:n]]


@torch.no_grad()
def greedy(base: Transformer, prompts: AdaptionPrompts, inputs: list, eos_id: int, n_new: int = 32) -> list:
    pre = prefixes_for(base, prompts)
    return generate(
        base, inputs, SamplingParams(max_gen_len=n_new, temperature=0), eos_id, adapters=[pre] * len(inputs)
    )


def agreement(ref: list[list[int]], out: list[list[int]], n: int = 32) -> dict:
    """Position-wise agreement of the first n tokens (a missing token counts as a mismatch, two
    ended sequences as agreeing) and the mean length of the common prefix."""
    same, prefix = [], []
    for a, b in zip(ref, out):
        a, b = a[:n] + [-1] * (n - len(a[:n])), b[:n] + [-1] * (n - len(b[:n]))
        same.append(np.mean([x == y for x, y in zip(a, b)]))
        prefix.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n))
    return {"token_agreement": float(np.mean(same)), "mean_common_prefix": float(np.mean(prefix))}


class Clock:
    """Wall time and this process's CPU time. The machine is shared and oversubscribed, so the
    suite runs torch on one thread and reports tokens per CPU-second of this process (stable) next
    to tokens per wall-second (what others' load left us)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def train_speed(base: Transformer, prompts: AdaptionPrompts, train_batches: list) -> dict:
    p = copy.deepcopy(prompts)
    model = AdaptedLlama(base, p)
    opt = torch.optim.AdamW(p.parameters(), lr=1e-4)

    def step(x, y):
        loss, _ = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(*train_batches[0])  # warm-up
    real = sum(int((x != 0).sum()) for x, _ in train_batches[1:])  # real tokens (collate pads with 0)
    with Clock() as c:
        for x, y in train_batches[1:]:
            step(x, y)
    return {"cpu": real / c.cpu, "wall": real / c.wall}


@torch.no_grad()
def generate_speed(base: Transformer, prompts: AdaptionPrompts, inputs: list, n_new: int = 32) -> dict:
    pre = prefixes_for(base, prompts)
    params = SamplingParams(max_gen_len=n_new, temperature=0)
    generate(base, inputs[:2], SamplingParams(max_gen_len=2, temperature=0), -1, adapters=[pre] * 2)  # warm-up
    with Clock() as c:
        outs = generate(base, inputs, params, eos_id=-1, adapters=[pre] * len(inputs))
    n = sum(len(o) for o in outs)
    return {"cpu": n / c.cpu, "wall": n / c.wall}


def linear_bytes(base: Transformer) -> int:
    return sum(weight_bytes(layer.get_submodule(p)) for layer in base.layers for p in BLOCK_LINEARS)


# --- subjects ---------------------------------------------------------------------------------------
def stories_bases() -> tuple[dict, object]:
    path = SHARED_DATA / "stories260K"
    source = ModelSource(base=str(path), tokenizer=str(path / "tokenizer.model"), device="cpu")
    bases = {
        "fp32": load_model(source.model_copy(update={"dtype": "float32"})).base,
        "bf16": load_model(source.model_copy(update={"dtype": "bfloat16"})).base,
        "int8": load_model(source.model_copy(update={"quantize": "int8"})).base,
        "int4": load_model(source.model_copy(update={"quantize": "int4"})).base,
    }
    return bases, load_model(source).tokenizer


def tiny_shape_bases() -> dict:
    args = ModelArgs(
        dim=SHAPE["dim"],
        n_layers=SHAPE["n_layers"],
        n_heads=SHAPE["n_heads"],
        vocab_size=SHAPE["vocab"],
        hidden_dim=SHAPE["ffn"],
        norm_eps=1e-6,
        max_seq_len=2048,
    )
    base = build_on_meta(args).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # Hugging Face's LLaMA initialisation, as bench/train_vs_peft.py's base
        for n, p in base.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    base = base.requires_grad_(False).eval()
    return {
        "fp32": base,
        "bf16": copy.deepcopy(base).to(torch.bfloat16),
        "int8": quantize_base(copy.deepcopy(base), "int8"),
        "int4": quantize_base(copy.deepcopy(base), "int4"),
    }


def measure_subject(
    name: str,
    bases: dict,
    tokenizer_path: str,
    eos_id: int,
    config: AdapterConfig,
    steps: int,
    lr: float,
    max_seq_len: int,
    speed_steps: int,
    n_gen: int,
    rounds: int,
) -> dict:
    train, val = alpaca_records(tokenizer_path, max_seq_len)
    t0 = time.perf_counter()
    prompts, losses = train_adapter(bases["fp32"], config, train, steps, 8, lr)
    train_s = time.perf_counter() - t0
    inputs = prompt_tokens(val, n_gen)
    ref = greedy(bases["fp32"], prompts, inputs, eos_id)
    rows = {}
    for prec, base in bases.items():
        rows[prec] = {
            "base_weight_bytes": weight_bytes(base),
            "block_linear_bytes": linear_bytes(base),
            "held_out_loss": held_out_loss(base, prompts, val),
            "held_out_loss_untrained_adapter": held_out_loss(base, AdaptionPrompts(base.args, config), val),
            **agreement(ref, greedy(base, prompts, inputs, eos_id)),
        }
    # Speed: the precisions take turns, rounds times; each keeps its best round (least disturbed).
    speed_batches = batches(train, 8, seed=2, epoch=0)[: speed_steps + 1]
    for _ in range(rounds):
        for prec, base in bases.items():
            t, g = train_speed(base, prompts, speed_batches), generate_speed(base, prompts, inputs)
            r = rows[prec]
            r["train_tokens_per_cpu_s"] = max(r.get("train_tokens_per_cpu_s", 0), t["cpu"])
            r["train_tokens_per_wall_s"] = max(r.get("train_tokens_per_wall_s", 0), t["wall"])
            r["generate_tokens_per_cpu_s"] = max(r.get("generate_tokens_per_cpu_s", 0), g["cpu"])
            r["generate_tokens_per_wall_s"] = max(r.get("generate_tokens_per_wall_s", 0), g["wall"])
    for prec in rows:
        print(name, prec, json.dumps({k: round(v, 4) for k, v in rows[prec].items()}))
    goals = compare_to_fp32(rows)
    return {
        "records": {"train": len(train), "held_out": len(val), "max_seq_len": max_seq_len},
        "adapter": config.to_dict(),
        "training": {
            "steps": steps,
            "batch": 8,
            "lr": lr,
            "seconds": train_s,
            "first_loss": losses[0],
            "last_10_mean": float(np.mean(losses[-10:])),
        },
        "greedy_prompts": len(inputs),
        "speed": {
            "threads": torch.get_num_threads(),
            "train_batches": speed_steps,
            "batch": 8,
            "generate": f"{len(inputs)} prompts x 32 new tokens",
            "rounds": rounds,
            "kept": "best round",
        },
        "precisions": rows,
        "goals": goals,
    }


def compare_to_fp32(rows: dict) -> dict:
    """Adds each precision's loss change and byte savings against the fp32 row; returns the goals."""
    fp32 = rows["fp32"]
    for r in rows.values():
        r["loss_vs_fp32"] = r["held_out_loss"] / fp32["held_out_loss"] - 1
        r["weights_below_fp32"] = fp32["base_weight_bytes"] / r["base_weight_bytes"]
        r["block_linears_below_fp32"] = fp32["block_linear_bytes"] / r["block_linear_bytes"]

    return {
        prec: {
            "loss": f"{rows[prec]['loss_vs_fp32']:+.2%} vs goal within {g['loss_within']:.0%}: "
            + ("met" if abs(rows[prec]["loss_vs_fp32"]) <= g["loss_within"] else "MISSED"),
            **{
                f"bytes_{part}": f"{rows[prec][key]:.2f}x below fp32 vs goal {g['bytes_below_fp32']:.0f}x: "
                + ("met" if rows[prec][key] >= g["bytes_below_fp32"] else "MISSED")
                for part, key in (("all_weights", "weights_below_fp32"), ("block_linears", "block_linears_below_fp32"))
            },
        }
        for prec, g in GOALS.items()
    }


# --- memory of the LLaMA shapes (computed) -----------------------------------------------------------
def quantized_linear_bytes(out_features: int, in_features: int, mode: str, working_bytes: int = 2) -> int:
    """Bytes a block linear holds per format, as adapter/quantize.py stores it (checked against the
    measured bases in `run`)."""
    n = out_features * in_features
    if mode == "none":
        return n * working_bytes
    if mode == "int8":
        return n + 4 * out_features  # int8 codes + one fp32 scale per row
    blocks = math.ceil(n / INT4_BLOCKSIZE)
    # NF4 codes, one uint8 absmax per block (double quantization), one fp32 per 256 absmax, the
    # 256-entry fp32 table of that second quantization, the 16-entry NF4 table and bitsandbytes'
    # serialized quant-state descriptor (167-175 bytes, by the digits of the shape).
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 170


def base_weight_bytes(args: ModelArgs, mode: str, working_bytes: int = 2) -> int:
    base = build_on_meta(args)
    total = 0
    linears = {f"layers.{i}.{p}.weight" for i in range(args.n_layers) for p in BLOCK_LINEARS}
    for name, p in base.named_parameters():
        if name in linears:
            total += quantized_linear_bytes(p.shape[0], p.shape[1], mode, working_bytes)
        else:
            total += p.numel() * working_bytes
    return total


def saved_bytes_per_token_per_layer(args: ModelArgs) -> float:
    """Bytes autograd keeps for backward per token in one adapted block (bf16), counted on one
    block of this shape: the difference between 2 x 16 and 2 x 8 tokens, over 16 tokens (with fused
    attention nothing grows faster than the token count)."""
    one = ModelArgs(**{**args.to_dict(), "n_layers": 1, "vocab_size": 256})
    torch.manual_seed(0)
    base = build_on_meta(one).to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():  # the values do not matter to what is saved; zeros are quick to write
        for p in base.parameters():
            p.zero_()
    base.requires_grad_(False).eval()
    model = AdaptedLlama(base, AdaptionPrompts(one, AdapterConfig(10, 1)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def count(t_len: int) -> int:
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, 256, (2, t_len), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model.hidden(ids)  # the block only: the output head is counted apart
        del h
        return sum(seen.values())

    return (count(16) - count(8)) / 16


def memory_table(micro_batches: tuple[int, ...] = (1, 4), seq_len: int = 512, response_share: float = 0.46) -> dict:
    config = AdapterConfig()
    out = {
        "assumptions": {
            "working_dtype": "bf16 (the GPU default) for bf16/int8/int4: embedding, norms, output and activations; the fp32 "
            "row holds everything in fp32 (activations scaled x2 from the bf16 count); adapter and AdamW state fp32",
            "adapter": config.to_dict(),
            "sequence": f"{seq_len} tokens per row (max_seq_len), {response_share:.0%} of them "
            "response tokens (the Alpaca average, docs/training.md) whose logits the loss computes",
            "activations": "tensors saved for backward in each adapted layer, counted on one block of the real shape (bf16, "
            "fused attention: no T x T matrix kept); logits fp32 + their gradient at response positions",
            "transients": "the largest dequantized weight (quantized bases) and the logits gradient",
            "cuda_context_gib": CUDA_CONTEXT_GIB,
        },
        "models": {},
    }
    for name in ("llama-7b", "llama-13b", "llama-65b"):
        args = preset(name)
        n_adapted = config.layers_for(args)
        trainable = sum(p.numel() for p in AdaptionPrompts(args, config, device="meta").parameters())
        per_layer = saved_bytes_per_token_per_layer(args)
        biggest = args.ffn_hidden_dim * args.dim
        rows = {}
        for mode, label, wb in (("none", "fp32", 4), ("none", "bf16", 2), ("int8", "int8", 2), ("int4", "int4", 2)):
            w = base_weight_bytes(args, mode, wb)
            rows[label] = {"base_weights_gib": w / GIB, "weights_below_fp32": base_weight_bytes(args, "none", 4) / w}
            for mb in micro_batches:
                tokens = mb * seq_len
                resp = int(tokens * response_share)
                act = n_adapted * per_layer * tokens * wb / 2 + resp * args.vocab_size * 4 * 2
                # int8 dequantizes in two steps (cast, then scale): two copies of the weight at once
                transient = resp * args.vocab_size * 4 + biggest * 2 * {"none": 0, "int8": 2, "int4": 1}[mode]
                peak = w + trainable * 16 + act + transient + CUDA_CONTEXT_GIB * GIB
                fits = next((label_ for cap, label_ in GPUS if peak <= cap * GIB), "none listed (over 141 GB)")
                rows[label][f"peak_training_gib_mb{mb}"] = peak / GIB
                rows[label][f"smallest_gpu_mb{mb}"] = fits
        out["models"][name] = {
            "params": sum(p.numel() for p in build_on_meta(args).parameters()),
            "adapted_layers": n_adapted,
            "saved_bytes_per_token_per_layer": per_layer,
            "precisions": rows,
        }
    return out


def markdown_memory(table: dict, micro_batches: tuple[int, ...] = (1, 4)) -> str:
    head = (
        "| model | precision | base weights (vs fp32) | "
        + " | ".join(f"peak training, micro-batch {mb} x 512 | smallest GPU" for mb in micro_batches)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(micro_batches))]
    for name, m in table["models"].items():
        for prec, r in m["precisions"].items():
            cells = " | ".join(
                f"{r[f'peak_training_gib_mb{mb}']:.1f} GiB | {r[f'smallest_gpu_mb{mb}']}" for mb in micro_batches
            )
            lines.append(
                f"| {name} | {prec} | {r['base_weights_gib']:.1f} GiB ({r['weights_below_fp32']:.2f}x) | {cells} |"
            )
    return "\n".join(lines)


# --- the suite ------------------------------------------------------------------------------------
def charts(result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = common.RESULTS  # looked up at call time, as write_result does
    out.mkdir(parents=True, exist_ok=True)
    subjects = list(result["subjects"])
    metrics = [
        ("base_weight_bytes", "base weight bytes (MB)", 1e-6),
        ("held_out_loss", "held-out loss", 1),
        ("token_agreement", "greedy agreement, first 32", 1),
        ("train_tokens_per_cpu_s", "train tokens / CPU-s", 1),
        ("generate_tokens_per_cpu_s", "generated tokens / CPU-s", 1),
    ]
    fig, axes = plt.subplots(
        len(subjects), len(metrics), figsize=(3.2 * len(metrics), 3.0 * len(subjects)), squeeze=False
    )
    colors = ["#4878a8", "#e07b39", "#6aa84f", "#a64d79"]
    for i, s in enumerate(subjects):
        rows = result["subjects"][s]["precisions"]
        for j, (key, label, scale) in enumerate(metrics):
            ax = axes[i][j]
            vals = [rows[p][key] * scale for p in PRECISIONS]
            bars = ax.bar(PRECISIONS, vals, color=colors)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_title(f"{s}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
            if key == "held_out_loss":
                ax.set_ylim(min(vals) * 0.97, max(vals) * 1.01)
    fig.tight_layout()
    path = out / "quantize.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    models = list(result["memory"]["models"])
    x = np.arange(len(models))
    for k, prec in enumerate(PRECISIONS):
        vals = [result["memory"]["models"][m]["precisions"][prec]["peak_training_gib_mb1"] for m in models]
        bars = ax.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=prec, color=colors[k])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    for cap, _ in GPUS:
        ax.axhline(cap, color="#999", lw=0.6, ls="--")
    ax.set_xticks(x, models)
    ax.set_ylabel("GiB")
    ax.set_title("peak training memory, micro-batch 1 x 512 (computed); dashed: GPU sizes")
    ax.legend()
    fig.tight_layout()
    mem = out / "quantize-memory.png"
    fig.savefig(mem, dpi=110)
    plt.close(fig)
    return [str(path), str(mem)]


def run(quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see Clock
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict:
    torch.manual_seed(0)
    result = {"what": __doc__.split("\n\n")[0], "subjects": {}}
    bases, tok = stories_bases()
    result["subjects"]["stories260K"] = measure_subject(
        "stories260K",
        bases,
        tok.path,
        tok.eos_id,
        AdapterConfig(adapter_len=10, adapter_layers=5),
        steps=20 if quick else 300,
        lr=1e-2,
        max_seq_len=256,
        speed_steps=2 if quick else 10,
        n_gen=4 if quick else 16,
        rounds=1 if quick else 3,
    )
    tiny = tiny_shape_bases()
    tokenizer = str(SHARED_DATA / "tokenizer.model")
    from adapter.tokenizer import Tokenizer

    result["subjects"]["tiny-shape"] = measure_subject(
        "tiny-shape",
        tiny,
        tokenizer,
        Tokenizer(tokenizer).eos_id,
        AdapterConfig(adapter_len=SHAPE["adapter_len"], adapter_layers=SHAPE["adapter_layers"]),
        steps=10 if quick else 200,
        lr=1e-2,
        max_seq_len=256,
        speed_steps=2 if quick else 6,
        n_gen=4 if quick else 8,
        rounds=1 if quick else 3,
    )
    # The memory formula against what the small bases measurably hold.
    for s, b in (("stories260K", bases), ("tiny-shape", tiny)):
        args = b["fp32"].args
        result["subjects"][s]["computed_vs_measured_bytes"] = {
            p: {"computed": base_weight_bytes(args, m, 4), "measured": weight_bytes(b[p])}
            for p, m in (("fp32", "none"), ("int8", "int8"), ("int4", "int4"))
        }
    result["memory"] = memory_table()
    result["memory_markdown"] = markdown_memory(result["memory"])
    result["charts"] = charts(result)
    write_result("quantize", result)
    print(result["memory_markdown"])
    return result


if __name__ == "__main__":
    run()
