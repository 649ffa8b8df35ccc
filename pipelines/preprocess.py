"""Ray Data job: Alpaca demonstrations -> tokenized, loss-masked parquet shards.

    python -m pipelines.preprocess --config tiny-cpu [--set data.source=PATH_OR_URL --set data.out=DIR]
    ray job submit --working-dir . -- python -m pipelines.preprocess --config tiny-cpu

It reads the `model` (tokenizer, context) and `data` sections of a training config, so the data a
training run uses can be built on its own first.

Each record becomes BOS + prompt + response + EOS (METHOD.md section 4), with the prompt and
BOS labelled IGNORE_INDEX (-100, not 0, which is <unk>). The prompt and the response are
tokenized separately: the prompt exactly as the model sees it at inference time, the response
as the model should produce it, so the loss mask never straddles a merged piece. Sequences longer
than max_seq_len are cut at the end; the EOS of a cut response is gone (teaching EOS there would
teach stopping mid-answer). Nothing is dropped silently: every bad record is counted by reason
and written with the reason to rejects.jsonl. Output is built in a temporary folder and swapped
into place, so a half-written output never looks complete; stats.json carries a fingerprint of
everything the records depend on (input and tokenizer hashes, lengths, split), so stale output is
never reused.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from adapter.adapter import IGNORE_INDEX
from adapter.loader import model_context
from adapter.prompts import format_prompt
from adapter.settings import add_config_args, config_from_args, project_path, save_config
from adapter.tokenizer import Tokenizer
from pipelines.config import PreprocessConfig, TrainConfig
from pipelines.data_source import fetch, read_raw_records, sha256_of
from pipelines.folders import fresh_tmp, replace_dir
from pipelines.ray_session import connect

FIELDS = ("instruction", "input", "output")
OUTPUT_SCHEMA = pa.schema([
    ("idx", pa.int64()),
    ("split", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("num_response_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
    ("raw", pa.string()),
])


def validate(raw: str) -> tuple[dict | None, str, str]:
    """(record, "", "") for a good record, else (None, reason, detail)."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, "invalid_json", str(e)
    if not isinstance(rec, dict):
        return None, "not_an_object", type(rec).__name__
    missing = [f for f in ("instruction", "output") if f not in rec]
    if missing:
        return None, "missing_field", ",".join(missing)
    extra = sorted(set(rec) - set(FIELDS))
    if extra:
        return None, "extra_field", ",".join(extra)
    rec.setdefault("input", "")
    bad_type = [f for f in FIELDS if not isinstance(rec[f], str)]
    if bad_type:
        return None, "non_string_field", ",".join(f"{f}:{type(rec[f]).__name__}" for f in bad_type)
    if not rec["instruction"].strip():
        return None, "empty_instruction", ""
    if not rec["output"].strip():
        return None, "empty_output", ""
    return rec, "", ""


