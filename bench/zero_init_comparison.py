"""The ICLR comparison on the same data and budget (docs/encoders.md): zero-init gated prompts
vs the same prompts with the gate fixed at 1 (no gating: random prompts at full weight from step 0) vs a linear probe (head only),
each trained by `pipelines.train` (Ray Train, 2 CPU workers) and scored by `pipelines.evaluate`.

Tasks here: scikit-learn's real digits (an image folder) on a tiny RANDOM ViT, and a synthetic
SQuAD v2.0 span task on a tiny RANDOM RoBERTa. No pretrained ViT / RoBERTa is reachable on this
machine, so these numbers compare the arms on random backbones; they are not the paper's setting
and say nothing about VTAB-1k or SQuAD. Three seeds per arm.

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
TINY_VIT = {
    "image_size": 32,
    "patch_size": 8,
    "num_layers": 3,
    "num_heads": 2,
    "hidden_dim": 32,
    "mlp_dim": 64,
    "num_classes": 10,
}
COLORS = ["red", "blue", "green", "yellow"]
FILLER = "the a of river stone walked over under quiet small house garden old city near light".split()


def synthetic_squad(n: int, seed: int, after_near: bool = False) -> dict:
    """Which color does the passage name? One color word among filler words (its position random);
    a fifth of the passages name none (v2.0: unanswerable). after_near: two different colors, and
    the answer is the one right after the word "near" (the token alone no longer tells)."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice([w for w in FILLER if w != "near"]) for _ in range(rng.randint(8, 16))]
        qa = {
            "id": f"s{seed}-{i}",
            "question": "Which color comes after near?" if after_near else "Which color is named?",
        }
        if rng.random() < 0.2:
            if after_near:
                words.insert(rng.randint(0, len(words)), rng.choice(COLORS))
            qa.update(answers=[], is_impossible=True)
        else:
            color, other = rng.sample(COLORS, 2)
            at = rng.randint(0, len(words))
            words[at:at] = ["near", color] if after_near else [color]
            if after_near:
                words.insert(rng.choice([k for k in range(len(words) + 1) if k not in (at + 1, at + 2)]), other)
                at = words.index("near") + 1
            start = len(" ".join(words[:at])) + (1 if at else 0)
            qa.update(answers=[{"text": color, "answer_start": start}], is_impossible=False)
        paragraphs.append({"context": " ".join(words), "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": "colors", "paragraphs": paragraphs}]}


def common(tmp: Path) -> dict:
    return {
        "output_dir": str(tmp / "runs"),
        "ray": {"num_cpus": 4},
        "checkpoint": {"keep": 1},
        "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
        "evaluation": {"batch_size": 64},
    }


def digits_config(tmp: Path, epochs: float) -> dict:
    from adapter.backbones.vit import ViTShape, save_random_vit
    from pipelines.datasets.image_folder import write_digits

    if not (tmp / "digits" / "train").is_dir():
        write_digits(tmp / "digits", size=32)
    weights = save_random_vit(tmp / "tiny-vit.safetensors", ViTShape(**TINY_VIT))
    return {
        **common(tmp),
        "task": "image-classification",
        "encoder": {"weights": str(weights), "vit": TINY_VIT, "adapter": {"prompt_len": 4, "layers": 2}},
        "data": {"source": str(tmp / "digits"), "out": str(tmp / "digits-records")},
        "optim": {
            "recipe": "custom",
            "lr": 0.05,
            "weight_decay": 0.0,
            "epochs": epochs,
            "warmup_epochs": 0.2,
            "micro_batch_size": 32,
        },
    }


def squad_config(tmp: Path, epochs: float, after_near: bool = False) -> dict:
    from adapter.backbones.bert_family import save_random_roberta

    tag = "near" if after_near else "color"
    train, dev = synthetic_squad(400, 1, after_near), synthetic_squad(200, 2, after_near)
    (tmp / f"train-{tag}.json").write_text(json.dumps(train))
    (tmp / f"dev-{tag}.json").write_text(json.dumps(dev))
    texts = [p["context"] + " " + q["question"] for a in train["data"] for p in a["paragraphs"] for q in p["qas"]]
    folder = save_random_roberta(tmp / f"tiny-roberta-{tag}", texts, hidden_size=32, num_layers=2, num_heads=2)
    return {
        **common(tmp),
        "task": "squad",
        "encoder": {
            "weights": str(folder),
            "eval_source": str(tmp / f"dev-{tag}.json"),
            "doc_stride": 16,
            "adapter": {"prompt_len": 4, "layers": 2},
        },
        "data": {
            "source": str(tmp / f"train-{tag}.json"),
            "out": str(tmp / f"squad-records-{tag}"),
            "max_seq_len": 48,
            "val_fraction": 0.1,
        },
        "optim": {
            "recipe": "custom",
            "lr": 0.05,
            "weight_decay": 0.0,
            "epochs": epochs,
            "warmup_epochs": 0.5,
            "micro_batch_size": 16,
        },
    }


