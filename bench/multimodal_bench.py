"""Suite `multimodal`: (1) image throughput of the COCO evaluation job (Ray Data batch inference,
model in an actor pool) with 1 vs 2 CPU actors, on coco-mini val with the tiny CPU config's trained
adapter; (2) the paper's ScienceQA run (LLaMA-7B + CLIP ViT-L/14, 5 epochs, 8 x A100) PROJECTED
from token counts measured on the real shared problems with the real LLaMA tokenizer.

    python -m pipelines.train --config coco-tiny-cpu      # once: the adapter (1) uses
    python -m bench.multimodal_bench [--quick]

Nothing here ran on a GPU: the 8 x A100 time is FLOPs / (peak x an ASSUMED utilisation).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from adapter.adapter import AdapterConfig
from adapter.flops import training_flops_per_token
from adapter.model_args import preset
from adapter.tokenizer import Tokenizer
from bench.common import SHARED_DATA, write_result

PEAK_A100_BF16 = 312e12
GPUS = 8
EPOCHS = 5
MFU_ASSUMED = 0.35
PAPER_TRAIN_PROBLEMS = 12_726  # ScienceQA's train split (docs/multimodal.md)
# CLIP ViT-L/14 at 224 px: 24 blocks of width 1024 (~303M weights) over 257 tokens; forward only,
# once per image per run (the tower is frozen and the recipe encodes each image once).
CLIP_L14_PARAMS = 303_000_000
CLIP_L14_TOKENS = 257


def scienceqa_projection() -> dict:
    from pipelines.tasks.scienceqa import answer_text, check_problem, format_problem

    src = SHARED_DATA / "scienceqa"
    problems = json.loads((src / "problems.json").read_text())
    train = json.loads((src / "pid_splits.json").read_text())["train"]
    tok = Tokenizer(SHARED_DATA / "tokenizer.model")
    lengths, responses, images = [], [], 0
    for pid in train:
        p = problems[pid]
        if check_problem(p):
            continue
        prompt, target = tok.encode(format_problem(p)), tok.encode(answer_text(p), bos=False)
        lengths.append(min(512, len(prompt) + len(target) + 1))
        responses.append(len(target) + 1)
        images += bool(p.get("image"))
    lengths = np.array(lengths)
    args = preset("llama-7b")
    cfg = AdapterConfig(10, 30)
    resp_fraction = float(np.sum(responses) / lengths.sum())
    per_token = training_flops_per_token(
        args, cfg.layers_for(args), cfg.adapter_len, float(lengths.mean()), resp_fraction
    )
    scale = PAPER_TRAIN_PROBLEMS / len(lengths)
    tokens = float(lengths.sum()) * scale * EPOCHS
    image_count = images * scale
    llm_flop = tokens * per_token
    clip_flop = image_count * 2 * CLIP_L14_PARAMS * CLIP_L14_TOKENS
    peak = GPUS * PEAK_A100_BF16
    return {
        "measured_on": f"{len(lengths)} real train problems of the shared ScienceQA subset, LLaMA tokenizer",
        "tokens_per_problem": {
            "mean": float(lengths.mean()),
            "p50": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "response_fraction": resp_fraction,
        "with_image_fraction": images / len(lengths),
        "projected_tokens_5_epochs": tokens,
        "projected_images_encoded": image_count,
        "flop": {"llm_train": llm_flop, "clip_forward": clip_flop},
        "minutes_at_35pct_mfu": (llm_flop + clip_flop) / (peak * MFU_ASSUMED) / 60,
        "assumptions": [
            f"{PAPER_TRAIN_PROBLEMS:,} train problems with the subset's mean length and image share",
            "training FLOPs per token from adapter/flops.py (frozen base, activation-only backward, logits at "
            "response positions only), batches padded to the mean length (no padding counted)",
            "CLIP ViT-L/14 forward 2 x 303M x 257 FLOPs per image, once per run",
            f"{GPUS} x {PEAK_A100_BF16 / 1e12:.0f} TFLOP/s at an ASSUMED {MFU_ASSUMED:.0%} utilisation; fixed costs "
            "(loading, evaluation, checkpoints) not included",
        ],
    }


def eval_throughput(quick: bool) -> dict:
    from adapter.settings import load_config
    from pipelines.evaluate import run
    from pipelines.job_config import TrainConfig
    from pipelines.ray_session import connect

    cfg = load_config(TrainConfig, "coco-tiny-cpu")
    adapter = Path("runs") / cfg.name / "adapter"
    if not adapter.is_dir():
        return {"skipped": f"{adapter} not found: run `python -m pipelines.train --config coco-tiny-cpu` first"}
    import ray

    # A private local cluster: on a shared machine `connect` would join whatever Ray is running.
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    connect(cfg.ray)
    out = {}
    for actors in (1, 2):
        e = cfg.evaluation.model_copy(
            update={
                "actors": actors,
                "cpus_per_actor": 1.0,
                "limit": 16 if quick else None,
                "out": f"runs/bench-eval-coco-{actors}",
            }
        )
        t0 = time.time()
        r = run(cfg.model_copy(update={"evaluation": e}))
        out[f"{actors}_actor"] = {
            "images": r["images"],
            "images_per_s": r["images_per_s"],
            "job_seconds": round(time.time() - t0, 1),
            "load_average_1min": os.getloadavg()[0],
        }
    return out


def run(quick: bool = False) -> dict:
    result = {
        "what": "COCO evaluation job images/s with 1 vs 2 CPU actors (MEASURED on this machine); ScienceQA "
        "8 x A100 training time PROJECTED from measured token counts",
        "eval_throughput": eval_throughput(quick),
        "scienceqa_8xa100_projection": scienceqa_projection(),
    }
    path = write_result("multimodal", result)
    return json.loads(path.read_text())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    r = run(ap.parse_args().quick)
    print(json.dumps({k: v for k, v in r.items() if k != "machine"}, indent=2))
