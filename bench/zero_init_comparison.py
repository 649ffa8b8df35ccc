"""The ICLR comparison on the same data and budget (METHOD.md section 8): zero-init gated prompts
vs the same prompts with the gate fixed at 1 (random-init attention) vs a linear probe (head only),
each trained by `pipelines.train` (Ray Train, 2 CPU workers) and scored by `pipelines.evaluate_encoder`.

Tasks here: scikit-learn's real digits (an image folder) on a tiny RANDOM ViT, and a synthetic
SQuAD v2.0 span task on a tiny RANDOM RoBERTa. No pretrained ViT / RoBERTa is reachable on this
machine, so these numbers compare the arms on random backbones; they are not the paper's setting
and say nothing about VTAB-1k or SQuAD. One seed per arm.

    python -m bench.run --suite zero-init-comparison
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from bench.common import RESULTS, write_result

ARMS = ("zero-init", "fixed-one", "linear-probe")
TINY_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
            "num_classes": 10}
COLORS = ["red", "blue", "green", "yellow"]
FILLER = "the a of river stone walked over under quiet small house garden old city near light".split()


def synthetic_squad(n: int, seed: int) -> dict:
    """Which color does the passage name? One color word among filler words (its position random);
    a fifth of the passages name none (v2.0: unanswerable)."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 16))]
        qa = {"id": f"s{seed}-{i}", "question": "Which color is named?"}
        if rng.random() < 0.2:
            qa.update(answers=[], is_impossible=True)
        else:
            color, at = rng.choice(COLORS), rng.randint(0, len(words))
            words.insert(at, color)
            start = len(" ".join(words[:at])) + (1 if at else 0)
            qa.update(answers=[{"text": color, "answer_start": start}], is_impossible=False)
        paragraphs.append({"context": " ".join(words), "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": "colors", "paragraphs": paragraphs}]}


def common(tmp: Path) -> dict:
    return {"output_dir": str(tmp / "runs"), "ray": {"num_cpus": 4}, "checkpoint": {"keep": 1},
            "workers": {"num_workers": 2, "cpus_per_worker": 0.5}, "evaluation": {"batch_size": 64}}


def digits_config(tmp: Path, epochs: float) -> dict:
    from adapter.vit import ViTShape, save_random_vit
    from pipelines.image_folder import write_digits

    if not (tmp / "digits" / "train").is_dir():
        write_digits(tmp / "digits", size=32)
    weights = save_random_vit(tmp / "tiny-vit.safetensors", ViTShape(**TINY_VIT))
    return {**common(tmp), "task": "image-classification",
            "encoder": {"weights": str(weights), "vit": TINY_VIT, "adapter": {"prompt_len": 4, "layers": 2}},
            "data": {"source": str(tmp / "digits"), "out": str(tmp / "digits-records")},
            "optim": {"recipe": "custom", "lr": 0.05, "weight_decay": 0.0, "epochs": epochs, "warmup_epochs": 0.2,
                      "micro_batch_size": 32}}


def squad_config(tmp: Path, epochs: float) -> dict:
    from adapter.roberta import save_random_roberta

    train, dev = synthetic_squad(400, seed=1), synthetic_squad(200, seed=2)
    (tmp / "train.json").write_text(json.dumps(train))
    (tmp / "dev.json").write_text(json.dumps(dev))
    texts = [p["context"] + " " + q["question"] for a in train["data"] for p in a["paragraphs"] for q in p["qas"]]
    folder = save_random_roberta(tmp / "tiny-roberta", texts, hidden_size=32, num_layers=2, num_heads=2)
    return {**common(tmp), "task": "squad",
            "encoder": {"weights": str(folder), "eval_source": str(tmp / "dev.json"), "doc_stride": 16,
                        "adapter": {"prompt_len": 4, "layers": 2}},
            "data": {"source": str(tmp / "train.json"), "out": str(tmp / "squad-records"), "max_seq_len": 48,
                     "val_fraction": 0.1},
            "optim": {"recipe": "custom", "lr": 0.05, "weight_decay": 0.0, "epochs": epochs, "warmup_epochs": 0.5,
                      "micro_batch_size": 16}}


def run_arms(base: dict, metric: str) -> dict:
    from pipelines.config import TrainConfig
    from pipelines.evaluate_encoder import run as evaluate
    from pipelines.train import run as train

    out = {}
    for arm in ARMS:
        cfg = dict(base, name=f"{base['task']}-{arm}")
        cfg["encoder"] = {**base["encoder"], "adapter": {**base["encoder"]["adapter"], "gate": arm}}
        cfg = TrainConfig.model_validate(cfg)
        summary = train(cfg)
        result = evaluate(cfg)
        out[arm] = {metric: result[metric], "steps": summary["steps"], "train_wall_s": summary["wall_s"],
                    "best_val_loss": summary["best_val_loss"], "trainable": summary["base_note"].split("(")[-1][:-1],
                    **({"f1": result["f1"]} if "f1" in result else {})}
    return out


def markdown(result: dict) -> str:
    lines = ["| task (random backbone) | metric | " + " | ".join(ARMS) + " |", "|---|---|---|---|---|"]
    for task, metric in (("digits / ViT", "top1"), ("synthetic SQuAD v2.0 / RoBERTa", "exact")):
        arms = result["tasks"][task]
        lines.append(f"| {task} | {metric} | " + " | ".join(f"{arms[a][metric]:.1f}" for a in ARMS) + " |")
    return "\n".join(lines)


def run(quick: bool = False) -> dict:
    from pipelines.ray_session import connect
    from pipelines.config import RaySection

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect(RaySection(num_cpus=4))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tasks = {"digits / ViT": run_arms(digits_config(tmp, 0.5 if quick else 2), "top1"),
                 "synthetic SQuAD v2.0 / RoBERTa": run_arms(squad_config(tmp, 1 if quick else 6), "exact")}
    result = {"what": "zero-init gated prompts vs gate fixed at 1 vs linear probe, same data / steps / lr, MEASURED "
                      "on this CPU machine with tiny RANDOM backbones (no pretrained ViT / RoBERTa reachable); one "
                      "seed per arm", "quick": quick, "tasks": tasks}
    result["table"] = markdown(result)
    (RESULTS / "zero_init_comparison.md").write_text(result["table"] + "\n")
    path = write_result("zero_init_comparison", result)
    return json.loads(path.read_text())
