"""What a finished run shows its user: the loss curve as a PNG and the sampled responses before
and after tuning, side by side."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train loss (per step)", alpha=0.7)
    if val:
        ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats / response token)")
    ax.set_title(f"LLaMA-Adapter fine-tuning: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def side_by_side(run_dir: Path, width: int = 60) -> str:
    """Responses at step 0 (the adapter's gates are zero: the base model) and at the last sample."""
    rows = read_jsonl(run_dir / "samples.jsonl")
    if not rows:
        return "(no samples written)"
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    before = {r["instruction"]: r["response"] for r in rows if r["step"] == first}
    after = {r["instruction"]: r["response"] for r in rows if r["step"] == last}
    lines = []
    for instr in before:
        lines.append(f"### {instr}")
        lines.append(f"  before (step {first}): {before[instr][: width * 2]!r}")
        lines.append(f"  after  (step {last}): {after.get(instr, '')[: width * 2]!r}")
    return "\n".join(lines)
