"""Fine-tune a LLaMA-Adapter with Ray Train + DeepSpeed ZeRO-2, from raw JSON to an adapter.

    python -m pipelines.train --config tiny-cpu [--set optim.epochs=1 ...]
    ray job submit --working-dir . -- python -m pipelines.train --config configs/llama7b-alpaca-8xa100.yaml

Stages: preprocess with Ray Data (reused when its output was built from the same input, tokenizer
and settings) -> TorchTrainer over the parquet shards (the recipe in `train_worker.py`) -> the
final adapter folder, the loss curve and before/after samples. Everything lands in
`<output_dir>/<name>/`; on a multi-node cluster that must be shared storage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from adapter.settings import add_config_args, config_from_args, project_path, save_config
from pipelines.config import ENCODER_TASKS, TrainConfig, preprocess_part
from pipelines.folders import fresh_tmp, replace_dir
from pipelines.run_report import plot_loss, side_by_side

ADAPTER_DIR = "adapter"


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Workers do not share the driver's working directory: hand them absolute paths, resolved by
    the project-root rule (adapter.settings.project_root)."""
    d, m = cfg.data, cfg.model
    multimodal = {}
    if m is not None:
        multimodal["model"] = m.model_copy(
            update={"base": project_path(m.base), "tokenizer": project_path(m.tokenizer)}
        )
    if cfg.encoder is not None:
        multimodal["encoder"] = cfg.encoder.model_copy(
            update={"weights": project_path(cfg.encoder.weights), "eval_source": project_path(cfg.encoder.eval_source)}
        )
    if cfg.vision is not None:
        multimodal["vision"] = cfg.vision.model_copy(update={"encoder": project_path(cfg.vision.encoder)})
    if cfg.scienceqa.images:
        multimodal["scienceqa"] = cfg.scienceqa.model_copy(update={"images": project_path(cfg.scienceqa.images)})
    return cfg.model_copy(
        update={
            **multimodal,
            "output_dir": project_path(cfg.output_dir),
            "data": d.model_copy(update={"source": project_path(d.source), "out": project_path(d.out)}),
            "checkpoint": cfg.checkpoint.model_copy(update={"resume_from": project_path(cfg.checkpoint.resume_from)}),
        }
    )


def prepare_data(cfg: TrainConfig) -> dict:
    """The preprocessed data for this config: reused when it was built from the same input (file
    contents, or a folder's listing), tokenizer and settings, rebuilt (and the reason printed)
    otherwise. Alpaca-style data by pipelines/preprocess.py, ScienceQA / COCO by their own jobs,
    all in the layout the trainer reads. Returns its stats."""
    from pipelines import coco, encoder_data, preprocess, scienceqa
    from pipelines.data_source import fetch

    if cfg.task == "alpaca":
        pp = preprocess_part(cfg)
        expected = preprocess.fingerprint(pp, fetch(cfg.data.source, cfg.data.sha256))
        build = lambda: preprocess.run(pp)  # noqa: E731
    else:
        job = {"scienceqa": scienceqa, "coco": coco, "image-classification": encoder_data, "squad": encoder_data}[
            cfg.task
        ]
        expected = job.fingerprint(cfg)
        build = lambda: job.run(cfg)  # noqa: E731
    out = Path(cfg.data.out)
    changed = preprocess.changed_settings(out, expected)
    what = "" if cfg.task == "alpaca" else f"{cfg.task} "
    if changed == []:
        print(f"[train] preprocessed {what}data found at {out} (same input and settings); reusing it", flush=True)
    else:
        why = f"it was built with other settings ({'; '.join(changed)})" if changed else "none found"
        print(f"[train] preprocessing {what}{cfg.data.source} -> {out} ({why})", flush=True)
        stats = build()
        print(
            f"[train] preprocessed: {stats['records_read']:,} read, {stats['records_written']:,} written "
            f"({stats['train_records']:,} train / {stats['val_records']:,} held out), "
            f"{stats['records_rejected']:,} rejected {stats['rejected_by_reason']}, {stats['seconds']} s",
            flush=True,
        )
    return json.loads((out / "stats.json").read_text())


def build_trainer(cfg: TrainConfig, run_dir: Path, data_fingerprint: dict):
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_worker import train_loop_per_worker

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
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
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