class TokenizeBatch:
    """Ray Data callable class: SentencePiece is loaded once per worker, not per batch."""

    def __init__(self, tokenizer_path: str, max_seq_len: int, val_indices: np.ndarray):
        self.tok = Tokenizer(tokenizer_path)
        self.max_seq_len = max_seq_len
        self.val = set(int(i) for i in val_indices)

    def __call__(self, batch: pa.Table) -> pa.Table:
        idx = batch.column("idx").to_pylist()
        raws = batch.column("raw").to_pylist()
        checked = [validate(r) for r in raws]
        good = [i for i, (rec, _, _) in enumerate(checked) if rec is not None]
        # One thread per Ray CPU slot: more would oversubscribe the cores Ray already shares out.
        prompts = self.tok.encode_batch([format_prompt(checked[i][0]["instruction"], checked[i][0]["input"])
                                         for i in good], num_threads=1)
        responses = self.tok.encode_batch([checked[i][0]["output"] for i in good], num_threads=1)
        rows = {name: [None] * len(raws) for name in OUTPUT_SCHEMA.names}
        rows["idx"] = idx
        for i, (rec, reason, detail) in enumerate(checked):
            rows["reject_reason"][i], rows["reject_detail"][i] = reason, detail
            rows["raw"][i] = raws[i] if reason else None
        for i, p, r in zip(good, prompts, responses):
            ids = [self.tok.bos_id] + p + r + [self.tok.eos_id]
            labels = [IGNORE_INDEX] * (1 + len(p)) + r + [self.tok.eos_id]
            truncated = len(ids) > self.max_seq_len
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            n_resp = sum(1 for x in labels if x != IGNORE_INDEX)
            if n_resp == 0:
                rows["reject_reason"][i] = "no_response_tokens_after_truncation"
                rows["reject_detail"][i] = f"prompt alone is {len(p) + 1} tokens, max_seq_len {self.max_seq_len}"
                rows["raw"][i] = raws[i]
                continue
            rows["input_ids"][i], rows["labels"][i] = ids, labels
            rows["num_tokens"][i], rows["num_response_tokens"][i] = len(ids), n_resp
            rows["truncated"][i] = truncated
            rows["split"][i] = "val" if idx[i] in self.val else "train"
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


def choose_validation(n: int, fraction: float, seed: int) -> np.ndarray:
    """Held-out record indices, disjoint from training (unlike the authors' first-200 'val')."""
    k = int(round(n * fraction))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 95, 99])
    return {"mean": float(lengths.mean()), "p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]),
            "p99": float(q[3]), "max": int(lengths.max()), "min": int(lengths.min())}


FORMAT_VERSION = 1  # bump when the records written change meaning


def fingerprint(cfg: PreprocessConfig, source: Path) -> dict:
    """Everything the written records depend on; stored in stats.json and checked before reuse."""
    d = cfg.data
    return {"format": FORMAT_VERSION, "source_sha256": sha256_of(source),
            "tokenizer_sha256": sha256_of(Path(project_path(cfg.model.tokenizer))),
            "max_seq_len": d.max_seq_len, "val_fraction": d.val_fraction, "seed": d.seed, "limit": d.limit}


def changed_settings(out: Path, expected: dict) -> list[str] | None:
    """None when `out` holds no finished output; else the settings it was built with that differ."""
    stats_path = Path(out) / "stats.json"
    if not stats_path.is_file():
        return None
    try:
        built = json.loads(stats_path.read_text()).get("fingerprint") or {}
    except json.JSONDecodeError:
        return ["stats.json (unreadable)"]
    return [f"{k}: {built.get(k)!r} -> {v!r}" for k, v in expected.items() if built.get(k) != v]


def check_context(cfg: PreprocessConfig) -> None:
    ctx = model_context(cfg.model)
    if cfg.data.max_seq_len > ctx:
        raise ValueError(f"data.max_seq_len {cfg.data.max_seq_len} is longer than the model's context of "
                         f"{ctx} tokens")


