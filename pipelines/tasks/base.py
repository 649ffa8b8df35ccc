"""What a task is (docs/tasks.md): the one interface the generic jobs ask.

A task owns everything that differs between datasets: its records (the Ray Data build and what it
rejects), the prompt template its adapter is trained with, what a batch feeds the loss, its
evaluation rows, its metric and its report. The jobs (`pipelines.preprocess`, `pipelines.train`,
`pipelines.evaluate`) and the training recipe know none of them by name: they look the task up in
the registry (`pipelines/tasks/__init__.py`) and call these methods.

Two families share the rest: `LlamaTask` adapts the frozen LLaMA (text, or with the CLIP image
token), `BackboneTask` a frozen ViT / BERT-family encoder with a task head. The training recipe
picks its model hooks by `family` (pipelines/training/llama.py, pipelines/training/backbone.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from adapter.prompts import render_prompt

if TYPE_CHECKING:  # annotations only: the config schema does not depend on any task
    import torch

    from pipelines.job_config import PreprocessConfig, TrainConfig


class Task:
    name: ClassVar[str]
    family: ClassVar[str]  # "llama" | "backbone"
    # The config's `evaluation.split` default is "test"; a task may evaluate a split of its own.
    description: ClassVar[str] = ""

    # --- configuration ---------------------------------------------------------------------------
    def check_config(self, cfg: PreprocessConfig) -> None:
        """Raise ValueError naming what a config lacks for this task (called by every job)."""

    # --- records ---------------------------------------------------------------------------------
    def fingerprint(self, cfg: TrainConfig) -> dict:
        """Everything the written records depend on; a different fingerprint means rebuild."""
        raise NotImplementedError

    def build_records(self, cfg: TrainConfig) -> dict:
        """Write train / val parquet shards, rejects.jsonl and stats.json (with `fingerprint`)
        into `cfg.data.out` with Ray Data (Ray is running); return the stats."""
        raise NotImplementedError

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, cfg: TrainConfig, adapter: str, out: Path) -> dict:
        """Score the adapter at `adapter` on this task's evaluation rows; write predictions and
        scores under `out`; return the result, with `report` (a few lines for the console)."""
        raise ValueError(f"task {self.name!r} has no evaluation job; its training run reports held-out loss")


class LlamaTask(Task):
    family = "llama"
    prompt_template: ClassVar[str] = "alpaca"  # adapter/prompts.py; recorded in the adapter file

    def check_config(self, cfg: PreprocessConfig) -> None:
        if cfg.model is None:
            raise ValueError(f"task {self.name!r} fine-tunes LLaMA: it needs a `model` section")
        # A section of the other family is a mistake (a leftover of another config), not a no-op.
        if cfg.encoder is not None:
            raise ValueError(
                f"task {self.name!r} fine-tunes LLaMA: remove the `encoder` section (it is for tasks of "
                "the backbone family)"
            )

    def prompt(self, instruction: str, input: str = "") -> str:
        """How this task's adapter sees an instruction (training samples, evaluation, serving)."""
        return render_prompt(self.prompt_template, instruction, input)


class BackboneTask(Task):
    family = "backbone"

    def check_config(self, cfg: PreprocessConfig) -> None:
        if cfg.encoder is None:
            raise ValueError(f"task {self.name!r} needs an `encoder` section (the frozen backbone's weights)")
        if cfg.model is not None:
            raise ValueError(f"task {self.name!r} adapts the `encoder` backbone: remove the `model` section (LLaMA)")

    # --- the model (on each training worker and evaluation actor) --------------------------------
    def build_model(self, cfg: TrainConfig, device, labels: list[str] | None = None):
        """(frozen backbone, adapted model with fresh prompts / gates / head, a note for the log)."""
        raise NotImplementedError

    def load_adapted(self, cfg: TrainConfig, adapter_path: str, device):
        """The frozen backbone with the adapter file at `adapter_path` (checked to belong to it)."""
        raise NotImplementedError

    # --- what a batch feeds the loss ------------------------------------------------------------
    def inputs(self, cfg: TrainConfig, split: dict) -> dict[str, torch.Tensor]:
        """A split's records (columns read from its shard) as tensors, prepared once per run."""
        raise NotImplementedError

    def batch_loss(self, model, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the rows of `x`, how many of them were right)."""
        raise NotImplementedError
