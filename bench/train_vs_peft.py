"""Suite `train-vs-peft`: our adapter training step against Hugging Face PEFT's
AdaptionPromptConfig on transformers.LlamaForCausalLM, same weights, same real records, same
batch size, fp32 on CPU, both in one run, alternating step by step (measured)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from adapter.adapter import AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.base_weights import load_base
from bench.common import RESULTS, SHARED_DATA, bar_chart, write_result
from pipelines.data.instructions import TokenizeBatch
from pipelines.training.batching import collate, epoch_order

SHAPE = dict(dim=512, n_layers=8, n_heads=8, vocab=32000, ffn=1536, adapter_len=10, adapter_layers=6)


def real_records(n: int, max_seq_len: int) -> tuple[list, list]:
    raw = [json.dumps(r) for r in json.loads((SHARED_DATA / "alpaca_data.json").read_text())[: n + 50]]
    tb = TokenizeBatch(str(SHARED_DATA / "tokenizer.model"), max_seq_len)
    out = tb(pa.table({"idx": list(range(len(raw))), "raw": raw}))
    rows = [r for r in out.to_pylist() if not r["reject_reason"]][:n]
    return [r["input_ids"] for r in rows], [r["labels"] for r in rows]


def run(n_records: int = 128, batch_size: int = 8, max_seq_len: int = 256, quick: bool = False) -> dict:
    import transformers
    from peft import AdaptionPromptConfig, get_peft_model

    if quick:
        n_records, max_seq_len = 16, 128
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab"],
        hidden_size=SHAPE["dim"],
        intermediate_size=SHAPE["ffn"],
        num_hidden_layers=SHAPE["n_layers"],
        num_attention_heads=SHAPE["n_heads"],
        num_key_value_heads=SHAPE["n_heads"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        base = load_base(Path(tmp))  # the very same weights, through our HF loader
    ours = AdaptedLlama(base, AdaptionPrompts(base.args, AdapterConfig(SHAPE["adapter_len"], SHAPE["adapter_layers"])))
    peft_model = get_peft_model(
        hf,
        AdaptionPromptConfig(
            adapter_len=SHAPE["adapter_len"], adapter_layers=SHAPE["adapter_layers"], task_type="CAUSAL_LM"
        ),
    )
    opt_ours = torch.optim.AdamW(ours.trainable_parameters(), lr=1e-3)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    ids, labels = real_records(n_records, max_seq_len)
    lengths = np.array([len(x) for x in ids])
    real_tokens = int(lengths.sum())
    # PEFT as a Hugging Face user runs it: shuffled, padded to the batch's longest (DataCollator).
    peft_batches = epoch_order(lengths, batch_size, seed=0, epoch=0, group_by_length=False)
    our_batches = epoch_order(lengths, batch_size, seed=0, epoch=0, group_by_length=True)

    def step_ours(rows):
        x, y = collate([ids[i] for i in rows], [labels[i] for i in rows])
        loss, _ = ours.loss(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return x.numel()

    def step_peft(rows):
        x, y = collate([ids[i] for i in rows], [labels[i] for i in rows])
        mask = torch.zeros_like(x)
        for j, i in enumerate(rows):
            mask[j, : len(ids[i])] = 1
        out = peft_model(input_ids=x, attention_mask=mask, labels=y)
        out.loss.backward()
        opt_peft.step()
        opt_peft.zero_grad(set_to_none=True)
        return x.numel()

    step_ours(our_batches[0]), step_peft(peft_batches[0])  # warm-up, not timed
    times = {"ours": [], "peft": []}
    padded = {"ours": 0, "peft": 0}
    for k in range(len(our_batches)):  # alternate: one of ours, one of PEFT's
        for name, fn, batches in (("ours", step_ours, our_batches), ("peft", step_peft, peft_batches)):
            t0 = time.perf_counter()
            padded[name] += fn(batches[k])
            times[name].append(time.perf_counter() - t0)
    epoch = {k: float(sum(v)) for k, v in times.items()}
    batch_tokens = {
        k: [int(sum(lengths[i] for i in b)) for b in bs] for k, bs in (("ours", our_batches), ("peft", peft_batches))
    }
    result = {
        "what": "one epoch of adapter training over the same real Alpaca records (measured, fp32, CPU)",
        "shape": SHAPE,
        "records": len(ids),
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "real_tokens": real_tokens,
        "padded_tokens": padded,
        "epoch_seconds": epoch,
        "tokens_per_s_per_step_median": {
            k: float(np.median([t / s for t, s in zip(batch_tokens[k], v)])) for k, v in times.items()
        },
        "speedup_epoch": epoch["peft"] / epoch["ours"],
        "goal": "ours >= 1.5x faster per epoch",
        "ours_recipe": "length-grouped batches padded to their longest, no graph below the first adapted layer, "
        "logits only at response positions, SDPA attention",
        "peft_recipe": "PEFT AdaptionPromptConfig on LlamaForCausalLM, shuffled batches padded to their longest "
        "with an attention mask, full logits (transformers default)",
    }
    path = write_result("train-vs-peft", result)
    bar_chart(
        RESULTS / "train-vs-peft.png",
        f"Adapter training, one epoch of {len(ids)} Alpaca records (measured, CPU)",
        ["ours", "HF PEFT"],
        [epoch["ours"], epoch["peft"]],
        "seconds per epoch (lower is better)",
    )
    return json.loads(path.read_text())
