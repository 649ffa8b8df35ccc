"""The training recipe of the encoder tasks (METHOD.md section 8) on every Ray Train worker: the
LLaMA recipe's stages, checkpoints, resume checks, fault injection and metrics (train_worker.py),
with a frozen ViT or RoBERTa instead of LLaMA and a task head beside the prompts.

What changes is only what a model is: `build_model` loads the backbone and wraps its top layers
(adapter/backbones/adapted.py); the trainable module handed to DeepSpeed is the EncoderAdapter
(prompts, gates, head); a step's loss is cross-entropy over classes, or over start and end
positions; validation also reports accuracy (top-1; for QA, windows whose start and end are both
right). The ICLR comparison's three arms are one setting, `encoder.adapter.gate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from adapter.backbones.adapted import (
    ADAPTER_FILENAME,
    AdaptedRoberta,
    AdaptedViT,
    EncoderAdapterFileError,
    adapt_roberta,
    adapt_vit,
    load_encoder_adapter,
    save_encoder_adapter,
)
from pipelines.train_worker import AdapterRecipe, all_reduce_sum


def decode_pixels(images: list[bytes], shape) -> torch.Tensor:
    """Image file bytes -> (N, 3, S, S), preprocessed once per run (the backbone is frozen)."""
    from adapter.backbones.vit import preprocess_images
    from adapter.image_encoder import decode_image

    if not images:
        return torch.zeros(0, 3, shape.image_size, shape.image_size)
    parts = [
        preprocess_images([decode_image(b) for b in images[i : i + 256]], shape) for i in range(0, len(images), 256)
    ]
    return torch.cat(parts)


class EncoderRecipe(AdapterRecipe):
    ADAPTER_FILE = ADAPTER_FILENAME  # encoder_adapter.safetensors
    SHARD_COLUMNS = ()  # `inputs` reads every column with a default

    # --- model ----------------------------------------------------------------------------------
    def build_model(self) -> None:
        e = self.cfg.encoder
        self.val_accuracy: float | None = None
        torch.manual_seed(self.cfg.optim.seed)  # identical prompts and head on every rank
        with self.timer("load_model"):
            if self.cfg.task == "image-classification":
                from adapter.backbones.vit import load_vit

                labels = self.data_fingerprint["classes"]
                self.base = load_vit(e.weights, e.vit, device=self.device)
                self.model = adapt_vit(self.base, e.adapter, labels, weights=e.weights)
                self.base_note = f"frozen ViT {e.vit.hidden_dim}x{e.vit.num_layers} from {Path(e.weights).name}"
            else:
                from adapter.backbones.roberta import load_roberta

                self.base = load_roberta(e.weights, device=self.device)
                self.model = adapt_roberta(self.base, e.adapter, e.weights)
                self.base_note = f"frozen RoBERTa from {Path(e.weights).name}"
        self.model.adapter.to(self.device)
        self.prompts = self.model.adapter  # the trainable module: prompts, gates, head
        self.spec = self.model.adapter.spec
        self.base_note += (
            f", adapter {e.adapter.gate} ({sum(p.numel() for p in self.model.trainable_parameters()):,} trainable)"
        )

    def prepare_data(self) -> None:
        with self.timer("decode_inputs"):
            self.train_inputs, self.val_inputs = self.inputs(self.train), self.inputs(self.val)
        n = len(self.train["idx"])
        self.lengths = np.ones(n, dtype=np.int64)  # fixed-size inputs: length grouping changes nothing

    def inputs(self, split: dict) -> dict[str, torch.Tensor]:
        if self.cfg.task == "image-classification":
            return {
                "pixel_values": decode_pixels(split.get("image", []), self.cfg.encoder.vit),
                "labels": torch.tensor(split.get("label", []), dtype=torch.long),
            }
        return {
            k: torch.tensor(split.get(k, []), dtype=torch.long)
            for k in ("input_ids", "attention_mask", "start_positions", "end_positions")
        }

    def adapter_settings(self) -> dict:
        return {"encoder_adapter": self.cfg.encoder.adapter.model_dump(mode="json"), "backbone": self.spec.identity}

    def device_peak_flops(self) -> float | None:
        return self.cfg.workers.peak_tflops * 1e12 if self.cfg.workers.peak_tflops else None

    # --- adapter files --------------------------------------------------------------------------
    def read_adapter(self, folder: Path) -> dict[str, torch.Tensor]:
        try:
            return load_encoder_adapter(folder / self.ADAPTER_FILE, self.spec, device=self.device).state_dict()
        except EncoderAdapterFileError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader error names the file, whatever it was
            raise EncoderAdapterFileError(f"{folder}: unreadable encoder adapter ({type(e).__name__}: {e})") from None

    def write_adapter(self, folder: Path) -> None:
        save_encoder_adapter(self.prompts, folder / self.ADAPTER_FILE, extra={"step": self.step, "task": self.cfg.task})

    # --- steps ----------------------------------------------------------------------------------
    def batch_loss(self, inputs: dict, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over these rows and how many of them were right (top-1, or start and end)."""
        x = {k: v[rows].to(self.device) for k, v in inputs.items()}
        if isinstance(self.model, AdaptedViT):
            logits = self.model.logits(x["pixel_values"])
            loss = torch.nn.functional.cross_entropy(logits, x["labels"])
            return loss, (logits.argmax(-1) == x["labels"]).sum()
        assert isinstance(self.model, AdaptedRoberta)
        start, end = self.model.span_logits(x["input_ids"], x["attention_mask"])
        outside = start.shape[1]
        loss = (
            sum(
                torch.nn.functional.cross_entropy(lg, pos.clamp(0, outside), ignore_index=outside)
                for lg, pos in ((start, x["start_positions"]), (end, x["end_positions"]))
            )
            / 2
        )
        right = (start.argmax(-1) == x["start_positions"]) & (end.argmax(-1) == x["end_positions"])
        return loss, right.sum()

    def train_step(self, micro_batches: list[np.ndarray]) -> dict:
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x n, right, n
        for rows in micro_batches:
            rows = torch.as_tensor(rows)
            loss, right = self.batch_loss(self.train_inputs, rows)
            self.engine.backward(loss)
            self.engine.step()
            n = torch.tensor(float(len(rows)), dtype=torch.float64, device=self.device)
            sums += torch.stack([loss.detach().double() * n, right.double(), n])
        self.step += 1
        loss_sum, right, n = all_reduce_sum(sums)
        dt = time.perf_counter() - t0
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss_sum / n.clamp(min=1),
            "train_accuracy": right / n.clamp(min=1),
            "lr": self.sched.get_last_lr()[0],
            "grad_norm": self.engine.get_global_grad_norm(),
            "records_per_s": n / dt,
            "step_time_s": dt,
        }
        if self.prompts.prompts is not None:
            row["gate_abs_mean"] = self.prompts.prompts.activated_gate().detach().abs().mean()
        return row

    @torch.no_grad()
    def validate(self) -> float:
        with self.timer("validate"):
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            mb = self.cfg.optim.micro_batch_size
            n_val = len(self.val["idx"])
            for i in range(0, n_val, mb):
                rows = torch.arange(i, min(i + mb, n_val))
                loss, right = self.batch_loss(self.val_inputs, rows)
                n = torch.tensor(float(len(rows)), dtype=torch.float64, device=self.device)
                sums += torch.stack([loss.double() * n, right.double(), n])  # no host sync per batch
            loss_sum, right, n = all_reduce_sum(sums).tolist()
            self.val_loss = loss_sum / n if n else float("nan")
            self.val_accuracy = right / n if n else float("nan")
        self.log.add(
            {
                "kind": "val",
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy,
            },
            flush=True,
        )
        return self.val_loss

    def sample(self) -> None:
        """Nothing to generate: validation accuracy is the before/after."""

    def run(self) -> dict:
        summary = super().run()
        summary["val_accuracy"] = self.val_accuracy
        return summary
