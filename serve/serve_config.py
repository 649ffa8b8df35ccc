"""The serving app's settings: composed from `adapter/`'s own types, plus what only serving has.

`model:` is the same `ModelSource` the jobs use (loaded by `adapter.loader.load_model`, which
checks the tokenizer against the vocabulary); `sampling:` is a `SamplingParams` whose values are
the defaults of a request that leaves `max_tokens` / `temperature` / `top_p` out. Replica counts
and autoscaling are not here: they live in the Serve YAML's `deployments:` section only.

`build_app` takes the YAML's `args:` as nested mappings, dotted `key=value` arguments from
`serve run serve.app:build_app model.base=... adapters=runs`, and `config=FILE` (a YAML file of
this shape) underneath both. Relative paths resolve with `adapter.settings.project_path`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from adapter.decoding import SamplingParams
from adapter.image_encoder import VisionConfig
from adapter.settings import ModelSource, Section, apply_overrides, load_config, parse_value
from serve.engine import DEFAULT_STEP_TOKENS


class ServeConfig(Section):
    model: ModelSource
    sampling: SamplingParams = Field(
        SamplingParams(max_gen_len=128),
        description="request defaults: max_gen_len is the max_tokens of a request that sends none",
    )
    adapters: str | None = Field(
        None, description="adapter root: a folder (relative: to the project root) or a pyarrow URI (s3://...)"
    )
    base_name: str = Field("base", description="the `model` name that means the base without an adapter")
    max_loaded_adapters: int = Field(8, ge=1, description="adapters kept in memory per replica (LRU)")
    max_adapter_bytes: int = Field(256 * 2**20, ge=1, description="an adapter file larger than this is refused")
    max_batch_size: int = Field(8, ge=1, description="rows decoded together (pre-allocated KV cache slots)")
    max_waiting: int = Field(64, ge=0, description="rows waiting for a slot; beyond that: 503 + Retry-After")
    step_tokens: int = Field(
        DEFAULT_STEP_TOKENS,
        ge=2,
        description="tokens one engine step may process: one per decoding row, the rest for chunks of "
        "prompts being prefilled (smaller: steadier inter-token latency while long prompts arrive; "
        "larger: prompts enter faster). Must be above max_batch_size",
    )
    compile_decode: bool = Field(
        False,
        description="torch.compile the decode step (one graph per batch-size bucket, compiled at replica "
        "start: seconds on stories260K, ~100 s on SmolLM2 for buckets 1-8; needs a C++ compiler). Pays "
        "where a step is overhead, not weight reads: docs/serving-performance.md",
    )
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_prompts_per_request: int = Field(8, ge=1)
    max_n: int = Field(4, ge=1, description="largest `n` (choices per prompt) a request may ask for")
    max_body_bytes: int = Field(
        2**20,
        ge=1,
        description="larger request bodies get 413 (an inline image counts: base64 is 4/3 of the image's bytes)",
    )
    vision: VisionConfig | None = Field(
        None,
        description="the image encoder multimodal adapters were trained with (the training config's "
        "`vision:`); without it, adapters answer text only",
    )
    max_concurrent_images: int = Field(
        2,
        ge=1,
        description="images decoded at once per replica, each in its own child process (serve/image_worker.py); "
        "more wait. Memory for images: at most this x (image_memory_bytes + ~40 MiB per child); the replica "
        "itself keeps ~0.2 MB per image (docs/serving-images.md)",
    )
    max_image_bytes: int = Field(
        4 * 2**20,
        ge=1,
        description="a larger image (decoded bytes) gets 400; the "
        "body limit applies first (raise max_body_bytes to "
        "about 4/3 of this to take such images)",
    )
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="width x height from the image's header; larger: 400 before decoding. Measured peak "
        "decoding memory per image (bench/image_memory.py): 7 bytes a pixel (baseline JPEG) to 9 "
        "(progressive 4:4:4 JPEG), 8 (PNG), 16-18 (WebP): ~430 MiB at this default",
    )
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        description="scans of a JPEG, counted from its markers before decoding: each progressive scan is one "
        "more pass over the whole image (an ordinary progressive JPEG has about 10)",
    )
    max_image_frames: int = Field(
        1000,
        ge=1,
        description="frames of an animated GIF / WebP / PNG, counted before decoding (only the first is decoded)",
    )
    image_cpu_seconds: int = Field(
        5,
        ge=1,
        description="CPU-seconds one image may take to decode and shrink (RLIMIT_CPU of its child process); "
        "past that: 400. A 25M-pixel image took 0.3-1 s here",
    )
    image_memory_bytes: int = Field(
        512 * 2**20,
        ge=2**20,
        description="address space one decoding child may add (RLIMIT_AS); past that: 400. Must hold an "
        "image at max_image_pixels (see there: ~430 MiB at the defaults)",
    )
    api_key_env: str | None = Field(
        None,
        description="name of the environment variable holding the API key; the replica refuses to "
        "start when it is named but unset or empty. None: no key required",
    )

    @model_validator(mode="after")
    def _budget_above_batch(self) -> ServeConfig:
        if self.step_tokens <= self.max_batch_size:
            raise ValueError(
                f"step_tokens ({self.step_tokens}) must be above max_batch_size ({self.max_batch_size}): "
                "each decoding row takes one token of a step and prompts need the rest"
            )
        return self


def serve_config(args: dict) -> ServeConfig:
    """The config from `build_app`'s args: `config=FILE` first, then nested and dotted keys.

    Dotted keys come from the `serve run` command line, where every value is a string: they are
    read as YAML scalars (`max_n=2` is an int, `api_key_env=null` is None), like `--set` in jobs.
    """
    args = dict(args)
    path = args.pop("config", None)
    dotted = {k: parse_value(v) if isinstance(v, str) else v for k, v in args.items() if "." in k}
    plain = {k: v for k, v in args.items() if "." not in k}
    if path is None:
        return ServeConfig.model_validate(apply_overrides(plain, dotted))
    base = load_config(ServeConfig, path).model_dump()
    return ServeConfig.model_validate(apply_overrides(_merge(base, plain), dotted))


def _merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into
