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
