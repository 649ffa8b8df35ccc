"""Images in chat requests: an OpenAI `image_url` content part carrying a `data:` URI.

Only inline images are taken. A server that fetched `http(s)://` URLs on a client's behalf would
reach whatever its network reaches (internal services, cloud metadata endpoints) and wait on
whoever answers slowly, so remote URLs are refused with a 400 that says how to send the image
instead. The bytes are size-checked before they are decoded, and decoding itself refuses
decompression bombs and truncated files (`adapter.image_encoder.decode_image`).
"""

from __future__ import annotations

import base64
import binascii
import re

DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


class ImageRequestError(ValueError):
    """The request's image cannot be used; the message says why (answered with a 400)."""


def image_bytes(url: str, max_bytes: int) -> bytes:
    """The image inside a `data:image/...;base64,...` URI, at most `max_bytes` once decoded."""
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://")):
        raise ImageRequestError(
            "remote image URLs are not fetched by this server: send the image inline as a "
            "data URI (data:image/png;base64,...)"
        )
    m = DATA_URI.match(url)
    if m is None:
        raise ImageRequestError("image_url.url must be a data URI (data:image/png;base64,...)")
    if not (m["mime"] or "").lower().startswith("image/"):
        raise ImageRequestError(f"image_url data URI has media type {m['mime'] or 'text/plain'!r}, not image/*")
    if not m["b64"]:
        raise ImageRequestError("image_url data URI must be base64-encoded (data:image/png;base64,...)")
    payload = url[m.end() :]
    # A base64 text of n characters holds at most 3n/4 bytes: refuse before decoding anything.
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise ImageRequestError(f"image is larger than this server's limit of {max_bytes:,} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRequestError("image_url data URI is not valid base64") from None
    if not data:
        raise ImageRequestError("image_url data URI holds no image")
    if len(data) > max_bytes:
        raise ImageRequestError(
            f"image of {len(data):,} bytes is larger than this server's limit of {max_bytes:,} bytes"
        )
    return data