def export_adapter(checkpoint_dir: Path, run_dir: Path, cfg: TrainConfig, summary: dict) -> Path:
    """Copy the final adapter out of the checkpoint with its config and training metadata."""
    from adapter.adapter_file import ADAPTER_FILENAME, read_metadata

    out = run_dir / ADAPTER_DIR
    tmp = fresh_tmp(out)
    shutil.copy2(checkpoint_dir / ADAPTER_FILENAME, tmp / ADAPTER_FILENAME)
    meta = read_metadata(tmp / ADAPTER_FILENAME)
    (tmp / "adapter_config.json").write_text(json.dumps(meta["adapter_config"], indent=2))
    (tmp / "training.json").write_text(
        json.dumps(
            {
                "base": cfg.model.base,
                "preset": cfg.model.preset,
                "tokenizer": cfg.model.tokenizer,
                "base_shape": meta["base_shape"],
                "recipe": cfg.optim.recipe,
                # Multimodal: what the prompt looks like and which image encoder folder the adapter was trained with.
                "task": cfg.task,
                "vision": cfg.vision.model_dump(mode="json") if cfg.vision else None,
                **summary,
            },
            indent=2,
        )
    )
    return replace_dir(tmp, out)


def export_encoder_adapter(checkpoint_dir: Path, run_dir: Path, cfg: TrainConfig, summary: dict) -> Path:
    """The ViT / RoBERTa adapter file (METHOD.md section 8) with its training metadata."""
    from adapter.backbones.adapted import ADAPTER_FILENAME

    out = run_dir / ADAPTER_DIR
    tmp = fresh_tmp(out)
    shutil.copy2(checkpoint_dir / ADAPTER_FILENAME, tmp / ADAPTER_FILENAME)
    (tmp / "training.json").write_text(
        json.dumps(
            {"task": cfg.task, "encoder": cfg.encoder.model_dump(mode="json"), "recipe": cfg.optim.recipe, **summary},
            indent=2,
        )
    )
    return replace_dir(tmp, out)


def run(cfg: TrainConfig) -> dict:
    from pipelines.progress import TrainingProgress
    from pipelines.ray_session import connect

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    joined = connect(cfg.ray)
    print(f"[train] run {cfg.name} -> {run_dir} (Ray: {joined} cluster)", flush=True)
    stats = prepare_data(cfg)

    with TrainingProgress(run_dir / "metrics.jsonl"):
        result = build_trainer(cfg, run_dir, stats["fingerprint"]).fit()
    if result.error:
        raise result.error
    summary = dict(result.return_value or {})
    summary["train_records"] = stats["train_records"]
    summary["final_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else None
    summary["best_checkpoint"] = best.path if best else None
    summary["best_val_loss"] = min((m.get("val_loss", float("inf")) for _, m in result.best_checkpoints), default=None)
    with result.checkpoint.as_directory() as d:
        export = export_encoder_adapter if cfg.task in ENCODER_TASKS else export_adapter
        adapter_dir = export(Path(d), run_dir, cfg, summary)
    plot = plot_loss(run_dir)
    summary.update(
        {
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
    summary = run(cfg)
    run_dir = Path(summary["run_dir"])
    m = cfg.model
    if m is not None:
        print("\nSamples before and after tuning (fixed instructions):")
        print(side_by_side(run_dir))
    print(f"\n[train] done in {summary['wall_s']} s; {summary['base_note']}")
    print(f"  adapter:     {summary['adapter']}")
    print(f"  metrics:     {summary['metrics']}  (TensorBoard: {summary['tensorboard']})")
    print(f"  loss curve:  {summary['loss_plot']}")
    if m is None:
        print("  evaluate:    python -m pipelines.evaluate_encoder --config <this config> (top-1, or SQuAD EM / F1)")
        return summary
    print(f"  samples:     {summary['samples']}")
    print(
        f"  try it:      python -m adapter.generate --base {project_path(m.base)} --tokenizer "
        f"{project_path(m.tokenizer)} --adapter {summary['adapter']} --instruction 'Tell me about alpacas.'"
    )
    return summary


if __name__ == "__main__":
    main()
