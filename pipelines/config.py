"""The jobs' configs, built from the sections in `adapter/settings.py` (the one config system).

A training YAML holds every section; the preprocessing job reads the same file and uses its
`model` (the tokenizer, and the context the data must fit) and `data` sections, so both jobs see
one set of facts. Each job saves its resolved config beside its outputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from adapter.generation import SamplingParams
from adapter.settings import (CONFIG_DIR, ModelConfig, Section, add_config_args, config_from_args,  # noqa: F401
                              load_config, save_config)


class DataConfig(Section):
    source: str = Field(description="Alpaca JSON / JSONL: a path or an http(s)/file URL")
    sha256: str | None = Field(None, description="expected sha256 of the source file")
    out: str = Field(description="folder for parquet shards, stats.json and rejects.jsonl")
    max_seq_len: int = Field(512, ge=8, description="records are cut to this many tokens")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N records (a quick subset)")


class RaySection(Section):
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of a local Ray started by this job (ignored when a cluster is running)")
    verbose: bool = Field(False, description="show Ray's own logs and progress bars on the console")


class OptimConfig(Section):
    recipe: Literal["script", "paper", "custom"] = Field(
        "script", description="script: lr = blr x global batch / 256 (authors' code); paper: lr = blr (absolute, "
                              "the paper's batch 64); custom: lr")
    blr: float = Field(9e-3, gt=0)
    lr: float | None = Field(None, gt=0, description="absolute learning rate (recipe 'custom')")
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    epochs: float = Field(5, gt=0)
    warmup_epochs: float = Field(2, ge=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    group_by_length: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _custom_needs_lr(self):
        if self.recipe == "custom" and self.lr is None:
            raise ValueError("optim.recipe 'custom' needs optim.lr")
        return self

    def peak_lr(self, world_size: int) -> float:
        if self.recipe == "custom":
            return self.lr
        if self.recipe == "paper":
            return self.blr
        return self.blr * self.micro_batch_size * self.grad_accum_steps * world_size / 256


class WorkersConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs for Ray Data on shared clusters")
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    peak_tflops: float | None = Field(
        None, gt=0, description="per-device peak for MFU; default: looked up from the GPU's name")


class CheckpointConfig(Section):
    every_n_steps: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1, description="best k checkpoints kept, by held-out loss")
    resume_from: str | None = Field(None, description="a checkpoint folder to start from (a TRUSTED folder: "
                                                      "DeepSpeed unpickles its optimizer state)")
    max_failures: int = Field(1, ge=0)


class SamplesConfig(Section):
    """Fixed instructions answered at step 0 and every epoch end: the run's before/after."""

    instructions: list[str] = [
        "Tell me about alpacas.",
        "Write a short story about a dog who finds a ball.",
        "List three tips for staying healthy.",
    ]
    sampling: SamplingParams = SamplingParams(max_gen_len=48, temperature=0.0)


class PreprocessConfig(Section):
    model: ModelConfig
    data: DataConfig
    ray: RaySection = RaySection()


class TrainConfig(PreprocessConfig):
    name: str = "adapter-run"
    output_dir: str = "runs"
    optim: OptimConfig = OptimConfig()
    workers: WorkersConfig = WorkersConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    samples: SamplesConfig = SamplesConfig()
    fail_at_step: int | None = Field(None, description="fault injection: a worker dies once at this step")
    stop_at_step: int | None = Field(None, ge=1, description="end early after this step (schedule unchanged)")

    @model_validator(mode="after")
    def _needs_held_out(self):
        if self.data.val_fraction <= 0:
            raise ValueError("training needs a held-out split (data.val_fraction > 0): checkpoints are "
                             "ranked by held-out loss")
        return self


def preprocess_part(cfg: TrainConfig) -> PreprocessConfig:
    return PreprocessConfig(model=cfg.model, data=cfg.data, ray=cfg.ray)
