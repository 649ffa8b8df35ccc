"""Instruction records (Alpaca's format) -> tokenized, loss-masked parquet shards, with Ray Data.
The alpaca task (pipelines/tasks/alpaca.py) builds its records here; the preprocessing job
(`python -m pipelines.preprocess`) and the training driver call it through the task.

Each record becomes BOS + prompt + response + EOS (docs/method.md), with the prompt and
BOS labelled IGNORE_INDEX (-100, not 0, which is <unk>). The prompt and the response are
tokenized separately: the prompt exactly as the model sees it at inference time, the response
as the model should produce it, so the loss mask never straddles a merged piece. Sequences longer
than max_seq_len are cut at the end; the EOS of a cut response is gone (teaching EOS there would
teach stopping mid-answer). Nothing is dropped silently: every bad record is counted by reason
and written with the reason to rejects.jsonl, and written + rejected == read is checked against
what is on disk. Output is built in a temporary folder and swapped into place, so a half-written
output never looks complete; stats.json carries a fingerprint of everything the records depend
on (input, tokenizer, lengths, split), so stale output is never reused.

The driver holds no record. Ray Data reads (`records_reader`: JSON Lines, JSON arrays, parquet;
a file, folder, glob or URI), a task-based `map_batches` validates and tokenizes, and a
`Datasink` (`SplitSink`) writes each write task's train / val parquet shard and its rejects, and
returns that task's partial stats (counts by reason, token sums, a per-length histogram), which
the driver merges. The held-out split is a seeded hash of each record's content (`held_out`), so
no index set exists: the same record lands in the same split at any scale, in any format, in any
partitioning.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from adapter.adapter import IGNORE_INDEX
from adapter.loader import model_context, tokenizer_for
from adapter.prompts import format_prompt
from adapter.settings import project_path, save_config
from adapter.tokenizer import load_tokenizer
from pipelines.data.folders import fresh_tmp, replace_dir
from pipelines.data.records_reader import FIELDS, read_records
from pipelines.data.sources import DataSourceError, Source, fetch, sha256_of, source_digest
from pipelines.data.splits import held_out as split_held_out
from pipelines.job_config import PreprocessConfig
from pipelines.ray_session import connect

GOOD_COLUMNS = ["idx", "input_ids", "labels", "num_tokens", "num_response_tokens", "truncated"]
OUTPUT_SCHEMA = pa.schema(
    [
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
    ]
)
BATCH_RECORDS = 1024
ROWS_PER_SHARD = 8192
HISTOGRAM_BINS = 16


def validate(raw: str, unterminated: bool = False) -> tuple[dict | None, str, str]:
    """(record, "", "") for a good record, else (None, reason, detail)."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        # A last line without its newline that does not parse: the file was cut off mid-record.
        return None, "truncated_last_line" if unterminated else "invalid_json", str(e)
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
    for f in FIELDS:
        # JSON may escape half a surrogate pair ("\ud83d"); json.loads accepts it, but no UTF-8
        # text (a tokenizer's input, a parquet string) can hold it.
        try:
            rec[f].encode("utf-8")
        except UnicodeEncodeError as e:
            return None, "lone_surrogate", f"{f}: {e.reason} at {e.start}"
    if not rec["instruction"].strip():
        return None, "empty_instruction", ""
    if not rec["output"].strip():
        return None, "empty_output", ""
    return rec, "", ""


def held_out(rec: dict, val_fraction: float, seed: int) -> bool:
    """An instruction record's split: by (instruction, input, output), pipelines/data/splits.py."""
    return split_held_out(tuple(rec[f] for f in FIELDS), val_fraction, seed)


