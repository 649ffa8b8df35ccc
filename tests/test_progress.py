"""The driver's progress display, fed by the metrics file rank 0 writes (no Ray needed)."""

import io
import json

from pipelines.training.progress import TrainingProgress, fmt_duration


def _write(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_plain_lines_show_step_loss_throughput_and_eta(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [{"kind": "train", "step": 99, "loss": 9.0, "tokens_per_s": 1.0}])  # an earlier run's row
    out = io.StringIO()
    progress = TrainingProgress(metrics, stream=out, every_s=0.0, tty=False)
    _write(
        metrics,
        [
            {"kind": "start", "step": 0, "total_steps": 10},
            {"kind": "val", "step": 0, "val_loss": 4.5},
            {"kind": "train", "step": 1, "loss": 4.25, "tokens_per_s": 1234.0, "mfu": None},
            {"kind": "train", "step": 2, "loss": 4.0, "tokens_per_s": 2345.0, "mfu": 0.31},
        ],
    )
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')  # a half-written line is left for the next poll
    progress.poll()
    line = out.getvalue().strip().splitlines()[-1]
    assert line.startswith("[train] step 2/10 (20%)")
    assert "loss 4.0000" in line and "held-out 4.5000" in line and "2,345 tok/s" in line and "MFU 31.0%" in line
    assert "ETA" in line and "step 99" not in out.getvalue()


def test_a_terminal_gets_a_progress_bar(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    with TrainingProgress(metrics, stream=out, tty=True):
        _write(
            metrics,
            [
                {"kind": "start", "step": 3, "total_steps": 8},
                {"kind": "train", "step": 4, "loss": 1.5, "tokens_per_s": 10.0},
            ],
        )
    text = out.getvalue()
    assert "4/8" in text and "loss=1.5000" in text


def test_durations_read_like_a_clock():
    assert fmt_duration(65) == "1m05s" and fmt_duration(3725) == "1h02m05s" and fmt_duration(-3) == "0m00s"
