"""ASGI middleware that runs before any route reads the request body: the API key and the body
size limit. An unauthenticated client never gets its body parsed or validated (a 401 costs the
replica nothing), and a body over the limit is refused with 413 without being buffered whole.

The key is compared in constant time (`hmac.compare_digest`). `/health` stays open so that load
balancers and probes, which carry no key, can reach it; it reveals only counts. So does the
playground page at `/`, a static file that asks the user for the key.

Settings are per replica process: the replica calls `configure` in its constructor (the FastAPI
app object is shared by the class, the settings are not). Until then every request gets 503.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException

# The playground page ("/") holds no data: it asks for the key and sends it with its API calls.
OPEN_PATHS = ("/health", "/")


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None
    max_body_bytes: int


SETTINGS: GuardSettings | None = None


def configure(settings: GuardSettings) -> None:
    global SETTINGS
    SETTINGS = settings


class BodyTooLarge(HTTPException):
    """Raised while the route reads a body without a Content-Length (chunked) past the limit;
    an HTTPException so that FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's limit of {limit} bytes")


def _error(status: int, message: str, type_: str, code: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class RequestGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = SETTINGS
        if settings is None:
            return await _respond(send, *_error(503, "replica is starting", "server_error", "not_ready"))
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers = dict(scope.get("headers") or [])
        if settings.api_key and path not in OPEN_PATHS:
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, b"Bearer " + settings.api_key.encode()):
                return await _respond(
                    send,
                    *_error(
                        401,
                        "missing or invalid API key (send 'Authorization: Bearer <key>')",
                        "authentication_error",
                        "invalid_api_key",
                    ),
                    extra=[(b"www-authenticate", b"Bearer")],
                )
        too_large = _error(
            413,
            f"request body is larger than this server's limit of {settings.max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > settings.max_body_bytes:
            return await _respond(send, *too_large)

        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > settings.max_body_bytes:
                    raise BodyTooLarge(settings.max_body_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _respond(send, *too_large)


async def _respond(send, status: int, body: bytes, extra: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