class TokenizeBatch:
    """Validate, split and tokenize a block of (idx, raw[, reject_reason, reject_detail,
    unterminated]) rows into OUTPUT_SCHEMA rows, one out per row in."""

    def __init__(self, tokenizer_path: str, max_seq_len: int, val_fraction: float = 0.0, seed: int = 0):
        self.tok = load_tokenizer(tokenizer_path)
        self.max_seq_len = max_seq_len
        self.val_fraction, self.seed = val_fraction, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        idx = batch.column("idx").to_pylist()
        raws = batch.column("raw").to_pylist()
        n = len(raws)
        names = batch.column_names
        pre_reason = batch.column("reject_reason").to_pylist() if "reject_reason" in names else [""] * n
        pre_detail = batch.column("reject_detail").to_pylist() if "reject_detail" in names else [""] * n
        unterminated = batch.column("unterminated").to_pylist() if "unterminated" in names else [False] * n
        checked = [
            (None, pre_reason[i], pre_detail[i]) if pre_reason[i] else validate(raws[i], unterminated[i])
            for i in range(n)
        ]
        good = [i for i, (rec, _, _) in enumerate(checked) if rec is not None]
        # One thread per Ray CPU slot: more would oversubscribe the cores Ray already shares out.
        prompts = self.tok.encode_batch(
            [format_prompt(checked[i][0]["instruction"], checked[i][0]["input"]) for i in good], num_threads=1
        )
        responses = self.tok.encode_batch([checked[i][0]["output"] for i in good], num_threads=1)
        rows = {name: [None] * n for name in OUTPUT_SCHEMA.names}
        rows["idx"] = idx
        for i, (_rec, reason, detail) in enumerate(checked):
            rows["reject_reason"][i], rows["reject_detail"][i] = reason, detail
            rows["raw"][i] = raws[i] if reason else None
        for i, p, r in zip(good, prompts, responses):
            # The base's start-of-sequence tokens (none for a base whose file says not to add one).
            bos = self.tok.bos_prefix
            ids = bos + p + r + [self.tok.eos_id]
            labels = [IGNORE_INDEX] * (len(bos) + len(p)) + r + [self.tok.eos_id]
            truncated = len(ids) > self.max_seq_len
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            n_resp = len(labels) - min(len(labels), len(bos) + len(p))
            if n_resp == 0:
                rows["reject_reason"][i] = "no_response_tokens_after_truncation"
                rows["reject_detail"][i] = f"prompt alone is {len(p) + len(bos)} tokens, max_seq_len {self.max_seq_len}"
                rows["raw"][i] = raws[i]
                continue
            rows["input_ids"][i], rows["labels"][i] = ids, labels
            rows["num_tokens"][i], rows["num_response_tokens"][i] = len(ids), n_resp
            rows["truncated"][i] = truncated
            rows["split"][i] = "val" if held_out(checked[i][0], self.val_fraction, self.seed) else "train"
        return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)


@functools.lru_cache(maxsize=4)
def _tokenizer_for(tokenizer_path: str, max_seq_len: int, val_fraction: float, seed: int) -> TokenizeBatch:
    # Ray reuses a worker process for many tasks: SentencePiece loads once per process, not per batch.
    return TokenizeBatch(tokenizer_path, max_seq_len, val_fraction, seed)


def tokenize_block(batch: pa.Table, **settings) -> pa.Table:
    return _tokenizer_for(**settings)(batch)


# --- stats: per write task, merged on the driver ----------------------------------------------------
def empty_partial(max_seq_len: int) -> dict:
    return {
        "read": 0,
        "written": {"train": 0, "val": 0},
        "rejected": {},
        "truncated": 0,
        "total_tokens": 0,
        "response_tokens": 0,
        "length_counts": np.zeros(max_seq_len + 1, dtype=np.int64),
        "cpu_seconds": 0.0,
    }


def add_to_partial(part: dict, table: pa.Table) -> pa.Table:
    """Count one tokenized block into `part`; returns its good rows."""
    part["read"] += table.num_rows
    reasons = table.column("reject_reason")
    good = table.filter(pc.equal(reasons, ""))
    for reason, count in Counter(r for r in reasons.to_pylist() if r).items():
        part["rejected"][reason] = part["rejected"].get(reason, 0) + count
    lengths = good.column("num_tokens").to_numpy()
    part["length_counts"] += np.bincount(lengths, minlength=len(part["length_counts"]))
    part["total_tokens"] += int(lengths.sum())
    part["response_tokens"] += int(good.column("num_response_tokens").to_numpy().sum())
    part["truncated"] += int(pc.sum(good.column("truncated").cast(pa.int64())).as_py() or 0)
    return good


def merge_partials(parts: list[dict], max_seq_len: int) -> dict:
    total = empty_partial(max_seq_len)
    for p in parts:
        for key in ("read", "truncated", "total_tokens", "response_tokens", "cpu_seconds"):
            total[key] += p[key]
        for split in ("train", "val"):
            total["written"][split] += p["written"][split]
        for reason, count in p["rejected"].items():
            total["rejected"][reason] = total["rejected"].get(reason, 0) + count
        total["length_counts"] += p["length_counts"]
    return total


