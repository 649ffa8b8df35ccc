"""Training records of the encoder tasks (METHOD.md section 8) through Ray Data: an image folder
for the ViT (task image-classification) and SQuAD for RoBERTa (task squad).

    python -m pipelines.encoder_data --config configs/vit-digits-tiny-cpu.yaml

Output as the other tasks': `<out>/train/*.parquet`, `<out>/val/*.parquet`, rejects.jsonl and
stats.json (with the fingerprint the training job compares, written last, in a folder swapped in
whole). Images: `image` (the file's bytes, checked decodable here) and `label`; held out: the
folder's val/ split, else a hash split of train/ by path. SQuAD: one record per token window
(input_ids, attention_mask, start_positions, end_positions; pipelines/squad_data.py), held out by a
hash of the question id, so every window of a question lands on the same side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import pyarrow as pa

from adapter.settings import add_config_args, config_from_args, project_path
from pipelines.config import TrainConfig
from pipelines.multimodal_data import from_rows, listing_digest, read_image, sha256_file, write_output

FORMAT_VERSION = 1
IMAGE_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)
SQUAD_COLUMNS = ["input_ids", "attention_mask", "start_positions", "end_positions"]
SQUAD_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("key", pa.string()),
        ("split", pa.string()),
        *[(c, pa.list_(pa.int32())) for c in SQUAD_COLUMNS[:2]],
        *[(c, pa.int64()) for c in SQUAD_COLUMNS[2:]],
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)
WINDOWS_PER_QUESTION = 1000  # record idx = question index x this + window: unique, in reading order


def held_out(key: str, fraction: float, seed: int) -> bool:
    """A stable split by content: the same key lands on the same side on every run and machine."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# --- image folders --------------------------------------------------------------------------------
def image_rows(cfg: TrainConfig) -> tuple[list[str], list[dict]]:
    from pipelines.image_folder import list_image_folder

    root = Path(project_path(cfg.data.source))
    classes, items, rejects = list_image_folder(root / "train")
    split_of = {rel: "val" if held_out(rel, cfg.data.val_fraction, cfg.data.seed) else "train" for rel, _ in items}
    rows = [
        {"key": f"train/{rel}", "split": split_of[rel], "label": label, "path": str(root / "train" / rel), "reason": ""}
        for rel, label in items
    ]
    if (root / "val").is_dir():
        val_classes, val_items, val_rejects = list_image_folder(root / "val")
        if val_classes != classes:
            raise ValueError(f"{root}: val/ has classes {val_classes}, train/ has {classes}")
        rows = [{**r, "split": "train"} for r in rows]
        rows += [
            {"key": f"val/{rel}", "split": "val", "label": label, "path": str(root / "val" / rel), "reason": ""}
            for rel, label in val_items
        ]
        rejects += [(f"val/{rel}", why) for rel, why in val_rejects]
    if cfg.data.limit:  # a seeded sample of the training images, not the first classes in sorted order
        train = [r for r in rows if r["split"] == "train" or not (root / "val").is_dir()]
        keep = {r["key"] for r in random.Random(cfg.data.seed).sample(train, min(cfg.data.limit, len(train)))}
        rows = [r for r in rows if r["key"] in keep or r["key"].startswith("val/")]
    rows += [{"key": rel, "split": "", "label": -1, "path": "", "reason": why} for rel, why in rejects]
    return classes, [{**r, "idx": i} for i, r in enumerate(rows)]


def read_images(batch: pa.Table) -> pa.Table:
    """Each image's bytes, decoded once here so a training worker never meets a corrupt one."""
    out = {name: [] for name in IMAGE_SCHEMA.names}
    for r in batch.to_pylist():
        data, reason, detail = (None, r["reason"], r["key"]) if r["reason"] else read_image(r["path"])
        out["idx"].append(r["idx"])
        out["key"].append(r["key"])
        out["split"].append("" if reason else r["split"])  # a reject belongs to no split
        out["label"].append(r["label"])
        out["image"].append(data)
        out["reject_reason"].append(reason)
        out["reject_detail"].append(detail)
    return pa.Table.from_pydict(out, schema=IMAGE_SCHEMA)


# --- SQuAD ----------------------------------------------------------------------------------------
def squad_rows(cfg: TrainConfig) -> list[dict]:
    from pipelines.squad_data import read_squad

    source = Path(project_path(cfg.data.source))
    examples, rejects = read_squad(json.loads(source.read_text(encoding="utf-8")))
    examples = examples[: cfg.data.limit] if cfg.data.limit else examples
    rows = [
        {
            "idx": i * WINDOWS_PER_QUESTION,
            "id": e["id"],
            "question": e["question"],
            "context": e["context"],
            "answers": e["answers"],
            "answer_starts": e["answer_starts"],
            "is_impossible": e["is_impossible"],
            "split": "val" if held_out(e["id"], cfg.data.val_fraction, cfg.data.seed) else "train",
            "reason": "",
        }
        for i, e in enumerate(examples)
    ]
    n = len(rows)
    rows += [
        {
            "idx": (n + k) * WINDOWS_PER_QUESTION,
            "id": r["id"] or "",
            "question": "",
            "context": "",
            "answers": [],
            "answer_starts": [],
            "is_impossible": False,
            "split": "",
            "reason": r["reason"] + "\0" + r["detail"],
        }
        for k, r in enumerate(rejects)
    ]
    return rows


