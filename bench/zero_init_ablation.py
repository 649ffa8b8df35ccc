"""Suite `zero-init-ablation`: the paper's case for zero-init attention (docs/method.md, "Why
zero-init"), on a real pretrained base: SmolLM2-135M-Instruct (docs/models.md).

Three arms, same data, steps, learning rate and seeds: zero-init gates (the method), gates
initialised N(0, 1) and trained ("random"), gating removed (weight fixed at 1, "fixed-one").
Two tasks: ScienceQA as text (the real problems; an image problem gets its released caption as
context, as the dataset's text baselines do), scored on val and test with the standard answer
parser; and Alpaca held-out loss. The base's zero-shot ScienceQA accuracy is the reference row.

In one process (the base loaded once, 2 CPU threads), through the project's own model, adapter,
loss and generation code; the same adapter trains through Ray Train in `pipelines.train`. The
budget (steps, examples, adapted layers, sequence length, questions scored) is printed beside the
results: it is sized for this 2-core CPU, far below the paper's runs.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from adapter.adapter import AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.loader import load_model
from adapter.prompts import format_prompt
from adapter.settings import ModelSource
from bench.common import RESULTS, write_result
from pipelines.data.record_output import tokenize_pair
from pipelines.tasks.scienceqa import LETTERS, answer_text, check_problem, format_problem, parse_answer, read_captions
from pipelines.training.batching import collate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARMS = ("zero", "random", "fixed-one")
BUDGETS = {
    # name: adapted layers, prompt len, seq len, train steps, micro-batch, lr, questions scored per split,
    #       alpaca steps, alpaca held-out records, seeds
    "quick": dict(layers=2, plen=4, seq=160, steps=3, mb=2, lr=0.01, per_split=4, a_steps=3, a_val=4, seeds=(0,)),
    # What fitted beside other work on this machine in one session (docs/benchmarks.md says so).
    "session": dict(
        layers=4, plen=10, seq=192, steps=20, mb=4, lr=0.01, per_split=20, a_steps=20, a_val=24, seeds=(0, 1)
    ),
    # The size: about 5 minutes per run on the idle 2-core machine, 9 runs and the zero-shot row in ~50.
    "cpu": dict(
        layers=6, plen=10, seq=256, steps=60, mb=6, lr=0.01, per_split=100, a_steps=40, a_val=48, seeds=(0, 1, 2)
    ),
}


def sqa_records(split: str, limit: int | None, tok, seq: int, seed: int = 0) -> list[dict]:
    src = SHARED / "scienceqa"
    problems = json.loads((src / "problems.json").read_text())
    pids = [str(p) for p in json.loads((src / "pid_splits.json").read_text())[split]]
    captions = read_captions(str(src / "captions.json"))
    if limit is not None:
        pids = sorted(random.Random(seed).sample(pids, min(limit, len(pids))), key=pids.index)
    out = []
    for pid in pids:
        p = problems[pid]
        if check_problem(p):
            continue
        prompt = format_problem(p, captions.get(pid, "") if p.get("image") else "")
        ids, labels, _ = tokenize_pair(tok, prompt, answer_text(p), seq)
        out.append({"pid": pid, "problem": p, "prompt": prompt, "ids": ids, "labels": labels})
    return out


def alpaca_records(tok, seq: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    recs = json.loads((SHARED / "alpaca_data.json").read_text())
    rows = []
    for r in recs[: (n_train + n_val) * 2]:
        ids, labels, _ = tokenize_pair(tok, format_prompt(r["instruction"], r["input"]), r["output"], seq)
        if any(x != -100 for x in labels):
            rows.append({"ids": ids, "labels": labels})
    return rows[n_val : n_val + n_train], rows[:n_val]


def loss_of(model: AdaptedLlama, rows: list[dict]) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            ids, lab = collate([r["ids"] for r in rows[i : i + 8]], [r["labels"] for r in rows[i : i + 8]])
            loss, k = model.loss(ids, lab)
            total, n = total + float(loss) * int(k), n + int(k)
    return total / max(1, n)


def train(base, arm: str, seed: int, rows: list[dict], b: dict, steps: int, val: list[dict] | None = None):
    """(prompts, per-step train losses, [(step, held-out loss)])."""
    torch.manual_seed(seed)
    prompts = AdaptionPrompts(base.args, AdapterConfig(b["plen"], b["layers"], gate_init=arm))
    model = AdaptedLlama(base, prompts)
    opt = torch.optim.AdamW([p for p in prompts.parameters() if p.requires_grad], lr=b["lr"], weight_decay=0.02)
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    losses, curve = [], []
    if val is not None:
        curve.append((0, loss_of(model, val)))
    for step in range(steps):
        lr = b["lr"] * min(1.0, (step + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pick = [order[(step * b["mb"] + k) % len(order)] for k in range(b["mb"])]
        ids, lab = collate([rows[i]["ids"] for i in pick], [rows[i]["labels"] for i in pick])
        loss, _ = model.loss(ids, lab)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in prompts.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(float(loss))
        if val is not None and ((step + 1) % max(1, steps // 4) == 0 or step + 1 == steps):
            curve.append((step + 1, loss_of(model, val)))
    return prompts, losses, curve


def sqa_accuracy(base, tok, prompts, rows: list[dict]) -> dict:
    pre = prefixes_for(base, prompts) if prompts is not None else None
    params = SamplingParams(max_gen_len=10, temperature=0.0)
    right, parsed = 0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            chunk = rows[i : i + 8]
            outs = generate(
                base,
                [tok.encode(r["prompt"]) for r in chunk],
                params,
                tok.eos_id,
                adapters=None if pre is None else [pre] * len(chunk),
            )
            for r, o in zip(chunk, outs):
                letter, status = parse_answer(tok.decode(o), len(r["problem"]["choices"]))
                parsed += status == "ok"
                right += status == "ok" and letter == LETTERS[r["problem"]["answer"]]
    return {"accuracy": round(100 * right / max(1, len(rows)), 2), "answered": parsed, "questions": len(rows)}


def earlier_runs(out: Path, result: dict) -> dict[tuple[str, int], dict]:
    """Runs an earlier suite of the same budget (seeds aside) finished, keyed by (arm, seed): an
    interrupted suite continues, and a finished one gains seeds. Delete the file to measure afresh."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    mine = {k: v for k, v in json.loads(json.dumps(result["budget"])).items() if k != "seeds"}
    if {k: v for k, v in earlier.get("budget", {}).items() if k != "seeds"} != mine:
        return {}
    runs = earlier.get("partial_runs") or {arm: a["runs"] for arm, a in earlier.get("arms", {}).items()}
    return {(arm, r["seed"]): r for arm, rs in runs.items() for r in rs}


