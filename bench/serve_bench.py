"""Suite `serve`: bounded load on loopback against the real Serve app (stories260K base):
16 concurrent clients, a fixed number of requests; batched vs one-at-a-time, and a mixed
8-adapter batch vs a single adapter (measured)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, SHARED_DATA, bar_chart, write_result

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park.", "One day, a bird",
           "Tom had a red ball.", "The sun was hot.", "A cat sat on the mat.", "There was a big tree."]


def _adapters(root: Path, args, n: int) -> list[str]:
    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.adapter_file import save_adapter

    names = []
    for i in range(n):
        torch.manual_seed(i)
        p = AdaptionPrompts(args, AdapterConfig(10, 30))
        with torch.no_grad():
            p.gate.uniform_(0.05, 0.2)
        save_adapter(p, args, root / f"a{i}")
        names.append(f"a{i}")
    return names


def _load(url: str, models: list[str], n_requests: int, clients: int, max_tokens: int) -> dict:
    import httpx

    def one(k: int):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": models[k % len(models)], "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"], int(r.headers["x-batch-size"])

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"requests": n_requests, "clients": clients, "completion_tokens": tokens, "wall_s": wall,
            "mean_batch_size_seen_by_requests": float(np.mean([r[2] for r in results])),
            "tokens_per_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}


def run(n_requests: int = 96, clients: int = 16, max_tokens: int = 32, batch_wait_ms: float = 50,
        quick: bool = False) -> dict:
    import ray
    from ray import serve

    from adapter.checkpoint import load_base
    from serve.app import build_app

    if quick:
        n_requests, max_tokens = 16, 8
    stories = SHARED_DATA / "stories260K"
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = _adapters(Path(tmp), load_base(stories).args, 8)
        for label, batch, models in (("one-at-a-time", 1, names[:1]), ("batched, 1 adapter", 16, names[:1]),
                                     ("batched, 8 adapters mixed", 16, names)):
            cfg = {"model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model")}, "adapters": tmp,
                   "max_batch_size": batch, "max_tokens_limit": 256}
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            _load(url, models, len(models), 1, 2)  # load adapters + warm up, not timed
            rows[label] = _load(url, models, n_requests, clients, max_tokens)
            serve.delete("bench")
    serve.shutdown()
    result = {
        "what": "OpenAI /v1/completions on loopback, greedy, stories260K base, 1 replica (measured)",
        "settings": {"max_tokens": max_tokens, "max_batch_size": 16},
        "rows": rows,
        "batched_vs_one_at_a_time": rows["batched, 1 adapter"]["tokens_per_s"] / rows["one-at-a-time"]["tokens_per_s"],
        "mixed_vs_single_adapter": rows["batched, 8 adapters mixed"]["tokens_per_s"] / rows["batched, 1 adapter"]["tokens_per_s"],
        "goals": {"batched_vs_one_at_a_time": ">= 4", "mixed_vs_single_adapter": ">= 0.9"},
    }
    path = write_result("serve", result)
    bar_chart(RESULTS / "serve.png", f"Serving: {clients} clients, {n_requests} requests (measured, 2-core CPU)",
              list(rows), [r["tokens_per_s"] for r in rows.values()], "completion tokens / s")
    return json.loads(path.read_text())
