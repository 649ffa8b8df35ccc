"""Shared fixtures: paths to ../shared/data, tiny models, and one Ray cluster per session."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import save_adapter
from adapter.base_weights import load_base
from adapter.hashing import sha256_of
from adapter.model import Transformer
from adapter.model_args import preset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
# Ray Train's controller polls its workers every 2 s by default: it learns a run ended, a worker died
# or a checkpoint was reported only then, and the fault injector waits two polls (docs/training.md).
# Both test clusters (this process's and `ray start --head`'s, which inherits this environment) poll
# 4x as often, which saves seconds per Ray Train run and changes nothing they check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def shared_file(rel: str) -> Path:
    """A file from ../shared/data, or a skip that says exactly what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data {p} is missing (tests read real data from ../shared/data)")
    return p


MINILM = "all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # its model.safetensors


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2, a real pretrained BERT (docs/encoders.md): the folder $MINILM_DIR names, else
    the model catalogue's copy where the catalogue (adapter/models.py) is installed, else a skip
    saying how to get it. Its weights are checked to be the published ones."""
    from adapter.models import ModelFetchError, resolve_model

    if os.environ.get("MINILM_DIR"):
        folder = Path(os.environ["MINILM_DIR"])
    else:
        try:
            folder = Path(resolve_model(MINILM))
        except ModelFetchError as e:
            pytest.skip(f"real {MINILM} not available (offline?): {e}")
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{MINILM}: no model.safetensors in {folder}")
    assert sha256_of(folder / "model.safetensors") == MINILM_SHA256, f"{folder} is not the published {MINILM}"
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny shapes on a shared 2-core machine: a second OpenMP thread only adds waiting (up to 100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray cluster for the whole session (each start costs seconds)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only; real clusters keep token auth on
    import ray
    from ray.data import DataContext

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
        _temp_dir=str(Path("/tmp") / f"ray-t{os.getpid()}"),
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head_cluster():
    """A second cluster, started with `ray start --head` as users do, for `ray job submit` and
    `serve deploy` (shared by their tests: each start costs seconds)."""
    from tests.ray_head import ray_head

    with ray_head() as cluster:
        yield cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_LIMIT = 400  # max_tokens_limit of the `server` apps: long enough for a stream to be cut off mid-way


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    """Serve's HTTP proxy, started once per session (a second serve.start on another port would be
    ignored by the running proxy): its base URL. Apps are added under their own route prefixes."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def server(serve_http, tmp_path_factory):
    """Shared by the Serve and playground tests (each start costs ~25 s). Two apps: `llama` (open) and `secure` (API key, one KV slot, one waiting row, 4 KiB bodies)."""
    from ray import serve

    from serve.app import build_app, deployment_for
    from serve.serve_config import serve_config

    stories = shared_file("stories260K/params.json").parent
    root = tmp_path_factory.mktemp("adapters")
    args = load_base(stories).args
    # Two prompt lengths (4 and 7): requests for both share a batch.
    for seed, k, path in ((1, 4, root / "alpha"), (2, 7, root / "beta.safetensors")):
        torch.manual_seed(seed)
        p = AdaptionPrompts(args, AdapterConfig(adapter_len=k, adapter_layers=3))
        with torch.no_grad():
            p.gate.uniform_(0.5, 1.0)
            p.prompt.mul_(6)  # prompts start N(0, 1); x6 makes the change to the output plain
        save_adapter(p, args, path)
    (root / "junk.txt").write_text("not an adapter")
    h = json.dumps({"__metadata__": {"format": "llama-adapter", "adapter_config": "{oops", "base_shape": "{}"}})
    (root / "broken.safetensors").write_bytes(len(h).to_bytes(8, "little") + h.encode())
    # Server defaults for what a request leaves out: greedy, 6 tokens (checked below).
    cfg = serve_config(
        {
            "model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model")},
            "sampling": {"max_gen_len": 6, "temperature": 0.0},
            "adapters": str(root),
            "base_name": "stories260k",
            "max_tokens_limit": SERVE_LIMIT,
            "max_n": 3,
        }
    ).model_dump(mode="json")
    serve.run(build_app(cfg), name="llama", route_prefix="/")
    small = {**cfg, "api_key_env": "TEST_API_KEY", "max_batch_size": 1, "max_waiting": 1, "max_body_bytes": 4096}
    secure = deployment_for(serve_config(small)).options(
        name="SecureServer", ray_actor_options={"runtime_env": {"env_vars": {"TEST_API_KEY": "sekrit"}}}
    )
    serve.run(secure.bind(small), name="secure", route_prefix="/secure")
    yield serve_http
    serve.delete("llama")
    serve.delete("secure")


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the model catalogue (fetched once into the model
    cache, verified by sha256), or a skip that says why it is not here."""
    from adapter.models import ModelFetchError, fetch

    try:
        return fetch("SmolLM2-135M-Instruct")
    except ModelFetchError as e:
        pytest.skip(f"real SmolLM2 not available (offline?): {e}")
