"""Suite `quantize-smollm2`: `model.quantize: int8 / int4` on the real SmolLM2-135M-Instruct, with an
adapter already trained on it (no retraining here), CPU, measured.

The adapter is the one the README's first command trains, on the first 600 Alpaca records
(`TRAIN_COMMAND` below), scored on its own held-out records (the
`val/` parquet of that run's preprocessed data, already tokenized with the prompt template the
adapter was trained with). The base is loaded four times through `load_model`: fp32, bf16, int8 and
int4 (adapter/quantize.py); per precision: bytes of base weights (all, and the block linears alone),
held-out loss of the trained adapter and of a zero-gate adapter (its output is the base's own), the
relative change of both against fp32, and greedy agreement of the trained adapter's first 32 new
tokens on 8 held-out prompts with fp32's.

The "fp32" base is the catalogue's GGUF (Q4_1 matrices) dequantized to fp32: int8 and int4 here
re-quantize weights that were already 4-bit, so the change measured is that of our quantization on
top of what the checkpoint is, the same base the adapter was trained on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from adapter.adapter import AdaptionPrompts
from adapter.adapter_file import load_adapter, read_metadata
from adapter.loader import load_model
from adapter.quantize import weight_bytes
from adapter.settings import ModelSource, project_path
from bench import common
from bench.common import SMOLLM2, bar_chart, write_result
from bench.quantize_bench import (
    PRECISIONS,
    agreement,
    compare_to_fp32,
    greedy,
    held_out_loss,
    linear_bytes,
    prompt_tokens,
)

ADAPTER = "runs/smollm2-alpaca-600/adapter"
DATA = "runs/data/alpaca-smollm2-192-first600"  # its own folder: the 300-record one stays the README's
VAL = f"{DATA}/val"
TRAIN_COMMAND = (
    "python -m pipelines.train --config smollm2-alpaca-cpu --set data.limit=600 "
    f"--set data.val_fraction=0.08 --set data.out={DATA} --set name=smollm2-alpaca-600"
)
CONTEXT = 512  # the training config's cap: the records are at most 192 tokens, + 32 generated


def held_out_records(path: str | Path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every record in a preprocessed `val/` folder, in stored order."""
    table = pq.read_table(str(path), columns=["input_ids", "labels"])
    return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))


def smollm2_bases(base: str, context: int = CONTEXT) -> tuple[dict, object]:
    source = ModelSource(base=base, context=context, device="cpu")
    bases = {
        "fp32": load_model(source.model_copy(update={"dtype": "float32"})),
        "bf16": load_model(source.model_copy(update={"dtype": "bfloat16"})),
        "int8": load_model(source.model_copy(update={"quantize": "int8"})),
        "int4": load_model(source.model_copy(update={"quantize": "int4"})),
    }
    return {p: m.base for p, m in bases.items()}, bases["fp32"]


