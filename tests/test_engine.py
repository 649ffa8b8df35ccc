"""The continuous-batching engine, driven from a plain loop (no Ray, no HTTP): a row's output does
not depend on what it is batched with or when it joins; rows leave and join at every step."""

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.model import PromptKV
from serve.engine import ContextOverflow, Engine, EngineFull

PROMPTS = [[1, 15, 200, 33, 7, 90, 45], [1, 300], [1, 5, 6, 7, 8], [1, 77, 78], [1, 400, 401, 402, 9, 9]]
GREEDY = SamplingParams(max_gen_len=10, temperature=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(model, seed, k, layers=2):
    torch.manual_seed(seed)
    p = AdaptionPrompts(model.args, AdapterConfig(k, layers))
    with torch.no_grad():
        p.gate.uniform_(0.5, 1.0)
    return prefixes_for(model, p)


def _drain(engine, limit=500):
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not drain")


def _alone(model, prompt, params, prefixes=None, seed=None):
    engine = Engine(model, eos_id=-1, max_running=1)  # the whole prompt in one chunk
    seq = engine.add(prompt, params, prefixes, seed)
    _drain(engine)
    return seq.tokens


@pytest.fixture
def adapters(tiny_model):
    # Two prompt lengths (3 and 5) and the plain base: they must share a batch.
    return [_adapter(tiny_model, 1, 3), _adapter(tiny_model, 2, 5), None, _adapter(tiny_model, 3, 3, layers=4), None]


def test_greedy_alone_equals_the_reference_generate(tiny_model, adapters):
    for prompt, pre in zip(PROMPTS, adapters):
        if pre is not None and len({p.k.shape[2] for p in pre.values()}) > 1:
            continue
        assert _alone(tiny_model, prompt, GREEDY, pre) == generate(tiny_model, [prompt], GREEDY, -1, [pre])[0]


def test_greedy_output_is_the_same_alone_in_a_full_batch_and_joining_mid_flight(tiny_model, adapters):
    alone = [_alone(tiny_model, p, GREEDY, a) for p, a in zip(PROMPTS, adapters)]
    assert len({tuple(t) for t in alone}) > 1
    # A full batch: every row (two adapter_len values and base rows) decoded together.
    engine = Engine(tiny_model, eos_id=-1, max_running=len(PROMPTS))
    rows = [engine.add(p, GREEDY, a) for p, a in zip(PROMPTS, adapters)]
    _drain(engine)
    assert [r.tokens for r in rows] == alone
    assert all(r.max_batch == len(PROMPTS) for r in rows)
    # Joining mid-flight: rows arrive one every 3 steps, into a batch already decoding.
    engine = Engine(tiny_model, eos_id=-1, max_running=3)
    rows = []
    for p, a in zip(PROMPTS, adapters):
        rows.append(engine.add(p, GREEDY, a))
        for _ in range(3):
            engine.step()
    _drain(engine)
    assert [r.tokens for r in rows] == alone
    assert max(r.max_batch for r in rows) == 3


@pytest.mark.parametrize("step_tokens", [6, 9, 40])
def test_greedy_output_is_the_same_when_prompts_are_chunked_and_prefilled_together(tiny_model, adapters, step_tokens):
    """A small step budget splits prompts into chunks beside the decoding rows (6: one or two tokens
    of a prompt per step; 9: chunks of several prompts padded together; 40: short prompts whole,
    together); rows still get exactly their solo output, adapters of two prompt lengths included."""
    alone = [_alone(tiny_model, p, GREEDY, a) for p, a in zip(PROMPTS, adapters)]
    engine = Engine(tiny_model, eos_id=-1, max_running=5, step_tokens=step_tokens)
    rows = [engine.add(p, GREEDY, a) for p, a in zip(PROMPTS[:3], adapters[:3])]
    engine.step()
    rows += [engine.add(p, GREEDY, a) for p, a in zip(PROMPTS[3:], adapters[3:])]  # join while others decode
    _drain(engine)
    assert [r.tokens for r in rows] == alone
    assert engine.fused_fallbacks == 0  # the joins ran as one forward with the decoding rows


def test_a_long_prompt_enters_in_chunks_while_running_rows_keep_decoding(tiny_model, adapters):
    budget = 16
    engine = Engine(tiny_model, eos_id=-1, max_running=3, step_tokens=budget)
    long_params = SamplingParams(max_gen_len=40, temperature=0)
    running = [engine.add(p, long_params, a) for p, a in zip(PROMPTS[:2], adapters[:2])]
    engine.step()
    assert all(len(r.tokens) == 1 for r in running)  # both short prompts prefilled in one step
    long_prompt = [1] + [(7 * i) % 500 + 3 for i in range(150)]
    joining = engine.add(long_prompt, GREEDY)
    steps = 0
    while not joining.tokens:
        before = [len(r.tokens) for r in running]
        engine.step()
        steps += 1
        assert [len(r.tokens) for r in running] == [n + 1 for n in before]  # no stall: a token every step
    assert steps >= len(long_prompt) // budget  # it took several steps: chunks of at most budget - 2 tokens
    _drain(engine)
    assert joining.tokens == _alone(tiny_model, long_prompt, GREEDY)
    assert [r.tokens for r in running] == [_alone(tiny_model, p, long_params, a) for p, a in zip(PROMPTS, adapters)][:2]


def test_step_budget_must_leave_room_for_prompts(tiny_model):
    with pytest.raises(ValueError, match="step_tokens"):
        Engine(tiny_model, eos_id=-1, max_running=8, step_tokens=8)


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_finish(tiny_model):
    engine = Engine(tiny_model, eos_id=-1, max_running=4)
    long = SamplingParams(max_gen_len=100, temperature=0)
    rows = [engine.add(p, long) for p in PROMPTS[:3]]
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 3
    engine.cancel(rows[1])
    engine.step()
    assert rows[1] not in engine.running and rows[1].finish_reason == "cancelled"
    assert len(rows[1].tokens) < 10
    _drain(engine)
    assert [len(rows[0].tokens), len(rows[2].tokens)] == [100, 100]
    assert [r.tokens for r in (rows[0], rows[2])] == [_alone(tiny_model, p, long) for p in (PROMPTS[0], PROMPTS[2])]
    # A waiting row is cancelled at once.
    engine = Engine(tiny_model, eos_id=-1, max_running=1)
    engine.add(PROMPTS[0], long)
    queued = engine.add(PROMPTS[1], long)
    engine.step()
    engine.cancel(queued)
    assert queued.finish_reason == "cancelled" and engine.stats()["waiting"] == 0


def test_seed_reproduces_sampled_text_whatever_the_batch(tiny_model, adapters):
    hot = SamplingParams(max_gen_len=12, temperature=1.0, top_p=0.95)
    alone = _alone(tiny_model, PROMPTS[0], hot, adapters[0], seed=1234)
    engine = Engine(tiny_model, eos_id=-1, max_running=4)
    others = [engine.add(p, hot, a) for p, a in zip(PROMPTS[1:4], adapters[1:4])]  # unseeded neighbours
    for _ in range(2):
        engine.step()
    seeded = engine.add(PROMPTS[0], hot, adapters[0], seed=1234)
    _drain(engine)
    assert seeded.tokens == alone
    assert _alone(tiny_model, PROMPTS[0], hot, adapters[0], seed=99) != alone  # the seed matters
    assert all(len(o.tokens) == 12 for o in others)


def test_a_long_prompt_does_not_shorten_its_neighbours(tiny_model):
    ctx = tiny_model.args.max_seq_len
    engine = Engine(tiny_model, eos_id=-1, max_running=2)
    near_full = engine.add([1] + [7] * (ctx - 4), SamplingParams(3, temperature=0))
    short = engine.add(PROMPTS[1], SamplingParams(40, temperature=0))
    _drain(engine)
    assert (len(near_full.tokens), near_full.finish_reason) == (3, "length")
    assert (len(short.tokens), short.finish_reason) == (40, "length")


def test_admission_refuses_context_overflow_and_a_full_queue(tiny_model):
    ctx = tiny_model.args.max_seq_len
    engine = Engine(tiny_model, eos_id=-1, max_running=1, max_waiting=2)
    with pytest.raises(ContextOverflow, match=f"maximum context length is {ctx} tokens.*{ctx - 10} in the prompt, 11"):
        engine.add([1] * (ctx - 10), SamplingParams(11))
    engine.add([1] * (ctx - 10), SamplingParams(10))  # exactly the context: fine
    engine.step()  # it runs; two more may wait
    engine.add(PROMPTS[0], GREEDY)
    engine.add(PROMPTS[1], GREEDY)
    with pytest.raises(EngineFull):
        engine.add(PROMPTS[2], GREEDY)


@pytest.mark.parametrize("joins_running_rows", [False, True], ids=["prefilled-together", "joins-running-rows"])
def test_a_row_that_fails_fails_alone(tiny_model, adapters, joins_running_rows):
    """Joining running rows, the bad row's chunk shares a forward with the decoding rows: when that
    forward fails, the decode and the chunk run apart (each retried row by row)."""
    wrong = {3: PromptKV(k=torch.zeros(1, 2, 3, 7), v=torch.zeros(1, 2, 3, 7), gate=torch.ones(1, 4))}  # bad head_dim
    engine = Engine(tiny_model, eos_id=-1, max_running=4)
    good = [engine.add(p, GREEDY, a) for p, a in zip(PROMPTS[:2], adapters[:2])]
    if joins_running_rows:
        engine.step()
        assert engine.n_decoding == 2
    bad = engine.add(PROMPTS[2], GREEDY, wrong)
    later = engine.add(PROMPTS[3], GREEDY, adapters[3])
    _drain(engine)
    assert bad.finish_reason == "error" and bad.error is not None
    expected = [
        _alone(tiny_model, p, GREEDY, a) for p, a in zip(PROMPTS[:2] + PROMPTS[3:4], adapters[:2] + adapters[3:4])
    ]
    assert [s.tokens for s in good + [later]] == expected


def test_eos_ends_a_row_with_stop(tiny_model):
    first = _alone(tiny_model, PROMPTS[0], SamplingParams(1, temperature=0))[0]
    engine = Engine(tiny_model, eos_id=first, max_running=2)
    seq = engine.add(PROMPTS[0], SamplingParams(20, temperature=0))
    _drain(engine)
    assert (seq.tokens, seq.finish_reason) == ([], "stop")


def test_async_engine_streams_outputs_aborts_and_health_fails_when_the_loop_dies(tiny_model):
    """The engine contract the app uses (serve/engine.py's docstring), on a real event loop."""
    import asyncio

    from serve.app import AdapterServer
    from serve.engine import EngineDead, GenerationRequest
    from serve.engine_loop import AsyncEngine

    async def scenario():
        engine = AsyncEngine(Engine(tiny_model, eos_id=-1, max_running=2, step_tokens=4))
        streams = [engine.generate(GenerationRequest(p, GREEDY)) for p in PROMPTS[:3]]
        final = engine.generate(GenerationRequest(PROMPTS[3], GREEDY, final_only=True))
        seen = []
        for stream in streams:
            outs = [o async for o in stream]
            counts = [len(o.token_ids) for o in outs]  # cumulative; steps between two reads coalesce
            assert counts[0] >= 1 and all(a < b for a, b in zip(counts[:-2], counts[1:-1])) and counts[-1] == 10
            assert outs[-1].finished and outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])
            seen.append(outs[-1].token_ids)
        only = [o async for o in final]
        assert len(only) == 1 and only[0].finished  # final_only: one output
        assert seen + [only[0].token_ids] == [_alone(tiny_model, p, GREEDY) for p in PROMPTS[:4]]
        # abort: the stream ends with the caller's reason, the row leaves
        long = GenerationRequest(PROMPTS[0], SamplingParams(max_gen_len=200, temperature=0))
        stream = engine.generate(long)
        first = await anext(stream)
        engine.abort(long.request_id, "stop")
        rest = [o async for o in stream]
        assert rest[-1].finish_reason == "stop" and len(rest[-1].token_ids) < 200 and first.token_ids
        assert engine.stats()["finished"].get("stop") == 1 and not engine.rows
        server = type("Replica", (), {"engine": engine})()
        AdapterServer.func_or_class.check_health(server)  # healthy: no exception
        engine.task.cancel()
        await asyncio.sleep(0)
        assert not engine.is_running
        with pytest.raises(EngineDead):
            AdapterServer.func_or_class.check_health(server)
        with pytest.raises(EngineDead):
            engine.generate(GenerationRequest(PROMPTS[0], GREEDY))

    asyncio.run(scenario())
