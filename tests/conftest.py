"""Shared fixtures: paths to ../shared/data, tiny models, and one Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adapter.config import preset
from adapter.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(rel: str) -> Path:
    """A file from ../shared/data, or a skip that says exactly what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data {p} is missing (tests read real data from ../shared/data)")
    return p


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

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2,
             log_to_driver=False, _temp_dir=str(Path("/tmp") / f"ray-t{os.getpid()}"),
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}})
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
