"""ScienceQA (docs/multimodal.md): the problem format, its classes, the answer parsers, the
records built from the official layout, and the evaluation (accuracy per class, the paper's Table 2).

Official layout under `data.source`: `problems.json` ({pid: problem}), `pid_splits.json`
({split: [pid, ...]}) and `images/<split>/<pid>/image.png` for problems whose `image` is set.
The text follows ScienceQA's own question / context / options format (context = the hint, or
"N/A"; with `scienceqa.captions` an image problem's caption joins the context, as the dataset's
text baselines do); the target is "The answer is (X)." Training records come from the official
train split, held-out loss from its val split; `data.limit` keeps the first N problems of each.

Scoring: a generation counts as answered only when it holds exactly one "The answer is (X)" with an
upper-case letter (the extraction used with this target format, mm-cot's): parser "standard".
"lenient" (any case, brackets optional, the first match) is kept as a named option only.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow as pa
import ray

from adapter.loader import tokenizer_for
from adapter.settings import project_path
from adapter.tokenizer import load_tokenizer
from pipelines.data.record_output import (
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
from pipelines.evaluation.llama_predictor import predict
from pipelines.job_config import TrainConfig
from pipelines.tasks.base import LlamaTask

LETTERS = "ABCDE"
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CLASSES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")  # the paper's Table 2 columns
LENIENT_ANSWER = re.compile(r"the answer is\s*\(?\s*([a-z])\s*\)?(?![a-z])", re.IGNORECASE)
STANDARD_ANSWER = re.compile(r"The answer is \(([A-Z])\)")
PARSERS = ("standard", "lenient")


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


def format_problem(p: dict, caption: str = "") -> str:
    """ScienceQA's "QCM" input: question, context (hint, then the image's caption when given, or
    N/A), options (A) .. (E)."""
    context = " ".join([(p.get("hint") or "").strip(), (caption or "").strip()]).strip() or "N/A"
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


def parse_answer(text: str, n_choices: int, parser: str = "standard") -> tuple[str | None, str]:
    """(letter, "ok") for an answered generation, else (None or the letter, why): "no_answer",
    "several_answers" (standard only) or "out_of_range" (a letter past the options).
    standard: exactly one "The answer is (X)", X upper-case; lenient: the first match, any case,
    brackets optional."""
    if parser == "standard":
        found = STANDARD_ANSWER.findall(text or "")
        if len(found) > 1:
            return None, "several_answers"
        letter = found[0] if found else None
    elif parser == "lenient":
        m = LENIENT_ANSWER.search(text or "")
        letter = m.group(1).upper() if m else None
    else:
        raise ValueError(f"unknown answer parser {parser!r} (known: {', '.join(PARSERS)})")
    if letter is None:
        return None, "no_answer"
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


def read_captions(path: str | None) -> dict[str, str]:
    """ScienceQA's released captions ({"captions": {pid: text}}), or none."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    captions = data.get("captions", data) if isinstance(data, dict) else None
    if not isinstance(captions, dict):
        raise ValueError(f"{path}: expected {{'captions': {{pid: text}}}}")
    return {str(k): v for k, v in captions.items() if isinstance(v, str)}


class EncodeProblems:
    """Ray Data callable class: tokenizer loaded once per actor; images read and checked here."""

    def __init__(self, tokenizer: str, max_seq_len: int, missing_image: str, captions: dict[str, str]):
        self.tok, self.max_seq_len, self.missing_image = load_tokenizer(tokenizer), max_seq_len, missing_image
        self.captions = captions

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
            caption = self.captions.get(rows["key"][i], "") if p.get("image") else ""
            set_record(rows, i, self.tok, format_problem(p, caption), answer_text(p), self.max_seq_len, split, image)
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


def eval_rows(cfg: TrainConfig) -> tuple[list[dict], dict, list[dict]]:
    """(rows to run, problems by pid, set-aside problems with the reason) of `evaluation.split`."""
    e = cfg.evaluation
    pids, problems = load_split(Path(cfg.data.source), e.split, e.limit)
    root, rows, aside, kept = images_root(cfg), [], [], {}
    captions = read_captions(cfg.scienceqa.captions)
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
        caption = captions.get(pid, "") if p.get("image") else ""
        rows.append({"key": pid, "prompt": format_problem(p, caption), "image": image})
        kept[pid] = p
    return rows, kept, aside


def score(problems: dict, predictions: list[dict], parser: str = "standard") -> list[dict]:
    out = []
    for r in predictions:
        p = problems[r["key"]]
        truth = LETTERS[p["answer"]]
        if r["error"]:
            letter, parse = None, r["error"].split(":")[0]
        else:
            letter, parse = parse_answer(r["generation"], len(p["choices"]), parser)
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