def length_stats(counts: np.ndarray) -> dict:
    """mean, percentiles (numpy's default linear interpolation), min, max and a histogram of the
    token lengths, from their counts per length (exact: lengths are integers <= max_seq_len)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return {}
    cdf = np.cumsum(counts)
    lengths = np.arange(len(counts))

    def order_stat(k: int) -> int:  # the k-th smallest length, from 0
        return int(np.searchsorted(cdf, k + 1))

    def percentile(q: float) -> float:
        pos = (n - 1) * q / 100
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        a, b = order_stat(lo), order_stat(hi)
        return float(a + (b - a) * (pos - lo))

    nonzero = np.nonzero(counts)[0]
    width = -(-len(counts) // HISTOGRAM_BINS)
    hist = [int(counts[i : i + width].sum()) for i in range(0, len(counts), width)]
    return {
        "mean": float((lengths * counts).sum() / n),
        "p50": percentile(50),
        "p90": percentile(90),
        "p95": percentile(95),
        "p99": percentile(99),
        "max": int(nonzero[-1]),
        "min": int(nonzero[0]),
        "histogram": {"bin_width": width, "counts": hist},
    }


class SplitSink(Datasink):
    """Each write task writes `train/part-T.parquet`, `val/part-T.parquet` and
    `_rejects/part-T.jsonl` (sorted by idx) and returns its partial stats."""

    def __init__(self, folder: Path, max_seq_len: int):
        self.folder, self.max_seq_len = Path(folder), max_seq_len
        self.partials: list[dict] = []

    def write(self, blocks, ctx) -> dict:
        cpu0 = time.process_time()
        part = empty_partial(self.max_seq_len)
        writers, rejects = {}, []
        name = f"part-{ctx.task_idx:06d}"
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if table.num_rows == 0:
                    continue
                good = add_to_partial(part, table)
                for split in ("train", "val"):
                    rows = good.filter(pc.equal(good.column("split"), split)).select(GOOD_COLUMNS)
                    if rows.num_rows == 0:
                        continue
                    if split not in writers:
                        path = self.folder / split / f"{name}.parquet"
                        writers[split] = pq.ParquetWriter(path, rows.schema)
                    writers[split].write_table(rows)
                    part["written"][split] += rows.num_rows
                bad = table.filter(pc.not_equal(table.column("reject_reason"), ""))
                rejects += bad.select(["idx", "reject_reason", "reject_detail", "raw"]).to_pylist()
        finally:
            for w in writers.values():
                w.close()
        if rejects:
            rejects.sort(key=lambda r: r["idx"])
            with open(self.folder / "_rejects" / f"{name}.jsonl", "w") as f:
                for r in rejects:
                    f.write(
                        json.dumps(
                            {
                                "index": r["idx"],
                                "reason": r["reject_reason"],
                                "detail": r["reject_detail"],
                                "record": r["raw"],
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
        # CPU time of this task: it pulls its blocks through the fused tokenize step.
        part["cpu_seconds"] = time.process_time() - cpu0
        return part

    @property
    def min_rows_per_write(self) -> int:
        # Fewer, larger shards (Ray Data bundles blocks up to this many rows per write task).
        return ROWS_PER_SHARD

    def on_write_complete(self, write_result) -> None:
        self.partials = list(write_result.write_returns)

    def get_name(self) -> str:
        return "WriteSplits"


def merge_rejects(parts: Path, target: Path) -> int:
    """The write tasks' sorted reject files merged (streamed) into one, ordered by index."""
    files = [open(p) for p in sorted(parts.glob("*.jsonl"))]
    n = 0
    try:
        with open(target, "w") as out:
            for line in heapq.merge(*files, key=lambda line: json.loads(line)["index"]):
                out.write(line)
                n += 1
    finally:
        for f in files:
            f.close()
    return n


FORMAT_VERSION = 2  # bump when the records written change meaning (2: the split is a hash of the record)


def fingerprint(cfg: PreprocessConfig, source: Source | Path) -> dict:
    """Everything the written records depend on; stored in stats.json and checked before reuse.
    `source_sha256` is the content of a single file, or the listing of a folder / glob's files
    (see data_source.source_digest for why), and `source_hashed` says which."""
    d = cfg.data
    hashed, digest = source_digest(source)
    return {
        "format": FORMAT_VERSION,
        "source_sha256": digest,
        "source_hashed": hashed,
        "tokenizer_sha256": sha256_of(tokenizer_for(cfg.model).path),
        "max_seq_len": d.max_seq_len,
        "val_fraction": d.val_fraction,
        "seed": d.seed,
        "limit": d.limit,
        "max_record_bytes": d.max_record_bytes,
    }


def check_context(cfg: PreprocessConfig) -> None:
    ctx = model_context(cfg.model)
    if cfg.data.max_seq_len > ctx:
        raise ValueError(f"data.max_seq_len {cfg.data.max_seq_len} is longer than the model's context of {ctx} tokens")


def _source_error(e: BaseException) -> DataSourceError | None:
    """A DataSourceError raised in a Ray task, from what Ray Data re-raises (its message carries
    the worker's traceback and Ray's retry advice; the first line of the original is kept)."""
    while e is not None:
        if isinstance(e, DataSourceError):
            m = re.search(r"DataSourceError: (.+)", str(e))
            return DataSourceError(m.group(1) if m else str(e))
        e = e.__cause__
    return None