class SquadWindows:
    """Questions -> token windows with span labels (a Ray Data actor: the tokenizer loads once)."""

    def __init__(self, tokenizer_folder: str, max_len: int, doc_stride: int):
        from adapter.backbones.roberta import load_roberta_tokenizer

        self.tok, self.max_len, self.doc_stride = load_roberta_tokenizer(tokenizer_folder), max_len, doc_stride

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.squad_data import features_for_training, question_fits

        out = {name: [] for name in SQUAD_SCHEMA.names}
        for r in batch.to_pylist():
            if r["reason"]:
                reason, _, detail = r["reason"].partition("\0")
                self._append(out, r["idx"], r["id"], "", None, reason, detail)
                continue
            if not question_fits(r["question"], self.tok, self.max_len, self.doc_stride):
                self._append(
                    out,
                    r["idx"],
                    r["id"],
                    "",
                    None,
                    "question_too_long",
                    f"the question leaves no room for context in {self.max_len}-token windows "
                    f"(stride {self.doc_stride})",
                )
                continue
            f = features_for_training([r], self.tok, self.max_len, self.doc_stride)
            if len(f["example_id"]) >= WINDOWS_PER_QUESTION:
                self._append(
                    out,
                    r["idx"],
                    r["id"],
                    "",
                    None,
                    "too_many_windows",
                    f"{len(f['example_id'])} windows of {self.max_len} tokens",
                )
                continue
            for w in range(len(f["example_id"])):
                self._append(out, r["idx"] + w, r["id"], r["split"], {c: f[c][w] for c in SQUAD_COLUMNS}, "", "")
        return pa.Table.from_pydict(out, schema=SQUAD_SCHEMA)

    @staticmethod
    def _append(out: dict, idx: int, key: str, split: str, window: dict | None, reason: str, detail: str) -> None:
        out["idx"].append(idx)
        out["key"].append(key)
        out["split"].append(split)
        for c in SQUAD_COLUMNS:
            v = None if window is None else window[c]
            out[c].append(v.tolist() if hasattr(v, "tolist") else v)
        out["reject_reason"].append(reason)
        out["reject_detail"].append(detail)


# --- the job --------------------------------------------------------------------------------------
def fingerprint(cfg: TrainConfig, images: tuple[list[str], list[dict]] | None = None) -> dict:
    """images: `image_rows(cfg)` when the caller has it already (listing a large folder costs)."""
    source = Path(project_path(cfg.data.source))
    d = cfg.data
    common = {
        "format": FORMAT_VERSION,
        "task": cfg.task,
        "val_fraction": d.val_fraction,
        "seed": d.seed,
        "limit": d.limit,
    }
    if cfg.task == "image-classification":
        classes, rows = images or image_rows(cfg)
        return {**common, "images": listing_digest([Path(r["path"]) for r in rows if r["path"]]), "classes": classes}
    tokenizer = Path(project_path(cfg.encoder.weights)) / "tokenizer.json"
    return {
        **common,
        "squad_sha256": sha256_file(source),
        "max_seq_len": d.max_seq_len,
        "doc_stride": cfg.encoder.doc_stride,
        "tokenizer_sha256": sha256_file(tokenizer) if tokenizer.is_file() else None,
    }


def run(cfg: TrainConfig) -> dict:
    """Preprocess into cfg.data.out (Ray must be running); returns the stats written to stats.json."""
    import ray

    t0 = time.time()
    if cfg.task == "image-classification":
        classes, rows = image_rows(cfg)
        fp = fingerprint(cfg, (classes, rows))
        processed = from_rows(rows).map_batches(read_images, batch_format="pyarrow", batch_size=64)
        columns, extra = ["idx", "key", "label", "image"], {"classes": classes}
    else:
        rows = squad_rows(cfg)
        processed = from_rows(rows).map_batches(
            SquadWindows,
            fn_constructor_args=(project_path(cfg.encoder.weights), cfg.data.max_seq_len, cfg.encoder.doc_stride),
            batch_format="pyarrow",
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        )
        columns, extra = ["idx", "key", *SQUAD_COLUMNS], {"questions": sum(1 for r in rows if not r["reason"])}
        fp = fingerprint(cfg)
    if not rows:
        raise ValueError(f"{cfg.data.source}: no records for task {cfg.task}")
    return write_output(
        processed.materialize(),
        Path(project_path(cfg.data.out)),
        cfg,
        fp,
        {"task": cfg.task, "source": cfg.data.source, **extra},
        t0,
        columns,
    )


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="vit-digits-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k != "fingerprint"}, indent=2))
    return stats


if __name__ == "__main__":
    # Run it as `pipelines.encoder_data`, not `__main__`: what it hands to Ray workers must import by name.
    from pipelines.encoder_data import main as _main

    _main()
