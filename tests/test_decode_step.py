"""The serving forward (adapter/decode_step.py) on its own: one forward for decoding rows and a
prompt chunk equals the two passes it replaces, and the compiled decode step is compiled once per
batch-size bucket and gives the eager step's greedy tokens."""

import copy

import pytest
import torch

from adapter.decode_step import DecodeStep
from adapter.decoding import SamplingParams
from serve.engine import Engine

GREEDY = SamplingParams(max_gen_len=12, temperature=0)
PROMPTS = [[1, 15, 200, 33, 7, 90, 45], [1, 300], [1, 5, 6, 7, 8], [1, 77, 78], [1, 400, 401, 402, 9, 9]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _filled(model):
    """Caches for 4 rows: rows 0-1 hold 6 and 9 tokens (decoding next at 6 and 9), rows 2-3 are empty."""
    caches = model.new_caches(4, 64)
    step = DecodeStep(model, caches)
    torch.manual_seed(1)
    tokens = torch.randint(3, 500, (2, 9))
    step.chunk(0, tokens, [0, 0], {}, [0, 1], [5, 8])
    return step, caches


def test_one_forward_for_decode_rows_and_a_chunk_equals_the_two_passes(tiny_model):
    step, caches = _filled(tiny_model)
    before = copy.deepcopy(caches)
    chunk = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])  # right-padded: row 3 has 3 tokens
    decode = step(0, [7, 8], [6, 9], {})
    chunked = step.chunk(2, chunk, [0, 0], {}, [0, 1], [4, 2])
    separate = [(c.k.clone(), c.v.clone()) for c in caches]
    for c, b in zip(caches, before):  # back to the state before both passes
        c.k.copy_(b.k)
        c.v.copy_(b.v)
    mixed_decode, mixed_chunk = step.mixed([7, 8], [6, 9], {}, chunk, [0, 0], {}, [0, 1], [4, 2])
    torch.testing.assert_close(mixed_decode, decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_chunk, chunked, rtol=1e-5, atol=1e-5)
    for c, (k, v) in zip(caches, separate):
        torch.testing.assert_close(c.k, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.v, v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(mixed_chunk[0], mixed_chunk[1])  # the rows' own logits, not one row's twice


def test_compiled_decode_is_one_graph_per_bucket_with_the_eager_greedy_tokens(tiny_model):
    """With automatic dynamic shapes the second bucket would turn the batch size symbolic and every
    larger bucket would share that generic graph (measured 2.4x slower at batch 8): one graph per
    bucket is what makes compiling pay."""
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