def run(quick: bool = False, adapter: str = ADAPTER, val: str = VAL) -> dict:
    """adapter / val: relative paths resolve against the project root (`$LLAMA_ADAPTER_ROOT`, else
    the current directory), as config paths do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench/quantize_bench.py: the machine is shared
    try:
        return _run(quick, Path(project_path(adapter)), Path(project_path(val)))
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, adapter: Path, val: Path) -> dict:
    for what, path in (("adapter", adapter), ("held-out records", val)):
        if not path.exists():
            raise FileNotFoundError(f"{what} {path} not found: train it first with `{TRAIN_COMMAND}`")
    t0 = time.perf_counter()
    meta = read_metadata(adapter)
    training = json.loads((adapter / "training.json").read_text()) if (adapter / "training.json").exists() else {}
    records = held_out_records(val)
    n_val, n_prompts, n_new = (2, 2, 8) if quick else (len(records), 8, 32)
    records = records[:n_val]
    bases, loaded = smollm2_bases(training.get("base") or SMOLLM2.path)
    eos = loaded.tokenizer.eos_id
    prompts = load_adapter(adapter, bases["fp32"].args)
    zero_gate = AdaptionPrompts(bases["fp32"].args, meta["config"])
    assert float(zero_gate.gate.detach().abs().max()) == 0.0, "a zero-gate adapter must leave the base as it is"
    inputs = prompt_tokens(records, n_prompts)
    ref = greedy(bases["fp32"], prompts, inputs, eos, n_new)
    rows, samples = {}, {}
    for prec in PRECISIONS:
        base = bases[prec]
        out = ref if prec == "fp32" else greedy(base, prompts, inputs, eos, n_new)
        rows[prec] = {
            "base_weight_bytes": weight_bytes(base),
            "block_linear_bytes": linear_bytes(base),
            "held_out_loss": held_out_loss(base, prompts, records),
            "held_out_loss_zero_gate": held_out_loss(base, zero_gate, records),
            **agreement(ref, out, n_new),
        }
        samples[prec] = loaded.tokenizer.decode(out[0])
        print("quantize-smollm2", prec, json.dumps({k: round(v, 4) for k, v in rows[prec].items()}), flush=True)
    goals = compare_to_fp32(rows)
    fp32 = rows["fp32"]
    for r in rows.values():
        r["zero_gate_loss_vs_fp32"] = r["held_out_loss_zero_gate"] / fp32["held_out_loss_zero_gate"] - 1
        r["adapter_gain"] = r["held_out_loss_zero_gate"] - r["held_out_loss"]
    name = "quantize-smollm2-quick" if quick else "quantize-smollm2"  # quick results are not kept
    result = {
        "what": __doc__.split("\n\n")[0],
        "quick": quick,
        "base": loaded.note,
        "adapter": {
            "path": str(adapter),
            "config": meta["adapter_config"],
            "trained_by": TRAIN_COMMAND,
            "best_val_loss_recorded": training.get("best_val_loss"),
        },
        "held_out": {"path": str(val), "records": len(records), "tokens_scored": "response tokens (labels)"},
        "greedy": {"prompts": len(inputs), "new_tokens": n_new, "reference": "fp32 base + the same adapter"},
        "threads": torch.get_num_threads(),
        "wall_s": None,
        "precisions": rows,
        "goals": goals,
        "first_prompt_output": samples,
    }
    result["markdown"] = markdown(rows, n_new)
    result["charts"] = [chart(rows, name).name]  # beside the JSON in bench/results
    result["wall_s"] = time.perf_counter() - t0
    write_result(name, result)
    print(result["markdown"])
    return result


def markdown(rows: dict, n_new: int) -> str:
    lines = [
        "| precision | base weights (x below fp32) | block linears (x below fp32) | held-out loss, trained adapter "
        f"(vs fp32) | held-out loss, zero gate = base (vs fp32) | greedy agreement, first {n_new} | mean common prefix |",
        "|---|---|---|---|---|---|---|",
    ]
    for prec, r in rows.items():
        lines.append(
            f"| {prec} | {r['base_weight_bytes'] / 1e6:.1f} MB ({r['weights_below_fp32']:.2f}x) "
            f"| {r['block_linear_bytes'] / 1e6:.1f} MB ({r['block_linears_below_fp32']:.2f}x) "
            f"| {r['held_out_loss']:.4f} ({r['loss_vs_fp32']:+.2%}) "
            f"| {r['held_out_loss_zero_gate']:.4f} ({r['zero_gate_loss_vs_fp32']:+.2%}) "
            f"| {r['token_agreement']:.0%} | {r['mean_common_prefix']:.1f} |"
        )
    return "\n".join(lines)


def chart(rows: dict, name: str) -> Path:
    out = common.RESULTS  # looked up at call time, as write_result does
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{p}: {r['base_weight_bytes'] / 1e6:.0f} MB, agree {r['token_agreement']:.0%}" for p, r in rows.items()]
    return bar_chart(
        out / f"{name}.png",
        "SmolLM2-135M-Instruct + trained adapter: held-out loss vs fp32",
        labels,
        [100 * r["loss_vs_fp32"] for r in rows.values()],
        "held-out loss vs fp32 (%)",
    )


if __name__ == "__main__":
    run()
