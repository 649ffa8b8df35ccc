"""Serve over real HTTP with a GGUF base: a chat with the base is rendered with the base's own chat
template; a chat with an adapter keeps the Alpaca template it was trained with."""

import httpx
import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import save_adapter
from adapter.base_weights import load_base
from adapter.decoding import SamplingParams, generate
from adapter.prompts import format_prompt
from adapter.tokenizer import load_tokenizer
from tests.gguf_files import write_tiny_llama

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_server(serve_http, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    folder = tmp_path_factory.mktemp("gguf-serve")
    base = folder / "tiny.gguf"
    write_tiny_llama(base, "Q8_0", tied=True, seed=5)
    torch.manual_seed(1)
    prompts = AdaptionPrompts(load_base(base).args, AdapterConfig(adapter_len=4, adapter_layers=2))
    with torch.no_grad():
        prompts.gate.uniform_(0.5, 1.0)
    save_adapter(prompts, load_base(base).args, folder / "adapters" / "alpha")
    cfg = {"model": {"base": str(base)}, "adapters": str(folder / "adapters"), "base_name": "tiny"}
    serve.run(build_app(cfg), name="gguf", route_prefix="/gguf")
    yield f"{serve_http}/gguf", base
    serve.delete("gguf")


def _chat(url, model):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_base_chat_uses_the_bases_template_and_an_adapter_keeps_alpaca(gguf_server):
    url, base_file = gguf_server
    tok, base = load_tokenizer(base_file), load_base(base_file)
    templated = tok.encode(tok.render_chat(MESSAGES))
    body = _chat(url, "tiny")
    assert body["usage"]["prompt_tokens"] == len(templated)
    want = generate(base, [templated], SamplingParams(max_gen_len=8, temperature=0.0), tok.eos_id)[0]
    assert body["choices"][0]["message"]["content"] == tok.decode(want)
    alpaca = tok.encode(format_prompt("What is the capital of France?", "Be brief."))
    assert _chat(url, "alpha")["usage"]["prompt_tokens"] == len(alpaca)
