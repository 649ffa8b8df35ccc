"""Generation: the KV cache changes nothing but speed; sampling parameters are checked."""

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.decoding import SamplingParams, generate, prefixes_for, sample_top_p

PROMPTS = [[1, 15, 200, 33, 7, 90, 45], [1, 300], [1, 5, 6, 7, 8]]


def _trained_adapter(model):
    torch.manual_seed(3)
    p = AdaptionPrompts(model.args, AdapterConfig(4, 2))
    with torch.no_grad():
        p.gate.uniform_(-1, 1)
        p.prompt.mul_(20)
    return p


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_with_kv_cache_equals_full_recomputation(tiny_model, with_adapter):
    pre = prefixes_for(tiny_model, _trained_adapter(tiny_model)) if with_adapter else None
    params = SamplingParams(max_gen_len=12, temperature=0)
    adapters = [pre] * len(PROMPTS)
    cached = generate(tiny_model, PROMPTS, params, eos_id=2, adapters=adapters)
    full = generate(tiny_model, PROMPTS, params, eos_id=2, adapters=adapters, use_cache=False)
    assert cached == full
    assert all(len(o) > 0 for o in cached)
    # Batched equals alone (left padding leaves each row's result unchanged).
    for p, o in zip(PROMPTS, cached):
        assert generate(tiny_model, [p], params, eos_id=2, adapters=[pre]) == [o]


def test_adapter_changes_generation(tiny_model):
    params = SamplingParams(max_gen_len=12, temperature=0)
    pre = prefixes_for(tiny_model, _trained_adapter(tiny_model))
    assert generate(tiny_model, PROMPTS, params, 2) != generate(tiny_model, PROMPTS, params, 2, adapters=[pre] * 3)


def test_generation_stops_at_eos(tiny_model):
    first = generate(tiny_model, [PROMPTS[0]], SamplingParams(1, temperature=0), eos_id=-1)[0][0]
    # Declare the greedy first token to be EOS: generation must stop with nothing emitted.
    assert generate(tiny_model, [PROMPTS[0]], SamplingParams(20, temperature=0), eos_id=first) == [[]]


def test_max_gen_len_bounds_new_tokens(tiny_model):
    out = generate(tiny_model, PROMPTS, SamplingParams(5, temperature=0), eos_id=-1)
    assert [len(o) for o in out] == [5, 5, 5]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_top_p(logits, 1.0, 0.75, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_top_p(logits, 0, 0.75)) == 0


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    params = SamplingParams(10, temperature=1.0, top_p=0.9)
    a = generate(tiny_model, PROMPTS, params, 2, generator=torch.Generator().manual_seed(5))
    b = generate(tiny_model, PROMPTS, params, 2, generator=torch.Generator().manual_seed(5))
    assert a == b


@pytest.mark.parametrize("kw", [{"max_gen_len": 0}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_params_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_prompt_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny_model, [[1] * tiny_model.args.max_seq_len], SamplingParams(4), 2)


def test_per_row_params_match_running_each_row_alone(tiny_model):
    rows = [SamplingParams(3, temperature=0), SamplingParams(7, temperature=0), SamplingParams(5, temperature=0)]
    together = generate(tiny_model, PROMPTS, rows, eos_id=-1)
    assert [len(o) for o in together] == [3, 7, 5]
    for p, r, o in zip(PROMPTS, rows, together):
        assert generate(tiny_model, [p], r, eos_id=-1) == [o]


def test_on_token_streams_every_token_in_order(tiny_model):
    seen = {}
    out = generate(
        tiny_model,
        PROMPTS,
        SamplingParams(6, temperature=0),
        eos_id=-1,
        on_token=lambda row, tok: seen.setdefault(row, []).append(tok),
    )
    assert [seen[i] for i in range(len(PROMPTS))] == out
