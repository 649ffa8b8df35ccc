"""The backbone family's model on a training worker (docs/encoders.md): a frozen ViT or
BERT-family encoder whose top layers carry zero-init prompts, and a task head beside them. A
sibling of pipelines/training/llama.py; the stages that drive both are pipelines/training/recipe.py.

The task says what a model is (`build_model`), what a batch feeds the loss (`inputs`,
`batch_loss`); the trainable module handed to DeepSpeed is the EncoderAdapter (prompts, gates,
head; for full fine-tuning the head and the backbone it then holds); validation also reports
accuracy (top-1; for QA, windows whose start and end are both right). The ICLR comparison's arms are one setting, `encoder.adapter.gate`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from adapter.backbones.adapted import (
    ADAPTER_FILENAME,
    EncoderAdapterFileError,
    load_encoder_adapter,
    save_encoder_adapter,
)
from pipelines.job_config import SamplesConfig, TrainConfig


class BackboneHooks:
    adapter_file = ADAPTER_FILENAME  # encoder_adapter.safetensors
    shard_columns = ()  # the task's `inputs` reads every column with a default

    def __init__(self, cfg: TrainConfig, task, device: torch.device, timer, data_fingerprint: dict):
        self.cfg, self.task, self.device = cfg, task, device
        self.labels = data_fingerprint.get("classes")

    def build(self) -> None:
        torch.manual_seed(self.cfg.optim.seed)  # identical prompts and head on every rank
        self.base, self.model, note = self.task.build_model(self.cfg, self.device, self.labels)
        self.model.adapter.to(self.device)
        self.trainable = self.model.adapter  # prompts, gates, head
        self.spec = self.model.adapter.spec
        n = sum(p.numel() for p in self.model.trainable_parameters())
        self.note = f"{note}, adapter {self.cfg.encoder.adapter.gate} ({n:,} trainable)"

    def prepare(self, train: dict, val: dict) -> np.ndarray:
        self.train, self.val = self.task.inputs(self.cfg, train), self.task.inputs(self.cfg, val)
        self.n_val = len(val["idx"])
        return np.ones(len(train["idx"]), dtype=np.int64)  # fixed-size inputs: length grouping changes nothing

    def adapter_settings(self) -> dict:
        return {"encoder_adapter": self.cfg.encoder.adapter.model_dump(mode="json"), "backbone": self.spec.identity}

    def device_peak_flops(self) -> float | None:
        return None

    @staticmethod
    def export_files(checkpoint_dir: Path, folder: Path, cfg: TrainConfig, summary: dict) -> None:
        """The final adapter file out of its checkpoint, with its training metadata."""
        shutil.copy2(checkpoint_dir / ADAPTER_FILENAME, folder / ADAPTER_FILENAME)
        training = {"task": cfg.task, "encoder": cfg.encoder.model_dump(mode="json"), "recipe": cfg.optim.recipe}
        (folder / "training.json").write_text(json.dumps({**training, **summary}, indent=2))

    # --- adapter files --------------------------------------------------------------------------
    def read_adapter(self, folder: Path) -> dict[str, torch.Tensor]:
        # A full fine-tune's file holds the backbone's weights too: read into a copy, not the live model.
        into = copy.deepcopy(self.base) if self.cfg.encoder.adapter.gate == "full" else None
        try:
            return load_encoder_adapter(
                folder / self.adapter_file, self.spec, device=self.device, backbone_module=into
            ).state_dict()
        except EncoderAdapterFileError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader error names the file, whatever it was
            raise EncoderAdapterFileError(f"{folder}: unreadable encoder adapter ({type(e).__name__}: {e})") from None

    def write_adapter(self, folder: Path, step: int) -> None:
        save_encoder_adapter(self.trainable, folder / self.adapter_file, extra={"step": step, "task": self.task.name})

    # --- steps ----------------------------------------------------------------------------------
    def batch_loss(self, inputs: dict, rows) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch_loss(self.model, {k: v[rows].to(self.device) for k, v in inputs.items()})

    def train_micro_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, [loss x n, right, n])."""
        rows = torch.as_tensor(rows)
        loss, right = self.batch_loss(self.train, rows)
        n = torch.tensor(float(len(rows)), dtype=torch.float64, device=self.device)
        return loss, torch.stack([loss.detach().double() * n, right.double(), n])

    def train_metrics(self, sums: torch.Tensor, dt: float, world: int, peak_flops: float | None) -> dict:
        loss_sum, right, n = sums
        row = {
            "loss": loss_sum / n.clamp(min=1),
            "train_accuracy": right / n.clamp(min=1),
            "records_per_s": n / dt,
            "step_time_s": dt,
        }
        if self.trainable.prompts is not None:
            row["gate_abs_mean"] = self.trainable.prompts.activated_gate().detach().abs().mean()
        return row

    def validate(self, micro_batch: int, reduce) -> dict:
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(0, self.n_val, micro_batch):
            rows = torch.arange(i, min(i + micro_batch, self.n_val))
            loss, right = self.batch_loss(self.val, rows)
            n = torch.tensor(float(len(rows)), dtype=torch.float64, device=self.device)
            sums += torch.stack([loss.double() * n, right.double(), n])  # no host sync per batch
        loss_sum, right, n = reduce(sums).tolist()
        return {"val_loss": loss_sum / n if n else float("nan"), "val_accuracy": right / n if n else float("nan")}

    def sample(self, s: SamplesConfig) -> list[dict]:
        """Nothing to generate: validation accuracy is the before/after."""
        return []
