"""Image classification with zero-init prompts on a frozen ViT (docs/encoders.md): an image folder
(`<source>/train/<class>/...`, optional `val/`), top-1 accuracy on `encoder.eval_source` (default
`<source>/test`, else `val`).

Records: `image` (the file's bytes, checked decodable here) and `label`; held out: the folder's
val/ split, else a seeded hash split of train/ by path (pipelines/data/splits.py).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from adapter.backbones.adapted import AdaptedViT, adapt_vit, load_encoder_adapter, read_encoder_metadata, vit_spec
from adapter.backbones.vit import load_vit, preprocess_images
from adapter.image_encoder import ImageError, decode_image
from pipelines.data.record_output import from_rows, listing_digest, read_image, write_output
from pipelines.data.splits import held_out
from pipelines.datasets.image_folder import list_image_folder
from pipelines.evaluation.actor_pool import map_with_actor_pool
from pipelines.job_config import TrainConfig
from pipelines.tasks.base import BackboneTask

FORMAT_VERSION = 2  # 2: the held-out split is the project's one hash rule (pipelines/data/splits.py)
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
DECODE_CHUNK = 256  # images decoded and preprocessed at a time (bounded memory)


# --- image folders --------------------------------------------------------------------------------
def image_rows(cfg: TrainConfig) -> tuple[list[str], list[dict]]:
    root = Path(cfg.data.source)
    classes, items, rejects = list_image_folder(root / "train")
    split_of = {rel: "val" if held_out((rel,), cfg.data.val_fraction, cfg.data.seed) else "train" for rel, _ in items}
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


def decode_pixels(images: list[bytes], shape) -> torch.Tensor:
    """Image file bytes -> (N, 3, S, S), preprocessed once per run (the backbone is frozen)."""
    if not images:
        return torch.zeros(0, 3, shape.image_size, shape.image_size)
    chunks = [images[i : i + DECODE_CHUNK] for i in range(0, len(images), DECODE_CHUNK)]
    return torch.cat([preprocess_images([decode_image(b) for b in c], shape) for c in chunks])


def eval_images(cfg: TrainConfig) -> tuple[list[dict], dict]:
    """(rows: key, label, image bytes; facts about the split) for the image-folder split evaluated."""
    root = Path(cfg.data.source)
    folder = (
        Path(cfg.encoder.eval_source)
        if cfg.encoder.eval_source
        else (root / "test" if (root / "test").is_dir() else root / "val")
    )
    classes, items, rejects = list_image_folder(folder)
    if cfg.evaluation.limit:  # a seeded sample across classes (items are sorted by class)
        items = sorted(random.Random(0).sample(items, min(cfg.evaluation.limit, len(items))))
    rows = [{"key": rel, "label": label, "image": (folder / rel).read_bytes()} for rel, label in items]
    return rows, {"split": str(folder), "classes": classes, "set_aside": [{"path": p, "reason": r} for p, r in rejects]}


class Classifier:
    """Ray Data actor: the frozen ViT + adapter (loaded once), top-1 per image; a bad file fails its row."""

    def __init__(self, task: ImageClassification, train_config: dict, adapter_path: str):
        import ray

        self.cfg = TrainConfig.model_validate(train_config)
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")  # the GPU Ray reserved, if any
        self.model, self.device = task.load_adapted(self.cfg, adapter_path, device), device

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        preds, errors, images, live = np.full(n, -1), [""] * n, [], []
        for i, data in enumerate(batch["image"]):
            try:
                images.append(decode_image(bytes(data)))
                live.append(i)
            except ImageError as err:
                errors[i] = f"image_error: {err}"
        if live:
            logits = self.model.logits(preprocess_images(images, self.cfg.encoder.vit).to(self.device))
            preds[live] = logits.argmax(-1).cpu().numpy()
        return {"key": batch["key"], "label": batch["label"], "pred": preds, "error": np.array(errors, dtype=object)}


class ImageClassification(BackboneTask):
    name = "image-classification"
    description = "image-folder classification on a frozen ViT (top-1)"

    def fingerprint(self, cfg: TrainConfig, images: tuple[list[str], list[dict]] | None = None) -> dict:
        """images: `image_rows(cfg)` when the caller has it already (listing a large folder costs)."""
        classes, rows = images or image_rows(cfg)
        d = cfg.data
        return {
            "format": FORMAT_VERSION,
            "task": self.name,
            "val_fraction": d.val_fraction,
            "seed": d.seed,
            "limit": d.limit,
            "images": listing_digest([Path(r["path"]) for r in rows if r["path"]]),
            "classes": classes,
        }

    def build_records(self, cfg: TrainConfig) -> dict:
        t0 = time.time()
        classes, rows = image_rows(cfg)
        if not rows:
            raise ValueError(f"{cfg.data.source}: no records for task {self.name}")
        processed = from_rows(rows).map_batches(read_images, batch_format="pyarrow", batch_size=64)
        extra = {"task": self.name, "source": cfg.data.source, "classes": classes}
        fp = self.fingerprint(cfg, (classes, rows))
        columns = ["idx", "key", "label", "image"]
        return write_output(processed.materialize(), Path(cfg.data.out), cfg, fp, extra, t0, columns)

    # --- the model ---------------------------------------------------------------------------------
    def build_model(self, cfg: TrainConfig, device, labels: list[str] | None = None):
        e = cfg.encoder
        base = load_vit(e.weights, e.vit, device=device)
        model = adapt_vit(base, e.adapter, labels, weights=e.weights)
        return base, model, f"frozen ViT {e.vit.hidden_dim}x{e.vit.num_layers} from {Path(e.weights).name}"

    def load_adapted(self, cfg: TrainConfig, adapter_path: str, device) -> AdaptedViT:
        e = cfg.encoder
        vit = load_vit(e.weights, e.vit, device=device)
        adapter = load_encoder_adapter(adapter_path, vit_spec(vit, e.weights), device=device, backbone_module=vit)
        return AdaptedViT(vit, adapter).eval()

    def inputs(self, cfg: TrainConfig, split: dict) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": decode_pixels(split.get("image", []), cfg.encoder.vit),
            "labels": torch.tensor(split.get("label", []), dtype=torch.long),
        }

    def batch_loss(self, model, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.logits(x["pixel_values"])
        loss = torch.nn.functional.cross_entropy(logits, x["labels"])
        return loss, (logits.argmax(-1) == x["labels"]).sum()

    # --- evaluation --------------------------------------------------------------------------------
    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        """Top-1 on the evaluation split, its classes matched to the adapter's by name; writes
        metrics.json and predictions.jsonl; a row that fails is listed, not fatal."""
        t0 = time.time()
        rows, facts = eval_images(cfg)
        labels = read_encoder_metadata(adapter)["labels"]
        if facts["classes"] != labels:
            raise ValueError(f"{facts['split']} has classes {facts['classes']}, the adapter was trained on {labels}")
        t_pred = time.time()
        args = (self, cfg.model_dump(mode="json"), adapter)
        preds = sorted(
            map_with_actor_pool(pa.Table.from_pylist(rows), Classifier, args, cfg.evaluation), key=lambda r: r["key"]
        )
        pred_s = time.time() - t_pred
        correct = [int(r["pred"]) == int(r["label"]) and not r["error"] for r in preds]
        per_class = Counter(labels[int(r["label"])] for r in preds)
        right = Counter(labels[int(r["label"])] for r, ok in zip(preds, correct) if ok)
        result = {
            **facts,
            "task": self.name,
            "adapter": adapter,
            "gate": cfg.encoder.adapter.gate,
            "top1": round(100 * sum(correct) / max(1, len(preds)), 2),
            "per_class_top1": {c: round(100 * right[c] / per_class[c], 2) for c in labels if per_class[c]},
            "images": len(preds),
            "errors": [{"key": r["key"], "error": r["error"]} for r in preds if r["error"]],
            "images_per_s": round(len(preds) / pred_s, 2),
            "seconds": round(time.time() - t0, 2),
            "out": str(out),
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        with open(out / "predictions.jsonl", "w") as f:
            for r, ok in zip(preds, correct):
                pred = labels[int(r["pred"])] if int(r["pred"]) >= 0 else None
                line = {"key": r["key"], "label": labels[int(r["label"])], "pred": pred, "correct": ok}
                f.write(json.dumps({**line, "error": r["error"] or None}) + "\n")
        result["report"] = (
            f"[evaluate] top-1 {result['top1']}% on {result['images']} images of {result['split']} "
            f"({len(result['errors'])} errors, {result['images_per_s']} images/s) -> {out}"
        )
        return result
