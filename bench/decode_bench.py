"""Suite `decode`: greedy decoding speed of the serving engine (serve/engine.py with
adapter/decode_step.py) and of the generation library (`adapter.decoding.generate`, the path the
engine used per step before) against Hugging Face `LlamaForCausalLM.generate`, on the SAME weights:
the base is loaded by our loader and copied into a transformers Llama (q/k rows permuted to its
rotate-half layout), real Alpaca prompts, greedy, exactly N new tokens (no EOS), fp32, CPU, one
torch thread, implementations alternated within each repeat, median of repeats.

`--base` takes any checkpoint our loader reads (default: the real stories260K). For the real
SmolLM2-135M, pass its folder once the GGUF loader is merged (`load_base` reading it); the
transformers side then should load the same GGUF file itself (`gguf_file=`), see `hf_model`.

Tokens/s are reported by wall clock and per CPU-second of this process (the 2 cores are shared,
so wall clocks stretch unevenly). Greedy agreement: every implementation's tokens against HF's,
prompt by prompt at batch 1 and in the batched runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adapter.base_weights import load_base
from adapter.decoding import SamplingParams, generate
from adapter.model import Transformer
from adapter.prompts import format_prompt
from adapter.tokenizer import load_tokenizer
from bench.common import RESULTS, SHARED_DATA, bar_chart, write_result
from serve.engine import Engine

NO_EOS = -1  # no token id is -1: nothing stops early, so every side makes exactly N tokens
MACHINE_NOTE = "2-core shared CPU (four engineers' work on the same cores), 1 torch thread"


def tokenizer_of(base_path: Path) -> Path:
    """What `load_tokenizer` reads for a checkpoint: a GGUF file itself (its own vocabulary), else
    the checkpoint's folder (load_tokenizer finds its tokenizer.json or tokenizer.model)."""
    return base_path if base_path.suffix == ".gguf" or base_path.is_dir() else base_path.parent


def base_slug(base_path: Path) -> str:
    """A checkpoint's name in result files: SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct."""
    return Path(base_path).stem.split(".")[0].lower()


def alpaca_prompts(tokenizer: Path, n: int) -> list[list[int]]:
    tok = load_tokenizer(tokenizer)
    records = json.loads((SHARED_DATA / "alpaca_data.json").read_text())[:n]
    return [tok.encode(format_prompt(r["instruction"], r.get("input", "")), bos=True) for r in records]


