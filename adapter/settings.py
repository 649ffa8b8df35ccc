"""One config system for every job and app: typed sections (pydantic), loaded from YAML,
overridden with `--set section.key=value`, and saved resolved beside what the job writes.

It lives in `adapter/` because both `pipelines/` (the jobs) and `serve/` (the app) import it,
`serve/` must never import `pipelines/`, and `adapter/` is what both already build on; it needs
no Ray. Sections are composed from `adapter/`'s own types (`AdapterConfig`, `SamplingParams`),
never from copies of their fields and defaults. Unknown keys are errors: a typo in a YAML file
must not silently fall back to a default.

Relative paths in a config resolve against the *project root* (`project_root()`), which is where
the user started the job, also when Ray runs it from a temporary copy (`ray job submit
--working-dir .`): see `project_root` for the rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter.adapter import AdapterConfig

ROOT_ENV = "LLAMA_ADAPTER_ROOT"
DISTRIBUTION = "llama-adapter-ray"
# Where Ray unpacks a job's or app's `working_dir` (…/runtime_resources/working_dir_files/_ray_pkg_…).
RAY_WORKING_DIR_MARK = "working_dir_files"


PATH_MARK = "project_path"  # json_schema_extra key of fields that hold a path


def PathField(default=..., model_name: bool = False, **kwargs):  # noqa: N802 - used like pydantic's Field
    """A config field holding a path: `with_project_paths` resolves it by the project-root rule.
    `model_name`: the field may also hold a catalogue name (adapter/models.py), left as it is."""
    return Field(default, json_schema_extra={PATH_MARK: "model" if model_name else True}, **kwargs)


def looks_like_model_name(value: str) -> bool:
    """A bare name (no folder, no suffix) that is not a path under the project root: what a model
    catalogue name looks like. adapter.models.resolve_model decides what it really is."""
    return "/" not in value and not Path(value).suffix and not (project_root() / value).exists()


class InputError(Exception):
    """Something the user supplied (a file, a model name, a URL) is missing or unusable. The
    command-line entry points print its message on one line instead of a traceback."""


def run_cli(main, argv: list[str] | None = None):
    """Run a job's `main`; an InputError (or a missing file) ends it with one line and exit code 2."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(Section):
    """Where the frozen base and its tokenizer come from, and how it is held in memory. `base` and
    `tokenizer` may name a catalogue model (adapter.models.resolve_model fetches it when loaded) or a
    path (made absolute by the project-root rule before workers get the config)."""

    base: str | None = PathField(
        None,
        model_name=True,
        description="a catalogue model (python -m adapter.models list), a GGUF file, a Meta / Hugging Face "
        "checkpoint folder, or a llama2.c .bin",
    )
    preset: str | None = Field(None, description="random-initialised base of a named shape (last resort)")
    tokenizer: str | None = PathField(
        None,
        model_name=True,
        description="tokenizer.model (SentencePiece), tokenizer.json or a .gguf; unset: the base's own "
        "(a GGUF file, or a folder holding tokenizer.json / tokenizer.model)",
    )
    context: int | None = Field(
        None,
        ge=1,
        description="cap the base's context in tokens (unset: the base's own, 8192 for SmolLM2); a Serve "
        "replica pre-allocates max_batch_size x context of KV cache",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="frozen weights; auto: bfloat16 on GPU, float32 on CPU (adapters stay float32)"
    )
    device: str | None = Field(None, description="auto: cuda when available, else cpu")
    quantize: Literal["none", "int8", "int4"] = Field(
        "none",
        description="hold the frozen blocks' linear layers in int8 (LLM.int8) or int4 (NF4); see adapter/quantize.py",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.base is None and self.preset is None:
            raise ValueError("model needs `base` (a checkpoint) or `preset`")
        return self


class ModelConfig(ModelSource):
    """The base plus the shape of the adapter trained on it."""

    adapter: AdapterConfig = AdapterConfig()


# --- loading --------------------------------------------------------------------------------------
C = TypeVar("C", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse_value(text: str):
    """`--set` values are YAML scalars: 3, 0.5, true, null, [1, 2], or a string."""
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str] | dict) -> dict:
    """`a.b.c=value` items (or a {dotted key: value} dict) written into nested `data`."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p} is not a section")
        node[leaf] = value
    return data


def _split(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    return key, parse_value(value)


def resolve_config_path(name: str | Path) -> Path:
    """`configs/tiny-cpu.yaml`, `tiny-cpu.yaml` and `tiny-cpu` all name the same preset file."""
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config {str(name)!r} not found (looked in . and {CONFIG_DIR})")


def load_config(
    cls: type[C], path: str | Path | None, overrides: list[str] | dict = (), ignore: set[str] = frozenset()
) -> C:
    """`ignore`: top-level sections that belong to another job reading the same file."""
    data = {}
    if path is not None:
        data = yaml.safe_load(resolve_config_path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file holds a mapping of sections, not {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return cls.model_validate({k: v for k, v in data.items() if k not in ignore})


def save_config(config: BaseModel, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def add_config_args(ap: argparse.ArgumentParser, default: str | None) -> None:
    """The same two flags on every job: a YAML file (or preset name) and `--set` overrides."""
    ap.add_argument("--config", default=default, help=f"YAML file or preset name in configs/ (default {default})")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.epochs=1 (repeatable)",
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(cls: type[C], a: argparse.Namespace, ignore: set[str] = frozenset()) -> C:
    cfg = load_config(cls, a.config, a.overrides, ignore)
    if a.print_config:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        raise SystemExit(0)
    return cfg


# --- paths ----------------------------------------------------------------------------------------
def in_ray_working_dir(cwd: Path | None = None) -> bool:
    """True inside Ray's unpacked copy of a `working_dir` (`ray job submit --working-dir .`)."""
    return RAY_WORKING_DIR_MARK in Path(cwd or Path.cwd()).parts


