"""Benchmarks never run in CI; this only checks that suites run on a tiny setting and write valid
JSON and a chart (into a temporary folder, never over bench/results)."""

import json

import pytest

from pipelines.data.instructions import run as preprocess
from pipelines.job_config import DataConfig, PreprocessConfig
from tests.conftest import shared_file


def test_projection_suite_writes_valid_json(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("bench.projection.RESULTS", tmp_path)
    monkeypatch.setattr("bench.common.RESULTS", tmp_path)
    preprocess(
        PreprocessConfig(
            model={"preset": "llama-7b", "tokenizer": str(shared_file("tokenizer.model"))},
            data=DataConfig(source=str(shared_file("alpaca_data_first200.json")), out=str(tmp_path / "data")),
        )
    )
    from bench.projection import run

    result = run(data_dir=str(tmp_path / "data"))
    saved = json.loads((tmp_path / "projection.json").read_text())
    assert saved["measured"]["train_records"] == result["measured"]["train_records"] > 150
    assert saved["measured"]["ours_padded_tokens_per_epoch"] < saved["measured"]["authors_padded_tokens_per_epoch"]
    assert (tmp_path / "projection.png").read_bytes()[:4] == b"\x89PNG"
    assert any("ASSUMPTION" in a for a in saved["assumptions"])


def test_train_vs_peft_suite_runs_quick(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="peft is a bench-only dependency (pip install -e '.[bench]')")
    monkeypatch.setattr("bench.train_vs_peft.RESULTS", tmp_path)
    monkeypatch.setattr("bench.common.RESULTS", tmp_path)
    from bench.train_vs_peft import run

    result = run(quick=True)
    assert result["epoch_seconds"]["ours"] > 0 and result["epoch_seconds"]["peft"] > 0
    assert json.loads((tmp_path / "train-vs-peft.json").read_text())["records"] == 16


def test_image_memory_suite_writes_valid_json(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.image_memory.RESULTS", tmp_path)
    monkeypatch.setattr("bench.common.RESULTS", tmp_path)
    from bench.image_memory import run

    result = run(pixels=300_000)
    saved = json.loads((tmp_path / "image-memory.json").read_text())
    assert set(saved["cases"]) == set(result["cases"]) and len(saved["cases"]) == 7
    assert all(c["sent_to_replica_mib"] < 0.3 for c in saved["cases"].values())  # shrunk in the child
    assert (tmp_path / "image-memory.png").read_bytes()[:4] == b"\x89PNG"


def test_quantize_smollm2_names_the_command_that_trains_its_adapter(tmp_path):
    # The measurement itself loads SmolLM2 four times (~40 s even with --quick): a benchmark, not a
    # test. What is checked here is what a user without the trained adapter sees (no model load).
    from bench.quantize_smollm2 import TRAIN_COMMAND, run

    with pytest.raises(FileNotFoundError, match="train it first") as err:
        run(quick=True, adapter=str(tmp_path / "missing"), val=str(tmp_path / "val"))
    assert TRAIN_COMMAND in str(err.value) and "name=smollm2-alpaca-600" in TRAIN_COMMAND
