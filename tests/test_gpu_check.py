"""bench/gpu_check.py on the CPU with the tiny shape: the JSON's structure and labels, the batching
it measures with, and that its training loop trains the adapter and nothing else. (Its figures on
a CPU are not GPU figures; nothing here asserts on timing beyond > 0.)"""

import json
import random
import statistics

import pytest
import torch

from adapter.model_args import preset
from bench import gpu_check


def test_tiny_cpu_run_writes_a_labelled_result(tmp_path):
    gpu_check.main(["--tiny", "--steps", "2", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["measured_on"] == "cpu" and "NOT GPU figures" in r["note"]
    assert r["machine"]["torch"] == torch.__version__
    assert r["errors"] == [] and r["skipped"] == []
    assert [row["micro_batch"] for row in r["training"]] == [2, 4]
    for row in r["training"]:
        assert row["timed_steps"] == 2
        assert row["tokens_per_s_real"] > 0 and row["tokens_per_s_padded"] >= row["tokens_per_s_real"]
        assert row["step_time_s"]["mean"] > 0 and row["flop_per_step_mean"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU: no peak, no CUDA memory
        assert 0 < row["labelled_tokens"] < row["real_tokens"] <= row["padded_tokens"]
    # Generation at batch 1 and 16 (the tiny run keeps batch 16, with 16 new tokens per row).
    assert [g["batch"] for g in r["generation"]] == [1, 16]
    for g in r["generation"]:
        assert g["new_tokens"] == g["batch"] * 16 and g["new_tokens_per_s"] > 0 and g["mfu"] is None
    fixed = r["fixed_costs"]
    assert fixed["build_base_s"] > 0 and fixed["eval_no_grad"]["seconds"] > 0
    assert fixed["sample_generation"]["seconds"] > 0
    assert "PROJECTED from a measured single-GPU rate" in r["projection"]["what"]
    assert "SMOKE" in r["projection"]["what"] and r["projection"]["total_minutes"] > 0
    assert r["attention"]["cases"]["train_words_causal_no_mask_fwd_bwd"]["math"] == "ok"
    assert r["attention"]["model_training_step_ops"]  # the profiler saw the model's attention ops


def test_time_limit_skips_and_records_instead_of_running(tmp_path):
    r = gpu_check.run(tiny=True, out=tmp_path, time_limit_s=0)
    assert r["skipped"] and r["skipped"][0]["what"] == "build" and r["training"] == []
    assert json.loads((tmp_path / "gpu-check.json").read_text())["skipped"] == r["skipped"]


def test_embedded_lengths_are_the_real_distribution():
    pairs = gpu_check.ALPACA_LENGTHS
    assert len(pairs) == 200 and all(p < t <= 512 for t, p in pairs)
    assert statistics.mean(t for t, _ in pairs) == pytest.approx(126.9, abs=1.0)  # docs/method.md: 127 average


def test_batches_are_length_grouped_and_padded_to_their_longest():
    rng = random.Random(0)
    batches = gpu_check.grouped_batches(gpu_check.ALPACA_LENGTHS, 4, 10, rng)
    assert len(batches) == 10 and all(len(b) == 4 for b in batches)
    # Sorted buckets: rows of a batch are close in length; little padding (real job: 3.8% at 4).
    assert gpu_check.padding_ratio(gpu_check.ALPACA_LENGTHS, 4) < 1.10
    ids, labels, c = gpu_check.make_batch(batches[0], 512, "cpu", torch.Generator().manual_seed(0))
    assert ids.shape == (4, c["width"]) and c["width"] == max(t for t, _ in batches[0])
    assert int((labels != -100).sum()) == c["labelled"] == sum(t - p for t, p in batches[0])


def test_training_loop_moves_the_adapter_and_not_the_base(one_torch_thread):
    args = preset("tiny")
    model, _ = gpu_check.build(args, torch.device("cpu"), torch.float32)
    opt, _ = gpu_check.make_optimizer(model, torch.device("cpu"))
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    prompt_before, gate_before = model.adapter.prompt.detach().clone(), model.adapter.gate.detach().clone()
    rows = gpu_check.grouped_batches(gpu_check.ALPACA_LENGTHS, 2, 3, random.Random(0))
    batches = [gpu_check.make_batch(r, args.vocab_size, "cpu", torch.Generator().manual_seed(0)) for r in rows]
    times, losses = gpu_check.train_steps(model, opt, batches, torch.device("cpu"))
    assert len(times) == 3 and all(t > 0 for t in times) and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.adapter.gate, gate_before)
    assert not torch.equal(model.adapter.prompt, prompt_before)
    assert all(torch.equal(v, base_before[k]) for k, v in model.base.state_dict().items())