def _editable_source() -> Path | None:
    """The folder this project was `pip install -e`'d from, if it was (PEP 610 direct_url.json)."""
    # Several may be found (a source tree's own *.egg-info on sys.path): the installed one says.
    for dist in metadata.distributions(name=DISTRIBUTION):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            path = Path(unquote(urlparse(info["url"]).path))
            if path.is_dir():
                return path
    return None


def project_root() -> Path:
    """What relative paths in configs resolve against.

    1. `$LLAMA_ADAPTER_ROOT` when set;
    2. inside Ray's temporary copy of a working dir: the folder the project is installed from
       (`pip install -e .`, which is the folder users submit from); the copy itself never holds
       outputs (it vanishes with the job);
    3. otherwise the current directory.
    """
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if in_ray_working_dir():
        source = _editable_source()
        if source is None:
            raise RuntimeError(
                "this job runs in Ray's temporary copy of its working dir, and relative paths there "
                f"would read and write inside that copy: set {ROOT_ENV} (e.g. --runtime-env-json "
                f'\'{{"env_vars": {{"{ROOT_ENV}": "/path/to/project"}}}}\') or use absolute paths'
            )
        return source
    return Path.cwd()


def project_path(p: str | None) -> str | None:
    """An absolute path for `p` (URIs and absolute paths unchanged; `~` expanded)."""
    if p is None or "://" in p:
        return p
    path = Path(p).expanduser()
    if path.is_absolute():
        return str(path)
    return str((project_root() / path).resolve())


def with_project_paths(cfg: C) -> C:
    """A copy of a config with every `PathField` of every nested section absolute. Workers and
    actors do not share the driver's working directory, so jobs hand them these copies; one walk
    over the schema instead of a hand-kept list of path fields."""
    updates = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        mark = field.json_schema_extra.get(PATH_MARK) if isinstance(field.json_schema_extra, dict) else None
        if mark:
            if isinstance(value, str) and not (mark == "model" and looks_like_model_name(value)):
                updates[name] = project_path(value)
        elif isinstance(value, BaseModel):
            resolved = with_project_paths(value)
            if resolved is not value:
                updates[name] = resolved
    return cfg.model_copy(update=updates) if updates else cfg