def spread(values: list[float]) -> dict:
    return {
        "mean": round(statistics.mean(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "values": [round(v, 3) for v in values],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = dict(zip(ARMS, ("tab:green", "tab:red", "tab:blue")))
    for arm in ARMS:
        for run in result["arms"][arm]["runs"]:
            axes[0].plot(run["sqa_train_loss"], color=colors[arm], alpha=0.6, label=arm if run["seed"] == 0 else None)
            steps, vals = zip(*run["alpaca_val_curve"])
            axes[1].plot(steps, vals, "o-", color=colors[arm], alpha=0.7, label=arm if run["seed"] == 0 else None)
    axes[0].set(title="ScienceQA (text): training loss", xlabel="step", ylabel="loss")
    axes[1].set(title="Alpaca: held-out loss", xlabel="step", ylabel="loss")
    names = ["zero-shot base", *ARMS]
    means = [result["zero_shot"]["mean_accuracy"]] + [result["arms"][a]["sqa_accuracy"]["mean"] for a in ARMS]
    lows = [0] + [result["arms"][a]["sqa_accuracy"]["mean"] - result["arms"][a]["sqa_accuracy"]["min"] for a in ARMS]
    highs = [0] + [result["arms"][a]["sqa_accuracy"]["max"] - result["arms"][a]["sqa_accuracy"]["mean"] for a in ARMS]
    axes[2].bar(names, means, yerr=[lows, highs], color=["grey", *colors.values()], capsize=4)
    axes[2].axhline(result["chance_accuracy"], color="black", linestyle=":", label="a random choice")
    axes[2].legend()
    axes[2].set(title="ScienceQA val+test accuracy (standard parser)", ylabel="%")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"zero-init ablation on SmolLM2-135M-Instruct ({result['budget_name']} budget, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool = False, budget: str | None = None) -> dict:
    name = budget or ("quick" if quick else "cpu")
    b = BUDGETS[name]
    t0 = time.time()
    torch.set_num_threads(2)
    loaded = load_model(ModelSource(base="SmolLM2-135M-Instruct", context=512), device="cpu")
    base, tok = loaded.base.eval(), loaded.tokenizer
    n_train = b["steps"] * b["mb"]
    sqa_train = sqa_records("train", n_train, tok, b["seq"])
    sqa_eval = {s: sqa_records(s, b["per_split"], tok, b["seq"], seed=1) for s in ("val", "test")}
    a_train, a_val = alpaca_records(tok, b["seq"], b["a_steps"] * b["mb"], b["a_val"])
    zero_shot = {s: sqa_accuracy(base, tok, None, rows) for s, rows in sqa_eval.items()}
    result = {
        "base": "SmolLM2-135M-Instruct (GGUF Q4_1 matrices, dequantized to fp32)",
        "budget_name": name,
        "budget": {**b, "sqa_train_problems": len(sqa_train), "alpaca_train_records": len(a_train)},
        "answer_parser": "standard",
        "zero_shot": {**zero_shot, "mean_accuracy": statistics.mean(v["accuracy"] for v in zero_shot.values())},
        # What picking a choice uniformly at random scores on the same questions (2-5 choices each),
        # and what always answering (A) scores: the floors an accuracy is read against.
        "chance_accuracy": round(
            statistics.mean(100 / len(r["problem"]["choices"]) for rows in sqa_eval.values() for r in rows), 2
        ),
        "always_a_accuracy": round(
            statistics.mean(100 * (r["problem"]["answer"] == 0) for rows in sqa_eval.values() for r in rows), 2
        ),
        "arms": {},
        "note": "one process, 2 threads, on a 2-core CPU; a budget far below the "
        "paper's (its ScienceQA figures come from LLaMA-7B + CLIP, full training set, many epochs)",
    }
    suite = "zero-init-ablation" if name == "cpu" else f"zero-init-ablation-{name}"
    out = RESULTS / f"{suite}.json"  # write_result's file: suite, date and machine written with each run
    kept = earlier_runs(out, result)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    # Seed-major, each finished run written at once: an interrupted suite still holds whole seeds of
    # every arm, and running it again continues where it stopped.
    for seed in b["seeds"]:
        for arm in ARMS:
            if (arm, seed) in kept:
                runs[arm].append(kept[arm, seed])
                print(f"[ablation] {arm} seed {seed}: kept from the earlier run in {out}", flush=True)
                continue
            t_run = time.time()
            prompts, sqa_losses, _ = train(base, arm, seed, sqa_train, b, b["steps"])
            acc = {s: sqa_accuracy(base, tok, prompts, rows) for s, rows in sqa_eval.items()}
            _, a_losses, a_curve = train(base, arm, seed, a_train, b, b["a_steps"], val=a_val)
            runs[arm].append(
                {
                    "seed": seed,
                    "sqa": acc,
                    "sqa_accuracy": statistics.mean(v["accuracy"] for v in acc.values()),
                    "sqa_train_loss": sqa_losses,
                    "alpaca_train_loss": a_losses,
                    "alpaca_val_curve": a_curve,
                    "seconds": round(time.time() - t_run, 1),
                }
            )
            print(f"[ablation] {arm} seed {seed}: ScienceQA {acc}, Alpaca held-out {a_curve}", flush=True)
            write_result(suite, {**result, "complete": False, "partial_runs": runs})
    for arm in ARMS:
        result["arms"][arm] = {
            "runs": runs[arm],
            "sqa_accuracy": spread([r["sqa_accuracy"] for r in runs[arm]]),
            "alpaca_final_val_loss": spread([r["alpaca_val_curve"][-1][1] for r in runs[arm]]),
            "sqa_final_train_loss": spread([statistics.mean(r["sqa_train_loss"][-5:]) for r in runs[arm]]),
        }
    result.update(
        {
            "wall_s": round(time.time() - t0, 1),  # this process; runs kept from an earlier one not included
            "runs_s_total": round(sum(r["seconds"] for rs in runs.values() for r in rs), 1),
            "complete": True,
        }
    )
    write_result(suite, result)
    plot(result, out.with_suffix(".png"))
    return json.loads(out.read_text())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    print(json.dumps(run(budget=ap.parse_args().budget), indent=2)[:4000])
