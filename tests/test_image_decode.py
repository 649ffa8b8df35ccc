"""Strict image decoding (adapter/image_decode.py) and its child processes (serve/image_worker.py),
without a server: each hostile file of issue #24 is refused by what is wrong with it, valid files
decode to the same pixels as the lenient path, and the child's CPU, memory and life are bounded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from adapter.image_decode import ImageError, ImageLimits, check_image, decode_image, shrink_for_encoder
from serve.image_worker import ENDED_BY_CPU_LIMIT, LENGTH, ImageDecoders, WorkerSpec, cpu_limit_message
from tests.conftest import SHARED_DATA
from tests.hostile_images import (
    encode,
    lying_jpeg,
    many_scan_jpeg,
    other_formats,
    png_bad_crc,
    png_bad_zlib,
    progressive_bomb,
)

LIMITS = ImageLimits(max_pixels=25_000_000, max_jpeg_scans=100, max_frames=50)


def photo(size=(123, 77)) -> Image.Image:
    """Not flat: gradients in every channel, so subsampling and IDCT differences would show."""
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8), "RGB")


def _frame(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (4 * i, 0, 0))


def _cut(data: bytes) -> bytes:
    return data[: len(data) * 3 // 4]


HOSTILE = {
    "3,000-scan progressive bomb": (lambda: progressive_bomb(6000, 3000), "more than 100 scans"),
    "progression repeated under the scan limit": (lambda: progressive_bomb(2000, 60), "Inconsistent progression"),
    "64x48 JPEG claiming 6000x6000": (lambda: lying_jpeg(6000, 4000), "premature end of data segment"),
    "JPEG cut short": (lambda: _cut(encode(photo(), "JPEG")), "JPEG is truncated"),
    "JPEG cut short, EOI added": (lambda: _cut(encode(photo(), "JPEG")) + b"\xff\xd9", "premature end"),
    "PNG with a wrong checksum": (png_bad_crc, "checksum of its 'IDAT' chunk is wrong"),
    "PNG with broken zlib data": (png_bad_zlib, "compressed image data is broken"),
    "PNG cut short": (lambda: encode(photo(), "PNG")[:-30], "PNG is truncated"),
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (16, 16)), "JPEG"), "CMYK"),
    "GIF cut short": (lambda: encode(photo(), "GIF")[:-40], "GIF is truncated"),
    "WebP cut short": (lambda: encode(photo(), "WEBP")[:-20], "WebP is truncated"),
    "too many pixels": (lambda: encode(Image.new("L", (6000, 5000)), "PNG"), "over the 25,000,000-pixel limit"),
    "too many frames": (
        lambda: encode(_frame(0), "GIF", save_all=True, append_images=[_frame(i) for i in range(1, 60)]),
        "more than 50 frames",
    ),
    **{
        name: (lambda d=d: d, "not an accepted image format: send PNG, JPEG, WebP, GIF (first frame)")
        for name, d in other_formats().items()
    },
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_image_is_refused_by_what_is_wrong_with_it(name):
    make, message = HOSTILE[name]
    data = make()
    start = time.process_time()
    with pytest.raises(ImageError) as e:
        decode_image(data, LIMITS)
    assert message in str(e.value), str(e.value)
    assert " at 0x" not in str(e.value) and "<" not in str(e.value)  # no Python object reprs
    print(f"\n[measured] {name}: {len(data):,} bytes refused after {time.process_time() - start:.3f} CPU-s")


def test_the_bomb_is_refused_from_its_markers_before_any_decoding():
    start = time.process_time()
    with pytest.raises(ImageError, match="more than 100 scans"):
        check_image(progressive_bomb(6000, 3000), LIMITS)
    assert time.process_time() - start < 1.0  # one pass over 318 KB; decoding it costs ~13 CPU-seconds


def test_a_valid_progressive_jpeg_with_many_scans_decodes_and_its_scans_are_counted():
    data = many_scan_jpeg(64, 48, ac_bits=2, coefficients=10)
    assert check_image(data, LIMITS).scans == 31
    assert decode_image(data, LIMITS).getextrema() == ((128, 128),) * 3
    with pytest.raises(ImageError, match="more than 30 scans"):
        decode_image(data, ImageLimits(25_000_000, 30, 50))


def _layouts() -> dict[str, bytes]:
    img = photo()
    frames = [photo((50, 40)).rotate(90 * i) for i in range(3)]
    return {
        "JPEG 4:2:0": encode(img, "JPEG", quality=85),
        "JPEG 4:4:4": encode(img, "JPEG", quality=95, subsampling=0),
        "JPEG progressive": encode(img, "JPEG", progressive=True),
        "JPEG grayscale": encode(img.convert("L"), "JPEG"),
        "PNG RGB": encode(img, "PNG"),
        "PNG RGBA interlaced": encode(img.convert("RGBA"), "PNG", interlace=1),
        "PNG palette": encode(img.convert("P"), "PNG"),
        "PNG 16-bit gray": encode(img.convert("I;16"), "PNG"),
        "GIF animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "WebP lossy": encode(img, "WEBP"),
        "WebP lossless": encode(img, "WEBP", lossless=True),
        "WebP animated": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "PNG animated": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_strict_decoding_gives_the_pixels_training_sees(name):
    data = _layouts()[name]
    strict, lenient = decode_image(data, LIMITS), decode_image(data)
    assert strict.mode == "RGB" and strict.size == lenient.size
    assert np.array_equal(np.asarray(strict), np.asarray(lenient))


def test_strict_decoding_gives_the_same_pixels_on_coco_mini():
    files = sorted((SHARED_DATA / "coco-mini").glob("*2017/*.jpg"))
    if not files:
        pytest.skip(f"shared data {SHARED_DATA / 'coco-mini'} is missing")
    for f in files:
        data = f.read_bytes()
        assert np.array_equal(np.asarray(decode_image(data, LIMITS)), np.asarray(decode_image(data))), f.name


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 777), (225, 224), (224, 224), (100, 80), (4000, 201)])
def test_shrinking_early_gives_the_processors_own_pixels(size):
    """The worker sends the image at the processor's first resize: the processor (transformers, the
    oracle) must then produce exactly what it produces from the full image."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    img = photo(size)
    for edge in (224, 32):
        proc = Processor(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge})
        small = shrink_for_encoder(img, edge, int(proc.resample))
        assert min(small.size) == edge
        full = proc(images=[img], return_tensors="np")["pixel_values"]
        assert np.array_equal(proc(images=[small], return_tensors="np")["pixel_values"], full), (size, edge)