def run(cfg: PreprocessConfig, num_blocks: int | None = None) -> dict:
    """Preprocess into cfg.data.out; returns the stats written to stats.json."""
    import ray
    from ray.data.expressions import col

    t0 = time.time()
    check_context(cfg)
    d = cfg.data
    source = fetch(project_path(d.source), d.sha256)
    tokenizer = project_path(cfg.model.tokenizer)
    raw = read_raw_records(source)
    if d.limit is not None:
        raw = raw[: d.limit]
    if not raw:
        raise ValueError(f"{d.source}: no records")
    if not ray.is_initialized():
        connect(cfg.ray)
    table = pa.table({"idx": pa.array(range(len(raw)), pa.int64()), "raw": pa.array(raw, pa.string())})
    # One block per slice (no repartition task: on a 1-CPU cluster it would wait forever behind
    # the tokenizer actor holding that CPU).
    blocks = num_blocks or max(1, min(64, len(raw) // 2000))
    step = -(-len(raw) // blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(raw), step)])
    val_idx = choose_validation(len(raw), d.val_fraction, d.seed)
    processed = ds.map_batches(
        TokenizeBatch, fn_constructor_args=(tokenizer, d.max_seq_len, val_idx),
        batch_format="pyarrow", batch_size=1024, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=8),
    ).materialize()

    out = Path(project_path(d.out))
    tmp = fresh_tmp(out)
    good_cols = ["idx", "input_ids", "labels", "num_tokens", "num_response_tokens", "truncated"]
    for split in ("train", "val"):
        part = processed.filter(expr=col("split") == split).select_columns(good_cols)
        # write_parquet skips empty datasets; an empty split folder still tells readers "none".
        (tmp / split).mkdir()
        part.write_parquet(str(tmp / split))

    summary = processed.select_columns(
        ["idx", "split", "num_tokens", "num_response_tokens", "truncated", "reject_reason"]).to_arrow_refs()
    summary = pa.concat_tables(ray.get(summary)).sort_by("idx")
    rejects = processed.filter(expr=col("reject_reason") != "").select_columns(
        ["idx", "reject_reason", "reject_detail", "raw"]).take_all()
    with open(tmp / "rejects.jsonl", "w") as f:
        for r in sorted(rejects, key=lambda r: r["idx"]):
            f.write(json.dumps({"index": r["idx"], "reason": r["reject_reason"], "detail": r["reject_detail"],
                                "record": r["raw"]}, ensure_ascii=False) + "\n")

    reasons = Counter(summary.column("reject_reason").to_pylist())
    reasons.pop("", None)
    splits = Counter(summary.column("split").to_pylist())
    kept = summary.filter(pc.equal(summary.column("reject_reason"), ""))
    lengths = kept.column("num_tokens").to_numpy()
    stats = {
        "source": d.source,
        "source_file": str(source),
        "tokenizer": tokenizer,
        "max_seq_len": d.max_seq_len,
        "seed": d.seed,
        "records_read": len(raw),
        "records_written": kept.num_rows,
        "records_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "train_records": splits.get("train", 0),
        "val_records": splits.get("val", 0),
        "truncated": int(np.sum(kept.column("truncated").to_numpy(zero_copy_only=False))),
        "total_tokens": int(lengths.sum()),
        "response_tokens": int(kept.column("num_response_tokens").to_numpy().sum()),
        "token_length": length_stats(lengths),
        "seconds": round(time.time() - t0, 2),
        "fingerprint": fingerprint(cfg, source),
    }
    if stats["records_written"] + stats["records_rejected"] != stats["records_read"]:
        raise RuntimeError(f"records lost: {stats['records_read']} read, {stats['records_written']} written, "
                           f"{stats['records_rejected']} rejected")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))  # last: marks the output complete
    replace_dir(tmp, out)
    return stats


def is_complete(out: Path) -> bool:
    """The output of a finished run: stats.json is written last, inside the renamed folder."""
    return (Path(out) / "stats.json").is_file()


def read_split(out: Path, split: str) -> pa.Table:
    files = sorted((Path(out) / split).glob("*.parquet"))
    if not files:
        return OUTPUT_SCHEMA.empty_table().select(["idx", "input_ids", "labels", "num_tokens",
                                                   "num_response_tokens", "truncated"])
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("idx")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="tiny-cpu")
    # A training config holds more sections than this job reads; they are left to the training job.
    cfg = config_from_args(PreprocessConfig, ap.parse_args(argv),
                           ignore=set(TrainConfig.model_fields) - set(PreprocessConfig.model_fields))
    connect(cfg.ray)
    out = project_path(cfg.data.out)
    print(f"[preprocess] {cfg.data.source} -> {out}", flush=True)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("token_length", "fingerprint")}, indent=2))
    print(f"[preprocess] wrote {stats['records_written']} records to {out} "
          f"({stats['records_rejected']} rejected, see {Path(out) / 'rejects.jsonl'})")
    return stats


if __name__ == "__main__":
    main()
