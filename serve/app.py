"""Ray Serve application: one frozen base per replica, many adapters, an OpenAI-compatible API.

    serve run serve/local.yaml                       # or: serve deploy serve/local.yaml
    serve run serve.app:build_app model.base=DIR model.tokenizer=FILE adapters=DIR

Routes (no `from __future__ import annotations` here: FastAPI must see real types): POST
/v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events), GET
/v1/models, GET /health. The request's `model` names an adapter from the adapter root, or the base
by its configured name. A chat may carry one image (an `image_url` part with a data: URI) for a
multimodal adapter when the config has a `vision:` encoder (serve/images.py). A chat with the base
is rendered with the base's own chat template when it has one (a GGUF's `tokenizer.chat_template`).
Requests join the replica's continuously batched engine as rows, through the engine contract alone
(serve/engine.py's docstring: generate, abort, check, check_health, stats). Everything a request can
get wrong is refused before it joins, with an
OpenAI-shaped 4xx; a full engine answers 503 with Retry-After. The API key and the body limit are
checked before the body is read (serve/guard.py); /docs and /openapi.json are off.

Greedy output of a request does not depend on its batch on CPU in float32 (tested). On a GPU in
bfloat16 the kernels chosen for different batch shapes round differently, so a greedy request can
diverge from its solo run after some tokens; sampling with a seed is reproducible only under the
same condition.
"""

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from adapter.adapter_file import AdapterFileError
from adapter.decoding import SamplingParams
from adapter.image_decode import ImageError, ImageLimits, accepted_format
from adapter.image_encoder import ImageEncoder
from adapter.loader import load_model
from adapter.settings import project_path
from serve.adapters import AdapterStore, InvalidAdapterName, LoadedAdapter, UnknownAdapter
from serve.api import (
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_image,
    chat_messages,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    render_chat,
    usage_chunk,
)
from serve.engine import ContextOverflow, EngineFull, GenerationRequest, RequestOutput
from serve.engine_loop import AsyncEngine
from serve.guard import GuardSettings, RequestGuard, configure
from serve.image_worker import ImageDecoders, WorkerSpec
from serve.images import ImageRequestError, image_bytes
from serve.serve_config import ServeConfig, serve_config
from serve.text import TextStream

log = logging.getLogger("ray.serve")
PLAYGROUND = Path(__file__).with_name("playground.html")
RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_SEED = 2**63


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


app = FastAPI(
    title="LLaMA-Adapter",
    description="OpenAI-compatible completions for a LLaMA and its adapters",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
app.add_middleware(RequestGuard)


def _error_type(status: int) -> str:
    return "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse(
        error_body(e.message, _error_type(e.status), e.param, e.code), status_code=e.status, headers=e.headers
    )


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
    return JSONResponse(error_body(str(e.detail), _error_type(e.status_code)), status_code=e.status_code)


def resolved_paths(cfg: ServeConfig) -> dict[str, str | None]:
    """Where the config's relative paths point (adapter.settings.project_path: the project root)."""
    return {
        "model.base": project_path(cfg.model.base),
        "model.tokenizer": project_path(cfg.model.tokenizer),
        "adapters": project_path(cfg.adapters),
    }


