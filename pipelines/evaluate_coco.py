"""COCO Caption evaluation job: one greedy caption per image by Ray Data batch inference, scored
with BLEU-1..4 and CIDEr-D (pipelines/caption_metrics.py) against all the image's references.

    python -m pipelines.evaluate_coco --config coco-tiny-cpu [--set evaluation.split=test]

Reads the same YAML as the training job. Writes to `evaluation.out` (default
`<output_dir>/<name>/eval-coco-<split>`): `metrics.json`, `captions.json` (COCO's results format,
[{image_id, caption}]) and `predictions.jsonl` (each image: caption, references, error). An image
that cannot be read gets an empty caption (it scores nothing) and is listed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from adapter.prompts import format_prompt
from adapter.settings import add_config_args, config_from_args
from pipelines.caption_metrics import score_captions
from pipelines.coco import split_images
from pipelines.config import TrainConfig
from pipelines.evaluate_scienceqa import default_paths


def run(cfg: TrainConfig) -> dict:
    from pipelines.multimodal_predict import predict
    from pipelines.train import with_absolute_paths

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    adapter, out = default_paths(cfg, "coco")
    images = split_images(cfg, cfg.evaluation.split, cfg.evaluation.limit)
    if not images:
        raise ValueError(f"no captioned images in COCO split {cfg.evaluation.split!r}")
    prompt = format_prompt(cfg.coco.instruction)
    rows = []
    for im in images:
        path = Path(im["path"])
        # A missing file goes in as an empty image: the predictor fails that row alone, by name.
        rows.append({"key": im["key"], "prompt": prompt, "image": path.read_bytes() if path.is_file() else b""})
    t_pred = time.time()
    preds = {r["key"]: r for r in predict(cfg, adapter, rows)}
    pred_s = time.time() - t_pred
    hyps = {im["key"]: preds[im["key"]]["generation"].strip() for im in images}
    metrics = score_captions({im["key"]: im["captions"] for im in images}, hyps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "captions.json").write_text(
        json.dumps([{"image_id": int(k) if k.isdigit() else k, "caption": c} for k, c in hyps.items()])
    )
    with open(out / "predictions.jsonl", "w") as f:
        for im in images:
            p = preds[im["key"]]
            f.write(
                json.dumps(
                    {
                        "image_id": im["key"],
                        "caption": hyps[im["key"]],
                        "references": im["captions"],
                        "error": p["error"] or None,
                    }
                )
                + "\n"
            )
    errors = [{"image_id": k, "error": p["error"]} for k, p in preds.items() if p["error"]]
    result = {
        "split": cfg.evaluation.split,
        "adapter": adapter,
        "images": len(images),
        "metrics": metrics,
        "metrics_x100": {k: round(100 * v, 2) for k, v in metrics.items()},
        "errors": errors,
        "empty_captions": sum(1 for h in hyps.values() if not h),
        "predict_seconds": round(pred_s, 2),
        "images_per_s": round(len(images) / pred_s, 2),
        "actors": cfg.evaluation.actors,
        "seconds": round(time.time() - t0, 2),
        "out": str(out),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="coco-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    result = run(cfg)
    m = result["metrics_x100"]
    print(
        "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D |\n|---|---|---|---|---|\n"
        f"| {m['BLEU-1']} | {m['BLEU-2']} | {m['BLEU-3']} | {m['BLEU-4']} | {m['CIDEr-D']} |"
    )
    print(
        f"[evaluate] {result['images']} images, {len(result['errors'])} errors, {result['images_per_s']} images/s "
        f"-> {result['out']}"
    )
    return result


if __name__ == "__main__":
    # Run it as `pipelines.evaluate_coco`, not `__main__`: what this module hands to Ray workers must be
    # importable there by its module name.
    from pipelines.evaluate_coco import main as _main

    _main()
