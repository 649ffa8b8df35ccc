"""The training recipe Ray Train runs on every worker (docs/training.md), in named stages as
torchtune's recipes are: `setup` -> `resume` -> `train_epoch` (each step: `train_step`, then
`validate` / `sample` / `save` where due) -> summary.

This module is the stage machine only: schedule, DeepSpeed ZeRO-2, checkpoints and resume, fault
injection, metrics and timing. What a model is comes from its family's hooks, siblings of each
other (`pipelines/training/llama.py`: frozen LLaMA + adaption prompts, optionally the CLIP image
token; `pipelines/training/backbone.py`: a frozen ViT / BERT-family encoder + prompts + task head).
The hooks hand DeepSpeed only the trainable module: the frozen base never enters DeepSpeed, so it
is neither broadcast nor bucketed. AdamW runs over the adapter parameters only. Rank 0 writes
metrics (buffered, flushed every few seconds), TensorBoard events and per-epoch samples.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import numpy as np
import ray.train
import ray.train.torch
import torch

from adapter.adapter_file import AdapterFileError
from adapter.settings import project_path
from pipelines.job_config import TrainConfig
from pipelines.training.backbone import BackboneHooks
from pipelines.training.batching import epoch_order
from pipelines.training.checkpoints import (
    DS_DIR,
    STATE_FILE,
    CheckpointError,
    read_trainer_state,
    state_digest,
    write_manifest,
)
from pipelines.training.llama import LlamaHooks
from pipelines.training.metrics_log import MetricsLog


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up per iteration, then half-cycle cosine down to `floor` (the authors' schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: TrainConfig, world_size: int, n_trainable: int) -> dict:
    o = cfg.optim
    # ZeRO-2's default buckets hold 5e8 elements (2 GB fp32 per backward); the adapter has ~1.2M.
    bucket = max(n_trainable, 1 << 16)
    return {
        "train_batch_size": o.micro_batch_size * o.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        # Precision is ours: frozen weights already bf16 on GPU, adapter fp32. DeepSpeed's bf16
        # mode would cast the adapter to bf16 too.
        "zero_optimization": {
            "stage": 2,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def read_shard(name: str, expected: tuple[str, ...] = ()) -> dict[str, np.ndarray | list]:
    """This worker's whole share of a split, every column, ordered by record index (so the order
    does not depend on which block arrived first). Alpaca on 8 workers is about 3 MB of token ids
    per worker; multimodal records add image bytes, encoder tasks their own columns."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    columns: dict[str, list] = defaultdict(list)
    for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        for c in b.column_names:
            columns[c] += b.column(c).to_pylist()
    order = np.argsort(np.asarray(columns["idx"], dtype=np.int64), kind="stable")
    out = {c: [v[i] for i in order] for c, v in columns.items() if c != "idx"}
    out["idx"] = np.asarray(columns["idx"], dtype=np.int64)[order]
    for c in expected:  # an empty shard (fewer held-out records than workers) still has its columns
        out.setdefault(c, [])
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class FaultInjector:
    """`fail_at_step`: the last worker exits once at that step (a marker file makes it once per run).

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a worker lost within that interval of a
    report restarts the group from the checkpoint before. The injected crash waits two intervals
    first, so the restart it shows is from the latest checkpoint (docs/training.md)."""

    def __init__(self, at_step: int | None, marker: Path, is_victim: bool):
        self.at_step, self.marker, self.armed = at_step, marker, is_victim and at_step is not None

    def maybe_fail(self, step: int) -> None:
        if self.armed and step == self.at_step and not self.marker.exists():
            self.marker.write_text(f"worker killed at step {step}\n")
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
            print(f"[train] fault injection: a worker exits at step {step}", flush=True)
            os._exit(1)


