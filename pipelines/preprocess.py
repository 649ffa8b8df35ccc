"""Build a task's training records with Ray Data, on their own (the training driver does the same
when its data is missing or stale).

    python -m pipelines.preprocess --config tiny-cpu [--set data.source=PATH_OR_URL --set data.out=DIR]
    ray job submit --working-dir . -- python -m pipelines.preprocess --config scienceqa-tiny-cpu

Reads a training config; writes `data.out`: `train/` and `val/` parquet shards, `rejects.jsonl`
(every record set aside, with its reason) and `stats.json` (counts by reason and the fingerprint
the training driver compares before reusing the output), in a folder swapped in whole.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapter.settings import add_config_args, config_from_args, run_cli, with_project_paths
from pipelines.job_config import TrainConfig
from pipelines.ray_session import connect
from pipelines.tasks import Task, task_for


def run(cfg: TrainConfig, task: Task | None = None) -> dict:
    cfg = with_project_paths(cfg)
    task = task or task_for(cfg)
    return task.build_records(cfg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    try:
        task = task_for(cfg)
    except ValueError as e:
        ap.error(str(e))
    connect(cfg.ray)
    out = Path(with_project_paths(cfg).data.out)
    print(f"[preprocess] {task.name}: {cfg.data.source} -> {out}", flush=True)
    stats = run(cfg, task)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("token_length", "fingerprint")}, indent=2))
    print(
        f"[preprocess] wrote {stats['records_written']} records to {out} "
        f"({stats['records_rejected']} rejected, see {out / 'rejects.jsonl'})"
    )
    return stats


if __name__ == "__main__":
    run_cli(main)
