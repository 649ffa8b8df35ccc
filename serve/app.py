"""Ray Serve application: one frozen base per replica, many adapters, an OpenAI-compatible API.

    serve run serve/config.yaml                      # or: serve deploy serve/config.yaml
    serve run serve.app:build_app model.base=DIR model.tokenizer=FILE adapters=DIR

Routes (no `from __future__ import annotations` here: FastAPI must see real types): POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health. The request's `model` names an adapter from
the adapter root, or the base model by its configured name. Every bad request gets a 4xx with an
OpenAI-shaped error body; an API key is enforced when `api_key_env` names a set variable.
"""


import asyncio
import json
import logging
import os
import time

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from adapter.adapter_file import AdapterFileError
from adapter.generation import SamplingParams
from adapter.loader import load_model
from adapter.settings import project_path
from adapter.tokenizer import Tokenizer
from serve.adapters import AdapterStore, InvalidAdapterName, UnknownAdapter
from serve.api import (ChatRequest, CompletionRequest, chat_chunk, chat_response, completion_chunk,
                       completion_response, error_body, new_id, render_chat)
from serve.config import ServeConfig, serve_config
from serve.engine import BatchingEngine

log = logging.getLogger("ray.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


app = FastAPI(title="LLaMA-Adapter", description="OpenAI-compatible completions for a LLaMA and its adapters")


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    type_ = "authentication_error" if e.status == 401 else "invalid_request_error"
    return JSONResponse(error_body(e.message, type_, e.param, e.code), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return JSONResponse(error_body("request body is not valid JSON", code="invalid_json"), status_code=400)
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(x) for x in first if x != "body") or None
    return JSONResponse(error_body("; ".join(parts), param=param), status_code=400)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)


def resolved_paths(cfg: ServeConfig) -> dict[str, str | None]:
    """Where the config's relative paths point (adapter.settings.project_path: the project root)."""
    return {"model.base": project_path(cfg.model.base), "model.tokenizer": project_path(cfg.model.tokenizer),
            "adapters": project_path(cfg.adapters)}


