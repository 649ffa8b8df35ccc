"""A separate Ray cluster started the way users start one (`ray start --head`), on private ports
and its own temp dir, for the tests of `ray job submit` and `serve deploy`.

It is stopped by killing exactly its own processes (their command lines name its private temp
dir), never with `ray stop`, which would end every Ray on the host (the test session's too).
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
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cli_env() -> dict:
    """What a user's shell has: the project's virtualenv first on PATH (Ray runs job entrypoints
    with the python of the environment that started the cluster), no RAY_ADDRESS."""
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def _processes(marker: str) -> list[psutil.Process]:
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


def stop(marker: str) -> None:
    procs = _processes(marker)
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


@contextmanager
def ray_head(num_cpus: int = 4):
    """Yields {"dashboard": http address for `ray job submit` / `serve deploy`, "gcs": address}."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--port",
        str(gcs),
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        temp,
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--object-store-memory",
        str(256 * 2**20),
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, cwd=ROOT, env=cli_env(), check=True, capture_output=True, text=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:  # the job and Serve REST APIs answer only once the dashboard's agent is up
            try:
                if (
                    httpx.get(f"{address}/api/serve/applications/", timeout=5).status_code == 200
                    and httpx.get(f"{address}/api/jobs/", timeout=5).status_code == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("the dashboard's job / Serve API did not come up within 90 s")
            time.sleep(1)
        yield {"dashboard": address, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        stop(temp)
        shutil.rmtree(temp, ignore_errors=True)
