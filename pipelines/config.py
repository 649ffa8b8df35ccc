"""One config system for every job: typed pydantic models, loaded from YAML, overridden on the
command line with `--set section.key=value`, and saved resolved next to each run's output.

Unknown keys are errors (a typo in a YAML file must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    source: str = Field(description="Alpaca JSON / JSONL: a path or an http(s)/file URL")
    sha256: str | None = Field(None, description="expected sha256 of the source file")
    tokenizer: str = Field(description="SentencePiece tokenizer.model")
    out: str = Field(description="folder for parquet shards, stats.json and rejects.jsonl")
    max_seq_len: int = Field(512, ge=8)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N records (a quick subset)")


class ModelConfig(Strict):
    base: str | None = Field(None, description="Meta or Hugging Face checkpoint folder")
    preset: str | None = Field(None, description="random-initialised base of a named shape (last resort)")
    adapter_len: int = Field(10, ge=1)
    adapter_layers: int = Field(30, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if self.base is None and self.preset is None:
            raise ValueError("model needs `base` (a checkpoint folder) or `preset`")
        return self


class OptimConfig(Strict):
    recipe: Literal["script", "paper", "custom"] = Field(
        "script", description="script: lr = blr * global_batch / 256 (authors' code); paper: lr 9e-3 absolute")
    blr: float = 9e-3
    lr: float | None = Field(None, description="absolute learning rate (recipe 'custom')")
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


class ScalingSection(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs for Ray Data on shared clusters")
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class CheckpointConfig(Strict):
    every_n_steps: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1, description="best k checkpoints kept, by validation loss")
    resume_from: str | None = Field(None, description="a checkpoint folder to start from")
    max_failures: int = Field(1, ge=0)


class EvalConfig(Strict):
    instructions: list[str] = [
        "Tell me about alpacas.",
        "Write a short story about a dog who finds a ball.",
        "List three tips for staying healthy.",
    ]
    max_gen_len: int = 48
    temperature: float = 0.0


class TrainConfig(Strict):
    name: str = "adapter-run"
    output_dir: str = "runs"
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    fail_at_step: int | None = Field(None, description="fault injection: a worker dies once at this step")
    stop_at_step: int | None = Field(None, ge=1, description="end early after this step (schedule unchanged)")
    ray_num_cpus: int | None = Field(None, description="CPUs for a local Ray started by this job")

    @model_validator(mode="after")
    def _needs_held_out(self):
        if self.data.val_fraction <= 0:
            raise ValueError("training needs a held-out split (data.val_fraction > 0): checkpoints are "
                             "ranked by held-out loss")
        return self


C = TypeVar("C", bound=BaseModel)


def parse_value(text: str):
    """`--set` values are YAML scalars: 3, 0.5, true, null, [1, 2], or a string."""
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p} is not a section")
        node[leaf] = parse_value(value)
    return data


def resolve_config_path(name: str) -> Path:
    """`configs/tiny-cpu.yaml`, `tiny-cpu.yaml` and `tiny-cpu` all name the same preset file."""
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config {name!r} not found (looked in . and {CONFIG_DIR})")


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    data = {}
    if path is not None:
        data = yaml.safe_load(resolve_config_path(str(path)).read_text()) or {}
    return cls.model_validate(apply_overrides(data, list(overrides)))


def save_config(config: BaseModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
