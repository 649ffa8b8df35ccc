"""Ray Serve on 127.0.0.1 over real HTTP: the real pretrained stories260K base and two adapters
saved by the project."""

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.conftest import SERVE_LIMIT as LIMIT

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park.", "One day, a bird"]


def _complete(url, model, prompt, **kw):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r


def test_models_lists_base_and_adapters(server):
    r = httpx.get(f"{server}/v1/models", timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["stories260k", "alpha", "beta", "broken"]
    assert httpx.get(f"{server}/health", timeout=30).json()["status"] == "ok"


def test_completion_and_chat_shapes(server):
    body = _complete(server, "alpha", "Once upon a time").json()
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    chat = httpx.post(
        f"{server}/v1/chat/completions",
        timeout=60,
        json={
            "model": "beta",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 10,
            "temperature": 0,
        },
    ).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["message"]["content"]
    # Adapters really change the output of the base model.
    texts = {
        m: _complete(server, m, "Once upon a time").json()["choices"][0]["text"]
        for m in ("stories260k", "alpha", "beta")
    }
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
    chat = _sse(
        server,
        "/v1/chat/completions",
        {
            "model": "beta",
            "stream": True,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    )
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat)


def test_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai", reason="the openai client is a test-only dependency")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"stories260k", "alpha", "beta", "broken"}
    c = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert c.choices[0].text == _complete(server, "alpha", "Once upon a time").json()["choices"][0]["text"]
    chat = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.content
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model="alpha", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed == c.choices[0].text
    chat_stream = list(
        client.chat.completions.create(
            model="beta",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=10,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_stream) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


BAD_REQUESTS = [
    ("invalid json", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("missing prompt", "/v1/completions", {"model": "alpha"}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": "alpha"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages"),
    (
        "no user message",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "system", "content": "x"}]},
        400,
        "role 'user'",
    ),
    ("prompt wrong type", "/v1/completions", {"model": "alpha", "prompt": 5}, 400, "prompt"),
    (
        "max_tokens wrong type",
        "/v1/completions",
        {"model": "alpha", "prompt": "x", "max_tokens": "ten"},
        400,
        "max_tokens",
    ),
    ("max_tokens zero", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (
        "max_tokens above limit",
        "/v1/completions",
        {"model": "alpha", "prompt": "x", "max_tokens": LIMIT + 1},
        400,
        "limit",
    ),
    (
        "max_completion_tokens zero",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_tokens",
    ),
    ("NaN temperature", "/v1/completions", b'{"model": "alpha", "prompt": "x", "temperature": NaN}', 400, "finite"),
    ("Infinity top_p", "/v1/completions", b'{"model": "alpha", "prompt": "x", "top_p": Infinity}', 400, "finite"),
    (
        "400-digit temperature",
        "/v1/completions",
        b'{"model": "alpha", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
        400,
        "too large",
    ),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "alpha", "prompt": "a \\ud800 b"}', 400, "surrogate"),
    (
        "lone surrogate in message",
        "/v1/chat/completions",
        b'{"model": "alpha", "messages": [{"role": "user", "content": "\\udfff"}]}',
        400,
        "surrogate",
    ),
    ("logprobs", "/v1/completions", {"model": "alpha", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("echo", "/v1/completions", {"model": "alpha", "prompt": "x", "echo": True}, 400, "echo"),
    ("best_of", "/v1/completions", {"model": "alpha", "prompt": "x", "best_of": 3}, 400, "best_of"),
    (
        "frequency_penalty",
        "/v1/completions",
        {"model": "alpha", "prompt": "x", "frequency_penalty": 0.5},
        400,
        "frequency_penalty",
    ),
    (
        "unknown parameter",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    ("n above limit", "/v1/completions", {"model": "alpha", "prompt": "x", "n": 4}, 400, "n must be"),
    ("n zero", "/v1/completions", {"model": "alpha", "prompt": "x", "n": 0}, 400, "n must be"),
    ("negative seed", "/v1/completions", {"model": "alpha", "prompt": "x", "seed": -1}, 400, "seed"),
    ("stream with n=2", "/v1/completions", {"model": "alpha", "prompt": "x", "n": 2, "stream": True}, 400, "stream"),
    ("five stop strings", "/v1/completions", {"model": "alpha", "prompt": "x", "stop": list("abcde")}, 400, "stop"),
    (
        "prompt plus max_tokens over context",
        "/v1/completions",
        {"model": "alpha", "prompt": "word " * 1800, "max_tokens": LIMIT},
        400,
        "maximum context length is 2048 tokens",
    ),
    (
        "negative temperature",
        "/v1/completions",
        {"model": "alpha", "prompt": "x", "temperature": -1},
        400,
        "temperature",
    ),
    ("top_p zero", "/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("prompt longer than context", "/v1/completions", {"model": "alpha", "prompt": "word " * 3000}, 400, "context"),
    ("unknown adapter", "/v1/completions", {"model": "gamma", "prompt": "x"}, 404, "not found"),
    ("malformed adapter file", "/v1/completions", {"model": "broken", "prompt": "x"}, 500, "bad adapter metadata"),
    ("path separator in name", "/v1/completions", {"model": "../alpha", "prompt": "x"}, 400, "invalid adapter name"),
    (
        "slash in name",
        "/v1/chat/completions",
        {"model": "a/b", "messages": [{"role": "user", "content": "x"}]},
        400,
        "path separators",
    ),
]


@pytest.mark.parametrize("what,path,body,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_openai_error(server, what, path, body, status, needle):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower(), err
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert "/tmp" not in err["message"]  # never a path on the server


def test_bad_requests_fail_alone_while_valid_neighbours_get_full_replies(server):
    # Two adapter_len values, the base, and a prompt near the context (it must not shorten the others).
    work = list(zip(["alpha", "beta", "stories260k", "beta", "alpha"], PROMPTS + ["word " * 600]))
    solo = [_complete(server, m, p, max_tokens=40).json()["choices"][0]["text"] for m, p in work]

    def bad(case):
        _, path, body, status, _ = case
        kw = (
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        return httpx.post(f"{server}{path}", timeout=60, **kw).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(_complete, server, m, p, max_tokens=40) for m, p in work]
        bad_codes = list(pool.map(bad, BAD_REQUESTS))
        texts = [f.result().json()["choices"][0]["text"] for f in good]
    assert bad_codes == [c[3] for c in BAD_REQUESTS]
    assert texts == solo
    assert all(len(t) > 20 for t in texts[:4]), texts


def test_stop_strings_trim_the_text_streamed_or_not(server):
    whole = _complete(server, "alpha", "Once upon a time", max_tokens=40).json()["choices"][0]["text"]
    stop = whole[len(whole) // 2 : len(whole) // 2 + 4]
    cut = whole[: whole.index(stop)]
    body = _complete(server, "alpha", "Once upon a time", max_tokens=40, stop=[stop, "never appears"]).json()
    assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (cut, "stop")
    assert body["usage"]["completion_tokens"] < 40
    chunks = _sse(
        server,
        "/v1/completions",
        {
            "model": "alpha",
            "prompt": "Once upon a time",
            "max_tokens": 40,
            "temperature": 0,
            "stop": stop,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == cut
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_seed_reproduces_sampled_text_alone_and_among_neighbours_and_n_choices(server):
    hot = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 30}
    alone = _complete(server, "beta", "One day, a bird", seed=7, **hot).json()["choices"][0]["text"]
    with cf.ThreadPoolExecutor(5) as pool:
        noise = [pool.submit(_complete, server, m, p, **hot) for m, p in zip(["alpha", "beta", "stories260k"], PROMPTS)]
        again = pool.submit(_complete, server, "beta", "One day, a bird", seed=7, **hot)
        assert again.result().json()["choices"][0]["text"] == alone
        [f.result() for f in noise]
    assert _complete(server, "beta", "One day, a bird", seed=8, **hot).json()["choices"][0]["text"] != alone
    many = _complete(server, "beta", "One day, a bird", seed=7, n=3, **hot).json()
    texts = [c["text"] for c in many["choices"]]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2] and texts[0] == alone and len(set(texts)) == 3
    assert (
        many["usage"]["prompt_tokens"] == _complete(server, "beta", "One day, a bird").json()["usage"]["prompt_tokens"]
    )
    assert many["usage"]["completion_tokens"] >= 3 * 1


def _health(url):
    return httpx.get(f"{url}/health", timeout=30).json()


def test_a_disconnected_stream_leaves_the_engine_within_a_few_steps(server):
    body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": LIMIT, "temperature": 0}
    full = _complete(server, **{k: body[k] for k in ("model", "prompt")}, max_tokens=LIMIT).json()
    assert full["usage"]["completion_tokens"] == LIMIT, "the test needs a reply that runs to the limit"
    before = _health(server)
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leave mid-stream: the connection is closed here
    deadline = time.time() + 20
    while True:
        after = _health(server)
        if after["running"] == 0:
            break
        assert time.time() < deadline, after
        time.sleep(0.05)
    assert after["finished"].get("cancelled", 0) == before["finished"].get("cancelled", 0) + 1
    assert after["steps"] - before["steps"] < LIMIT  # it did not run to the end
    # Not streamed: a client that gives up (here: its timeout) frees its row too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json={**body, "n": 2}, timeout=httpx.Timeout(60, read=0.05))
    deadline = time.time() + 20
    while (
        _health(server)["running"]
        or _health(server)["finished"].get("cancelled", 0) < after["finished"].get("cancelled", 0) + 2
    ):
        assert time.time() < deadline, _health(server)
        time.sleep(0.05)


def test_auth_on_every_route_before_the_body_is_read(server):
    url, key = f"{server}/secure", {"Authorization": "Bearer sekrit"}
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    calls = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/chat/completions", {**chat, "stream": True}),
    ]
    for method, path, body in calls:
        assert httpx.request(method, f"{url}{path}", json=body, timeout=30).status_code == 401, path
        wrong = httpx.request(
            method, f"{url}{path}", json=body, headers={"Authorization": "Bearer sekrit2"}, timeout=30
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.request(method, f"{url}{path}", json=body, headers=key, timeout=30).status_code == 200, path
    # Unauthenticated and far too large: 401, the body never parsed.
    huge = b'{"model": "alpha", "prompt": "' + b"x" * 200_000 + b'"}'
    assert httpx.post(f"{url}/v1/completions", content=huge, timeout=30).status_code == 401
    too_big = httpx.post(f"{url}/v1/completions", content=huge, headers=key, timeout=30)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
    chunked = httpx.post(
        f"{url}/v1/completions",
        content=iter([huge[i : i + 8192] for i in range(0, len(huge), 8192)]),
        headers={**key, "content-type": "application/json"},
        timeout=30,
    )  # no Content-Length
    assert chunked.status_code == 413, chunked.text
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{url}{path}", headers=key, timeout=30).status_code == 404
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 404
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"  # probes carry no key


def test_rows_beyond_the_engines_bound_get_503_with_retry_after(server):
    # `secure` holds one running and one waiting row. (Serve itself queues requests beyond
    # max_ongoing_requests = running + waiting, so the engine's bound is met by rows, e.g. n > 1.)
    url, key = f"{server}/secure", {"Authorization": "Bearer sekrit"}
    body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    busy = httpx.post(f"{url}/v1/completions", json={**body, "n": 3}, headers=key, timeout=60)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["type"] == "server_error"
    assert _health(url)["waiting"] == 0  # the rows it had queued were withdrawn
    assert httpx.post(f"{url}/v1/completions", json={**body, "n": 2}, headers=key, timeout=60).status_code == 200


def test_killed_replica_is_replaced_and_requests_succeed(server):
    import ray

    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::llama#")
    ]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.time() + 90
    while True:
        try:
            r = httpx.post(
                f"{server}/v1/completions", json={"model": "alpha", "prompt": "Once", "max_tokens": 4}, timeout=30
            )
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the killed replica was not replaced within 90 s"
        time.sleep(1)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::llama#")
    ]
    assert names and replicas[0]["name"] not in names
