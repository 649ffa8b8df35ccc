"""The LLaMA family's model on a training worker (docs/training.md): the frozen base, the adaption
prompts (and, for multimodal tasks, the CLIP image token's projection), the loss over response
tokens, held-out loss and the fixed before/after samples. A sibling of pipelines/training/backbone.py;
the stages that drive both are pipelines/training/recipe.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from adapter.adapter import AdaptedLlama, AdaptionPrompts
from adapter.adapter_file import ADAPTER_FILENAME, load_adapter, read_metadata, save_adapter
from adapter.decoding import generate, prefixes_for
from adapter.flops import peak_flops_per_device, training_flops_per_token
from adapter.image_encoder import ImageEncoder, features_for
from adapter.loader import load_model
from pipelines.job_config import SamplesConfig, TrainConfig
from pipelines.training.batching import collate

IMAGE_CHUNK = 64  # images encoded at a time when a run starts


class LlamaHooks:
    adapter_file = ADAPTER_FILENAME  # the adapter inside each checkpoint (and the exported folder)
    shard_columns = ("input_ids", "labels")  # present even in an empty shard

    def __init__(self, cfg: TrainConfig, task, device: torch.device, timer, data_fingerprint: dict):
        self.cfg, self.task, self.device, self.timer = cfg, task, device, timer

    def build(self) -> None:
        """The frozen base, the trainable module (`trainable`, the only thing DeepSpeed sees) and the
        model that computes the loss."""
        cfg = self.cfg
        loaded = load_model(cfg.model, device=self.device)
        self.base, self.tok, self.note = loaded.base, loaded.tokenizer, loaded.note
        self.encoder, projection = None, None
        if cfg.vision is not None:
            self.encoder = ImageEncoder(cfg.vision, device=self.device, dtype=loaded.dtype)
        torch.manual_seed(cfg.optim.seed)  # identical initial prompts (and projection) on every rank
        if self.encoder is not None:
            projection = self.encoder.projection(cfg.vision.proj_hidden, self.base.args.dim, device=self.device)
        self.trainable = AdaptionPrompts(self.base.args, cfg.model.adapter, device=self.device, projection=projection)
        self.model = AdaptedLlama(self.base, self.trainable)
        self.n_adapted = cfg.model.adapter.layers_for(self.base.args)

    def prepare(self, train: dict, val: dict) -> np.ndarray:
        """Image features once per run (the encoder is frozen); returns the records' lengths."""
        self.train, self.val = train, val
        self.train_images, self.val_images = self.encode_images(train), self.encode_images(val)
        self.lengths = np.array([len(x) for x in train["input_ids"]])
        return self.lengths

    def adapter_settings(self) -> dict:
        """What a checkpoint's adapter must share with the run that resumes from it."""
        out = {"adapter": self.cfg.model.adapter.to_dict()}
        if self.encoder is not None:
            out["vision"] = self.encoder.identity
        return out

    def device_peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return peak_flops_per_device(torch.cuda.get_device_name(self.device), self.base.tok_embeddings.weight.dtype)

    @staticmethod
    def export_files(checkpoint_dir: Path, folder: Path, cfg: TrainConfig, summary: dict) -> None:
        """The final adapter out of its checkpoint, with its config and training metadata."""
        shutil.copy2(checkpoint_dir / ADAPTER_FILENAME, folder / ADAPTER_FILENAME)
        meta = read_metadata(folder / ADAPTER_FILENAME)
        (folder / "adapter_config.json").write_text(json.dumps(meta["adapter_config"], indent=2))
        training = {
            "base": cfg.model.base,
            "preset": cfg.model.preset,
            "tokenizer": cfg.model.tokenizer,
            "base_shape": meta["base_shape"],
            "recipe": cfg.optim.recipe,
            # Multimodal: what the prompt looks like and which image encoder folder the adapter was trained with.
            "task": cfg.task,
            "vision": cfg.vision.model_dump(mode="json") if cfg.vision else None,
            **summary,
        }
        (folder / "training.json").write_text(json.dumps(training, indent=2))

    # --- adapter files --------------------------------------------------------------------------
    def read_adapter(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_adapter(folder / self.adapter_file, self.base.args, device=self.device).state_dict()

    def write_adapter(self, folder: Path, step: int) -> None:
        # The task and its prompt template travel with the adapter: serving reads them back.
        extra = {"step": step, "task": self.task.name, "prompt_template": self.task.prompt_template}
        save_adapter(self.trainable, self.base.args, folder / self.adapter_file, extra=extra)

    # --- images (multimodal tasks) --------------------------------------------------------------
    def encode_images(self, split: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.encoder is None:
            return None
        images = split.get("image") or [None] * len(split["input_ids"])
        chunks = [images[i : i + IMAGE_CHUNK] for i in range(0, len(images), IMAGE_CHUNK)]
        parts = [features_for(self.encoder, c, device="cpu") for c in chunks]
        if not parts:
            return torch.zeros(0, self.encoder.out_features), torch.zeros(0, dtype=torch.bool)
        return torch.cat([f for f, _ in parts]), torch.cat([p for _, p in parts])

    def image_inputs(self, encoded, rows) -> dict:
        """The loss's image arguments for these rows (nothing for a text-only run)."""
        if encoded is None:
            return {}
        feats, present = encoded
        return {"image_features": feats[rows].to(self.device), "image_present": present[rows].to(self.device)}

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host to GPU without a sync (pinned, non-blocking): a plain copy waits for the stream."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # --- steps ----------------------------------------------------------------------------------
    def train_micro_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, [loss x labelled, labelled, real tokens, padded tokens, flops]). What still waits
        for the GPU is the loss's selection of response positions (a boolean index)."""
        ids, lab = collate([self.train["input_ids"][i] for i in rows], [self.train["labels"][i] for i in rows])
        images = self.image_inputs(self.train_images, torch.as_tensor(rows))
        loss, n = self.model.loss(self.to_device(ids), self.to_device(lab), **images)
        a = self.cfg.model.adapter
        # Logits at about half the positions (response tokens only): counted as half.
        flops = ids.numel() * training_flops_per_token(self.base.args, self.n_adapted, a.adapter_len, ids.shape[1], 0.5)
        host = torch.tensor([float(self.lengths[rows].sum()), float(ids.numel()), flops], dtype=torch.float64)
        return loss, torch.cat([torch.stack([loss.detach().double() * n, n.double()]), self.to_device(host)])

    def train_metrics(self, sums: torch.Tensor, dt: float, world: int, peak_flops: float | None) -> dict:
        loss_sum, n_lab, n_tok, padded, flops = sums
        return {
            "loss": loss_sum / n_lab.clamp(min=1),
            "tokens_per_s": n_tok / dt,
            "padded_tokens": padded,
            "step_time_s": dt,
            "tflops": flops / dt / 1e12,
            "mfu": flops / dt / peak_flops if peak_flops else None,
            "gate_abs_mean": self.trainable.gate.detach().abs().mean(),
        }

    def validate(self, micro_batch: int, reduce) -> dict:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(self.val["input_ids"]), micro_batch):
            rows = slice(i, i + micro_batch)
            ids, lab = collate(self.val["input_ids"][rows], self.val["labels"][rows])
            images = self.image_inputs(self.val_images, rows)
            loss, n = self.model.loss(self.to_device(ids), self.to_device(lab), **images)
            sums += torch.stack([loss.double() * n, n.double()])
        total_loss, total_n = reduce(sums).tolist()
        return {"val_loss": total_loss / total_n if total_n else float("nan")}

    def sample(self, s: SamplesConfig) -> list[dict]:
        prompts = [self.tok.encode(self.task.prompt(i)) for i in s.instructions]
        pre = prefixes_for(self.base, self.trainable)
        outs = generate(
            self.base,
            prompts,
            s.sampling,
            self.tok.eos_id,
            adapters=[pre] * len(prompts),
            generator=torch.Generator(device=self.device).manual_seed(0),
        )
        return [{"instruction": i, "response": self.tok.decode(o)} for i, o in zip(s.instructions, outs)]
