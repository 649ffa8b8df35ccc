"""What the user watches while a training job runs: one progress display on the driver, fed by
the metrics rank 0 writes (`metrics.jsonl`), so Ray's own output can stay in its log files.

On a terminal it is a tqdm bar (steps, ETA, loss, tokens/s, held-out loss); elsewhere (`ray job
logs`, CI, a file) a plain line every `every_s` seconds and at the end.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainingProgress:
    def __init__(self, metrics: Path, stream=None, every_s: float = 15.0, tty: bool | None = None):
        self.metrics, self.stream, self.every_s = Path(metrics), stream or sys.stderr, every_s
        self.tty = self.stream.isatty() if tty is None else tty
        self.offset = self.metrics.stat().st_size if self.metrics.is_file() else 0  # only this run's rows
        self.state: dict = {}
        self.first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self.bar = None
        self.last_line = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        if self.bar is not None:
            self.bar.close()
        elif self.state.get("step") is not None:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        if not self.metrics.is_file():
            return
        with open(self.metrics) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                self.update(json.loads(line))
        self.render()

    def update(self, row: dict) -> None:
        kind = row.get("kind")
        if kind == "start":
            self.state.update(total=row["total_steps"], step=row["step"])
        elif kind == "train":
            self.state.update(step=row["step"], loss=row["loss"], mfu=row.get("mfu"))
            if row.get("tokens_per_s") is not None:  # encoder tasks count records, not tokens
                self.state["tokens_per_s"] = row["tokens_per_s"]
            if self.first is None:
                self.first = (time.monotonic(), row["step"] - 1)
        elif kind == "val":
            self.state["val_loss"] = row["val_loss"]

    def eta(self) -> float | None:
        step, total = self.state.get("step"), self.state.get("total")
        if self.first is None or step is None or not total or step <= self.first[1]:
            return None
        rate = (step - self.first[1]) / (time.monotonic() - self.first[0])
        return (total - step) / rate

    def line(self) -> str:
        s = self.state
        step, total = s.get("step", 0), s.get("total") or 0
        parts = [f"[train] step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "")]
        if "loss" in s:
            parts.append(f"loss {s['loss']:.4f}")
        if "val_loss" in s:
            parts.append(f"held-out {s['val_loss']:.4f}")
        if "tokens_per_s" in s:
            parts.append(f"{s['tokens_per_s']:,.0f} tok/s")
        if s.get("mfu") is not None:
            parts.append(f"MFU {100 * s['mfu']:.1f}%")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        return "  ".join(parts)

    def render(self) -> None:
        if "total" not in self.state:
            return
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(
                    total=self.state["total"],
                    initial=self.state.get("step", 0),
                    unit="step",
                    desc="train",
                    file=self.stream,
                    dynamic_ncols=True,
                )
            self.bar.update(self.state.get("step", 0) - self.bar.n)
            post = {k: f"{self.state[k]:.4f}" for k in ("loss", "val_loss") if k in self.state}
            if "tokens_per_s" in self.state:
                post["tok/s"] = f"{self.state['tokens_per_s']:,.0f}"
            self.bar.set_postfix(post, refresh=True)
        elif time.monotonic() - self.last_line >= self.every_s and self.state.get("step") is not None:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_line = time.monotonic()
