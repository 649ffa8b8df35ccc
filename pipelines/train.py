"""Fine-tune an adapter with Ray Train + DeepSpeed ZeRO-2, from raw data to an adapter folder.

    python -m pipelines.train --config tiny-cpu [--set optim.epochs=1 ...]
    ray job submit --working-dir . -- python -m pipelines.train --config configs/llama7b-alpaca-8xa100.yaml

Any task of the registry (pipelines/tasks/__init__.py; docs/tasks.md). Stages: the task's records
built with Ray Data (reused when built from the same input and settings) -> TorchTrainer over the
parquet shards (pipelines/training/recipe.py) -> the final adapter folder, the loss curve and
before/after samples. Everything lands in `<output_dir>/<name>/`; on a multi-node cluster that
must be shared storage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray.data
import ray.train
from ray.data import ExecutionOptions
from ray.train.torch import TorchConfig, TorchTrainer

from adapter.models import is_catalogue_name
from adapter.settings import add_config_args, config_from_args, project_path, run_cli, save_config, with_project_paths
from pipelines.data.folders import fresh_tmp, replace_dir
from pipelines.data.record_output import changed_settings
from pipelines.job_config import TrainConfig
from pipelines.ray_session import connect
from pipelines.tasks import Task, task_for
from pipelines.training.progress import TrainingProgress
from pipelines.training.recipe import hooks_for, train_loop_per_worker
from pipelines.training.run_report import plot_loss, side_by_side

ADAPTER_DIR = "adapter"


def prepare_data(cfg: TrainConfig, task: Task, expected: dict | None = None) -> dict:
    """The task's records for this config: reused when built from the same input (file contents, or
    a folder's listing), tokenizer and settings, rebuilt (and the reason printed) otherwise.
    `expected`: the task's fingerprint of this config, when the caller has it already."""
    expected = expected if expected is not None else task.fingerprint(cfg)
    out = Path(cfg.data.out)
    changed = changed_settings(out, expected)
    if changed == []:
        print(f"[train] preprocessed {task.name} data found at {out} (same input and settings); reusing it", flush=True)
    else:
        why = f"it was built with other settings ({'; '.join(changed)})" if changed else "none found"
        print(f"[train] preprocessing {task.name} {cfg.data.source} -> {out} ({why})", flush=True)
        stats = task.build_records(cfg)
        print(
            f"[train] preprocessed: {stats['records_read']:,} read, {stats['records_written']:,} written "
            f"({stats['train_records']:,} train / {stats['val_records']:,} held out), "
            f"{stats['records_rejected']:,} rejected {stats['rejected_by_reason']}, {stats['seconds']} s",
            flush=True,
        )
    return json.loads((out / "stats.json").read_text())


def build_trainer(cfg: TrainConfig, task: Task, run_dir: Path, data_fingerprint: dict) -> TorchTrainer:
    w = cfg.workers
    resources = {"CPU": w.cpus_per_worker}
    if w.use_gpu:
        resources["GPU"] = w.gpus_per_worker
    backend = w.backend if w.backend != "auto" else ("nccl" if w.use_gpu else "gloo")
    data_dir = Path(cfg.data.out)
    # Materialized up front: the shards are small (Alpaca: ~27 MB of token ids), and splitting
    # blocks already in the object store spares each worker a cold read pipeline.
    datasets = {split: ray.data.read_parquet(str(data_dir / split)).materialize() for split in ("train", "val")}
    return TorchTrainer(
        train_loop_per_worker,
        # The task object itself goes to the workers: a task registered outside this package (a
        # plugin, a test) needs no registration in their processes.
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "task": task,
            "run_dir": str(run_dir),
            "data_fingerprint": data_fingerprint,
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker=resources
        ),
        datasets=datasets,
        # Same rows in the same order on every run: resume depends on it.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
        ),
    )


def export_adapter(checkpoint_dir: Path, run_dir: Path, cfg: TrainConfig, task: Task, summary: dict) -> Path:
    out = run_dir / ADAPTER_DIR
    tmp = fresh_tmp(out)
    hooks_for(task).export_files(checkpoint_dir, tmp, cfg, summary)
    return replace_dir(tmp, out)


def run(cfg: TrainConfig, task: Task | None = None) -> dict:
    """Train `cfg`; `task`: a task object to use instead of looking `cfg.task` up in the registry."""
    t0 = time.time()
    cfg = with_project_paths(cfg)
    task = task or task_for(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    # Inputs first (data, model, tokenizer: fetched or found), so a missing one is named before Ray starts.
    expected = task.fingerprint(cfg)
    joined = connect(cfg.ray)
    print(f"[train] run {cfg.name} ({task.name}) -> {run_dir} (Ray: {joined} cluster)", flush=True)
    stats = prepare_data(cfg, task, expected)

    with TrainingProgress(run_dir / "metrics.jsonl"):
        result = build_trainer(cfg, task, run_dir, stats["fingerprint"]).fit()
    if result.error:
        raise result.error
    summary = dict(result.return_value or {})
    summary["train_records"] = stats["train_records"]
    summary["final_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else None
    summary["best_checkpoint"] = best.path if best else None
    summary["best_val_loss"] = min((m.get("val_loss", float("inf")) for _, m in result.best_checkpoints), default=None)
    with result.checkpoint.as_directory() as d:
        adapter_dir = export_adapter(Path(d), run_dir, cfg, task, summary)
    plot = plot_loss(run_dir)
    summary.update(
        {
            "task": task.name,
            "run_dir": str(run_dir),
            "adapter": str(adapter_dir),
            "loss_plot": str(plot) if plot else None,
            "metrics": str(run_dir / "metrics.jsonl"),
            "samples": str(run_dir / "samples.jsonl"),
            "tensorboard": str(run_dir / "tensorboard"),
            "wall_s": round(time.time() - t0, 1),
        }
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="tiny-cpu")
    cfg = config_from_args(TrainConfig, ap.parse_args(argv))
    try:
        task = task_for(cfg)
    except ValueError as e:
        ap.error(str(e))
    summary = run(cfg, task)
    run_dir = Path(summary["run_dir"])
    m = cfg.model
    if m is not None:
        print("\nSamples before and after tuning (fixed instructions):")
        print(side_by_side(run_dir))
    print(f"\n[train] done in {summary['wall_s']} s; {summary['base_note']}")
    print(f"  adapter:     {summary['adapter']}")
    print(f"  metrics:     {summary['metrics']}  (TensorBoard: {summary['tensorboard']})")
    print(f"  loss curve:  {summary['loss_plot']}")
    print("  evaluate:    python -m pipelines.evaluate --config <this config>")
    if m is not None:
        print(f"  samples:     {summary['samples']}")
        base = m.base if is_catalogue_name(m.base or "") else project_path(m.base)
        tokenizer = f" --tokenizer {project_path(m.tokenizer)}" if m.tokenizer else ""
        print(
            f"  try it:      python -m adapter.generate --base {base}{tokenizer} --adapter {summary['adapter']} "
            "--instruction 'Tell me about alpacas.'"
        )
    return summary


if __name__ == "__main__":
    run_cli(main)