class ScienceQA(LlamaTask):
    name = "scienceqa"
    description = "ScienceQA multiple choice, text or with the image token (accuracy per class)"
    prompt_template = "raw"  # trained on ScienceQA's own "Question: ... Answer:" text

    def fingerprint(self, cfg: TrainConfig) -> dict:
        source = Path(cfg.data.source)
        paths = [Path(r["image_path"]) for r in input_rows(cfg) if r["image_path"]]
        return {
            "format": FORMAT_VERSION,
            "task": "scienceqa",
            "problems_sha256": sha256_file(source / "problems.json"),
            "splits_sha256": sha256_file(source / "pid_splits.json"),
            "images": listing_digest(paths),
            "missing_image": cfg.scienceqa.missing_image,
            "captions_sha256": sha256_file(Path(cfg.scienceqa.captions)) if cfg.scienceqa.captions else None,
            "tokenizer_sha256": sha256_file(tokenizer_for(cfg.model).path),
            "max_seq_len": cfg.data.max_seq_len,
            "limit": cfg.data.limit,
        }

    def build_records(self, cfg: TrainConfig) -> dict:
        t0 = time.time()
        rows = input_rows(cfg)
        if not rows:
            raise ValueError(f"{cfg.data.source}: no ScienceQA problems in the train / val splits")
        captions = read_captions(cfg.scienceqa.captions)
        processed = (
            from_rows(rows)
            .map_batches(
                EncodeProblems,
                fn_constructor_args=(
                    str(tokenizer_for(cfg.model).path),
                    cfg.data.max_seq_len,
                    cfg.scienceqa.missing_image,
                    captions,
                ),
                batch_format="pyarrow",
                batch_size=256,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
            )
            .materialize()
        )
        with_image = sum(1 for r in rows if r["image_path"])
        extra = {"task": "scienceqa", "source": cfg.data.source, "problems_with_image": with_image}
        return write_output(processed, Path(cfg.data.out), cfg, self.fingerprint(cfg), extra, t0)

    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        """Greedy answers by Ray Data batch inference; a generation the parser cannot read (or a
        letter past the options, or a row that could not be run) counts as WRONG and is listed.
        Writes accuracy.json, table.md (one row shaped like the paper's Table 2) and
        predictions.jsonl; malformed problems, or image problems whose image is missing under
        `missing_image: reject`, are set aside (listed, not scored)."""
        t0 = time.time()
        rows, problems, aside = eval_rows(cfg)
        if not rows:
            raise ValueError(
                f"no ScienceQA problems to evaluate in split {cfg.evaluation.split!r} ({len(aside)} set aside)"
            )
        parser = cfg.scienceqa.answer_parser
        t_pred = time.time()
        scored = score(problems, predict(cfg, adapter, rows), parser)
        pred_s = time.time() - t_pred
        acc = accuracy(scored)
        with open(out / "predictions.jsonl", "w") as f:
            for r in scored:
                f.write(json.dumps(r) + "\n")
        with_image = sum(1 for r in rows if r["image"] is not None) if cfg.vision else 0
        label = f"{cfg.name} ({cfg.evaluation.split}; {with_image} of {len(scored)} with their image)"
        (out / "table.md").write_text(markdown_table(acc, label))
        unparseable = [r["pid"] for r in scored if r["parse"] != "ok"]
        result = {
            "split": cfg.evaluation.split,
            "adapter": adapter,
            "answer_parser": parser,
            "problems": len(scored),
            "accuracy": acc,
            "wrong_unparseable": unparseable,
            "parse_results": {
                k: sum(1 for r in scored if r["parse"] == k) for k in sorted({r["parse"] for r in scored})
            },
            "set_aside": aside,
            "with_image": with_image,
            "captions": bool(cfg.scienceqa.captions),
            "predict_seconds": round(pred_s, 2),
            "problems_per_s": round(len(scored) / pred_s, 2),
            "actors": cfg.evaluation.actors,
            "seconds": round(time.time() - t0, 2),
            "out": str(out),
        }
        (out / "accuracy.json").write_text(json.dumps(result, indent=2))
        result["report"] = (
            markdown_table(acc, label)
            + f"[evaluate] {len(scored)} problems, answer parser {parser!r}: {len(unparseable)} unparseable "
            f"(counted wrong), {len(aside)} set aside; {result['problems_per_s']} problems/s -> {out}"
        )
        return result
