"""A base model's own chat template (Jinja, as Hugging Face and llama.cpp ship them), rendered in a
sandbox: the template text comes from a model file, so it may not reach Python internals.

The environment follows what the templates are written for (transformers' `apply_chat_template`):
trim_blocks / lstrip_blocks, loop controls, a `tojson` filter and a `raise_exception` function.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused these messages (its own raise_exception) or could not be rendered."""


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def render_chat_template(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **special_tokens: str
) -> str:
    """`messages`: [{"role": ..., "content": str}, ...]; `special_tokens`: bos_token, eos_token, ...
    as the template refers to them."""
    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
        raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from None
