"""The FLOP formula (adapter/flops.py) against the figures docs/training.md quotes, and the
peak table's name matching."""

import pytest
import torch

from adapter.adapter import AdapterConfig, parameter_counts
from adapter.flops import (
    block_matmul_params,
    generation_flops_per_token,
    mfu,
    peak_flops_per_device,
    training_flops_per_token,
)
from adapter.model_args import preset

LLAMA_7B = preset("llama-7b")


def test_7b_training_is_about_4_flop_per_parameter_per_token():
    # docs/training.md: frozen-base training costs about 4 x 6.74e9 FLOP per token.
    f = training_flops_per_token(LLAMA_7B, adapted_layers=30, adapter_len=10, seq_len=512)
    assert f == pytest.approx(4 * 6.74e9, rel=0.10)


def frozen_from_formula(a) -> int:
    norms = (2 * a.n_layers + 1) * a.dim
    return a.n_layers * block_matmul_params(a) + 2 * a.vocab_size * a.dim + norms


def test_block_matmuls_plus_embedding_and_head_are_the_frozen_parameters():
    tiny = preset("tiny")  # grouped-query attention on: the formula follows the model code
    assert frozen_from_formula(tiny) == parameter_counts(tiny, AdapterConfig(10, 30))["frozen"]
    assert frozen_from_formula(LLAMA_7B) == 6_738_415_616  # bench/results/projection.json, from the shapes


def test_gqa_shrinks_the_key_value_projections():
    a = preset("tiny")  # 4 heads, 2 kv heads, dim 64
    assert block_matmul_params(a) == 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * a.ffn_hidden_dim


def test_flops_grow_with_sequence_length():
    values = [training_flops_per_token(LLAMA_7B, 30, 10, t) for t in (64, 128, 256, 512, 1024)]
    assert values == sorted(values) and len(set(values)) == len(values)
    gen = [generation_flops_per_token(LLAMA_7B, 30, 10, c) for c in (10, 100, 1000)]
    assert gen == sorted(gen) and len(set(gen)) == 3


def test_zero_adapted_layers_is_the_forward_alone():
    # Documented: with nothing trainable there is no backward at all, not even through the head.
    a, t = LLAMA_7B, 300
    forward = 2 * a.n_layers * block_matmul_params(a) + 4 * a.n_layers * a.dim * t / 2 + 2 * a.dim * a.vocab_size
    assert training_flops_per_token(a, 0, 10, t) == pytest.approx(forward)
    # ... which is also one generated token with the mean causal context t/2.
    assert generation_flops_per_token(a, 0, 10, t / 2) == pytest.approx(forward)


def test_backward_is_activation_gradients_of_the_adapted_layers_only():
    a, t = LLAMA_7B, 512
    forward = training_flops_per_token(a, 0, 10, t)
    # Every layer adapted: backward about equals the forward (no weight gradients), so about 2x.
    assert training_flops_per_token(a, a.n_layers, 10, t) == pytest.approx(2 * forward, rel=0.03)
    # Fewer adapted layers, less backward.
    assert training_flops_per_token(a, 10, 10, t) < training_flops_per_token(a, 30, 10, t)
    # Adapted layers beyond the depth are clamped, as AdapterConfig.layers_for does.
    assert training_flops_per_token(a, 99, 10, t) == training_flops_per_token(a, a.n_layers, 10, t)


def test_logits_fraction_counts_the_head_only_where_logits_are_computed():
    a = LLAMA_7B
    full = training_flops_per_token(a, 30, 10, 128)
    half = training_flops_per_token(a, 30, 10, 128, logits_fraction=0.5)
    # The head: 2 x dim x vocab forward + the same again backward, halved.
    assert full - half == pytest.approx(0.5 * 2 * (2 * a.dim * a.vocab_size))


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, 19.5e12),  # plain FP32, not TF32
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA A10G", "bf16", 125e12),
        ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ],
)
def test_peak_table_matches_device_names(name, dtype, peak):
    assert peak_flops_per_device(name, dtype) == peak


@pytest.mark.parametrize(
    "name, dtype",
    [
        (None, torch.bfloat16),
        ("cpu", torch.float32),
        ("NVIDIA L40S", torch.bfloat16),  # not an L4
        ("AMD Instinct MI300X", torch.bfloat16),
        ("Tesla V100-SXM2-16GB", torch.bfloat16),  # no bf16 cores
    ],
)
def test_unknown_devices_cpu_and_missing_dtypes_have_no_peak(name, dtype):
    assert peak_flops_per_device(name, dtype) is None


def test_mfu():
    assert mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
    assert mfu(1000.0, 1e9, None) is None
