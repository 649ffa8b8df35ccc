"""Alpaca-style instruction following (docs/method.md, "Instruction format"): records of
{instruction, input, output} from a JSON / JSON Lines / parquet source, the Alpaca prompt
template, held-out loss as the measure. The records are built by pipelines/data/instructions.py."""

from __future__ import annotations

from pipelines.data import instructions
from pipelines.data.sources import fetch
from pipelines.job_config import PreprocessConfig, TrainConfig, preprocess_part
from pipelines.tasks.base import LlamaTask


def _preprocess_part(cfg: PreprocessConfig) -> PreprocessConfig:
    return preprocess_part(cfg) if isinstance(cfg, TrainConfig) else cfg


class Alpaca(LlamaTask):
    name = "alpaca"
    description = "instruction following on Alpaca-format records (held-out loss)"
    prompt_template = "alpaca"

    def fingerprint(self, cfg: PreprocessConfig) -> dict:
        return instructions.fingerprint(
            _preprocess_part(cfg), fetch(cfg.data.source, cfg.data.sha256, download=cfg.data.download)
        )

    def build_records(self, cfg: PreprocessConfig) -> dict:
        return instructions.run(_preprocess_part(cfg))
