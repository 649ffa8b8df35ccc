"""Zero-init gated attention: the properties docs/method.md says tests must show."""

import pytest
import torch

from adapter.adapter import IGNORE_INDEX, AdaptedLlama, AdapterConfig, AdaptionPrompts, batch_prefixes
from adapter.model_args import preset


def _adapted(tiny_model, layers=2, k=3):
    torch.manual_seed(2)
    return AdaptedLlama(tiny_model, AdaptionPrompts(tiny_model.args, AdapterConfig(k, layers)))


def test_zero_gates_give_exactly_the_base_models_logits(tiny_model):
    model = _adapted(tiny_model)
    tokens = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        diff = (model(tokens) - tiny_model(tokens)).abs().max().item()
    assert diff <= 1e-6


def test_nonzero_gates_change_the_logits(tiny_model):
    model = _adapted(tiny_model)
    with torch.no_grad():
        model.adapter.gate.fill_(0.5)
    tokens = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert (model(tokens) - tiny_model(tokens)).abs().max().item() > 1e-3


def test_gradients_reach_only_prompts_and_gates(tiny_model):
    model = _adapted(tiny_model)
    tokens = torch.randint(0, 512, (2, 12))
    labels = tokens.clone()
    labels[:, :5] = IGNORE_INDEX
    loss, n = model.loss(tokens, labels)
    loss.backward()
    assert n == 2 * 7
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == {"adapter.prompt", "adapter.gate"}
    # Gates start at 0, and tanh'(0) = 1, so they receive gradient from the first step.
    assert model.adapter.gate.grad.abs().sum() > 0
    assert len(model.trainable_parameters()) == 2


def test_layers_below_the_adapter_build_no_graph(tiny_model):
    model = _adapted(tiny_model, layers=1)
    seen = {}
    for i, layer in enumerate(tiny_model.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(torch.randint(0, 512, (1, 6)))
    last = tiny_model.args.n_layers - 1
    assert seen == {i: i == last for i in range(tiny_model.args.n_layers)}


def test_adapter_shapes_follow_the_config():
    args = preset("tiny")
    p = AdaptionPrompts(args, AdapterConfig(adapter_len=5, adapter_layers=3))
    assert p.prompt.shape == (3, 5, args.dim) and p.gate.shape == (3, args.n_heads)
    assert list(p.adapted_layers) == [1, 2, 3]
    assert torch.all(p.gate == 0)


def test_mixed_batch_rows_match_their_own_adapter(tiny_model):
    """Rows for adapter A, adapter B and the plain base in one forward pass."""
    a, b = _adapted(tiny_model, layers=2), _adapted(tiny_model, layers=3)
    with torch.no_grad():
        a.adapter.gate.fill_(0.3)
        b.adapter.gate.fill_(-0.7)
        b.adapter.prompt.mul_(3)
        tokens = torch.randint(0, 512, (3, 8))
        pre = batch_prefixes([a.adapter.prefixes(tiny_model), b.adapter.prefixes(tiny_model), None])
        mixed = tiny_model(tokens, prefixes=pre)
        assert torch.allclose(mixed[0], a(tokens[:1])[0], atol=1e-5)
        assert torch.allclose(mixed[1], b(tokens[1:2])[0], atol=1e-5)
        assert torch.allclose(mixed[2], tiny_model(tokens[2:])[0], atol=1e-5)


def test_the_ablations_gate_initialisations(tiny_model):
    """gate_init: "random" starts the gates N(0, 1) and trains them; "fixed-one" weights the prompt
    term by exactly 1 and never trains the gate (the paper's ablation, bench/zero_init_ablation.py)."""
    tokens = torch.randint(0, 512, (2, 11))
    torch.manual_seed(0)
    rand = AdaptionPrompts(tiny_model.args, AdapterConfig(4, 2, gate_init="random"))
    assert rand.gate.requires_grad and rand.gate.abs().min() > 0 and rand.gate.std() > 0.3
    fixed = AdaptionPrompts(tiny_model.args, AdapterConfig(4, 2, gate_init="fixed-one"))
    assert not fixed.gate.requires_grad and torch.equal(fixed.activated_gate(), torch.ones_like(fixed.gate))
    with torch.no_grad():
        for prompts in (rand, fixed):
            assert (AdaptedLlama(tiny_model, prompts)(tokens) - tiny_model(tokens)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="gate_init"):
        AdapterConfig(gate_init="ones")
