"""`python -m bench.run --suite NAME|all [--quick]`: run benchmark suites, write bench/results/.

Benchmarks never run in CI; `--quick` is a tiny setting for smoke checks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

SUITES = (
    "train-vs-peft",
    "projection",
    "preprocess",
    "serve",
    "serve-smollm2",
    "gpu-check",
    "quantize",
    "quantize-smollm2",
    "multimodal",
    "decode",
    "chunked-prefill",
    "chunked-prefill-smollm2",
    "zero-init-comparison",
    "zero-init-ablation",
    "squad-minilm",
)


def run_suite(name: str, quick: bool = False, budget: str | None = None) -> dict:
    if name == "train-vs-peft":
        from bench.train_vs_peft import run
    elif name == "projection":
        from bench.projection import run
    elif name == "preprocess":
        from bench.preprocess_bench import run
    elif name in ("serve", "serve-smollm2"):  # stories260K; the real SmolLM2 (engine level only)
        from bench.serve_bench import run

        run = functools.partial(run, subject=name)
    elif name == "gpu-check":
        from bench.gpu_check import run  # the tiny shape on CPU (or with --quick), LLaMA-7B on a GPU
    elif name == "quantize":
        from bench.quantize_bench import run  # fp32 / bf16 / int8 / int4 base: bytes, loss, agreement, CPU speed
    elif name == "quantize-smollm2":
        from bench.quantize_smollm2 import run  # the same on the real SmolLM2, with the README's trained adapter
    elif name == "multimodal":
        from bench.multimodal_bench import run  # COCO evaluation images/s; ScienceQA 8 x A100 projection
    elif name == "decode":
        from bench.decode_bench import run  # greedy decoding tokens/s, ours vs Hugging Face generate
    elif name in ("chunked-prefill", "chunked-prefill-smollm2"):
        from bench.chunked_prefill_bench import run  # inter-token latency of running streams while long prompts arrive

        run = functools.partial(run, subject=name)
    elif name == "zero-init-comparison":
        from bench.zero_init_comparison import run  # ViT / RoBERTa: zero-init vs gate fixed at 1 vs linear probe
    elif name == "zero-init-ablation":
        from bench.zero_init_ablation import run  # SmolLM2: zero-init vs random-init vs no gating (ScienceQA, Alpaca)

        return run(quick=quick, budget=budget)
    elif name == "squad-minilm":
        from bench.squad_minilm import run  # the comparison on the real MiniLM and real SQuAD (split of dev)

        return run(quick=quick, budget=budget)
    else:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    if budget:
        raise ValueError(f"suite {name!r} has no --budget")
    return run(quick=quick)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="all", choices=SUITES + ("all",))
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke check), not for reporting")
    ap.add_argument(
        "--budget",
        help="squad-minilm: cpu / large / reduced / quick (bench/squad_minilm.py); zero-init-ablation: cpu / session / "
        "quick (bench/zero_init_ablation.py)",
    )
    a = ap.parse_args(argv)
    with_budget = ("squad-minilm", "zero-init-ablation")
    if a.budget and a.suite not in with_budget:
        ap.error(f"--budget is a setting of the {' and '.join(with_budget)} suites, not {a.suite}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in SUITES if a.suite == "all" else (a.suite,):
        try:
            result = run_suite(name, a.quick, a.budget if name in with_budget else None)
        except FileNotFoundError as e:  # a suite whose input is made by a command of its own (it says which)
            if a.suite != "all":
                raise SystemExit(f"[bench] {name}: {e}") from None
            print(f"[bench] {name} skipped: {e}", flush=True)
            continue
        print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2)[:3000])


if __name__ == "__main__":
    main()