# --- the child processes ------------------------------------------------------------------------


def _spec(**kw) -> WorkerSpec:
    return WorkerSpec(
        **{
            "limits": ImageLimits(25_000_000, 1000, 50),
            "cpu_seconds": 2,
            "memory_bytes": 512 * 2**20,
            "shrink": (224, 3),
            **kw,
        }
    )


def _decoders() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "serve.image_worker" in " ".join(p.cmdline())]


def test_the_child_refuses_by_memory_and_lives_on():
    async def run():
        pool = ImageDecoders(1, _spec(memory_bytes=48 * 2**20))
        try:
            ok = encode(photo((640, 480)), "JPEG")
            assert (await pool.decode(ok)).size == (298, 224)
            first = pool.idle[0].proc.pid
            with pytest.raises(ImageError, match="needs more than this server's 48 MiB"):
                await pool.decode(encode(Image.new("RGB", (4000, 4000)), "PNG"))  # 16M pixels: ~128 MB
            assert (await pool.decode(ok)).size == (298, 224) and pool.idle[0].proc.pid == first
        finally:
            await pool.close()

    asyncio.run(run())
    assert not _decoders()


def test_the_child_is_ended_by_its_cpu_limit_and_replaced():
    async def run():
        pool = ImageDecoders(1, _spec())
        try:
            start = time.perf_counter()
            with pytest.raises(ImageError, match="needs more than this server's 2 CPU-seconds"):
                await pool.decode(many_scan_jpeg(5000, 5000))  # valid, ~5 CPU-seconds
            print(f"\n[measured] CPU-limited decode ended after {time.perf_counter() - start:.1f} s wall")
            assert (await pool.decode(encode(photo((640, 480)), "JPEG"))).size == (298, 224)  # a new child
        finally:
            await pool.close()

    asyncio.run(run())
    assert not _decoders()


def test_the_child_says_it_was_ended_by_its_cpu_limit_before_it_exits():
    """The reply, not the exit status, names the CPU limit: a child's exit status can be lost to
    whatever else reaps children in the replica's process (seen in CI as returncode 255)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "serve.image_worker", _spec().to_json()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    data = many_scan_jpeg(5000, 5000)  # valid, ~5 CPU-seconds
    try:
        out, _ = child.communicate(LENGTH.pack(len(data)) + data, timeout=60)
    finally:
        child.kill()
    (n,) = LENGTH.unpack(out[: LENGTH.size])
    reply = json.loads(out[LENGTH.size : LENGTH.size + n])
    assert reply == {"error": cpu_limit_message(2), "ended": True}
    assert out[LENGTH.size + n :] == LENGTH.pack(0)  # an empty payload, and nothing after it
    assert child.returncode == ENDED_BY_CPU_LIMIT  # ended by its own watch, before the kernel's SIGXCPU


def test_a_cancelled_decode_is_killed_before_its_slot_is_free():
    async def run():
        pool = ImageDecoders(2, _spec(cpu_seconds=30))
        try:
            slow = many_scan_jpeg(5000, 5000)
            tasks = [asyncio.ensure_future(pool.decode(slow)) for _ in range(3)]
            await asyncio.sleep(1.0)
            busy = _decoders()
            assert len(busy) == 2  # the third waits for a slot
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not _decoders() and not any(p.is_running() and p.status() != "zombie" for p in busy)
            assert pool.slots._value == 2  # every slot back, and only once its child was gone
            assert (await pool.decode(encode(photo(), "PNG"))).size == (357, 224)
        finally:
            await pool.close()

    asyncio.run(run())
    assert not _decoders()
