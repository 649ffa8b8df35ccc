"""Suite `decode`: our batched KV-cache generation (`adapter.decoding.generate`) against
Hugging Face `LlamaForCausalLM.generate`, same random weights (built as in train-vs-peft: an HF
model saved and read back through our loader), same real Alpaca prompts, greedy, exactly the same
number of new tokens, fp32 on CPU with one thread, measured alternately, median of repeats.

Tokens/s are reported by wall clock and per CPU-second of this process (time.process_time()),
since the machine may be shared. Greedy agreement: without an adapter, our tokens must equal HF's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.base_weights import load_base
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.prompts import format_prompt
from adapter.tokenizer import Tokenizer
from bench.common import RESULTS, SHARED_DATA, bar_chart, write_result
from bench.train_vs_peft import SHAPE

NO_EOS = -1  # no token id is -1: our generate never stops early, so both sides make exactly N tokens


def alpaca_prompts(n: int) -> list[list[int]]:
    tok = Tokenizer(SHARED_DATA / "tokenizer.model")
    records = json.loads((SHARED_DATA / "alpaca_data.json").read_text())[:n]
    return [tok.encode(format_prompt(r["instruction"], r.get("input", ""))) for r in records]


def build_models(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
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
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        base = load_base(Path(tmp))  # the very same weights, through our HF loader (inverse permutation)
    adapter = AdaptionPrompts(base.args, AdapterConfig(SHAPE["adapter_len"], SHAPE["adapter_layers"]))
    with torch.no_grad():
        adapter.gate.uniform_(0.05, 0.2)  # random prompts (N(0, 1)) and gates: a nonzero adapter
    adapter.requires_grad_(False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, base, adapter


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    n_prompts, new_tokens, repeats, big = (4, 8, 1, 2) if quick else (16, 32, 3, 8)
    prompts = alpaca_prompts(n_prompts)
    hf, base, adapter = build_models()
    prefix = prefixes_for(base, adapter)
    params = SamplingParams(max_gen_len=new_tokens, temperature=0.0)

    def ours(batch, with_adapter):
        ad = [prefix] * len(batch) if with_adapter else None
        return generate(base, batch, params, eos_id=NO_EOS, adapters=ad)

    @torch.inference_mode()
    def hf_gen(batch):
        longest = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, longest:].tolist()

    impls = {"ours": lambda b: ours(b, False), "ours+adapter": lambda b: ours(b, True), "hf": hf_gen}
    batch_sizes = (1, big)

    def batches(bs):
        return [prompts[i : i + bs] for i in range(0, len(prompts), bs)]

    # Warm-up (not timed) and greedy agreement at batch 1, no padding on either side.
    agree = {"prompts": len(prompts), "exact": 0, "first_divergence": {}}
    for i, p in enumerate(prompts):
        a, b = ours([p], False)[0], hf_gen([p])[0]
        if a == b:
            agree["exact"] += 1
        else:
            agree["first_divergence"][i] = next(
                (j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))
            )
    for fn in impls.values():
        fn(prompts[:big])

    # Agreement of the batched paths too (left padding), informative only.
    batched_agree = {}
    ref = [hf_gen([p])[0] for p in prompts]
    for name, fn in (("ours", impls["ours"]), ("hf", hf_gen)):
        rows = [r for b in batches(big) for r in fn(b)]
        batched_agree[name] = sum(r == x for r, x in zip(rows, ref))

    wall = {bs: {k: [] for k in impls} for bs in batch_sizes}
    cpu = {bs: {k: [] for k in impls} for bs in batch_sizes}
    produced = len(prompts) * new_tokens
    for _ in range(repeats):
        for bs in batch_sizes:
            for name, fn in impls.items():  # alternate implementations within each repeat
                w0, c0 = time.perf_counter(), time.process_time()
                n = sum(len(r) for b in batches(bs) for r in fn(b))
                w, c = time.perf_counter() - w0, time.process_time() - c0
                assert n == produced, (name, bs, n, produced)
                wall[bs][name].append(produced / w)
                cpu[bs][name].append(produced / c)

    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    tps_wall = {f"batch{bs}": {k: med(v) for k, v in wall[bs].items()} for bs in batch_sizes}
    tps_cpu = {f"batch{bs}": {k: med(v) for k, v in cpu[bs].items()} for bs in batch_sizes}
    key = f"batch{big}"
    speedup = {
        b: {
            "ours_vs_hf_wall": tps_wall[b]["ours"] / tps_wall[b]["hf"],
            "ours_vs_hf_cpu": tps_cpu[b]["ours"] / tps_cpu[b]["hf"],
            "ours_adapter_vs_hf_wall": tps_wall[b]["ours+adapter"] / tps_wall[b]["hf"],
            "ours_adapter_vs_hf_cpu": tps_cpu[b]["ours+adapter"] / tps_cpu[b]["hf"],
        }
        for b in tps_wall
    }
    met = speedup[key]["ours_vs_hf_cpu"] >= 1.5 and speedup[key]["ours_vs_hf_wall"] >= 1.5
    result = {
        "what": f"greedy decoding of {len(prompts)} real Alpaca prompts, {new_tokens} new tokens each, "
        "ours vs Hugging Face generate, same random weights (measured, fp32, CPU, 1 thread)",
        "quick": quick,
        "shape": SHAPE,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prompt_tokens": [len(p) for p in prompts],
        "threads": torch.get_num_threads(),
        "tokens_per_s_wall_median": tps_wall,
        "tokens_per_cpu_s_median": tps_cpu,
        "tokens_per_s_wall_all": {f"batch{bs}": wall[bs] for bs in batch_sizes},
        "tokens_per_cpu_s_all": {f"batch{bs}": cpu[bs] for bs in batch_sizes},
        "speedup": speedup,
        "greedy_agreement_batch1": agree,
        "batched_agreement_with_hf_batch1": batched_agree,
        "goal": f"ours >= 1.5x HF generate at batch {big}",
        "goal_met": bool(met),
        "ours_recipe": "adapter.decoding.generate: left-padded batch, one prefill, KV cache, eos disabled; "
        "with adapter: AdapterConfig(10, 6), random prompts, gates uniform 0.05-0.2, prefixes computed once",
        "hf_recipe": "LlamaForCausalLM.generate(do_sample=False, max_new_tokens=min_new_tokens=N, eos_token_id=None), "
        "left padding with an attention mask, default attention implementation",
    }
    path = write_result("decode", result)
    labels, values = [], []
    for b in tps_cpu:
        for k in ("ours", "ours+adapter", "hf"):
            labels.append(f"{k} b{b[5:]}")
            values.append(tps_cpu[b][k])
    bar_chart(
        RESULTS / "decode.png",
        f"Greedy decoding, {len(prompts)} Alpaca prompts x {new_tokens} tokens (CPU, 1 thread)",
        labels,
        values,
        "new tokens per CPU-second (higher is better)",
    )
    return json.loads(path.read_text())
