"""ScienceQA evaluation job: greedy answers by Ray Data batch inference, accuracy per class.

    python -m pipelines.evaluate_scienceqa --config scienceqa-tiny-cpu [--set evaluation.split=val]

Reads the same YAML as the training job: the problems from `data.source` (official layout), the
adapter from `evaluation.adapter` (default `<output_dir>/<name>/adapter`), the encoder from
`vision`. Each generation is parsed for "The answer is (X)"; a generation without one (or with a
letter past the options, or a row that could not be run) counts as WRONG and is listed. Writes to
`evaluation.out` (default `<output_dir>/<name>/eval-scienceqa-<split>`): `accuracy.json` (overall
and NAT / SOC / LAN / TXT / IMG / NO / G1-6 / G7-12, with counts), `table.md` (one row shaped like
the paper's Table 2) and `predictions.jsonl` (every problem: generation, parse result, correct).
Problems that are malformed, or whose image is missing under `missing_image: reject`, are set
aside (listed, not scored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from adapter.settings import add_config_args, config_from_args, project_path
from pipelines.config import TrainConfig
from pipelines.scienceqa import (
    LETTERS,
    accuracy,
    check_problem,
    classes_of,
    format_problem,
    image_file,
    images_root,
    load_split,
    markdown_table,
    parse_answer,
)


def default_paths(cfg: TrainConfig, task: str) -> tuple[str, Path]:
    e, run_dir = cfg.evaluation, Path(project_path(cfg.output_dir)) / cfg.name
    adapter = project_path(e.adapter) if e.adapter else str(run_dir / "adapter")
    out = Path(project_path(e.out)) if e.out else run_dir / f"eval-{task}-{e.split}"
    return adapter, out


def build_rows(cfg: TrainConfig) -> tuple[list[dict], dict, list[dict]]:
    """(rows to run, problems by pid, set-aside problems with the reason)."""
    e = cfg.evaluation
    pids, problems = load_split(Path(project_path(cfg.data.source)), e.split, e.limit)
    root, rows, aside, kept = images_root(cfg), [], [], {}
    for pid in pids:
        p = problems.get(pid)
        bad = "missing from problems.json" if p is None else check_problem(p)
        if bad:
            aside.append({"pid": pid, "reason": "bad_problem", "detail": bad})
            continue
        path = image_file(root, e.split, pid, p)
        image = None
        if path and Path(path).is_file():
            image = Path(path).read_bytes()
        elif path and cfg.scienceqa.missing_image == "reject":
            aside.append({"pid": pid, "reason": "image_missing", "detail": path})
            continue
        rows.append({"key": pid, "prompt": format_problem(p), "image": image})
        kept[pid] = p
    return rows, kept, aside


def score(problems: dict, predictions: list[dict]) -> list[dict]:
    out = []
    for r in predictions:
        p = problems[r["key"]]
        truth = LETTERS[p["answer"]]
        if r["error"]:
            letter, parse = None, r["error"].split(":")[0]
        else:
            letter, parse = parse_answer(r["generation"], len(p["choices"]))
        out.append(
            {
                "pid": r["key"],
                "classes": classes_of(p),
                "answer": truth,
                "generation": r["generation"],
                "parsed": letter,
                "parse": parse,
                "correct": parse == "ok" and letter == truth,
                "error": r["error"] or None,
                "has_image": bool(p.get("image")),
            }
        )
    return sorted(out, key=lambda x: (len(x["pid"]), x["pid"]))


def run(cfg: TrainConfig) -> dict:
    from pipelines.multimodal_predict import predict
    from pipelines.train import with_absolute_paths

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    adapter, out = default_paths(cfg, "scienceqa")
    rows, problems, aside = build_rows(cfg)
    if not rows:
        raise ValueError(
            f"no ScienceQA problems to evaluate in split {cfg.evaluation.split!r} ({len(aside)} set aside)"
        )
    t_pred = time.time()
    scored = score(problems, predict(cfg, adapter, rows))
    pred_s = time.time() - t_pred
    acc = accuracy(scored)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for r in scored:
            f.write(json.dumps(r) + "\n")
    with_image = sum(1 for r in rows if r["image"] is not None) if cfg.vision else 0
    label = f"{cfg.name} ({cfg.evaluation.split}; {with_image} of {len(scored)} with their image)"
    (out / "table.md").write_text(markdown_table(acc, label))
    result = {
        "split": cfg.evaluation.split,
        "adapter": adapter,
        "problems": len(scored),
        "accuracy": acc,
        "wrong_unparseable": [r["pid"] for r in scored if r["parse"] != "ok"],
        "parse_results": {k: sum(1 for r in scored if r["parse"] == k) for k in sorted({r["parse"] for r in scored})},
        "set_aside": aside,
        "with_image": with_image,
        "predict_seconds": round(pred_s, 2),
        "problems_per_s": round(len(scored) / pred_s, 2),
        "actors": cfg.evaluation.actors,
        "seconds": round(time.time() - t0, 2),
        "out": str(out),
    }
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="scienceqa-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    result = run(cfg)
    print((Path(result["out"]) / "table.md").read_text())
    print(
        f"[evaluate] {result['problems']} problems, {len(result['wrong_unparseable'])} unparseable (counted wrong), "
        f"{len(result['set_aside'])} set aside; {result['problems_per_s']} problems/s -> {result['out']}"
    )
    return result


if __name__ == "__main__":
    # Run it as `pipelines.evaluate_scienceqa`, not `__main__`: what this module hands to Ray workers must be
    # importable there by its module name.
    from pipelines.evaluate_scienceqa import main as _main

    _main()
