"""What rank 0 records of a run: metrics.jsonl, TensorBoard events and samples.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

METRICS_FLUSH_S = 2.0  # rank 0 writes metrics at most this often (shared storage, host syncs)


class MetricsLog:
    """metrics.jsonl, TensorBoard events and samples.jsonl, written by rank 0 only. Rows may hold
    device tensors; they are read (one host sync) and written when flushed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.run_dir = enabled, run_dir
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, row: dict, flush: bool = False) -> None:
        if not self.enabled:
            return
        self.pending.append(row)
        if flush or time.monotonic() - self.last_flush >= METRICS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        rows = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in self.pending]
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                for k, v in row.items():
                    if row["kind"] in ("train", "val") and isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
        self.tb.flush()
        self.pending, self.last_flush = [], time.monotonic()

    def samples(self, step: int, epoch: float, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "epoch": epoch, **r}) + "\n")
