"""Ray Serve on 127.0.0.1 over real HTTP: the real pretrained stories260K base and two adapters
saved by the project."""

import concurrent.futures as cf
import json
import socket
import time

import httpx
import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import save_adapter
from adapter.checkpoint import load_base
from tests.conftest import shared_file

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park.", "One day, a bird"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve.app import build_app, deployment_for
    from serve.config import serve_config

    stories = shared_file("stories260K/params.json").parent
    root = tmp_path_factory.mktemp("adapters")
    args = load_base(stories).args
    for seed, path in ((1, root / "alpha"), (2, root / "beta.safetensors")):
        torch.manual_seed(seed)
        p = AdaptionPrompts(args, AdapterConfig(adapter_len=4, adapter_layers=3))
        with torch.no_grad():
            p.gate.uniform_(0.5, 1.0)
            p.prompt.mul_(300)
        save_adapter(p, args, path)
    (root / "junk.txt").write_text("not an adapter")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Server defaults for what a request leaves out: greedy, 6 tokens (checked below).
    cfg = serve_config({"model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model")},
                        "sampling": {"max_gen_len": 6, "temperature": 0.0}, "adapters": str(root),
                        "base_name": "stories260k", "max_tokens_limit": 64}).model_dump(mode="json")
    serve.run(build_app(cfg), name="llama", route_prefix="/")
    secure = deployment_for(serve_config(cfg)).options(name="SecureServer",
                                   ray_actor_options={"runtime_env": {"env_vars": {"TEST_API_KEY": "sekrit"}}})
    serve.run(secure.bind({**cfg, "api_key_env": "TEST_API_KEY"}), name="secure", route_prefix="/secure")
    base_url = f"http://127.0.0.1:{port}"
    yield base_url
    serve.delete("llama")
    serve.delete("secure")


def _complete(url, model, prompt, **kw):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12,
                                                  "temperature": 0, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_models_lists_base_and_adapters(server):
    r = httpx.get(f"{server}/v1/models", timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["stories260k", "alpha", "beta"]
    assert httpx.get(f"{server}/health", timeout=30).json()["status"] == "ok"


def test_completion_and_chat_shapes(server):
    body = _complete(server, "alpha", "Once upon a time").json()
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    chat = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "beta", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 10, "temperature": 0}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["message"]["content"]
    # Adapters really change the output of the base model.
    texts = {m: _complete(server, m, "Once upon a time").json()["choices"][0]["text"]
             for m in ("stories260k", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_request_without_sampling_fields_gets_the_servers_configured_defaults(server):
    # The fixture configures sampling {max_gen_len: 6, temperature: 0}: greedy, at most 6 tokens.
    plain = httpx.post(f"{server}/v1/completions", timeout=60, json={"model": "alpha", "prompt": "Once upon a time"})
    assert plain.status_code == 200, plain.text
    assert 0 < plain.json()["usage"]["completion_tokens"] <= 6
    greedy = _complete(server, "alpha", "Once upon a time", max_tokens=6).json()["choices"][0]["text"]
    assert plain.json()["choices"][0]["text"] == greedy


def test_mixed_adapter_batch_gives_each_request_its_solo_tokens(server):
    models = ["alpha", "beta", "stories260k", "alpha", "beta", "stories260k"]
    work = list(zip(models, PROMPTS + PROMPTS[:2]))
    solo = [_complete(server, m, p).json()["choices"][0]["text"] for m, p in work]
    with cf.ThreadPoolExecutor(len(work)) as pool:
        batched = list(pool.map(lambda mp: _complete(server, *mp), work))
    assert [r.json()["choices"][0]["text"] for r in batched] == solo
    sizes = [int(r.headers["x-batch-size"]) for r in batched]
    assert max(sizes) > 1, f"requests were never batched together: {sizes}"


def _sse(url, path, body):
    chunks = []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def test_streaming_equals_the_non_streamed_text(server):
    body = {"model": "alpha", "prompt": "The little dog", "max_tokens": 12, "temperature": 0}
    whole = _complete(server, **{k: body[k] for k in ("model", "prompt")}).json()["choices"][0]["text"]
    chunks = _sse(server, "/v1/completions", {**body, "stream": True})
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    chat = _sse(server, "/v1/chat/completions", {"model": "beta", "stream": True, "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat)


def test_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai", reason="the openai client is a test-only dependency")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"stories260k", "alpha", "beta"}
    c = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert c.choices[0].text == _complete(server, "alpha", "Once upon a time").json()["choices"][0]["text"]
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=10, temperature=0)
    assert chat.choices[0].message.content
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="alpha", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    chat_stream = list(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=0,
        stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_stream) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


BAD_REQUESTS = [
    ("invalid json", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("missing prompt", "/v1/completions", {"model": "alpha"}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": "alpha"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages"),
    ("no user message", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "system", "content": "x"}]},
     400, "role 'user'"),
    ("prompt wrong type", "/v1/completions", {"model": "alpha", "prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": "ten"}, 400,
     "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens above limit", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 65}, 400, "limit"),
    ("negative temperature", "/v1/completions", {"model": "alpha", "prompt": "x", "temperature": -1}, 400,
     "temperature"),
    ("top_p zero", "/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("prompt longer than context", "/v1/completions", {"model": "alpha", "prompt": "word " * 3000}, 400, "context"),
    ("unknown adapter", "/v1/completions", {"model": "gamma", "prompt": "x"}, 404, "not found"),
    ("path separator in name", "/v1/completions", {"model": "../alpha", "prompt": "x"}, 400, "invalid adapter name"),
    ("slash in name", "/v1/chat/completions", {"model": "a/b", "messages": [{"role": "user", "content": "x"}]}, 400,
     "path separators"),
]


@pytest.mark.parametrize("what,path,body,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_openai_error(server, what, path, body, status, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{server}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower(), err
    assert err["type"] == "invalid_request_error"


def test_api_key_is_enforced_when_configured(server):
    url = f"{server}/secure/v1/models"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).json()["error"]["type"] == \
        "authentication_error"
    assert httpx.get(url, headers={"Authorization": "Bearer sekrit"}, timeout=30).status_code == 200


def test_killed_replica_is_replaced_and_requests_succeed(server):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::llama#")]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.time() + 90
    while True:
        try:
            r = httpx.post(f"{server}/v1/completions", json={"model": "alpha", "prompt": "Once", "max_tokens": 4},
                           timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the killed replica was not replaced within 90 s"
        time.sleep(1)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::llama#")]
    assert names and replicas[0]["name"] not in names
