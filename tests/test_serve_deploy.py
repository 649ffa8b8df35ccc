"""`serve deploy serve/local.yaml` as a user runs it: against a separate cluster started with
`ray start --head` (its own ports and temp dir), answering over HTTP, a trained-run layout
(`<root>/<name>/adapter/adapter.safetensors`) served by its run name.

The cluster (tests/ray_head.py, shared with the job-submit tests) is torn down by killing exactly
the processes that belong to it, never with `ray stop`, which would end every Ray on the host.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
import torch
import yaml

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import save_adapter
from adapter.base_weights import load_base
from tests.conftest import ROOT, shared_file
from tests.ray_head import BIN, cli_env, free_ports


@pytest.fixture(scope="module")
def local_cluster(ray_head_cluster):
    """The session's `ray start --head` cluster (shared with the job-submit tests); Serve is shut
    down on it when this module ends, so no replica idles through the rest of the suite."""
    yield ray_head_cluster
    subprocess.run(
        [str(BIN / "serve"), "shutdown", "--address", ray_head_cluster["dashboard"], "--yes"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def local_yaml(tmp_path_factory):
    """serve/local.yaml as shipped (relative paths), with a temp adapter root and a free HTTP port."""
    stories = shared_file("stories260K/params.json").parent
    tmp_path = tmp_path_factory.mktemp("deploy")
    # A training run's layout: runs/<name>/adapter/adapter.safetensors, served as model <name>.
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    prompts = AdaptionPrompts(load_base(stories).args, AdapterConfig(adapter_len=4, adapter_layers=2))
    save_adapter(prompts, load_base(stories).args, runs / "tiny-run" / "adapter")
    (http_port,) = free_ports(1)
    cfg = yaml.safe_load((ROOT / "serve" / "local.yaml").read_text())
    cfg["http_options"]["port"] = http_port
    cfg["applications"][0]["args"]["adapters"] = str(runs)  # the rest as shipped (relative paths)
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, f"http://127.0.0.1:{http_port}"


def _answers_models_and_chat(url: str, dashboard: str) -> None:
    deadline = time.time() + 150
    while True:
        try:
            r = httpx.get(f"{url}/v1/models", timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()
        app = status.get("applications", {}).get("llama-adapter", {})
        assert app.get("status") != "DEPLOY_FAILED", app.get("message")
        assert time.time() < deadline, f"serve deploy did not answer within 150 s: {app}"
        time.sleep(2)
    assert [m["id"] for m in r.json()["data"]] == ["stories260k", "tiny-run"]
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-run", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


def test_serve_deploy_local_yaml_answers_over_http(local_cluster, local_yaml):
    path, url = local_yaml
    out = subprocess.run(
        [str(BIN / "serve"), "deploy", "--address", local_cluster["dashboard"], str(path)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    _answers_models_and_chat(url, local_cluster["dashboard"])


def test_serve_run_local_yaml_answers_over_http(local_cluster, local_yaml):
    path, url = local_yaml
    env = cli_env()
    down = subprocess.run(
        [str(BIN / "serve"), "shutdown", "--address", local_cluster["dashboard"], "--yes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr[-2000:]
    out = subprocess.run(
        [str(BIN / "serve"), "run", "--non-blocking", "--address", local_cluster["gcs"], str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    _answers_models_and_chat(url, local_cluster["dashboard"])
