"""COCO Caption (METHOD.md section 7): caption annotations + image folders -> training records.

    python -m pipelines.coco --config coco-tiny-cpu     # on its own; pipelines.train calls it too

Inputs under `data.source` (paths in the `coco:` section): COCO's `captions_*.json` (images with
`id` / `file_name`, annotations with `image_id` / `caption`) and their image folders; or, when
`coco.karpathy_split` names Karpathy's `dataset_coco.json`, its splits (train + restval for
training, val held out, test for evaluation) with images under `<source>/<filepath>/<filename>`.
One training record per (image, caption): the prompt is `coco.instruction` in the Alpaca template,
the target the caption. `data.limit` keeps the first N images of each split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa

from adapter.prompts import format_prompt
from adapter.settings import add_config_args, config_from_args, project_path
from adapter.tokenizer import Tokenizer
from pipelines.config import TrainConfig
from pipelines.multimodal_data import (
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

    def __init__(self, tokenizer: str, max_seq_len: int, instruction: str):
        self.tok, self.max_seq_len = Tokenizer(tokenizer), max_seq_len
        self.prompt = format_prompt(instruction)

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


def fingerprint(cfg: TrainConfig) -> dict:
    source, c = Path(project_path(cfg.data.source)), cfg.coco
    files = [c.karpathy_split] if c.karpathy_split else [c.train_captions, c.val_captions]
    return {
        "format": FORMAT_VERSION,
        "task": "coco",
        "annotations_sha256": {f: sha256_file(source / f) for f in files},
        "images": listing_digest(sorted({Path(r["image_path"]) for r in input_rows(cfg)})),
        "instruction": c.instruction,
        "tokenizer_sha256": sha256_file(Path(project_path(cfg.model.tokenizer))),
        "max_seq_len": cfg.data.max_seq_len,
        "limit": cfg.data.limit,
    }


def run(cfg: TrainConfig) -> dict:
    """Preprocess into cfg.data.out (Ray must be running); returns the stats written to stats.json."""
    import ray

    t0 = time.time()
    rows = input_rows(cfg)
    if not rows:
        raise ValueError(f"{cfg.data.source}: no captioned images in the train / val splits")
    processed = (
        from_rows(rows)
        .map_batches(
            EncodeCaptions,
            fn_constructor_args=(project_path(cfg.model.tokenizer), cfg.data.max_seq_len, cfg.coco.instruction),
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
        )
        .materialize()
    )
    images = {r["image_path"] for r in rows}
    return write_output(
        processed,
        Path(project_path(cfg.data.out)),
        cfg,
        fingerprint(cfg),
        {"task": "coco", "source": cfg.data.source, "images": len(images)},
        t0,
    )


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="coco-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k != "fingerprint"}, indent=2))
    return stats


if __name__ == "__main__":
    # Run it as `pipelines.coco`, not `__main__`: what this module hands to Ray workers must be
    # importable there by its module name.
    from pipelines.coco import main as _main

    _main()
