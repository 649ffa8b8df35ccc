"""The OpenAI-compatible request and response shapes, and how chat becomes an Alpaca prompt.

Every field is checked where it is parsed: numbers must be finite (NaN, Infinity and integers too
large for a float are refused), text must be encodable (a lone surrogate such as "\\ud800" is
refused before it reaches the tokenizer). Fields this server does not implement are refused by
name unless they hold OpenAI's no-op value (`unsupported_parameters`): nothing is silently ignored.
Sampling fields left out are None and take the server's configured defaults.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from adapter.prompts import format_prompt


def _finite(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError("number is too large") from None
    if not math.isfinite(f):
        raise ValueError("must be a finite number (not NaN or Infinity)")
    return f


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return s


Number = Annotated[float, BeforeValidator(_finite)]
Text = Annotated[StrictStr, AfterValidator(_encodable)]

# Fields we accept only at the value that changes nothing (OpenAI's default), else 400 naming them.
NO_OP_VALUES = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None,),
    "store": (None, False),
    "service_tier": (None, "auto"),
}
HARMLESS = {"user", "metadata"}  # identify the caller; they do not change the output


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Text
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def unsupported_parameters(self) -> list[str]:
        bad = []
        for key, value in (self.model_extra or {}).items():
            if key in HARMLESS:
                continue
            if key not in NO_OP_VALUES or not any(
                value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in NO_OP_VALUES[key]
            ):
                bad.append(key)
        return sorted(bad)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Text | list[Text]


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Text
    detail: Literal["auto", "low", "high"] | None = None  # accepted: one global feature either way


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        return (
            [] if isinstance(self.content, str) else [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        )


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


def render_chat(messages: list[ChatMessage], template: str = "alpaca") -> str:
    """The prompt for a chat. "alpaca": the last user message is the Alpaca instruction; system
    text and earlier turns, if any, become its input (Alpaca has no multi-turn format of its own).
    "raw": the last user message as it is (ScienceQA adapters were trained on their own
    "Question: ... Answer:" text, not on the template)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ValueError("messages must contain at least one message with role 'user'")
    last = users[-1]
    if template == "raw":
        return messages[last].text()
    context = [f"{m.role}: {m.text()}" if m.role != "system" else m.text() for m in messages[:last]]
    return format_prompt(messages[last].text(), "\n".join(context))


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a base model's own chat template takes them (text parts joined)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


def chat_image(messages: list[ChatMessage]) -> str | None:
    """The request's one image URL, if any: the adapter conditions on one image per prompt
    (docs/multimodal.md), so more than one, or one outside a user message, is refused."""
    found = [(m.role, url) for m in messages for url in m.image_urls()]
    if len(found) > 1:
        raise ValueError(f"this server takes one image per request; the messages hold {len(found)}")
    if found and found[0][0] != "user":
        raise ValueError(f"an image must be in a user message, not in a {found[0][0]!r} message")
    return found[0][1] if found else None


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(texts)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(
    rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
            for i, (t, f) in enumerate(texts)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, index: int = 0) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with `stream_options: {include_usage: true}` (empty choices)."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