def incremental_text(tok: Tokenizer, tokens: list[int], sent: str) -> str:
    """New text since `sent`; holds back a partial UTF-8 character until it is complete."""
    text = tok.decode(tokens)
    if text.endswith("\ufffd") or not text.startswith(sent):
        return ""
    return text[len(sent):]


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# Replica counts and autoscaling: only in the Serve YAML's `deployments:` section.
@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class AdapterServer:
    def __init__(self, config: dict):
        cfg = ServeConfig.model_validate(config)
        self.cfg = cfg
        log.info("LLaMA-Adapter replica config: %s; paths: %s", cfg.model_dump_json(), resolved_paths(cfg))
        # Auto device: cuda only when Ray reserved a GPU for this replica (never an unreserved GPU 0).
        loaded = load_model(cfg.model, device=cfg.model.device or ("cuda" if ray.get_gpu_ids() else "cpu"))
        log.info("LLaMA-Adapter replica: %s on %s (%s)", loaded.note, loaded.device, loaded.dtype)
        self.base, self.tok = loaded.base, loaded.tokenizer
        self.adapters = AdapterStore(resolved_paths(cfg)["adapters"], self.base, cfg.max_loaded_adapters,
                                     cfg.max_adapter_bytes)
        self.engine = BatchingEngine(self.base, self.tok.eos_id, cfg.max_batch_size, cfg.batch_wait_ms / 1000)
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def check_health(self) -> None:
        task = self.engine.task
        if task is not None and task.done():
            raise RuntimeError(f"batching loop stopped: {task.exception()!r}")

    # --- request checks -------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def _sampling(self, max_tokens: int | None, temperature: float | None, top_p: float | None) -> SamplingParams:
        """A request's sampling settings; what it leaves out comes from the config's `sampling`."""
        default = self.cfg.sampling
        if max_tokens is None:
            max_tokens = min(default.max_gen_len, self.cfg.max_tokens_limit)
        temperature = default.temperature if temperature is None else temperature
        top_p = default.top_p if top_p is None else top_p
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of "
                                f"{self.cfg.max_tokens_limit}", "max_tokens")
        if temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        return SamplingParams(max_gen_len=max_tokens, temperature=float(temperature), top_p=float(top_p))

    async def _prefixes(self, model: str):
        if model == self.cfg.base_name:
            return None
        try:
            return await asyncio.to_thread(self.adapters.get, model)
        except InvalidAdapterName as e:
            raise ApiError(400, str(e), "model", "invalid_model_name") from None
        except UnknownAdapter:
            raise ApiError(404, f"model {model!r} not found; GET /v1/models lists what is served",
                           "model", "model_not_found") from None
        except AdapterFileError as e:
            raise ApiError(500, f"adapter {model!r} could not be loaded: {e}", "model") from None

    def _encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, bos=True)
        ctx = self.base.args.max_seq_len
        if len(ids) >= ctx:
            raise ApiError(400, f"prompt is {len(ids)} tokens; the model's context is {ctx} tokens",
                           "prompt", "context_length_exceeded")
        return ids

    # --- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok", "batches_run": self.engine.batches_run}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        names = [self.cfg.base_name] + await asyncio.to_thread(self.adapters.available)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "llama-adapter",
             "loaded": n == self.cfg.base_name or n in self.adapters.loaded} for n in names]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > self.cfg.max_prompts_per_request:
            raise ApiError(400, f"prompt must be a string or a list of 1 to "
                                f"{self.cfg.max_prompts_per_request} strings", "prompt")
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "stream supports a single prompt per request", "prompt")
        params = self._sampling(body.max_tokens, body.temperature, body.top_p)
        encoded = [self._encode(p) for p in prompts]
        prefixes = await self._prefixes(body.model)
        jobs = [await self.engine.submit(ids, prefixes, params) for ids in encoded]
        rid = new_id("cmpl")
        if body.stream:
            return StreamingResponse(self._stream(jobs[0], rid, body.model, chat=False),
                                     media_type="text/event-stream")
        for job in jobs:
            async for _ in self.engine.stream(job):
                pass
        texts = [(self.tok.decode(j.tokens), j.finish_reason) for j in jobs]
        resp = completion_response(rid, body.model, texts, sum(map(len, encoded)), sum(len(j.tokens) for j in jobs))
        return JSONResponse(resp, headers={"x-batch-size": ",".join(str(j.batch_size) for j in jobs)})

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._authorize(request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._sampling(max_tokens, body.temperature, body.top_p)
        try:
            prompt = render_chat(body.messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = self._encode(prompt)
        prefixes = await self._prefixes(body.model)
        job = await self.engine.submit(ids, prefixes, params)
        rid = new_id("chatcmpl")
        if body.stream:
            return StreamingResponse(self._stream(job, rid, body.model, chat=True), media_type="text/event-stream")
        async for _ in self.engine.stream(job):
            pass
        resp = chat_response(rid, body.model, self.tok.decode(job.tokens), job.finish_reason, len(ids), len(job.tokens))
        return JSONResponse(resp, headers={"x-batch-size": str(job.batch_size)})

    async def _stream(self, job, rid: str, model: str, chat: bool):
        sent = ""
        if chat:
            yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        try:
            async for _ in self.engine.stream(job):
                delta = incremental_text(self.tok, job.tokens, sent)
                if delta:
                    sent += delta
                    yield sse(chat_chunk(rid, model, {"content": delta}, None) if chat
                              else completion_chunk(rid, model, delta, None))
        except Exception as e:  # headers are gone: report in-band, as OpenAI does
            yield sse(error_body(f"generation failed: {e}", "server_error"))
            return
        tail = self.tok.decode(job.tokens)[len(sent):]
        yield sse(chat_chunk(rid, model, {"content": tail} if tail else {}, job.finish_reason) if chat
                  else completion_chunk(rid, model, tail, job.finish_reason))
        yield "data: [DONE]\n\n"


def build_app(args: dict) -> serve.Application:
    """`import_path` of serve/config.yaml and serve/local.yaml, or on the command line:
    `serve run serve.app:build_app model.base=DIR model.tokenizer=FILE adapters=runs` (see serve/config.py)."""
    cfg = serve_config(args)
    return deployment_for(cfg).bind(cfg.model_dump(mode="json"))


def deployment_for(cfg: ServeConfig) -> serve.Deployment:
    """Options that follow from the config (the Serve YAML's `deployments:` still overrides them):
    a replica takes as many requests as its engine holds rows (running + waiting), and asks Ray for
    a GPU when the model's device is cuda (else replicas would all land, unreserved, on GPU 0)."""
    options = {"max_ongoing_requests": cfg.max_batch_size + cfg.max_waiting}
    if (cfg.model.device or "").startswith("cuda"):
        options["ray_actor_options"] = {"num_gpus": 1}
    return AdapterServer.options(**options)