class StageTimer:
    """Seconds spent per named stage, summed over the run."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


class Recipe:
    """The stages, over `hooks` (a family's model: pipelines/training/llama.py or backbone.py)."""

    def __init__(self, cfg: TrainConfig, task, run_dir: Path, data_fingerprint: dict):
        self.cfg, self.task, self.run_dir, self.data_fingerprint = cfg, task, run_dir, data_fingerprint
        self.timer = StageTimer()
        self.step = 0
        self.val_metrics: dict = {}

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.log = MetricsLog(self.run_dir, self.rank == 0)
        self.fault = FaultInjector(cfg.fail_at_step, self.run_dir / ".fault_injected", self.rank == self.world - 1)
        self.hooks = hooks_for(self.task)(cfg, self.task, self.device, self.timer, self.data_fingerprint)
        with self.timer("load_model"):
            self.hooks.build()
        with self.timer("read_data"):
            train, val = (read_shard(split, self.hooks.shard_columns) for split in ("train", "val"))
        with self.timer("prepare_data"):
            self.lengths = self.hooks.prepare(train, val)
        self.setup_optimizer()

    def setup_optimizer(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self.steps_per_epoch = len(self.lengths) // o.micro_batch_size // o.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"worker {self.rank} has {len(self.lengths)} training records: not one step of "
                f"{o.micro_batch_size} x {o.grad_accum_steps}"
            )
        self.total_steps = int(round(o.epochs * self.steps_per_epoch))
        self.stop_at = min(self.total_steps, cfg.stop_at_step or self.total_steps)
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.lr = o.peak_lr(self.world)
        trainable_module = self.hooks.trainable
        trainable = [p for p in trainable_module.parameters() if p.requires_grad]  # a gate fixed at 1 is not
        opt = torch.optim.AdamW(trainable, lr=self.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, self.total_steps, warmup, self.lr, o.min_lr) / self.lr
        )
        n_trainable = sum(p.numel() for p in trainable)
        with self.timer("deepspeed_init"):
            # Only the adapter goes in: DeepSpeed would otherwise broadcast the frozen base.
            self.engine, _, _, self.sched = deepspeed.initialize(
                model=trainable_module,
                optimizer=opt,
                lr_scheduler=sched,
                config=deepspeed_config(cfg, self.world, n_trainable),
                dist_init_required=False,
            )
        # The settings a checkpoint must share with the run that resumes from it.
        self.settings = {
            "world_size": self.world,
            "micro_batch_size": o.micro_batch_size,
            "grad_accum_steps": o.grad_accum_steps,
            "epochs": o.epochs,
            "warmup_epochs": o.warmup_epochs,
            "seed": o.seed,
            "group_by_length": o.group_by_length,
            "peak_lr": self.lr,
            "min_lr": o.min_lr,
            "data_fingerprint": self.data_fingerprint,
            **self.hooks.adapter_settings(),
        }
        peak = cfg.workers.peak_tflops * 1e12 if cfg.workers.peak_tflops else self.hooks.device_peak_flops()
        self.peak_flops = peak * self.world if peak else None

    # --- resume ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """A restart after a failure gets Ray's latest checkpoint; a new run may name one."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.cfg.checkpoint.resume_from:
            ckpt = ray.train.Checkpoint(project_path(self.cfg.checkpoint.resume_from))
        if ckpt is None:
            return
        with self.timer("resume"), ckpt.as_directory() as d:
            state = read_trainer_state(Path(d), self.settings, self.hooks.adapter_file)
            self.engine.load_checkpoint(
                str(Path(d) / DS_DIR),
                tag=state["ds_tag"],
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            try:
                saved = self.hooks.read_adapter(Path(d))
            except AdapterFileError as e:
                raise CheckpointError(str(e)) from None
            try:
                with torch.no_grad():
                    self.hooks.trainable.load_state_dict(saved)  # prompts, gates (and projection / head)
            except RuntimeError as e:
                raise CheckpointError(f"{d}: adapter does not fit this run ({e})") from None
            self.step = int(state["step"])

    # --- stages ---------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[np.ndarray]) -> dict:
        """One optimizer step over grad_accum micro-batches. Nothing here reads a device value
        (the row's tensors are read when the log flushes)."""
        t0 = time.perf_counter()
        sums = None
        for rows in micro_batches:
            loss, counts = self.hooks.train_micro_batch(rows)
            self.engine.backward(loss)
            self.engine.step()
            sums = counts if sums is None else sums + counts
        self.step += 1
        dt = time.perf_counter() - t0
        row = {"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch}
        row.update(self.hooks.train_metrics(all_reduce_sum(sums), dt, self.world, self.peak_flops))
        row.update({"lr": self.sched.get_last_lr()[0], "grad_norm": self.engine.get_global_grad_norm()})
        return row

    @torch.no_grad()
    def validate(self) -> float:
        with self.timer("validate"):
            self.val_metrics = self.hooks.validate(self.cfg.optim.micro_batch_size, all_reduce_sum)
        epoch = self.step / self.steps_per_epoch
        self.log.add({"kind": "val", "step": self.step, "epoch": epoch, **self.val_metrics}, flush=True)
        return self.val_metrics["val_loss"]

    @torch.no_grad()
    def sample(self) -> None:
        """Rank 0 answers the fixed instructions (greedy by default): the run's before/after."""
        if self.rank != 0:
            return
        with self.timer("sample"):
            rows = self.hooks.sample(self.cfg.samples)
        if rows:
            self.log.samples(self.step, self.step / self.steps_per_epoch, rows)

    def save(self, metrics: dict) -> None:
        val_loss = self.validate()
        with self.timer("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            tag = f"step{self.step:08d}"
            ds_dir = Path(tmp) / DS_DIR
            self.engine.save_checkpoint(str(ds_dir), tag=tag, save_latest=False)
            write_manifest(ds_dir, self.rank)
            if self.rank == 0:
                self.hooks.write_adapter(Path(tmp), self.step)
                # Written last: its presence marks a complete checkpoint.
                (Path(tmp) / STATE_FILE).write_text(
                    json.dumps({"step": self.step, "ds_tag": tag, "val_loss": val_loss, "settings": self.settings})
                )
            ray.train.report(
                {**metrics, "val_loss": val_loss, "step": self.step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    def train_epoch(self) -> None:
        o, cfg = self.cfg.optim, self.cfg
        epoch = self.step // self.steps_per_epoch
        batches = epoch_order(self.lengths, o.micro_batch_size, o.seed, epoch, o.group_by_length)
        first = (self.step % self.steps_per_epoch) * o.grad_accum_steps
        batches = batches[first : self.steps_per_epoch * o.grad_accum_steps]
        for k in range(0, len(batches), o.grad_accum_steps):
            self.fault.maybe_fail(self.step)
            with self.timer("train"):
                row = self.train_step(batches[k : k + o.grad_accum_steps])
            self.log.add(row)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            every_n = cfg.checkpoint.every_n_steps and self.step % cfg.checkpoint.every_n_steps == 0
            if end_of_epoch or every_n or self.step == self.stop_at:
                self.log.flush()
                if end_of_epoch:
                    self.sample()
                self.save({"loss": float(row["loss"]), "epoch": row["epoch"]})
            if self.step >= self.stop_at:
                return

    def run(self) -> dict:
        with self.timer("setup"):
            self.setup()
        self.resume()
        base = self.hooks.base
        digest_start = state_digest(base) if self.rank == 0 else None
        note = self.hooks.note
        self.log.add(
            {
                "kind": "start",
                "step": self.step,
                "total_steps": self.stop_at,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world,
                "peak_lr": self.lr,
                "base_note": note,
            },
            flush=True,
        )
        if self.step == 0:
            self.validate()
            self.sample()
        if self.rank == 0:
            print(
                f"[train] {note}; {self.world} workers, {len(self.lengths)} records on rank 0, "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, peak lr {self.lr:.3g} "
                f"(recipe {self.cfg.optim.recipe})" + (f", resumed at step {self.step}" if self.step else ""),
                flush=True,
            )
        self.engine.train()
        while self.step < self.stop_at:
            self.train_epoch()
        self.log.flush()
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "base_note": note,
            "peak_lr": self.lr,
            "world_size": self.world,
            "base_digest_start": digest_start,
            "base_digest_end": state_digest(base) if self.rank == 0 else None,
            "worker_seconds": {k: round(v, 2) for k, v in self.timer.seconds.items()},
            **{k: v for k, v in self.val_metrics.items() if k != "val_loss"},
        }


FAMILY_HOOKS = {"llama": LlamaHooks, "backbone": BackboneHooks}


def hooks_for(task):
    """The model hooks of the task's family."""
    if task.family not in FAMILY_HOOKS:
        raise ValueError(f"task {task.name!r} has an unknown family {task.family!r}")
    return FAMILY_HOOKS[task.family]


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig.model_validate(config["train"])
    return Recipe(cfg, config["task"], Path(config["run_dir"]), config["data_fingerprint"]).run()