def write_records(
    source: Source,
    cfg: PreprocessConfig,
    tokenizer: str,
    folder: Path,
    read_tasks: int | None = None,
    concurrency: int | None = None,
) -> list[dict]:
    """read -> validate + tokenize -> SplitSink into `folder`; returns the write tasks' partial stats."""
    from ray.data import DataContext

    d = cfg.data
    ctx = DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    first_n = d.limit is not None and len(source.files) > 1
    try:
        if first_n:
            # "The first N" across files: files in their listed order, then records in file order
            # (set before the dataset is made: it keeps a copy of the context).
            ctx.execution_options.preserve_order = True
        ds = read_records(
            source,
            d.max_record_bytes,
            d.limit,
            read_tasks=read_tasks,
            concurrency=min(concurrency, len(source.files)) if concurrency else None,
        )
        if first_n:
            ds = ds.limit(d.limit)
        ds = ds.map_batches(
            tokenize_block,
            batch_format="pyarrow",
            batch_size=BATCH_RECORDS,
            fn_kwargs={
                "tokenizer_path": tokenizer,
                "max_seq_len": d.max_seq_len,
                "val_fraction": d.val_fraction,
                "seed": d.seed,
            },
        )
        sink = SplitSink(folder, d.max_seq_len)
        ds.write_datasink(sink)
        return sink.partials
    finally:
        ctx.execution_options.preserve_order = preserve


def run(cfg: PreprocessConfig, num_blocks: int | None = None) -> dict:
    """Preprocess into cfg.data.out; returns the stats written to stats.json. `num_blocks`: read
    tasks (default: Ray Data's choice, at most one per file)."""
    import ray

    t0 = time.time()
    check_context(cfg)
    d = cfg.data
    source = fetch(project_path(d.source), d.sha256, download=d.download)
    tokenizer = str(tokenizer_for(cfg.model).path)  # the base's own, or the configured file
    fp = fingerprint(cfg, source)  # before reading: what the records are built from
    if not ray.is_initialized():
        connect(cfg.ray)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    out = Path(project_path(d.out))
    tmp = fresh_tmp(out)
    for sub in ("train", "val", "_rejects"):
        (tmp / sub).mkdir()

    try:
        partials = write_records(source, cfg, tokenizer, tmp, read_tasks=num_blocks, concurrency=cpus)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _source_error(e)
        if err is not None:
            raise err from None
        raise

    total = merge_partials(partials, d.max_seq_len)
    if total["read"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataSourceError(f"{d.source}: no records")
    rejected_on_disk = merge_rejects(tmp / "_rejects", tmp / "rejects.jsonl")
    shutil.rmtree(tmp / "_rejects")
    written_on_disk = {
        split: sum(pq.read_metadata(f).num_rows for f in (tmp / split).glob("*.parquet")) for split in ("train", "val")
    }
    reasons = dict(sorted(total["rejected"].items()))
    stats = {
        "source": d.source,
        "source_file": str(source),
        "source_files": len(source.files),
        "tokenizer": tokenizer,
        "max_seq_len": d.max_seq_len,
        "seed": d.seed,
        "records_read": total["read"],
        "records_written": sum(written_on_disk.values()),
        "records_rejected": rejected_on_disk,
        "rejected_by_reason": reasons,
        "train_records": written_on_disk["train"],
        "val_records": written_on_disk["val"],
        "truncated": total["truncated"],
        "total_tokens": total["total_tokens"],
        "response_tokens": total["response_tokens"],
        "token_length": length_stats(total["length_counts"]),
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds_tokenize_and_write": round(total["cpu_seconds"], 2),
        "fingerprint": fp,
    }
    # Nothing lost: the rows counted in (read), on disk (parquet row counts, reject lines), and
    # in the tasks' own tallies must all agree.
    accounted = stats["records_written"] + stats["records_rejected"]
    stats["accounted"] = {"written_plus_rejected": accounted, "equals_read": accounted == stats["records_read"]}
    if (
        accounted != stats["records_read"]
        or written_on_disk != total["written"]
        or rejected_on_disk != sum(reasons.values())
    ):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"records lost: {stats['records_read']} read, {stats['records_written']} written "
            f"({total['written']} counted), {stats['records_rejected']} rejected "
            f"({sum(reasons.values())} counted)"
        )
    if stats["records_written"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataSourceError(
            f"{d.source}: every one of its {stats['records_read']} records was rejected "
            f"({reasons}); is it the right file and format?"
        )
    if d.val_fraction > 0 and stats["val_records"] == 0:
        print(
            f"[preprocess] warning: no record fell into the held-out split (val_fraction {d.val_fraction} "
            f"of {stats['records_written']} records)",
            flush=True,
        )
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
        return OUTPUT_SCHEMA.empty_table().select(GOOD_COLUMNS)
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("idx")
