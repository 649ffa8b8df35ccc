"""`serve deploy serve/local.yaml` as a user runs it: against a separate cluster started with
`ray start --head` (its own ports and temp dir), answering over HTTP, a trained-run layout
(`<root>/<name>/adapter/adapter.safetensors`) served by its run name.

The cluster is torn down by killing exactly the processes that belong to it (their command lines
name its private temp dir), never with `ray stop`, which would end every Ray on the host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import save_adapter
from adapter.checkpoint import load_base
from tests.conftest import ROOT, shared_file

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def _cluster_processes(marker: str) -> list[psutil.Process]:
    """Every process whose command line names the cluster's private temp dir, and their children."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or ()):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop(marker: str) -> None:
    procs = _cluster_processes(marker)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def local_cluster():
    """`ray start --head` on private ports, from the project folder with the venv first on PATH."""
    temp = tempfile.mkdtemp(prefix="rsd", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--num-cpus", "2",
           "--temp-dir", temp, "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
           "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
    try:
        subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, text=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:  # the job / Serve REST API answers only once the dashboard's agent is up
            try:
                if httpx.get(f"{address}/api/serve/applications/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the dashboard's Serve API did not come up within 90 s"
            time.sleep(1)
        yield {"dashboard": address, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


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
    (http_port,) = _free_ports(1)
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
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-run", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


def test_serve_deploy_local_yaml_answers_over_http(local_cluster, local_yaml):
    path, url = local_yaml
    out = subprocess.run([str(BIN / "serve"), "deploy", "--address", local_cluster["dashboard"], str(path)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    _answers_models_and_chat(url, local_cluster["dashboard"])


def test_serve_run_local_yaml_answers_over_http(local_cluster, local_yaml):
    path, url = local_yaml
    env = _env()
    down = subprocess.run([str(BIN / "serve"), "shutdown", "--address", local_cluster["dashboard"], "--yes"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    out = subprocess.run([str(BIN / "serve"), "run", "--non-blocking", "--address", local_cluster["gcs"], str(path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    _answers_models_and_chat(url, local_cluster["dashboard"])
