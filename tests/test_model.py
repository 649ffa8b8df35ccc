"""The frozen base: shapes, padding, and the parameter counts of the paper's shapes."""

import json

import pytest
import torch

from adapter import params as params_cli
from adapter.adapter import AdapterConfig, parameter_counts
from adapter.model_args import PRESETS, ModelArgs, preset


def test_7b_trainable_count_is_the_papers_1229760():
    c = parameter_counts(preset("llama-7b"), AdapterConfig(10, 30))
    assert c["trainable"] == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    assert 6.7e9 < c["frozen"] < 6.8e9  # LLaMA-7B has 6.74B parameters
    assert 4.7e6 < c["adapter_fp32_bytes"] < 4.95e6  # the paper's 4.7-4.9 MB file


def test_65b_trainable_count():
    assert parameter_counts(preset("llama-65b"), AdapterConfig(10, 30))["trainable"] == 2_459_520


def test_adapter_layers_are_clamped_to_model_depth():
    c = parameter_counts(preset("tiny"), AdapterConfig(adapter_len=3, adapter_layers=30))
    args = preset("tiny")
    assert c["adapter_layers"] == args.n_layers
    assert c["trainable"] == args.n_layers * (3 * args.dim + args.n_heads)


def test_params_cli_prints_json(capsys):
    params_cli.main(["--preset", "llama-7b"])
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == 1_229_760 and out["preset"] == "llama-7b"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_known_ffn_widths(name):
    args = preset(name)
    expected = {"llama-7b": 11008, "llama-13b": 13824, "llama-33b": 17920, "llama-65b": 22016, "llama2-70b": 28672}
    if name in expected:
        assert args.ffn_hidden_dim == expected[name]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("llama-8b")


def test_left_padding_does_not_change_a_rows_logits(tiny_model):
    """A prompt alone and the same prompt left-padded next to a longer one give the same logits."""
    torch.manual_seed(1)
    short = torch.randint(3, 512, (1, 5))
    long = torch.randint(3, 512, (1, 9))
    alone = tiny_model(short)[0]
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:] = short[0]
    batch[1] = long[0]
    both = tiny_model(batch, pad=torch.tensor([4, 0]))
    assert torch.allclose(both[0, 4:], alone, atol=1e-5)
    assert torch.allclose(both[1], tiny_model(long)[0], atol=1e-5)
    assert torch.isfinite(both).all()