def api_key_from_env(cfg: ServeConfig) -> str | None:
    """The key, from the replica's environment. Named but unset or empty: refuse to start (auth
    must never be silently off); not named: no key required."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise RuntimeError(
            f"api_key_env names {cfg.api_key_env!r}, which is unset or empty in this replica's "
            "environment: refusing to serve without the key (set it where Ray was started, or "
            "remove api_key_env to serve without a key)"
        )
    return key


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# Replica counts and autoscaling: only in the Serve YAML's `deployments:` section.
@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class AdapterServer:
    def __init__(self, config: dict):
        cfg = ServeConfig.model_validate(config)
        self.cfg = cfg
        configure(GuardSettings(api_key_from_env(cfg), cfg.max_body_bytes))
        log.info("LLaMA-Adapter replica config: %s; paths: %s", cfg.model_dump_json(), resolved_paths(cfg))
        # Auto device: cuda only when Ray reserved a GPU for this replica (never an unreserved GPU 0).
        loaded = load_model(cfg.model, device=cfg.model.device or ("cuda" if ray.get_gpu_ids() else "cpu"))
        log.info("LLaMA-Adapter replica: %s on %s (%s)", loaded.note, loaded.device, loaded.dtype)
        self.base, self.tok = loaded.base, loaded.tokenizer
        # Multimodal adapters (docs/multimodal.md): one frozen image encoder per replica, if configured.
        self.encoder = None if cfg.vision is None else ImageEncoder(cfg.vision, loaded.device, loaded.dtype)
        self.image_limits = ImageLimits(cfg.max_image_pixels, cfg.max_jpeg_scans, cfg.max_image_frames)
        if self.encoder is not None:
            spec = WorkerSpec(
                self.image_limits, cfg.image_cpu_seconds, cfg.image_memory_bytes, self.encoder.shrink_rule()
            )
            # Decoding: child processes (serve/image_worker.py). Encoding the shrunk image: threads of
            # its own, so images never queue in the default pool that tokenization waits for.
            self.image_decoders = ImageDecoders(cfg.max_concurrent_images, spec)
            self.image_encoding = ThreadPoolExecutor(cfg.max_concurrent_images, thread_name_prefix="image-encode")
        self.adapters = AdapterStore(
            resolved_paths(cfg)["adapters"],
            self.base,
            cfg.max_loaded_adapters,
            cfg.max_adapter_bytes,
            self.encoder.identity if self.encoder else None,
        )
        self.engine = AsyncEngine.build(
            self.base, self.tok.eos_id, cfg.max_batch_size, cfg.max_waiting, cfg.step_tokens, cfg.compile_decode
        )

    def check_health(self) -> None:
        self.engine.check_health()

    # --- admission: everything a request can get wrong is refused here --------------------------
    def _check_request(self, body, n_prompts: int) -> None:
        bad = body.unsupported_parameters()
        if bad:
            raise ApiError(
                400, f"parameter(s) not supported by this server: {', '.join(bad)}", bad[0], "unsupported_parameter"
            )
        if not 1 <= body.n <= self.cfg.max_n:
            raise ApiError(400, f"n must be between 1 and {self.cfg.max_n}, got {body.n}", "n")
        if body.seed is not None and not 0 <= body.seed < MAX_SEED:
            raise ApiError(400, f"seed must be an integer in [0, 2**63), got {body.seed}", "seed")
        if len(body.stop_list()) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
        if body.stream and (n_prompts != 1 or body.n != 1):
            raise ApiError(400, "stream supports one prompt and n=1 per request", "stream")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")

    def _sampling(self, body, max_tokens: int | None, longest_prompt: int) -> SamplingParams:
        """A request's sampling settings; what it leaves out comes from the config's `sampling`."""
        default, limit = self.cfg.sampling, self.cfg.max_tokens_limit
        if max_tokens is None:  # as much as fits, up to the configured default
            max_tokens = max(1, min(default.max_gen_len, limit, self.engine.context_len - longest_prompt))
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limit}", "max_tokens")
        temperature = default.temperature if body.temperature is None else body.temperature
        top_p = default.top_p if body.top_p is None else body.top_p
        if temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        return SamplingParams(max_gen_len=max_tokens, temperature=temperature, top_p=top_p)

    def _encode_all(self, texts: list[str], param: str) -> list[list[int]]:
        """Runs in a worker thread: tokenizing a long prompt must not stall the event loop."""
        try:
            return [self.tok.encode(t, bos=True) for t in texts]
        except Exception as e:
            raise ApiError(400, f"{param} could not be tokenized ({type(e).__name__})", param) from None

    async def _adapter(self, model: str) -> LoadedAdapter | None:
        """The adapter a request names (None: the base model)."""
        if model == self.cfg.base_name:
            return None
        try:
            return await asyncio.to_thread(self.adapters.get, model)
        except InvalidAdapterName as e:
            raise ApiError(400, str(e), "model", "invalid_model_name") from None
        except UnknownAdapter:
            raise ApiError(
                404, f"model {model!r} not found; GET /v1/models lists what is served", "model", "model_not_found"
            ) from None
        except AdapterFileError as e:
            raise ApiError(500, f"adapter could not be loaded: {e}", "model", "adapter_unloadable") from None

    async def _image_prefixes(self, model: str, adapter: LoadedAdapter | None, url: str):
        """The row's prompt keys/values with this image's token added (docs/multimodal.md): decoded
        in a child process under the image limits, then encoded and projected in a thread of the
        image pool, so neither the engine loop nor tokenization waits on it."""
        if adapter is None:
            raise ApiError(
                400,
                f"model {model!r} is the base model without an adapter: it cannot take images",
                "messages",
                "image_not_supported",
            )
        if adapter.image_refusal is not None:
            raise ApiError(400, adapter.image_refusal, "messages", "image_not_supported")
        try:
            data = image_bytes(url, self.cfg.max_image_bytes)
            accepted_format(data, self.image_limits.formats)  # from the signature: refused without a slot
            image = await self.image_decoders.decode(data)  # a burst waits for a slot instead of filling memory
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.image_encoding, self._encode_image, adapter, image)
        except (ImageRequestError, ImageError) as e:
            raise ApiError(400, f"image: {e}", "messages", "invalid_image") from None
        except Exception as e:  # whatever else an odd image makes the preprocessing raise: still this image's fault
            raise ApiError(
                400, f"image could not be processed ({type(e).__name__})", "messages", "invalid_image"
            ) from None

    def _encode_image(self, adapter: LoadedAdapter, image):
        return adapter.prefixes_for_image(self.base, self.encoder.features([image]))

    async def _admit(self, body, texts: list[str], param: str, max_tokens: int | None, prefixes):
        """Tokenize, check, and queue every row of a request: (prompt token counts, rows), each row
        a (request id, output stream) of the engine."""
        encoded = await asyncio.to_thread(self._encode_all, texts, param)
        params = self._sampling(body, max_tokens, max(len(e) for e in encoded))
        for ids in encoded:
            try:
                self.engine.check(len(ids), params)
            except ContextOverflow as e:
                raise ApiError(400, str(e), param, "context_length_exceeded") from None
        final_only = not (body.stream or body.stop_list())
        rows: list[tuple[str, object]] = []
        try:
            for ids in encoded:
                for j in range(body.n):  # choices of one prompt differ by seed when a seed is given
                    seed = None if body.seed is None else (body.seed + j) % MAX_SEED
                    request = GenerationRequest(ids, params, prefixes, seed, final_only)
                    rows.append((request.request_id, self.engine.generate(request)))
        except EngineFull:
            for rid, _ in rows:
                self.engine.abort(rid)
            raise ApiError(
                503,
                "this replica is at capacity; retry shortly",
                None,
                "overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        return [len(e) for e in encoded], rows

    async def _collect(self, row, stop: list[str]) -> tuple[str, str, RequestOutput]:
        """A row's text, finish reason and last engine output (token ids, batch size)."""
        rid, outputs = row
        text = TextStream(self.tok, stop)
        out = None
        try:
            async for out in outputs:
                text.update(out.token_ids)
                if text.stopped:
                    break
        finally:  # a stop string matched, or an error/disconnect: free the row
            self.engine.abort(rid, "stop" if text.stopped else "cancelled")
        if out.error is not None:
            raise ApiError(500, f"generation failed ({type(out.error).__name__})", code="generation_failed")
        return text.text, "length" if out.finish_reason == "length" and not text.stopped else "stop", out

    async def _complete_all(self, rows, stop: list[str]) -> tuple[list[tuple[str, str]], int, str]:
        """Every row's (text, finish reason), the completion tokens, and the x-batch-size header."""
        try:
            done = await asyncio.gather(*(self._collect(r, stop) for r in rows))
        finally:  # an error or a disconnect: free every row still running
            for rid, _ in rows:
                self.engine.abort(rid)
        tokens = sum(len(out.token_ids) for _, _, out in done)
        return [(t, f) for t, f, _ in done], tokens, ",".join(str(out.batch_size) for _, _, out in done)

    # --- routes ---------------------------------------------------------------------------------
    @app.get("/")
    async def playground(self):
        """The browser playground (serve/playground.html): a static page over this same API."""
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health(self):
        if not self.engine.is_running:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok", **self.engine.stats()}

    @app.get("/v1/models")
    async def models(self):
        names = [self.cfg.base_name] + await asyncio.to_thread(self.adapters.available)
        images = set(await asyncio.to_thread(lambda: [n for n in names[1:] if self.adapters.takes_images(n)]))
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": now,
                    "owned_by": "llama-adapter",
                    "loaded": n == self.cfg.base_name or n in self.adapters.loaded,
                    "multimodal": n != self.cfg.base_name and n in images,
                }
                for n in names
            ],
        }

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > self.cfg.max_prompts_per_request:
            raise ApiError(
                400, f"prompt must be a string or a list of 1 to {self.cfg.max_prompts_per_request} strings", "prompt"
            )
        self._check_request(body, len(prompts))
        adapter = await self._adapter(body.model)
        prompt_tokens, rows = await self._admit(
            body, prompts, "prompt", body.max_tokens, adapter.prefixes if adapter else None
        )
        rid = new_id("cmpl")
        if body.stream:
            return StreamingResponse(
                self._stream(rows[0], rid, body, prompt_tokens[0], chat=False), media_type="text/event-stream"
            )
        texts, completion_tokens, batch_sizes = await self._complete_all(rows, body.stop_list())
        resp = completion_response(rid, body.model, texts, sum(prompt_tokens), completion_tokens)
        return JSONResponse(resp, headers={"x-batch-size": batch_sizes})

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        self._check_request(body, 1)
        adapter = await self._adapter(body.model)
        try:
            image = chat_image(body.messages)
            if adapter is None and self.tok.chat_template is not None:  # the base in its own chat format
                prompt = self.tok.render_chat(chat_messages(body.messages))
            else:  # an adapter keeps the prompt template it was trained with
                prompt = render_chat(body.messages, adapter.template if adapter else "alpaca")
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        prefixes = adapter.prefixes if adapter else None
        if image is not None:
            prefixes = await self._image_prefixes(body.model, adapter, image)
        prompt_tokens, rows = await self._admit(body, [prompt], "messages", max_tokens, prefixes)
        rid = new_id("chatcmpl")
        if body.stream:
            return StreamingResponse(
                self._stream(rows[0], rid, body, prompt_tokens[0], chat=True), media_type="text/event-stream"
            )
        texts, completion_tokens, batch_sizes = await self._complete_all(rows, body.stop_list())
        resp = chat_response(rid, body.model, texts, prompt_tokens[0], completion_tokens)
        return JSONResponse(resp, headers={"x-batch-size": batch_sizes})

    async def _stream(self, row, rid: str, body, prompt_tokens: int, chat: bool):
        model = body.model
        row_id, outputs = row
        text = TextStream(self.tok, body.stop_list())

        def chunk(delta: str, finish: str | None) -> str:
            if chat:
                return sse(chat_chunk(rid, model, {"content": delta} if delta or finish is None else {}, finish))
            return sse(completion_chunk(rid, model, delta, finish))

        try:
            if chat:
                yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
            async for out in outputs:
                delta = text.update(out.token_ids)
                if delta:
                    yield chunk(delta, None)
                if text.stopped:
                    break
            self.engine.abort(row_id, "stop")  # a stop string matched: free the row now
            if out.error is not None:  # headers are gone: report in-band, as OpenAI does
                yield sse(error_body(f"generation failed ({type(out.error).__name__})", "server_error"))
                return
            finish = "length" if out.finish_reason == "length" and not text.stopped else "stop"
            yield chunk(text.finish(), finish)
            if body.stream_options is not None and body.stream_options.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse(usage_chunk(rid, model, obj, prompt_tokens, len(out.token_ids)))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (Serve cancels the handler) or we are done
            self.engine.abort(row_id)


def build_app(args: dict) -> serve.Application:
    """`import_path` of serve/config.yaml and serve/local.yaml, or on the command line:
    `serve run serve.app:build_app model.base=DIR model.tokenizer=FILE adapters=runs` (see serve/serve_config.py)."""
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
