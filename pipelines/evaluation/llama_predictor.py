"""Batch inference of the LLaMA-family tasks' evaluations: a Ray Data callable class holding one model replica
(frozen base + image encoder + adapter) per actor, answering greedily (docs/method.md, "Inference").

Rows carry `key`, `prompt` (text) and `image` (file bytes or null). A row that cannot be answered
(an unreadable image, a prompt longer than the model's context) gets an `error` and no generation;
the batch goes on. Each row's visual prompt (P_l + its image token) is computed once and reused at
every decoding step, like a text adapter's prompt.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from adapter.adapter_file import load_adapter
from adapter.decoding import SamplingParams, generate
from adapter.image_encoder import ImageEncoder, ImageError, decode_image, features_for
from adapter.loader import load_model
from adapter.model import PromptKV
from pipelines.evaluation.actor_pool import map_with_actor_pool
from pipelines.job_config import TrainConfig


def split_rows(prefixes: dict[int, PromptKV], n: int) -> list[dict[int, PromptKV]]:
    """Batched prefixes (one row per image, or one shared row) -> one dict per row for `generate`."""

    def row(b):
        return {
            i: PromptKV(
                k=p.k[b if p.k.shape[0] > 1 else 0][None], v=p.v[b if p.v.shape[0] > 1 else 0][None], gate=p.gate
            )
            for i, p in prefixes.items()
        }

    return [row(b) for b in range(n)]


class Predictor:
    def __init__(self, train_config: dict, adapter_path: str, max_gen_len: int):
        cfg = TrainConfig.model_validate(train_config)
        loaded = load_model(cfg.model)
        self.base, self.tok, self.device = loaded.base, loaded.tokenizer, loaded.device
        self.encoder = ImageEncoder(cfg.vision, loaded.device, loaded.dtype) if cfg.vision else None
        self.adapter = load_adapter(
            adapter_path, self.base.args, device=self.device, encoder=self.encoder.identity if self.encoder else None
        )
        self.params = SamplingParams(max_gen_len=max_gen_len, temperature=0.0)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        keys, texts, images = list(batch["key"]), list(batch["prompt"]), list(batch["image"])
        n = len(keys)
        errors = [""] * n
        ids = [self.tok.encode(t) for t in texts]
        for i, x in enumerate(ids):
            if len(x) >= self.base.args.max_seq_len:
                errors[i] = f"prompt_too_long: {len(x)} tokens, context {self.base.args.max_seq_len}"
        visual = None
        if self.encoder is not None:
            usable = []
            for i, b in enumerate(images):
                b = None if b is None else bytes(b)
                try:
                    if b is not None:
                        decode_image(b)  # a bad image fails its own row, not the batch
                except ImageError as e:
                    errors[i], b = f"image_error: {e}", None
                usable.append(b)
            feats, present = features_for(self.encoder, usable)
            visual = self.adapter.image_tokens(feats, present)
        rows = split_rows(self.adapter.prefixes(self.base, visual), n)
        live = [i for i in range(n) if not errors[i]]
        outs = (
            generate(self.base, [ids[i] for i in live], self.params, self.tok.eos_id, adapters=[rows[i] for i in live])
            if live
            else []
        )
        generations = [""] * n
        for i, o in zip(live, outs):
            generations[i] = self.tok.decode(o)
        per_row = (time.perf_counter() - t0) / n
        return {
            "key": np.array(keys, dtype=object),
            "generation": np.array(generations, dtype=object),
            "error": np.array(errors, dtype=object),
            "seconds": np.full(n, per_row),
        }


def predict(cfg: TrainConfig, adapter_path: str, rows: list[dict]) -> list[dict]:
    """Run `rows` ({key, prompt, image}) through an actor pool of Predictors; results by key."""
    e = cfg.evaluation
    # Rows of similar length share a batch: a left-padded batch costs its longest prompt squared
    # in attention (ScienceQA prompts run from ~50 to ~800 tokens). Results are matched by key.
    rows = sorted(rows, key=lambda r: len(r["prompt"]))
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("key", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    )
    return map_with_actor_pool(table, Predictor, (cfg.model_dump(mode="json"), adapter_path, e.max_gen_len), e)
