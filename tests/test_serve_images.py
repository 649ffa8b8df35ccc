"""Images in chat requests, without a server: data URIs, content parts, one image per request."""

from __future__ import annotations

import base64

import pytest

from serve.api import ChatRequest, chat_image, render_chat
from serve.images import ImageRequestError, image_bytes


def uri(data: bytes, head: str = "data:image/png;base64,") -> str:
    return head + base64.b64encode(data).decode()


def test_a_data_uri_gives_its_bytes():
    assert image_bytes(uri(b"\x89PNG..."), 100) == b"\x89PNG..."
    assert image_bytes(uri(b"x", "data:image/jpeg;name=a.jpg;base64,"), 100) == b"x"


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://example.com/a.png", "remote image URLs are not fetched"),
        ("HTTP://169.254.169.254/latest", "remote image URLs are not fetched"),
        ("file:///etc/passwd", "remote image URLs are not fetched"),
        ("/etc/passwd", "must be a data URI"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:text/plain;base64,aGk=", "not image/*"),
        ("data:;base64,aGk=", "not image/*"),
        ("data:image/png;base64,a b", "not valid base64"),
        ("data:image/png;base64,", "holds no image"),
        (uri(b"\0" * 101), "larger than this server's limit of 100 bytes"),
        ("data:image/png;base64," + "A" * 10**6, "larger than this server's limit"),  # refused before decoding
    ],
)
def test_bad_image_urls_are_refused_by_reason(url, message):
    with pytest.raises(ImageRequestError, match=message):
        image_bytes(url, 100)


def chat(*contents) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": r, "content": c} for r, c in contents]})


def test_content_parts_render_as_text_and_yield_the_one_image():
    req = chat(
        ("system", "be brief"),
        (
            "user",
            [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                {"type": "text", "text": "this."},
            ],
        ),
    )
    assert chat_image(req.messages) == "data:image/png;base64,AA=="
    assert render_chat(req.messages) == render_chat(chat(("system", "be brief"), ("user", "Describe\nthis.")).messages)
    assert render_chat(req.messages, "raw") == "Describe\nthis."
    assert chat_image(chat(("user", "plain text")).messages) is None


def test_more_than_one_image_or_one_outside_a_user_message_is_refused():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    with pytest.raises(ValueError, match="one image per request"):
        chat_image(chat(("user", [part]), ("assistant", "ok"), ("user", [part])).messages)
    with pytest.raises(ValueError, match="must be in a user message"):
        chat_image(chat(("system", [part]), ("user", "hi")).messages)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "input_audio", "input_audio": {}}],
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "extreme"}}],
        [{"type": "text"}],
        [{"type": "text", "text": "\ud800"}],
    ],
)
def test_malformed_content_parts_fail_validation(content):
    with pytest.raises(ValueError):
        chat(("user", content))


def test_an_extreme_strip_is_refused_before_preprocessing_blows_it_up():
    """A 1 x 5000 PNG is ~100 bytes; resized to a 224-pixel short side it would be 224 x 1,120,000."""
    import io

    from PIL import Image

    from adapter.image_encoder import ImageError, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (1, 5000)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="more than 20:1"):
        decode_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (640, 100)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).size == (640, 100)  # 6.4:1, a panorama, is fine
