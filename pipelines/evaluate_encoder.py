"""Evaluation of the encoder tasks (METHOD.md section 8) by Ray Data batch inference, the model
held in an actor pool: top-1 accuracy of an image-classification adapter on an image-folder split,
or SQuAD exact match / F1 (the official normalisation and v2.0 no-answer rule,
pipelines/squad_metrics.py) of a QA adapter on a SQuAD dev file.

    python -m pipelines.evaluate_encoder --config vit-digits-tiny-cpu

Reads the training YAML. Images: `encoder.eval_source` (default `<data.source>/test`, else `val`),
its classes matched to the adapter's by name. SQuAD: `encoder.eval_source` (a dev file); each
actor cuts its questions into windows, runs them and picks each question's answer, so nothing but
the answers returns to the driver. Writes `metrics.json` and `predictions.jsonl` to
`evaluation.out` (default `<output_dir>/<name>/eval-<task>`); a row that fails is listed, not fatal.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from adapter.settings import add_config_args, config_from_args, project_path
from pipelines.config import TrainConfig


class EncoderPredictor:
    """One frozen backbone + adapter per actor (loaded once), checked against each other by file."""

    def __init__(self, train_config: dict, adapter_path: str):
        import ray

        from adapter.backbones.adapted import AdaptedRoberta, AdaptedViT, load_encoder_adapter, roberta_spec, vit_spec

        cfg = TrainConfig.model_validate(train_config)
        self.cfg, e = cfg, cfg.encoder
        # The GPU Ray reserved for this actor, if any (evaluation.gpus_per_actor).
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        if cfg.task == "image-classification":
            from adapter.backbones.vit import load_vit

            vit = load_vit(e.weights, e.vit, device=self.device)
            adapter = load_encoder_adapter(adapter_path, vit_spec(vit, e.weights), device=self.device)
            self.model = AdaptedViT(vit, adapter)
        else:
            from adapter.backbones.roberta import load_roberta, load_roberta_tokenizer

            roberta = load_roberta(e.weights, device=self.device)
            adapter = load_encoder_adapter(adapter_path, roberta_spec(roberta, e.weights), device=self.device)
            self.model = AdaptedRoberta(roberta, adapter)
            self.tok = load_roberta_tokenizer(e.weights)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.cfg.task == "image-classification":
            return self.classify(batch)
        return self.answer(batch)

    def classify(self, batch: dict) -> dict:
        from adapter.backbones.vit import preprocess_images
        from adapter.image_encoder import ImageError, decode_image

        n = len(batch["key"])
        preds, errors, images, live = np.full(n, -1), [""] * n, [], []
        for i, data in enumerate(batch["image"]):
            try:
                images.append(decode_image(bytes(data)))
                live.append(i)
            except ImageError as err:  # a bad file fails its own row, not the batch
                errors[i] = f"image_error: {err}"
        if live:
            logits = self.model.logits(preprocess_images(images, self.cfg.encoder.vit).to(self.device))
            preds[live] = logits.argmax(-1).cpu().numpy()
        return {"key": batch["key"], "label": batch["label"], "pred": preds, "error": np.array(errors, dtype=object)}

    def answer(self, batch: dict) -> dict:
        from pipelines.squad_data import best_answers, features_for_eval, question_fits

        e, max_len = self.cfg.encoder, self.cfg.data.max_seq_len
        examples = [
            {"id": q, "question": qu, "context": c}
            for q, qu, c in zip(batch["id"], batch["question"], batch["context"])
        ]
        # A question too long for a window is answered "" and listed (it would fail the whole batch).
        errors = [
            "" if question_fits(x["question"], self.tok, max_len, e.doc_stride) else "question_too_long"
            for x in examples
        ]
        asked = [x for x, err in zip(examples, errors) if not err]
        answers, windows = {}, {}
        if asked:
            features = features_for_eval(asked, self.tok, max_len, e.doc_stride)
            ids, mask = torch.as_tensor(features["input_ids"]), torch.as_tensor(features["attention_mask"])
            starts, ends = [], []
            for i in range(0, len(ids), 32):
                s, t = self.model.span_logits(ids[i : i + 32].to(self.device), mask[i : i + 32].to(self.device))
                starts.append(s.float().cpu().numpy())
                ends.append(t.float().cpu().numpy())
            answers = best_answers(
                asked,
                features,
                np.concatenate(starts),
                np.concatenate(ends),
                max_answer_len=e.max_answer_len,
                null_threshold=e.null_threshold,
                version_2=bool(batch["version_2"][0]),
            )
            windows = {q: features["example_id"].count(q) for q in answers}
        return {
            "id": batch["id"],
            "prediction": np.array([answers.get(q, "") for q in batch["id"]], dtype=object),
            "windows": np.array([windows.get(q, 0) for q in batch["id"]]),
            "error": np.array(errors, dtype=object),
        }


def eval_images(cfg: TrainConfig) -> tuple[list[dict], dict]:
    """(rows: key, label, image bytes; facts about the split) for the image-folder split evaluated."""
    from pipelines.image_folder import list_image_folder

    root = Path(project_path(cfg.data.source))
    folder = (
        Path(project_path(cfg.encoder.eval_source))
        if cfg.encoder.eval_source
        else (root / "test" if (root / "test").is_dir() else root / "val")
    )
    classes, items, rejects = list_image_folder(folder)
    if cfg.evaluation.limit:  # a seeded sample across classes (items are sorted by class)
        items = sorted(random.Random(0).sample(items, min(cfg.evaluation.limit, len(items))))
    rows = [{"key": rel, "label": label, "image": (folder / rel).read_bytes()} for rel, label in items]
    return rows, {"split": str(folder), "classes": classes, "set_aside": [{"path": p, "reason": r} for p, r in rejects]}


def pool_map(cfg: TrainConfig, adapter: str, rows: list[dict]) -> list[dict]:
    import pyarrow as pa

    from pipelines.multimodal_predict import map_with_actor_pool

    return map_with_actor_pool(
        pa.Table.from_pylist(rows), EncoderPredictor, (cfg.model_dump(mode="json"), adapter), cfg.evaluation
    )


def run(cfg: TrainConfig) -> dict:
    from adapter.backbones.adapted import read_encoder_metadata
    from pipelines.evaluate_scienceqa import default_paths
    from pipelines.train import with_absolute_paths

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    adapter, out = default_paths(cfg, cfg.task)
    if cfg.evaluation.out is None:
        out = out.with_name(f"eval-{cfg.task}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.task == "image-classification":
        rows, facts = eval_images(cfg)
        labels = read_encoder_metadata(adapter)["labels"]
        if facts["classes"] != labels:
            raise ValueError(f"{facts['split']} has classes {facts['classes']}, the adapter was trained on {labels}")
        t_pred = time.time()
        preds = sorted(pool_map(cfg, adapter, rows), key=lambda r: r["key"])
        pred_s = time.time() - t_pred
        correct = [int(r["pred"]) == int(r["label"]) and not r["error"] for r in preds]
        per_class = Counter(labels[int(r["label"])] for r in preds)
        right = Counter(labels[int(r["label"])] for r, ok in zip(preds, correct) if ok)
        result = {
            **facts,
            "top1": round(100 * sum(correct) / max(1, len(preds)), 2),
            "per_class_top1": {c: round(100 * right[c] / per_class[c], 2) for c in labels if per_class[c]},
            "images": len(preds),
            "errors": [{"key": r["key"], "error": r["error"]} for r in preds if r["error"]],
            "images_per_s": round(len(preds) / pred_s, 2),
        }
        lines = [
            {
                "key": r["key"],
                "label": labels[int(r["label"])],
                "pred": labels[int(r["pred"])] if int(r["pred"]) >= 0 else None,
                "correct": ok,
                "error": r["error"] or None,
            }
            for r, ok in zip(preds, correct)
        ]
    else:
        from pipelines.squad_data import questions_for_eval
        from pipelines.squad_metrics import is_version_2, score_dataset

        if not cfg.encoder.eval_source:
            raise ValueError("task squad: set encoder.eval_source to the SQuAD dev file to score")
        dataset = json.loads(Path(cfg.encoder.eval_source).read_text(encoding="utf-8"))
        v2 = is_version_2(dataset)
        examples, rejects = questions_for_eval(dataset)
        examples = examples[: cfg.evaluation.limit] if cfg.evaluation.limit else examples
        rows = [{**x, "version_2": v2} for x in examples]
        t_pred = time.time()
        preds = pool_map(cfg, adapter, rows)
        pred_s = time.time() - t_pred
        answers = {r["id"]: r["prediction"] for r in preds}
        if cfg.evaluation.limit:  # score only the questions asked
            keep = set(answers)
            dataset = {
                "version": dataset.get("version"),
                "data": [
                    {
                        **a,
                        "paragraphs": [
                            {**p, "qas": [q for q in p["qas"] if q.get("id") in keep]} for p in a["paragraphs"]
                        ],
                    }
                    for a in dataset["data"]
                ],
            }
        scores = score_dataset(dataset, answers, version_2=v2)
        result = {
            "split": cfg.encoder.eval_source,
            "version_2": v2,
            **scores,
            "questions": len(examples),
            "set_aside": rejects,
            "questions_per_s": round(len(examples) / pred_s, 2),
        }
        result["errors"] = [{"id": r["id"], "error": r["error"]} for r in preds if r["error"]]
        lines = [
            {"id": r["id"], "prediction": r["prediction"], "windows": int(r["windows"]), "error": r["error"] or None}
            for r in preds
        ]
    result.update(
        {
            "task": cfg.task,
            "adapter": adapter,
            "gate": cfg.encoder.adapter.gate,
            "seconds": round(time.time() - t0, 2),
            "out": str(out),
        }
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    with open(out / "predictions.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="vit-digits-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    result = run(cfg)
    if cfg.task == "image-classification":
        print(
            f"[evaluate] top-1 {result['top1']}% on {result['images']} images of {result['split']} "
            f"({len(result['errors'])} errors, {result['images_per_s']} images/s) -> {result['out']}"
        )
    else:
        print(
            f"[evaluate] SQuAD {'v2.0' if result['version_2'] else 'v1.1'}: exact {result['exact']:.2f}, "
            f"F1 {result['f1']:.2f} on {result['total']} questions -> {result['out']}"
        )
    return result


if __name__ == "__main__":
    # Run it as `pipelines.evaluate_encoder`, not `__main__`: Ray workers import it by module name.
    from pipelines.evaluate_encoder import main as _main

    _main()
