"""Ray Data preprocessing on the real Alpaca data (real local Ray)."""

import json

import pyarrow.parquet as pq
import pytest

from adapter.adapter import IGNORE_INDEX
from adapter.prompts import format_prompt
from adapter.tokenizer import Tokenizer
from pipelines.data.instructions import read_split, run
from pipelines.data.sources import DataSourceError, sha256_of
from pipelines.job_config import DataConfig, PreprocessConfig
from tests.conftest import shared_file

ALPACA_SHA256 = "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419"


def _cfg(source, out, tokenizer="tokenizer.model", **kw):
    """The LLaMA tokenizer (32,000 pieces) with a random base of the 7B shape: only its context
    (2,048) and vocabulary matter to preprocessing; no weights are read."""
    return PreprocessConfig(
        model={"preset": "llama-7b", "tokenizer": str(shared_file(tokenizer))},
        data=DataConfig(source=str(source), out=str(out), **kw),
    )


def _all_rows(out):
    import pyarrow as pa

    return pa.concat_tables([read_split(out, "train"), read_split(out, "val")]).sort_by("idx").to_pylist()


@pytest.fixture(scope="module")
def first200(ray_cluster, tmp_path_factory):
    src = shared_file("alpaca_data_first200.json")
    out = tmp_path_factory.mktemp("pp") / "first200"
    return src, out, run(_cfg(src, out, val_fraction=0.1))


def test_full_alpaca_every_record_is_accounted_for(ray_cluster, tmp_path):
    src = shared_file("alpaca_data.json")
    assert sha256_of(src) == ALPACA_SHA256
    stats = run(_cfg(src, tmp_path / "full", sha256=ALPACA_SHA256))
    assert stats["records_read"] == 52002
    assert stats["records_written"] + stats["records_rejected"] == 52002
    # The real file has 28 records with an empty output; they must be set aside with their reason.
    assert stats["rejected_by_reason"]["empty_output"] == 28
    rejects = [json.loads(line) for line in open(tmp_path / "full" / "rejects.jsonl")]
    assert len(rejects) == stats["records_rejected"]
    assert sum(r["reason"] == "empty_output" for r in rejects) == 28
    # stats.json agrees with the parquet output.
    written = json.loads((tmp_path / "full" / "stats.json").read_text())
    assert written == stats
    train, val = read_split(tmp_path / "full", "train"), read_split(tmp_path / "full", "val")
    assert train.num_rows == stats["train_records"] and val.num_rows == stats["val_records"]
    assert train.num_rows + val.num_rows == stats["records_written"]
    tokens = sum(
        pq.read_table(f).column("num_tokens").to_numpy().sum() for f in (tmp_path / "full").glob("*/*.parquet")
    )
    assert tokens == stats["total_tokens"]
    assert stats["truncated"] == sum(train.column("truncated").to_pylist()) + sum(val.column("truncated").to_pylist())
    assert 100 < stats["token_length"]["mean"] < 160
    assert set(train.column("idx").to_pylist()).isdisjoint(val.column("idx").to_pylist())


def test_first200_all_written_and_decode_to_the_template(first200):
    src, out, stats = first200
    assert (stats["records_written"], stats["records_rejected"]) == (200, 0)
    records = json.loads(src.read_text())
    tok = Tokenizer(shared_file("tokenizer.model"))
    rows = _all_rows(out)
    assert [r["idx"] for r in rows] == list(range(200))
    with_input = next(i for i, r in enumerate(records) if r["input"])
    without_input = next(i for i, r in enumerate(records) if not r["input"])
    for i in (with_input, without_input):
        rec, row = records[i], rows[i]
        prompt = format_prompt(rec["instruction"], rec["input"])
        ids, labels = row["input_ids"], row["labels"]
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not row["truncated"]
        assert tok.decode(ids[1:-1]) == prompt + " " + rec["output"]
        n_prompt = 1 + len(tok.encode(prompt, bos=False))
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # BOS + prompt masked...
        assert labels[n_prompt:] == ids[n_prompt:]  # ...and nothing else
        assert tok.decode(ids[n_prompt:-1]) == rec["output"]


def test_output_is_deterministic_for_a_seed(first200, tmp_path):
    src, out, _ = first200
    run(_cfg(src, tmp_path / "again", val_fraction=0.1))
    assert _all_rows(tmp_path / "again") == _all_rows(out)
    assert (
        read_split(tmp_path / "again", "val").column("idx").to_pylist()
        == read_split(out, "val").column("idx").to_pylist()
    )


