"""The serving forward (adapter/decode_step.py) on its own: one forward for decoding rows and a
prompt chunk equals the two passes it replaces, and the compiled decode step is compiled once per
batch-size bucket and gives the eager step's greedy tokens."""

import copy

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.decode_step import DecodeStep
from adapter.decoding import SamplingParams, prefixes_for, stack_prefixes
from serve.engine import Engine

GREEDY = SamplingParams(max_gen_len=12, temperature=0)
PROMPTS = [[1, 15, 200, 33, 7, 90, 45], [1, 300], [1, 5, 6, 7, 8], [1, 77, 78], [1, 400, 401, 402, 9, 9]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _filled(model):
    """Caches for 4 rows: rows 0-1 hold 6 and 9 tokens (decoding next at 6 and 9), rows 2-3 are empty."""
    caches = model.new_caches(4, 64)
    step = DecodeStep(model, caches)
    torch.manual_seed(1)
    tokens = torch.randint(3, 500, (2, 9))
    step.chunk(0, tokens, [0, 0], {}, [0, 1], [5, 8])
    return step, caches


def _adapters(model):
    """Two adapters' prompts on the top 2 layers, of different lengths (3 and 5)."""
    made = []
    for seed, k in ((1, 3), (2, 5)):
        torch.manual_seed(seed)
        p = AdaptionPrompts(model.args, AdapterConfig(k, 2))
        with torch.no_grad():
            p.gate.uniform_(0.5, 1.0)
        made.append(prefixes_for(model, p))
    return made


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "adapters"])
def test_one_forward_for_decode_rows_and_a_chunk_equals_the_two_passes(tiny_model, adapters):
    step, caches = _filled(tiny_model)
    before = copy.deepcopy(caches)
    chunk = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])  # right-padded: row 3 has 3 tokens
    a3, a5 = _adapters(tiny_model)
    pre, chunk_pre = (stack_prefixes([a3, a5]), stack_prefixes([a5, None])) if adapters else ({}, {})
    decode = step(0, [7, 8], [6, 9], pre)
    chunked = step.chunk(2, chunk, [0, 0], chunk_pre, [0, 1], [4, 2])
    separate = [(c.k.clone(), c.v.clone()) for c in caches]
    for c, b in zip(caches, before):  # back to the state before both passes
        c.k.copy_(b.k)
        c.v.copy_(b.v)
    mixed_decode, mixed_chunk = step.mixed([7, 8], [6, 9], pre, chunk, [0, 0], chunk_pre, [0, 1], [4, 2])
    torch.testing.assert_close(mixed_decode, decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_chunk, chunked, rtol=1e-5, atol=1e-5)
    for c, (k, v) in zip(caches, separate):
        torch.testing.assert_close(c.k, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.v, v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(mixed_chunk[0], mixed_chunk[1])  # the rows' own logits, not one row's twice
    if adapters:  # the prompts changed the logits: they were applied, in both groups
        plain_decode, plain_chunk = step.mixed([7, 8], [6, 9], {}, chunk, [0, 0], {}, [0, 1], [4, 2])
        assert not torch.allclose(plain_decode[0], mixed_decode[0]) and not torch.allclose(plain_chunk, mixed_chunk)


def test_compiled_decode_is_one_graph_per_bucket_with_the_eager_greedy_tokens(tiny_model):
    """With automatic dynamic shapes the second bucket would turn the batch size symbolic and every
    larger bucket would share that generic graph (measured 2.4x slower at batch 8): one graph per
    bucket is what makes compiling pay. Adapters: one more graph per bucket for their layer set,
    none for another prompt length."""
    eager = Engine(tiny_model, eos_id=-1, max_running=4)
    rows = [eager.add(p, GREEDY) for p in PROMPTS]
    while eager.has_work():
        eager.step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = Engine(tiny_model, eos_id=-1, max_running=4, compile_decode=True)
    engine.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert engine.decoder.buckets == [1, 2, 4]
    assert graphs == len(engine.decoder.buckets)
    compiled = [engine.add(p, GREEDY) for p in PROMPTS]  # 5 rows, 4 slots: batches of 4, then 3, 2, 1
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in compiled] == [r.tokens for r in rows]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no compile on a request
    # Adapters on the same layers, prompt lengths 3 then 5: the first batch compiles its bucket for
    # that layer set, the second needs no graph of its own (prompt lengths are dynamic).
    seen = []
    for adapter in _adapters(tiny_model):
        out = {}
        for e in (eager, engine):
            out[e] = [e.add(p, GREEDY, adapter) for p in PROMPTS[:4]]
            while e.has_work():
                e.step()
        assert [r.tokens for r in out[engine]] == [r.tokens for r in out[eager]]
        seen.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert seen[0] > graphs and seen[1] == seen[0]
