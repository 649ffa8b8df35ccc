"""Preprocessing inputs that broke the job before issue 14 (each reproduced on main), the readers'
byte-level scanners, and the split's independence of format and partitioning (real local Ray)."""

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data import records_reader
from pipelines.data.instructions import fingerprint, length_stats, read_split, run
from pipelines.data.record_output import changed_settings
from pipelines.data.records_reader import FILE_SHIFT, _Rows, read_array, read_lines
from pipelines.data.sources import DataSourceError, fetch
from pipelines.job_config import DataConfig, PreprocessConfig
from tests.conftest import shared_file

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
GOOD2 = {"instruction": "Name a colour.", "input": "", "output": "Blue"}


def _cfg(source, out, **kw):
    return PreprocessConfig(
        model={"preset": "llama-7b", "tokenizer": str(shared_file("tokenizer.model"))},
        data=DataConfig(source=str(source), out=str(out), **{"val_fraction": 0.0, **kw}),
    )


def _line(rec) -> bytes:
    return json.dumps(rec).encode()


def _big_line() -> bytes:
    return b'{"instruction": "Summarise.", "output": "' + b"x" * (50 << 20) + b'"}'


# name: (file bytes, records read, {reason: count}); every case also holds good records.
HOSTILE = {
    # An escaped lone surrogate: json.loads accepts it; no UTF-8 text (tokenizer, parquet) can hold it.
    "lone_surrogate_escape": (
        _line(GOOD) + b'\n{"instruction": "Smile.", "output": "\\ud83d"}\n' + _line(GOOD2),
        3,
        {"lone_surrogate": 1},
    ),
    # Raw U+2028 / U+2029 / U+0085 are legal inside JSON strings; str.splitlines split them.
    "unicode_line_separators": (
        json.dumps({"instruction": "Join\u2028these\u2029lines\u0085.", "output": "ok"}, ensure_ascii=False).encode()
        + b"\n"
        + _line(GOOD),
        2,
        {},
    ),
    "utf8_bom_json_array": (b"\xef\xbb\xbf" + json.dumps([GOOD, GOOD2], indent=2).encode(), 2, {}),
    "utf8_bom_json_lines": (b"\xef\xbb\xbf" + _line(GOOD) + b"\n" + _line(GOOD2) + b"\n", 2, {}),
    "crlf_json_lines": (_line(GOOD) + b"\r\n" + _line(GOOD2) + b"\r\n\r\n", 2, {}),
    "crlf_json_array": (json.dumps([GOOD, GOOD2], indent=2).replace("\n", "\r\n").encode(), 2, {}),
    "50mb_single_line": (_line(GOOD) + b"\n" + _big_line() + b"\n" + _line(GOOD2) + b"\n", 3, {"record_too_large": 1}),
    "truncated_last_line": (
        _line(GOOD) + b"\n" + _line(GOOD2) + b'\n{"instruction": "Cut',
        3,
        {"truncated_last_line": 1},
    ),
    "non_utf8_bytes": (
        _line(GOOD) + b'\n{"instruction": "caf\xe9", "output": "x"}\n' + _line(GOOD2),
        3,
        {"invalid_utf8": 1},
    ),
    "lone_surrogate_in_json_array": (
        b"[" + _line(GOOD) + b', {"instruction": "a", "output": "\\udc00"}]',
        2,
        {"lone_surrogate": 1},
    ),
    "bad_elements_in_json_array": (
        b"[" + _line(GOOD) + b', {"instruction": tru}, ' + _line(GOOD2) + b",]",
        4,
        {"invalid_json": 2},
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_a_reject_with_its_reason_never_a_crash(ray_cluster, tmp_path, case):
    data, n_records, reasons = HOSTILE[case]
    src = tmp_path / "data.json"
    src.write_bytes(data)
    stats = run(_cfg(src, tmp_path / "out"))
    assert stats["records_read"] == n_records
    assert stats["records_written"] + stats["records_rejected"] == n_records
    assert stats["accounted"] == {"written_plus_rejected": n_records, "equals_read": True}
    assert stats["rejected_by_reason"] == reasons
    rejects = [json.loads(x) for x in open(tmp_path / "out" / "rejects.jsonl")]
    assert sorted(r["reason"] for r in rejects) == sorted(r for r, k in reasons.items() for _ in range(k))
    assert len(read_split(tmp_path / "out", "train")) == stats["records_written"]
    if case == "50mb_single_line":
        assert len(rejects[0]["record"]) < 2000 and "over data.max_record_bytes" in rejects[0]["detail"]


def test_a_file_without_one_usable_record_fails_the_job(ray_cluster, tmp_path):
    src = tmp_path / "utf16.json"  # before: every line rejected, and the job reported success
    src.write_bytes("\n".join(json.dumps(r) for r in (GOOD, GOOD2)).encode("utf-16"))
    with pytest.raises(DataSourceError, match="every one of its 2 records was rejected"):
        run(_cfg(src, tmp_path / "out"))
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \r\n\n")
    with pytest.raises(DataSourceError, match="no records"):
        run(_cfg(blank, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_split_is_the_same_for_a_json_array_json_lines_and_parquet_shards(ray_cluster, tmp_path):
    src = shared_file("alpaca_data_first200.json")
    records = json.loads(src.read_text())
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(4):  # the Hugging Face layout: an extra `text` column, which is not part of a record
        part = records[k * 50 : (k + 1) * 50]
        pq.write_table(
            pa.table(
                {
                    "instruction": [r["instruction"] for r in part],
                    "input": [r["input"] for r in part],
                    "output": [r["output"] for r in part],
                    "text": ["formatted"] * len(part),
                }
            ),
            shards / f"train-{k:05d}-of-00004.parquet",
        )
    with gzip.open(tmp_path / "data.jsonl.gz", "wt") as f:
        f.write((tmp_path / "data.jsonl").read_text())
    splits = {}
    for name, source in [
        ("array", src),
        ("lines", tmp_path / "data.jsonl"),
        ("gzip", tmp_path / "data.jsonl.gz"),
        ("folder", shards),
        ("glob", shards / "*.parquet"),
        ("uri", f"file://{shards}/train-*"),
    ]:
        stats = run(_cfg(source, tmp_path / name, val_fraction=0.2))
        assert (stats["records_read"], stats["records_written"]) == (200, 200)
        splits[name] = {
            split: sorted(tuple(ids) for ids in read_split(tmp_path / name, split).column("input_ids").to_pylist())
            for split in ("train", "val")
        }
    assert 20 < len(splits["array"]["val"]) < 60
    assert splits["array"] == splits["lines"] == splits["gzip"] == splits["folder"] == splits["glob"] == splits["uri"]
    # Parquet ids: file number << 40 | row number, unique and in file order.
    ids = sorted(
        read_split(tmp_path / "folder", "train").column("idx").to_pylist()
        + read_split(tmp_path / "folder", "val").column("idx").to_pylist()
    )
    assert ids == [(k << FILE_SHIFT) + i for k in range(4) for i in range(50)]


def test_limit_takes_the_first_records_across_files_in_order(ray_cluster, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({**GOOD, "output": f"{k}-{i}"}) + "\n" for i in range(30))
        )
    stats = run(_cfg(shards, tmp_path / "out", limit=40))
    assert stats["records_read"] == 40
    ids = sorted(read_split(tmp_path / "out", "train").column("idx").to_pylist())
    assert ids == list(range(30)) + [(1 << FILE_SHIFT) + i for i in range(10)]


def test_a_download_failing_its_sha256_is_removed_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.data.sources.DEFAULT_CACHE", tmp_path / "cache")
    url = shared_file("alpaca_data_first200.json").resolve().as_uri()
    with pytest.raises(DataSourceError, match="removed from the cache"):
        fetch(url, "0" * 64)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_folder_fingerprint_follows_its_listing(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        (shards / f"part-{k}.jsonl").write_text(json.dumps(GOOD) + "\n")
    (shards / "_SUCCESS").write_text("")
    cfg = _cfg(shards, tmp_path / "out")
    source = fetch(str(shards))
    assert [p.rsplit("/", 1)[-1] for p in source.files] == ["part-0.jsonl", "part-1.jsonl"]
    fp = fingerprint(cfg, source)
    assert fp["source_hashed"] == "listing of 2 files (path, size, mtime)"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stats.json").write_text(json.dumps({"fingerprint": fp}))
    (shards / "part-1.jsonl").write_text(json.dumps(GOOD2) + "\n")  # rewritten: size and mtime change
    assert [c.split(":")[0] for c in changed_settings(tmp_path / "out", fingerprint(cfg, fetch(str(shards))))] == [
        "source_sha256"
    ]
    with pytest.raises(DataSourceError, match="checks one file"):
        fetch(str(shards), "0" * 64)
    with pytest.raises(DataSourceError, match="no data files"):
        fetch(str(tmp_path / "nothing-*.jsonl"))


# --- the byte scanners, without Ray, with chunks small enough to cut every token ---------------------
TRICKY = [
    GOOD,
    {"instruction": 'quote " and \\ backslash, [brackets] {braces}', "input": "a,b", "output": "\\"},
    {"instruction": "nested", "output": "x", "more": [{"a": [1, {"b": "]}"}]}]},
    "a string",
    3,
    [],
    {},
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_array_scanner_splits_elements_exactly_at_any_chunk_size(monkeypatch, chunk):
    monkeypatch.setattr(records_reader, "CHUNK_BYTES", chunk)
    data = json.dumps(TRICKY, indent=1, ensure_ascii=False).encode()
    f = io.BytesIO(data)
    first = f.read(chunk)
    while len(first) < 1:
        first += f.read(chunk)
    tables = list(read_array(first, f, _Rows(0, 1 << 20, None), "x.json"))
    rows = pa.concat_tables(tables).to_pylist()
    assert [json.loads(r["raw"]) for r in rows] == TRICKY
    assert [r["idx"] for r in rows] == list(range(len(TRICKY)))


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_line_scanner_counts_lines_and_caps_long_ones(monkeypatch, chunk):
    monkeypatch.setattr(records_reader, "CHUNK_BYTES", chunk)
    data = b'{"a": 1}\r\n\n   \n' + b"y" * 3000 + b'\n{"b": "\xe2\x80\xa8"}\n{"c"'
    f = io.BytesIO(data)
    rows = pa.concat_tables(list(read_lines(f.read(chunk), f, _Rows(2, 1024, None)))).to_pylist()
    base = 2 << FILE_SHIFT
    assert [r["idx"] - base for r in rows] == [0, 3, 4, 5]
    assert [r["raw"] for r in rows][0::2] == ['{"a": 1}', '{"b": "\u2028"}']
    assert rows[1]["reject_reason"] == "record_too_large" and rows[1]["raw"].startswith("y" * 999)
    assert [r["unterminated"] for r in rows] == [False, False, False, True]


def test_length_stats_from_counts_match_numpy():
    lengths = np.random.default_rng(0).integers(8, 513, size=997)
    got = length_stats(np.bincount(lengths, minlength=513))
    q = np.percentile(lengths, [50, 90, 95, 99])
    assert [got["p50"], got["p90"], got["p95"], got["p99"]] == pytest.approx(list(q))
    assert got["mean"] == pytest.approx(lengths.mean()) and (got["min"], got["max"]) == (lengths.min(), lengths.max())
    assert sum(got["histogram"]["counts"]) == 997
