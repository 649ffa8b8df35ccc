"""ScienceQA (METHOD.md section 7): the problem format, its classes, the answer parser, and the
Ray Data job that turns the official layout into training records.

    python -m pipelines.scienceqa --config scienceqa-tiny-cpu     # on its own; pipelines.train calls it too

Official layout under `data.source`: `problems.json` ({pid: problem}), `pid_splits.json`
({split: [pid, ...]}) and `images/<split>/<pid>/image.png` for problems whose `image` is set.
The text follows ScienceQA's own question / context / options format (context = the hint, or
"N/A"); the target is "The answer is (X)." Training records come from the official train split,
held-out loss from its val split; `data.limit` keeps the first N problems of each.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pyarrow as pa

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

LETTERS = "ABCDE"
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CLASSES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")  # the paper's Table 2 columns
ANSWER = re.compile(r"the answer is\s*\(?\s*([a-z])\s*\)?(?![a-z])", re.IGNORECASE)


# --- the problem as text -------------------------------------------------------------------------
def check_problem(p) -> str:
    """ "" for a usable problem, else what is wrong with it."""
    if not isinstance(p, dict):
        return f"not an object ({type(p).__name__})"
    if not isinstance(p.get("question"), str) or not p["question"].strip():
        return "question missing or empty"
    ch = p.get("choices")
    if not isinstance(ch, list) or not 2 <= len(ch) <= len(LETTERS) or not all(isinstance(c, str) for c in ch):
        return f"choices must be 2-{len(LETTERS)} strings"
    if not isinstance(p.get("answer"), int) or not 0 <= p["answer"] < len(ch):
        return f"answer {p.get('answer')!r} is not an index into {len(ch)} choices"
    if not isinstance(p.get("hint", ""), str):
        return "hint is not a string"
    if p.get("subject") not in SUBJECTS:
        return f"unknown subject {p.get('subject')!r}"
    if not re.fullmatch(r"grade([1-9]|1[0-2])", str(p.get("grade"))):
        return f"unknown grade {p.get('grade')!r}"
    return ""


def format_problem(p: dict) -> str:
    """ScienceQA's "QCM" input: question, context (hint or N/A), options (A) .. (E)."""
    context = (p.get("hint") or "").strip() or "N/A"
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(p["choices"]))
    return f"Question: {p['question'].strip()}\nContext: {context}\nOptions: {options}\nAnswer:"


def answer_text(p: dict) -> str:
    return f"The answer is ({LETTERS[p['answer']]})."


def classes_of(p: dict) -> list[str]:
    """The Table 2 columns a problem counts in: subject, context modality (text and image may both
    hold; NO when neither), grade band."""
    out = [SUBJECTS[p["subject"]]]
    has_text, has_image = bool((p.get("hint") or "").strip()), bool(p.get("image"))
    out += (["TXT"] if has_text else []) + (["IMG"] if has_image else []) + ([] if has_text or has_image else ["NO"])
    out.append("G1-6" if int(p["grade"].removeprefix("grade")) <= 6 else "G7-12")
    return out


def parse_answer(text: str, n_choices: int) -> tuple[str | None, str]:
    """(letter, "ok") from the first "The answer is (X)" in a generation (any case, brackets
    optional), else (None, why): "no_answer" or "out_of_range" (a letter past the options)."""
    m = ANSWER.search(text or "")
    if not m:
        return None, "no_answer"
    letter = m.group(1).upper()
    if letter not in LETTERS[:n_choices]:
        return letter, "out_of_range"
    return letter, "ok"


def accuracy(rows: list[dict]) -> dict:
    """Per class and overall: {"correct", "total", "accuracy" (percent)}; rows hold `classes`, `correct`."""
    out = {}
    for name in (*CLASSES, "Avg"):
        hit = [r for r in rows if name == "Avg" or name in r["classes"]]
        n_ok = sum(1 for r in hit if r["correct"])
        out[name] = {"correct": n_ok, "total": len(hit), "accuracy": round(100 * n_ok / len(hit), 2) if hit else None}
    return out


def markdown_table(acc: dict, label: str) -> str:
    """One row shaped like the paper's Table 2 (accuracy %, n/a for an empty class)."""
    cols = (*CLASSES, "Avg")
    cells = [f"{acc[c]['accuracy']:.2f}" if acc[c]["accuracy"] is not None else "n/a" for c in cols]
    counts = [str(acc[c]["total"]) for c in cols]
    return (
        "\n".join(
            [
                "| Method | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|",
                f"| {label} | " + " | ".join(cells) + " |",
                "| (problems) | " + " | ".join(counts) + " |",
            ]
        )
        + "\n"
    )


