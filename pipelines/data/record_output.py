"""The training-record layout every task but Alpaca writes through `write_output` (Alpaca's own
streaming writer is pipelines/data/instructions.py): ScienceQA and COCO with the columns below,
the backbone tasks with their own columns.

The output is the layout the training job reads for Alpaca (`<out>/train/*.parquet`,
`<out>/val/*.parquet` with idx, input_ids, labels, num_tokens, num_response_tokens, truncated;
`stats.json` with a `fingerprint`, written last, in a folder swapped in whole), plus `image`: the
original image file's bytes (null when a record has none), checked decodable here so a training
worker never meets a corrupt one, and `key`: the problem id / image id the record came from.
Bad records are counted by reason and listed in rejects.jsonl; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from adapter.adapter import IGNORE_INDEX
from adapter.image_encoder import ImageError, decode_image
from adapter.settings import save_config
from pipelines.data.folders import fresh_tmp, replace_dir
from pipelines.data.sources import sha256_of

FORMAT_VERSION = 1  # bump when the records written change meaning
RECORD_COLUMNS = ["idx", "key", "input_ids", "labels", "num_tokens", "num_response_tokens", "truncated", "image"]
OUTPUT_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("num_response_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("image", pa.binary()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)


sha256_file = sha256_of  # one hashing routine for every input file (pipelines/data_source.py)


def listing_digest(paths: list[Path]) -> str:
    """A cheap fingerprint of an image set (names, sizes, mtimes): hashing every byte of 120K COCO
    images would cost more than preprocessing them."""
    h = hashlib.sha256()
    for p in sorted(paths):
        if p.is_file():
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def tokenize_pair(tok, prompt: str, response: str, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """BOS + prompt + response + EOS, the prompt and BOS labelled IGNORE_INDEX; cut at the end.
    BOS is the base's start-of-sequence prefix (none for a base whose file says not to add one)."""
    p, r = tok.encode(prompt, bos=False), tok.encode(response, bos=False)
    ids = tok.bos_prefix + p + r + [tok.eos_id]
    labels = [IGNORE_INDEX] * (len(tok.bos_prefix) + len(p)) + r + [tok.eos_id]
    return ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len


def read_image(path: str | None) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") for a usable image, else (None, reason, detail)."""
    if not path:
        return None, "", ""
    p = Path(path)
    if not p.is_file():
        return None, "image_missing", str(p)
    data = p.read_bytes()
    try:
        decode_image(data)
    except ImageError as e:
        return None, "image_corrupt", f"{p}: {e}"
    return data, "", ""


def new_rows(n: int) -> dict[str, list]:
    return {name: [None] * n for name in OUTPUT_SCHEMA.names}


def set_record(
    rows: dict, i: int, tok, prompt: str, response: str, max_seq_len: int, split: str, image: bytes | None
) -> None:
    """Fill row i with a tokenized record, or a reject when nothing of the response survives the cut."""
    ids, labels, truncated = tokenize_pair(tok, prompt, response, max_seq_len)
    n_resp = sum(1 for x in labels if x != IGNORE_INDEX)
    if n_resp == 0:
        rows["reject_reason"][i] = "no_response_tokens_after_truncation"
        rows["reject_detail"][i] = f"prompt alone is over max_seq_len {max_seq_len}"
        return
    rows["input_ids"][i], rows["labels"][i] = ids, labels
    rows["num_tokens"][i], rows["num_response_tokens"][i], rows["truncated"][i] = len(ids), n_resp, truncated
    rows["split"][i], rows["image"][i], rows["reject_reason"][i] = split, image, ""


def write_output(
    processed, out: Path, cfg, fingerprint: dict, extra: dict, t0: float, columns: list[str] = RECORD_COLUMNS
) -> dict:
    """Write the splits, rejects.jsonl and stats.json (last) into a fresh folder swapped in at `out`.
    `columns`: what the trainer reads (the encoder tasks have no token counts; their stats skip them).
    A reject has split "" and so lands in no split."""
    import ray
    from ray.data.expressions import col

    tokens = "num_tokens" in columns
    tmp = fresh_tmp(out)
    for split in ("train", "val"):
        (tmp / split).mkdir()  # an empty split folder still tells readers "none"
        processed.filter(expr=col("split") == split).select_columns(columns).write_parquet(str(tmp / split))
    summary = pa.concat_tables(
        ray.get(
            processed.select_columns(
                ["idx", "key", "split", "reject_reason", "reject_detail"]
                + (["num_tokens", "num_response_tokens", "truncated"] if tokens else [])
            ).to_arrow_refs()
        )
    ).sort_by("idx")
    reasons = Counter(r for r in summary.column("reject_reason").to_pylist() if r)
    with open(tmp / "rejects.jsonl", "w") as f:
        for r in summary.to_pylist():
            if r["reject_reason"]:
                f.write(
                    json.dumps(
                        {"index": r["idx"], "key": r["key"], "reason": r["reject_reason"], "detail": r["reject_detail"]}
                    )
                    + "\n"
                )
    kept = [r for r in summary.to_pylist() if not r["reject_reason"]]
    splits = Counter(r["split"] for r in kept)
    stats = {
        **extra,
        "records_read": summary.num_rows,
        "records_written": len(kept),
        "records_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "train_records": splits.get("train", 0),
        "val_records": splits.get("val", 0),
    }
    if tokens:
        lengths = np.array([r["num_tokens"] for r in kept])
        stats.update(
            {
                "truncated": sum(1 for r in kept if r["truncated"]),
                "total_tokens": int(lengths.sum()) if len(lengths) else 0,
                "response_tokens": sum(r["num_response_tokens"] for r in kept),
                "token_length_max": int(lengths.max()) if len(lengths) else 0,
            }
        )
    stats.update({"seconds": round(time.time() - t0, 2), "fingerprint": fingerprint})
    save_config(cfg, tmp / "config.yaml")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))  # last: marks the output complete
    replace_dir(tmp, out)
    return stats


def from_rows(rows: list[dict], block_size: int = 500):
    """A Ray dataset of the job's input rows, one block per slice (no repartition task: on a
    1-CPU cluster it would wait behind an actor holding that CPU)."""
    import ray

    table = pa.Table.from_pylist(rows)
    return ray.data.from_arrow([table.slice(i, block_size) for i in range(0, max(1, len(rows)), block_size)])


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
