"""Evaluate a trained adapter on its task, by Ray Data batch inference (docs/tasks.md).

    python -m pipelines.evaluate --config scienceqa-tiny-cpu [--set evaluation.split=val]
    ray job submit --working-dir . -- python -m pipelines.evaluate --config vit-digits-tiny-cpu

Reads the training YAML: the adapter from `evaluation.adapter` (default
`<output_dir>/<name>/adapter`), results to `evaluation.out` (default
`<output_dir>/<name>/eval-<task>-<split>`). What is scored, how, and which files are written is
the task's own (`Task.evaluate`): ScienceQA accuracy per class, COCO caption metrics, image top-1,
SQuAD exact match / F1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapter.settings import add_config_args, config_from_args, run_cli, with_project_paths
from pipelines.job_config import TrainConfig
from pipelines.ray_session import connect
from pipelines.tasks import Task, task_for


def default_paths(cfg: TrainConfig, task: Task) -> tuple[str, Path]:
    """(adapter, results folder) of a config whose paths are absolute."""
    e, run_dir = cfg.evaluation, Path(cfg.output_dir) / cfg.name
    adapter = e.adapter or str(run_dir / "adapter")
    out = Path(e.out) if e.out else run_dir / f"eval-{task.name}-{e.split}"
    return adapter, out


def run(cfg: TrainConfig, task: Task | None = None) -> dict:
    """Evaluate; `task`: a task object to use instead of looking `cfg.task` up in the registry."""
    cfg = with_project_paths(cfg)
    task = task or task_for(cfg)
    adapter, out = default_paths(cfg, task)
    out.mkdir(parents=True, exist_ok=True)
    return task.evaluate(cfg, adapter, out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="scienceqa-tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    try:
        task = task_for(cfg)
    except ValueError as e:
        ap.error(str(e))
    connect(cfg.ray)
    result = run(cfg, task)
    print(result["report"])
    return result


if __name__ == "__main__":
    run_cli(main)