def _to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> HF's rotate-half rows (the inverse of base_weights._unpermute)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_model(base: Transformer):
    """A transformers Llama holding exactly our base's weights."""
    import transformers

    a = base.args
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=base.layers[0].feed_forward.w1.weight.shape[0],
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": base.tok_embeddings.weight, "model.norm.weight": base.norm.weight}
    sd["lm_head.weight"] = base.output.weight
    for i, layer in enumerate(base.layers):
        p, at, ff = f"model.layers.{i}.", layer.attention, layer.feed_forward
        sd[p + "self_attn.q_proj.weight"] = _to_hf_rows(at.wq.weight, a.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _to_hf_rows(at.wk.weight, a.kv_heads)
        sd[p + "self_attn.v_proj.weight"] = at.wv.weight
        sd[p + "self_attn.o_proj.weight"] = at.wo.weight
        sd[p + "mlp.gate_proj.weight"] = ff.w1.weight
        sd[p + "mlp.up_proj.weight"] = ff.w3.weight
        sd[p + "mlp.down_proj.weight"] = ff.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def run(quick: bool = False, base_path: Path | None = None, compiled: bool = True) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, Path(base_path or SHARED_DATA / "stories260K"), compiled)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, base_path: Path, compiled: bool) -> dict:
    n_prompts, new_tokens, repeats, big = (4, 8, 1, 2) if quick else (16, 32, 3, 8)
    base = load_base(base_path).eval().requires_grad_(False)
    prompts = alpaca_prompts(tokenizer_of(base_path), n_prompts)
    hf = hf_model(base)  # before the engine fuses the base's projections (same values either way)
    params = SamplingParams(max_gen_len=new_tokens, temperature=0.0)

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

    def library(batch):
        return generate(base, batch, params, eos_id=NO_EOS)

    engines: dict[tuple[int, bool], Engine] = {}

    def engine_gen(batch, compile_decode: bool):
        key = (len(batch), compile_decode)
        if key not in engines:  # one engine per batch size, built (and compiled) once, as a replica's
            # A step budget that holds every prompt: one prefill pass, as generate and HF do (the
            # budget's effect on latency is the chunked-prefill suite's subject).
            budget = sum(len(p) for p in prompts)
            engines[key] = Engine(base, NO_EOS, len(batch), step_tokens=budget, compile_decode=compile_decode)
            engines[key].warm_up()
        engine = engines[key]
        rows = [engine.add(p, params) for p in batch]
        while engine.has_work():
            engine.step()
        return [r.tokens for r in rows]

    impls = {
        "hf generate": hf_gen,
        "ours: generate (library)": library,
        "ours: serving engine": lambda b: engine_gen(b, False),
    }
    if compiled:
        impls["ours: serving engine, compiled"] = lambda b: engine_gen(b, True)
    batch_sizes = (1, big)

    def batches(bs):
        return [prompts[i : i + bs] for i in range(0, len(prompts), bs)]

    # Warm-up (untimed; compiles) and greedy agreement with HF, alone and batched.
    compile_s = {}
    ref = [hf_gen([p])[0] for p in prompts]
    agreement = {}
    for name, fn in impls.items():
        for bs in batch_sizes:
            t0 = time.perf_counter()
            rows = [r for b in batches(bs) for r in fn(b)]
            if "compiled" in name:
                compile_s[f"batch{bs}"] = time.perf_counter() - t0
            agreement.setdefault(name, {})[f"batch{bs}"] = sum(r == x for r, x in zip(rows, ref))

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
    speedup = {
        b: {
            f"{k} / hf, {clock}": tps[b][k] / tps[b]["hf generate"]
            for k in impls
            if k != "hf generate"
            for clock, tps in (("cpu", tps_cpu), ("wall", tps_wall))
        }
        for b in tps_cpu
    }
    key = f"batch{big}"
    best = max((k for k in impls if k.startswith("ours: serving")), key=lambda k: tps_cpu[key][k])
    result = {
        "what": f"greedy decoding of {len(prompts)} real Alpaca prompts, {new_tokens} new tokens each, "
        f"ours vs Hugging Face generate, same weights ({base_path.name}), fp32 (measured)",
        "machine_note": MACHINE_NOTE,
        "quick": quick,
        "base": base_path.name,
        "shape": {
            "dim": base.args.dim,
            "n_layers": base.args.n_layers,
            "n_heads": base.args.n_heads,
            "n_kv_heads": base.args.kv_heads,
            "vocab": base.args.vocab_size,
            "context": base.args.max_seq_len,
        },
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prompt_tokens": [len(p) for p in prompts],
        "threads": torch.get_num_threads(),
        "tokens_per_s_wall_median": tps_wall,
        "tokens_per_cpu_s_median": tps_cpu,
        "tokens_per_cpu_s_all": {f"batch{bs}": cpu[bs] for bs in batch_sizes},
        "speedup": speedup,
        "greedy_agreement_with_hf_prompts": agreement,
        "compile_and_first_run_s": compile_s,
        "goal": f"serving engine >= 1.5x HF generate at batch {big}, greedy text unchanged",
        "best_engine_at_goal_batch": best,
        "goal_met": bool(
            tps_cpu[key][best] / tps_cpu[key]["hf generate"] >= 1.5
            and agreement[best][key] == len(prompts)
            and agreement[best]["batch1"] == len(prompts)
        ),
        "hf_recipe": "LlamaForCausalLM.generate(do_sample=False, max_new_tokens=min_new_tokens=N, eos_token_id=None), "
        "left padding with an attention mask, default attention implementation",
        "ours_recipe": "engine: serve.engine.Engine(max_running=batch, step_tokens=all prompts' tokens), rows added "
        "together, step() until done (prefill in one pass, then adapter/decode_step.py per token); library: "
        "adapter.decoding.generate (left-padded batch, Transformer.hidden per step)",
    }
    name = "decode" if base_path.name == "stories260K" else f"decode-{base_slug(base_path)}"
    path = write_result(name, result)
    labels, values = [], []
    for b in tps_cpu:
        for k in impls:
            labels.append(f"{k.replace('ours: ', '')} b{b[5:]}")
            values.append(tps_cpu[b][k])
    bar_chart(
        RESULTS / f"{name}.png",
        f"Greedy decoding, {base_path.name}, {len(prompts)} Alpaca prompts x {new_tokens} tokens\n({MACHINE_NOTE})",
        labels,
        values,
        "new tokens per CPU-second (higher is better)",
    )
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", type=Path, default=None, help="checkpoint folder (default: stories260K)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine row")
    a = ap.parse_args(argv)
    result = run(a.quick, a.base, not a.no_compile)
    print(json.dumps({k: result[k] for k in ("tokens_per_cpu_s_median", "speedup", "goal_met")}, indent=2))


if __name__ == "__main__":
    main()