def run_arms(base: dict, metric: str, seeds: tuple[int, ...]) -> dict:
    """Each arm trained once per seed (the seed sets the prompts' and head's initialisation and the
    batch order); same data, steps and learning rate for every arm."""
    from pipelines.evaluate import run as evaluate
    from pipelines.job_config import TrainConfig
    from pipelines.train import run as train

    out = {}
    for arm in ARMS:
        runs = []
        for seed in seeds:
            cfg = dict(base, name=f"{Path(base['data']['out']).name}-{arm}-s{seed}")
            cfg["encoder"] = {**base["encoder"], "adapter": {**base["encoder"]["adapter"], "gate": arm}}
            cfg["optim"] = {**base["optim"], "seed": seed}
            cfg = TrainConfig.model_validate(cfg)
            summary, result = train(cfg), evaluate(cfg)
            runs.append(
                {
                    "seed": seed,
                    metric: result[metric],
                    "best_val_loss": summary["best_val_loss"],
                    "steps": summary["steps"],
                    "train_wall_s": summary["wall_s"],
                    **({"f1": result["f1"]} if "f1" in result else {}),
                }
            )
        values = [r[metric] for r in runs]
        out[arm] = {
            metric: round(sum(values) / len(values), 2),
            "min": min(values),
            "max": max(values),
            "trainable": summary["base_note"].split("(")[-1][:-1],
            "runs": runs,
        }
    return out


TASKS = (
    ("digits / ViT", "top1"),
    ("synthetic SQuAD v2.0: the color / RoBERTa", "exact"),
    ("synthetic SQuAD v2.0: the color after 'near' / RoBERTa", "exact"),
)


def markdown(result: dict) -> str:
    lines = [
        "| task (tiny random backbone) | metric, mean of seeds (min-max) | " + " | ".join(ARMS) + " |",
        "|---|---|---|---|---|",
    ]
    for task, metric in TASKS:
        arms = result["tasks"][task]
        n = len(arms[ARMS[0]]["runs"])
        lines.append(
            f"| {task} | {metric}, {n} seed{'s' * (n > 1)} | "
            + " | ".join(f"{arms[a][metric]:.1f} ({arms[a]['min']:.1f}-{arms[a]['max']:.1f})" for a in ARMS)
            + " |"
        )
    return "\n".join(lines)


def run(quick: bool = False) -> dict:
    from pipelines.job_config import RaySection
    from pipelines.ray_session import connect

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect(RaySection(num_cpus=4))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        seeds = (0,) if quick else (0, 1, 2)
        tasks = {
            TASKS[0][0]: run_arms(digits_config(tmp, 0.5 if quick else 2), "top1", seeds),
            TASKS[1][0]: run_arms(squad_config(tmp, 1 if quick else 6), "exact", seeds),
            TASKS[2][0]: run_arms(squad_config(tmp, 1 if quick else 6, after_near=True), "exact", seeds),
        }
    result = {
        "what": "zero-init gated prompts vs gate fixed at 1 vs linear probe, same data / steps / lr, MEASURED "
        "on this CPU machine with tiny RANDOM backbones (no pretrained ViT / RoBERTa reachable), "
        "3 seeds per arm",
        "quick": quick,
        "tasks": tasks,
    }
    result["table"] = markdown(result)
    (RESULTS / "zero_init_comparison.md").write_text(result["table"] + "\n")
    path = write_result("zero_init_comparison", result)
    plot(result, RESULTS / "zero_init_comparison.png")
    return json.loads(path.read_text())


def plot(result: dict, path: Path) -> Path:
    """One group per task, one bar per arm (mean of seeds), each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.26
    for k, arm in enumerate(ARMS):
        xs = [i + (k - 1) * width for i in range(len(TASKS))]
        means = [result["tasks"][t][arm][m] for t, m in TASKS]
        ax.bar(xs, means, width, label=arm, color=["#4878a8", "#e07b39", "#999999"][k])
        for x, (t, m) in zip(xs, TASKS):
            runs = [r[m] for r in result["tasks"][t][arm]["runs"]]
            ax.plot([x] * len(runs), runs, "k.", markersize=4)
    ax.set_xticks(
        range(len(TASKS)),
        [t.replace("synthetic SQuAD v2.0: ", "SQuAD-style: ").replace(" / ", "\n") + f" ({m})" for t, m in TASKS],
        fontsize=8,
    )
    ax.set_ylabel("held-out score, % (mean of seeds; dots: each seed)")
    ax.set_title("zero-init vs gate fixed at 1 vs linear probe, tiny RANDOM backbones (CPU)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
