"""What every benchmark result records: the machine, the versions, and where it was written."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
SHARED_DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass(frozen=True)
class BenchBase:
    """A base a suite runs on: a path or a catalogue name; tokenizer and context None: the base's own."""

    title: str
    path: str
    tokenizer: str | None = None
    context: int | None = None

    def load(self):
        from adapter.loader import load_model
        from adapter.settings import ModelSource

        return load_model(ModelSource(base=self.path, tokenizer=self.tokenizer, context=self.context, device="cpu"))


STORIES260K = BenchBase(
    "stories260K", str(SHARED_DATA / "stories260K"), str(SHARED_DATA / "stories260K" / "tokenizer.model")
)
SMOLLM2 = BenchBase("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")  # a catalogue name (adapter/models.py)


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("ray", "deepspeed", "transformers", "peft", "sentencepiece", "pyarrow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def write_result(name: str, result: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS  # looked up at call time, so tests can point it elsewhere
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"suite": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **result}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#4878a8", "#e07b39", "#6aa84f", "#a64d79", "#999999"][: len(values)])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=12, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