# --- the official layout ---------------------------------------------------------------------------
def load_split(source: Path, split: str, limit: int | None = None) -> tuple[list[str], dict]:
    """(pids of `split` in the file's order, the problems dict)."""
    problems = json.loads((source / "problems.json").read_text())
    splits = json.loads((source / "pid_splits.json").read_text())
    if split not in splits:
        raise ValueError(f"{source}/pid_splits.json has no split {split!r} (it has {sorted(splits)})")
    pids = [str(p) for p in splits[split]][:limit]
    return pids, problems


def image_file(images_root: Path, split: str, pid: str, problem) -> str | None:
    if not isinstance(problem, dict) or not problem.get("image"):
        return None
    return str(images_root / split / pid / problem["image"])


def images_root(cfg: TrainConfig) -> Path:
    return Path(
        project_path(cfg.scienceqa.images) if cfg.scienceqa.images else Path(project_path(cfg.data.source)) / "images"
    )


def input_rows(cfg: TrainConfig) -> list[dict]:
    source, root = Path(project_path(cfg.data.source)), images_root(cfg)
    rows = []
    for split in ("train", "val"):
        pids, problems = load_split(source, split, cfg.data.limit)
        for pid in pids:
            p = problems.get(pid)
            rows.append(
                {
                    "idx": len(rows),
                    "key": pid,
                    "split": split,
                    "problem": json.dumps(p),
                    "image_path": image_file(root, split, pid, p),
                }
            )
    return rows


class EncodeProblems:
    """Ray Data callable class: tokenizer loaded once per actor; images read and checked here."""

    def __init__(self, tokenizer: str, max_seq_len: int, missing_image: str):
        self.tok, self.max_seq_len, self.missing_image = Tokenizer(tokenizer), max_seq_len, missing_image

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        rows = new_rows(n)
        rows["idx"], rows["key"] = batch.column("idx").to_pylist(), batch.column("key").to_pylist()
        for i, (split, raw, path) in enumerate(
            zip(
                batch.column("split").to_pylist(),
                batch.column("problem").to_pylist(),
                batch.column("image_path").to_pylist(),
            )
        ):
            p = json.loads(raw)
            bad = "missing from problems.json" if p is None else check_problem(p)
            if bad:
                rows["reject_reason"][i], rows["reject_detail"][i] = "bad_problem", bad
                continue
            image, reason, detail = read_image(path)
            if reason and not (reason == "image_missing" and self.missing_image == "text_only"):
                rows["reject_reason"][i], rows["reject_detail"][i] = reason, detail
                continue
            set_record(rows, i, self.tok, format_problem(p), answer_text(p), self.max_seq_len, split, image)
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


def fingerprint(cfg: TrainConfig) -> dict:
    source = Path(project_path(cfg.data.source))
    paths = [Path(r["image_path"]) for r in input_rows(cfg) if r["image_path"]]
    return {
        "format": FORMAT_VERSION,
        "task": "scienceqa",
        "problems_sha256": sha256_file(source / "problems.json"),
        "splits_sha256": sha256_file(source / "pid_splits.json"),
        "images": listing_digest(paths),
        "missing_image": cfg.scienceqa.missing_image,
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
        raise ValueError(f"{cfg.data.source}: no ScienceQA problems in the train / val splits")
    processed = (
        from_rows(rows)
        .map_batches(
            EncodeProblems,
            fn_constructor_args=(project_path(cfg.model.tokenizer), cfg.data.max_seq_len, cfg.scienceqa.missing_image),
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
        )
        .materialize()
    )
    with_image = sum(1 for r in rows if r["image_path"])
    return write_output(
        processed,
        Path(project_path(cfg.data.out)),
        cfg,
        fingerprint(cfg),
        {"task": "scienceqa", "source": cfg.data.source, "problems_with_image": with_image},
        t0,
    )


def main(argv: list[str] | None = None) -> dict:
    from pipelines.ray_session import connect

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="scienceqa-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    connect(cfg.ray)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k != "fingerprint"}, indent=2))
    return stats


if __name__ == "__main__":
    # Run it as `pipelines.scienceqa`, not `__main__`: what this module hands to Ray workers must be
    # importable there by its module name.
    from pipelines.scienceqa import main as _main

    _main()
