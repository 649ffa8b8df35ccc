"""The README's first command in a clone with nothing beside it: a missing input is named in one
line (exit code 2), never a traceback, and before any Ray cluster starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_file


def run_job(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMA_ADAPTER_ROOT": str(tmp_path), "RAY_ADDRESS": ""}  # ../shared is not beside it
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("job", ["pipelines.train", "pipelines.preprocess"])
def test_missing_data_is_named_in_one_line(job, tmp_path):
    # No internet here either: the canonical URL's stand-in cannot be fetched.
    out = run_job(
        tmp_path, job, "--config", "smollm2-alpaca-cpu", "--set", "data.download=file:///nonexistent/alpaca_data.json"
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "alpaca_data.json not found" in last and "data.source" in last


def test_a_missing_base_is_named_in_one_line(tmp_path):
    out = run_job(
        tmp_path,
        "pipelines.train",
        "--config",
        "tiny-cpu",
        "--set",
        "model.base=nowhere/model.gguf",
        "--set",
        "model.preset=null",
        "--set",
        f"data.source={shared_file('alpaca_data_first200.json')}",
        "--set",
        f"model.tokenizer={shared_file('stories260K/tokenizer.model')}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "nowhere/model.gguf" in out.stderr.strip().splitlines()[-1]
