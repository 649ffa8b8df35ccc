"""COCO Caption (docs/multimodal.md): caption annotations + image folders -> training records, and
the evaluation (BLEU-1..4, CIDEr-D on greedy captions).

Inputs under `data.source` (paths in the `coco:` section): COCO's `captions_*.json` (images with
`id` / `file_name`, annotations with `image_id` / `caption`) and their image folders; or, when
`coco.karpathy_split` names Karpathy's `dataset_coco.json`, its splits (train + restval for
training, val held out, test for evaluation) with images under `<source>/<filepath>/<filename>`.
One training record per (image, caption): the prompt is `coco.instruction` in the Alpaca template,
the target the caption. `data.limit` keeps the first N images of each split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import ray

from adapter.loader import tokenizer_for
from adapter.settings import project_path
from adapter.tokenizer import load_tokenizer
from pipelines.data.record_output import (
    FORMAT_VERSION,
    OUTPUT_SCHEMA,
    from_rows,
    listing_digest,
    new_rows,
    read_image,
    set_record,
    sha256_file,
    write_output,
)
from pipelines.datasets.caption_metrics import score_captions
from pipelines.evaluation.llama_predictor import predict
from pipelines.job_config import TrainConfig
from pipelines.tasks.base import LlamaTask

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class CocoFormatError(ValueError):
    """An annotation file that is not COCO captions; the message says where."""


def read_captions(path: Path) -> list[dict]:
    """[{key, file, captions}] per image, in the file's image order; images without a caption dropped."""
    try:
        data = json.loads(Path(path).read_text())
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            if isinstance(a.get("caption"), str) and a["caption"].strip():
                caps.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CocoFormatError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return [{"key": str(i), "file": f, "captions": caps[i]} for i, f in images.items() if i in caps]


def read_karpathy(path: Path, split: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
        return [
            {
                "key": str(im["cocoid"]),
                "file": f"{im['filepath']}/{im['filename']}",
                "captions": [s["raw"].strip() for s in im["sentences"] if s["raw"].strip()],
            }
            for im in data["images"]
            if im["split"] in KARPATHY_SPLITS[split]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CocoFormatError(f"{path}: not a Karpathy split file ({type(e).__name__}: {e})") from None


def split_images(cfg: TrainConfig, split: str, limit: int | None = None) -> list[dict]:
    """Images of `split` ({key, path, captions}); without a Karpathy file, `test` means val."""
    source, c = Path(project_path(cfg.data.source)), cfg.coco
    if c.karpathy_split:
        items, root = read_karpathy(source / c.karpathy_split, split), source
    elif split == "train":
        items, root = read_captions(source / c.train_captions), source / c.train_images
    elif split in ("val", "test"):
        items, root = read_captions(source / c.val_captions), source / c.val_images
    else:
        raise ValueError(f"COCO has no split {split!r} (train, val, test)")
    return [{**it, "path": str(root / it["file"])} for it in items[:limit]]


def input_rows(cfg: TrainConfig) -> list[dict]:
    rows = []
    for split in ("train", "val"):
        for im in split_images(cfg, split, cfg.data.limit):
            for cap in im["captions"]:
                rows.append(
                    {"idx": len(rows), "key": im["key"], "split": split, "caption": cap, "image_path": im["path"]}
                )
    return rows


class EncodeCaptions:
    """Ray Data callable class: tokenizer loaded once per actor; each image read and checked once a batch."""

    def __init__(self, tokenizer: str, max_seq_len: int, prompt: str):
        self.tok, self.max_seq_len, self.prompt = load_tokenizer(tokenizer), max_seq_len, prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = new_rows(batch.num_rows)
        rows["idx"], rows["key"] = batch.column("idx").to_pylist(), batch.column("key").to_pylist()
        seen: dict[str, tuple] = {}
        for i, (split, cap, path) in enumerate(
            zip(
                batch.column("split").to_pylist(),
                batch.column("caption").to_pylist(),
                batch.column("image_path").to_pylist(),
            )
        ):
            if path not in seen:
                seen[path] = read_image(path)
            image, reason, detail = seen[path]
            if reason:
                rows["reject_reason"][i], rows["reject_detail"][i] = reason, detail
                continue
            set_record(rows, i, self.tok, self.prompt, cap, self.max_seq_len, split, image)
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


class Coco(LlamaTask):
    name = "coco"
    description = "COCO Caption with the image token (BLEU-1..4, CIDEr-D)"
    prompt_template = "alpaca"

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if getattr(cfg, "vision", False) is None:
            raise ValueError("task 'coco' captions images: it needs a `vision` section (the image encoder)")

    def fingerprint(self, cfg: TrainConfig) -> dict:
        source, c = Path(cfg.data.source), cfg.coco
        files = [c.karpathy_split] if c.karpathy_split else [c.train_captions, c.val_captions]
        return {
            "format": FORMAT_VERSION,
            "task": "coco",
            "annotations_sha256": {f: sha256_file(source / f) for f in files},
            "images": listing_digest(sorted({Path(r["image_path"]) for r in input_rows(cfg)})),
            "instruction": c.instruction,
            "tokenizer_sha256": sha256_file(tokenizer_for(cfg.model).path),
            "max_seq_len": cfg.data.max_seq_len,
            "limit": cfg.data.limit,
        }

    def build_records(self, cfg: TrainConfig) -> dict:
        t0 = time.time()
        rows = input_rows(cfg)
        if not rows:
            raise ValueError(f"{cfg.data.source}: no captioned images in the train / val splits")
        processed = (
            from_rows(rows)
            .map_batches(
                EncodeCaptions,
                fn_constructor_args=(
                    str(tokenizer_for(cfg.model).path),
                    cfg.data.max_seq_len,
                    self.prompt(cfg.coco.instruction),
                ),
                batch_format="pyarrow",
                batch_size=256,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
            )
            .materialize()
        )
        images = {r["image_path"] for r in rows}
        extra = {"task": "coco", "source": cfg.data.source, "images": len(images)}
        return write_output(processed, Path(cfg.data.out), cfg, self.fingerprint(cfg), extra, t0)

    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        """Greedy captions by Ray Data batch inference, scored with the standard COCO caption
        metrics; writes metrics.json, captions.json (COCO's results format) and predictions.jsonl."""
        t0 = time.time()
        images = split_images(cfg, cfg.evaluation.split, cfg.evaluation.limit)
        if not images:
            raise ValueError(f"no captioned images in COCO split {cfg.evaluation.split!r}")
        prompt = self.prompt(cfg.coco.instruction)
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
        (out / "captions.json").write_text(
            json.dumps([{"image_id": int(k) if k.isdigit() else k, "caption": c} for k, c in hyps.items()])
        )
        with open(out / "predictions.jsonl", "w") as f:
            for im in images:
                p = preds[im["key"]]
                line = {"image_id": im["key"], "caption": hyps[im["key"]], "references": im["captions"]}
                f.write(json.dumps({**line, "error": p["error"] or None}) + "\n")
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
        scores = ", ".join(f"{k} {v}" for k, v in result["metrics_x100"].items())
        result["report"] = (
            f"[evaluate] COCO {result['split']}: {scores} on {len(images)} images "
            f"({len(errors)} errors, {result['images_per_s']} images/s) -> {out}"
        )
        return result
