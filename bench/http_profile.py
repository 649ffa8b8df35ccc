"""Where short requests spend their time over HTTP: py-spy samples the Serve replica and the HTTP
proxy while 16 closed-loop clients send 32-token completions (the serve suite's HTTP setting), on
the real stories260K. Writes bench/results/http-profile.json: per process, the share of samples by
where they were (engine step, event loop / FastAPI / pydantic, Ray Serve plumbing, tokenizing,
idle), and the top functions by own time. `python -m bench.http_profile` (needs `pip install py-spy`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import SHARED_DATA, write_result

MACHINE_NOTE = "2-core shared CPU (four engineers' work on the same cores); wall clock"
CATEGORIES = (  # first match wins, tested against the whole stack (outermost first)
    ("engine step (model forward, scheduling)", ("decode_step.py", "serve/engine.py")),
    ("tokenize / detokenize", ("tokenizer.py", "serve/text.py", "sentencepiece")),
    ("FastAPI / Starlette / pydantic", ("fastapi", "starlette", "pydantic")),
    ("Ray Serve plumbing (router, proxy, handle, gRPC)", ("ray/serve", "ray/_private", "grpc", "_raylet")),
    ("asyncio event loop, other", ("asyncio",)),
)


def _pids(pattern: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if pattern in " ".join(p.info["cmdline"] or [])]


def _load(url: str, n: int, clients: int, max_tokens: int) -> dict:
    import httpx

    def one(k: int, client: httpx.Client) -> float:
        t0 = time.perf_counter()
        r = client.post(
            f"{url}/v1/completions",
            json={"model": "base", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0},
            timeout=300,
        )
        r.raise_for_status()
        return time.perf_counter() - t0

    def worker(c: int) -> list[float]:
        with httpx.Client() as client:  # one keep-alive connection per client, as a real client holds
            return [one(k, client) for k in range(c, n, clients)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        lat = [x for xs in pool.map(worker, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
    return {"requests": n, "wall_s": wall, "tokens_per_s": n * max_tokens / wall, "mean_latency_s": sum(lat) / n}


def _summarize(raw: Path) -> dict:
    """py-spy's raw (collapsed) output: `frame;frame;... count` per line, outermost first."""
    cats: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        idle = any(w in leaf for w in ("select", "epoll", "wait (threading", "_wait_for_tstate_lock", "sleep"))
        cat = "idle (waiting for work or I/O)" if idle else "other"
        if not idle:
            for name, keys in CATEGORIES:
                if any(k in f for f in frames for k in keys):
                    cat = name
                    break
        cats[cat] += n
        own[leaf] += n
    share = {k: round(v / total, 3) for k, v in cats.most_common()} if total else {}
    return {"samples": total, "share": share, "top_own": [(f, round(c / total, 3)) for f, c in own.most_common(12)]}


def run(quick: bool = False) -> dict:
    import ray
    from ray import serve

    from serve.app import build_app

    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    stories = SHARED_DATA / "stories260K"
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    n = 48 if quick else 160
    result = {}
    try:
        for label, slots in (("batched (16 slots)", 16), ("one-at-a-time (1 slot)", 1)):
            cfg = {
                "model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model"), "device": "cpu"},
                "max_batch_size": slots,
                "max_waiting": 64,
            }
            serve.run(build_app(cfg), name="prof", route_prefix="/")
            _load(url, 4, 1, 2)  # warm up
            replica, proxy = _pids("ServeReplica:prof"), _pids("ProxyActor")
            with tempfile.TemporaryDirectory() as tmp:
                procs = {}
                for name, pids in (("replica", replica), ("proxy", proxy)):
                    out = Path(tmp) / f"{name}.txt"
                    cmd = [spy, "record", "--pid", str(pids[0]), "--rate", "200", "--format", "raw"]
                    procs[name] = (subprocess.Popen([*cmd, "--output", str(out), "--nonblocking"]), out)
                time.sleep(1)
                load = _load(url, n, 16, 32)
                for p, _ in procs.values():
                    p.send_signal(2)  # SIGINT: py-spy writes its output and exits
                    p.wait(timeout=60)
                result[label] = {"load": load, **{name: _summarize(out) for name, (_, out) in procs.items()}}
            serve.delete("prof")
    finally:
        serve.shutdown()
        ray.shutdown()
    result["ratio_batched_over_one"] = (
        result["batched (16 slots)"]["load"]["tokens_per_s"] / result["one-at-a-time (1 slot)"]["load"]["tokens_per_s"]
    )
    path = write_result("http-profile", {"machine_note": MACHINE_NOTE, "max_tokens": 32, "clients": 16, **result})
    return {"path": str(path), **result}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1)[:6000])