def test_truncation_at_a_small_max_seq_len(ray_cluster, tmp_path):
    src = shared_file("alpaca_data_first200.json")
    stats = run(_cfg(src, tmp_path / "short", max_seq_len=64, val_fraction=0.0))
    rows = _all_rows(tmp_path / "short")
    assert all(len(r["input_ids"]) <= 64 and len(r["labels"]) == len(r["input_ids"]) for r in rows)
    cut = [r for r in rows if r["truncated"]]
    assert cut and len(cut) == stats["truncated"]
    assert all(len(r["input_ids"]) == 64 and r["input_ids"][-1] != 2 for r in cut)
    assert all(any(x != IGNORE_INDEX for x in r["labels"]) for r in rows)
    # Records whose prompt alone fills 64 tokens have no response left: rejected, not dropped.
    assert stats["records_written"] + stats["rejected_by_reason"].get("no_response_tokens_after_truncation", 0) == 200


def test_each_bad_record_is_counted_and_set_aside(ray_cluster, tmp_path):
    good = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "x"}),
        json.dumps({**good, "extra": 1}),
        json.dumps({**good, "output": 5}),
        json.dumps({**good, "instruction": "  "}),
        json.dumps({**good, "output": ""}),
        json.dumps({"instruction": "Name a colour.", "output": "Blue"}),  # input may be absent
    ]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    stats = run(_cfg(src, tmp_path / "out", val_fraction=0.0))
    expected = {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "extra_field": 1,
        "non_string_field": 1,
        "empty_instruction": 1,
        "empty_output": 1,
    }
    assert stats["rejected_by_reason"] == expected
    assert stats["records_written"] == 2
    rejects = [json.loads(x) for x in open(tmp_path / "out" / "rejects.jsonl")]
    assert {r["reason"] for r in rejects} == set(expected)
    assert [r["index"] for r in rejects] == [1, 2, 3, 4, 5, 6, 7]
    assert rejects[0]["record"] == "{not json"


def test_output_reads_back_with_ray_data(first200):
    import ray

    _, out, stats = first200
    ds = ray.data.read_parquet(str(out / "train"))
    assert ds.count() == stats["train_records"]
    row = ds.take(1)[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["num_tokens"]


def test_url_source_is_downloaded_and_checked(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.data.sources.DEFAULT_CACHE", tmp_path / "cache")
    src = shared_file("alpaca_data_first200.json")
    url = src.resolve().as_uri()
    with pytest.raises(DataSourceError, match="does not match"):
        run(_cfg(url, tmp_path / "o", sha256="0" * 64))
    stats = run(_cfg(url, tmp_path / "o", sha256=sha256_of(src), limit=20))
    assert stats["records_read"] == 20


def test_unreadable_sources_are_clear_errors(ray_cluster, tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        run(_cfg(tmp_path / "missing.json", tmp_path / "o"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(DataSourceError, match="not a valid JSON array"):
        run(_cfg(broken, tmp_path / "o"))
    with pytest.raises(DataSourceError, match="could not download"):
        run(_cfg((tmp_path / "nope.json").as_uri(), tmp_path / "o"))


def test_output_records_what_it_was_built_from_and_stale_output_is_named(first200):
    from pipelines.data.instructions import fingerprint
    from pipelines.data.record_output import changed_settings

    src, out, stats = first200
    cfg = _cfg(src, out, val_fraction=0.1)
    fp = fingerprint(cfg, src)
    assert stats["fingerprint"] == fp and changed_settings(out, fp) == []
    assert fp["source_sha256"] == sha256_of(src) and fp["tokenizer_sha256"] == sha256_of(shared_file("tokenizer.model"))
    for key, value in [("limit", 50), ("max_seq_len", 128), ("val_fraction", 0.2), ("seed", 3)]:
        other = fingerprint(_cfg(src, out, **{"val_fraction": 0.1, key: value}), src)
        assert [c.split(":")[0] for c in changed_settings(out, other)] == [key]
    other_tok = fingerprint(_cfg(src, out, tokenizer="stories260K/tokenizer.model", val_fraction=0.1), src)
    assert [c.split(":")[0] for c in changed_settings(out, other_tok)] == ["tokenizer_sha256"]
    assert changed_settings(out.parent / "nothing-here", fp) is None
    assert (out / "config.yaml").is_file()  # the resolved config, beside the output
