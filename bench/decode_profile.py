"""Where a decode step's time goes: torch's profiler over steady decode steps of the serving engine
(serve/engine.py, adapter/decode_step.py), one torch thread, every row decoding (prefill done
before the profiled steps), and the bytes of weights one step reads. Writes
bench/results/decode-profile-<base>.json: per operator, its share of the step's CPU time, and
the step's effective weight bandwidth (weight bytes / matrix-product time).

Why it exists: it says whether a faster decode step on this CPU is a matter of fewer Python
operations (the fused step's subject) or of fewer bytes per weight (docs/serving-performance.md).
`python -m bench.decode_profile [--base FILE_OR_DIR] [--batch 8]` (default: the SmolLM2 catalogue file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adapter.base_weights import load_base
from adapter.decoding import SamplingParams
from adapter.models import fetch
from bench.common import write_result
from bench.decode_bench import NO_EOS, alpaca_prompts, base_slug, tokenizer_of
from serve.engine import Engine

MATMULS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")


def run(base_path: Path | None = None, batch: int = 8, steps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    base_path = base_path or fetch("SmolLM2-135M-Instruct")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = load_base(base_path).eval().requires_grad_(False)
        prompts = alpaca_prompts(tokenizer_of(base_path), batch)
        engine = Engine(base, NO_EOS, batch, step_tokens=sum(map(len, prompts)))
        engine.warm_up()
        for p in prompts:
            engine.add(p, SamplingParams(max_gen_len=3 * steps + 4, temperature=0.0))
        engine.step()  # every prompt prefilled in one step; from here on every step decodes `batch` rows
        engine.step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            engine.step()
        wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
    finally:
        torch.set_num_threads(threads)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in ops)
    matmul_us = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    matmul_s_per_step = matmul_us / 1e6 / steps
    result = {
        "what": f"steady decode steps of the serving engine, {batch} rows, one torch thread, fp32 (measured)",
        "base": str(Path(base_path).name),
        "batch": batch,
        "profiled_steps": steps,
        "step_ms_wall": round(1e3 * wall, 2),
        "step_ms_cpu": round(1e3 * cpu, 2),
        "matmul_share": round(matmul_us / total_us, 3),
        "weight_mb_read_per_step": round(weight_bytes / 1e6, 1),
        "weight_gb_per_s_in_matmuls": round(weight_bytes / 1e9 / matmul_s_per_step, 2),
        "ops": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total_us, 4), "calls_per_step": e.count / steps}
            for e in ops[:15]
        ],
    }
    write_result(f"decode-profile-{base_slug(base_path)}", result)
    return result


def main(argv: list[str] | None = None) -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", type=Path, default=None, help="checkpoint (default: the SmolLM2 catalogue file)")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.base, a.batch), indent=2))


if __name__ == "__main__":
    main()
