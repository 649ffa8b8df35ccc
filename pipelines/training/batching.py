"""Turning a worker's share of the tokenized records into micro-batches.

Batches are padded only to their longest member (not to 512: docs/training.md measures ~3/4
of the authors' compute as padding) and, where asked, grouped by length: records are shuffled,
cut into buckets of many micro-batches, sorted by length inside a bucket, and the micro-batches
shuffled again, so each batch holds records of similar length while the order stays random.
Everything depends only on (seed, epoch): a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from adapter.adapter import IGNORE_INDEX

BUCKET_MICRO_BATCHES = 32


def epoch_order(
    lengths: np.ndarray, micro_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[np.ndarray]:
    """Row indices of each full micro-batch for this epoch (a trailing partial batch is dropped,
    so every worker with the same number of rows takes the same number of steps)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    n_batches = len(order) // micro_batch
    order = order[: n_batches * micro_batch]
    if not group_by_length:
        return [order[i * micro_batch : (i + 1) * micro_batch] for i in range(n_batches)]
    bucket = micro_batch * BUCKET_MICRO_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(input_ids: list, labels: list, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row. Causal attention never lets a real token see a later pad,
    so no attention mask is needed; padded labels are IGNORE_INDEX."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.as_tensor(x)
        lab[i, : len(y)] = torch.as_tensor(y)
    return ids, lab
