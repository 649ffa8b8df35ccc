"""The OpenAI-compatible request and response shapes, and how chat becomes an Alpaca prompt."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from adapter.prompts import format_prompt

class CompletionRequest(BaseModel):
    # Clients send fields we do not use (user, n=1, ...); accept them rather than fail.
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = None
    # None: the server's configured default (ServeConfig.sampling).
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stream: StrictBool = False
    seed: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    # None: the server's configured default (ServeConfig.sampling).
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stream: StrictBool = False
    seed: StrictInt | None = None


def render_chat(messages: list[ChatMessage]) -> str:
    """The last user message is the Alpaca instruction; system text and earlier turns, if any,
    become its input (Alpaca has no multi-turn format of its own)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ValueError("messages must contain at least one message with role 'user'")
    last = users[-1]
    context = [f"{m.role}: {m.content}" if m.role != "system" else m.content for m in messages[:last]]
    return format_prompt(messages[last].content, "\n".join(context))


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, index: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
