"""Image bytes -> an RGB PIL image, for the multimodal adapter (METHOD.md section 7). No torch here:
serving runs this module alone in small child processes (serve/image_worker.py).

Two ways to decode. `decode_image(data)` is the lenient one the data pipelines have always used:
any format Pillow opens, a pixel and aspect bound. `decode_image(data, limits)` is the strict one
for bytes from people who may be hostile (docs/serving-images.md):

- only the formats in `limits.formats` (PNG, JPEG, WebP, GIF's first frame), told from the bytes
  and never from a name or a media type, so EPS (Ghostscript), TIFF, ICO, PCX, DDS... never reach
  a decoder;
- the file's structure is walked BEFORE anything is decoded (`check_image`): size from the header
  within `max_pixels` and 20:1, a JPEG's scans counted from its markers (each progressive scan is
  one more pass over every block: 3,000 empty scans in 180 KB cost 13 CPU-seconds), frames
  counted, every PNG chunk's CRC checked and its image data inflated to exactly the size the
  header says (zlib's own checksum included): this walk costs one pass over the bytes;
- the decoder's warnings are errors: JPEG through libjpeg-turbo's TurboJPEG API in strict mode
  (simplejpeg), which stops at the first warning (a 64x48 JPEG whose header says 6000x6000, a
  broken progression, a premature end); Pillow, which silences libjpeg's warnings, decodes the
  other formats with Python warnings raised as errors.

Both give the same pixels for a valid file (tests/test_image_decode.py compares them on the
coco-mini images and on every JPEG layout Pillow writes), so an adapter sees the same image in
training and in serving.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

MAX_IMAGE_PIXELS = 40_000_000  # the lenient path's bound: a decompression bomb is refused, not decoded
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_ASPECT_RATIO = 20  # longer side / shorter side; COCO's most elongated images are about 6:1
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class ImageError(ValueError):
    """An image that cannot be used (unreadable, corrupt, too large); the message says which."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost (the Serve config's image limits; serve/serve_config.py has the defaults)."""

    max_pixels: int
    max_jpeg_scans: int
    max_frames: int
    max_aspect_ratio: int = MAX_ASPECT_RATIO
    formats: tuple[str, ...] = ACCEPTED_FORMATS


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    frames: int = 1
    scans: int = 1


def accepted(formats: tuple[str, ...]) -> str:
    return ", ".join("GIF (first frame)" if f == "GIF" else "WebP" if f == "WEBP" else f for f in formats)


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's first bytes (its signature), among the accepted ones; else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def accepted_format(data: bytes, formats: tuple[str, ...]) -> str:
    """The image's format if it is one of `formats` (from its signature), else ImageError naming them."""
    if not data:
        raise ImageError("empty image")
    fmt = sniff_format(data)
    if fmt is None or fmt not in formats:
        raise ImageError(f"not an accepted image format: send {accepted(formats)}")
    return fmt


def check_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """The image's format, size and work (frames, scans) from its structure, or ImageError; decodes nothing."""
    fmt = accepted_format(data, limits.formats)
    try:
        info = {"PNG": _png, "JPEG": _jpeg, "GIF": _gif, "WEBP": _webp}[fmt](data, limits)
    except (struct.error, IndexError):
        raise ImageError(f"{_name(fmt)} is truncated") from None
    _check_size(info.width, info.height, limits.max_pixels, limits.max_aspect_ratio)
    if info.frames > limits.max_frames:
        raise ImageError(f"{_name(fmt)} has {info.frames:,} frames, over this server's limit of {limits.max_frames:,}")
    return info


def decode_image(data: bytes, limits: ImageLimits | None = None):
    """Bytes -> an RGB PIL image, or ImageError naming the problem. With `limits`: the strict path above."""
    if limits is None:
        return _decode_lenient(data)
    info = check_image(data, limits)
    if info.format == "JPEG":
        return _decode_jpeg(data, info)
    from PIL import Image

    try:
        with warnings.catch_warnings():  # what Pillow only warns about (bad EXIF, odd chunks) refuses the image
            warnings.simplefilter("error")
            img = Image.open(io.BytesIO(data), formats=[info.format])
            if img.width > info.width or img.height > info.height:
                raise ImageError(f"{_name(info.format)} is inconsistent: its size changed while decoding")
            return img.convert("RGB")  # the first frame only; decodes fully, so truncation fails here
    except (ImageError, MemoryError):
        raise
    except Exception as e:
        raise ImageError(f"{_name(info.format)} is corrupt: {_reason(e)}") from None


def shortest_edge_size(width: int, height: int, edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `edge`: transformers' size rule for CLIP's
    `shortest_edge` resize (`get_resize_output_image_size`, default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (edge, new_long) if width <= height else (new_long, edge)


def shrink_for_encoder(img, edge: int, resample: int):
    """The resize CLIP's preprocessing does first, done early: the processor then resizes an image
    already at its size (a copy), so features are those of the full image (tested) while only the
    small one leaves the decoding process."""
    size = shortest_edge_size(img.width, img.height, edge)
    return img if size == img.size else img.resize(size, resample=resample)


# --- the lenient path (data pipelines) ----------------------------------------------------------


def _decode_lenient(data: bytes):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image of {len(data):,} bytes is over the {MAX_IMAGE_BYTES:,}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
        _check_size(img.width, img.height, MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO)
        return img.convert("RGB")  # decodes fully: a truncated file fails here, not later
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image ({type(e).__name__}: {_reason(e)})") from None


def _check_size(width: int, height: int, max_pixels: int, max_aspect: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image of {width}x{height} pixels is empty")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels is over the {max_pixels:,}-pixel limit")
    # Preprocessing scales the SHORT side to the model's size: a 1 x 1,000,000 strip (a few KB)
    # would become a 224 x 224,000,000 image before the crop.
    if max(width, height) > max_aspect * min(width, height):
        raise ImageError(f"image of {width}x{height} pixels is more than {max_aspect}:1")


def _name(fmt: str) -> str:
    return "WebP" if fmt == "WEBP" else fmt


def _reason(e: Exception) -> str:
    """An exception's message without Python object reprs (`<_io.BytesIO object at 0x...>`)."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image", str(e)).strip()
    return text or type(e).__name__


# --- JPEG ---------------------------------------------------------------------------------------

_SOF_ACCEPTED = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic
# The end of a scan's entropy-coded data: 0xFF, any fill 0xFF bytes, then a byte that is not a
# stuffed zero or a restart marker (RST0-7 sit inside the data).
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def _jpeg(data: bytes, limits: ImageLimits) -> ImageInfo:
    pos, frame, scans = 2, None, 0
    while True:
        if data[pos] != 0xFF:
            raise ImageError(f"JPEG is corrupt: no marker at byte {pos:,}")
        while data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI; what follows (an MPF second image, a gain map) is never decoded
            break
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            raise ImageError(f"JPEG is corrupt: marker 0x{marker:02X} out of place at byte {pos:,}")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise ImageError("JPEG is truncated")
        if marker in _SOF_OTHER:
            raise ImageError("JPEG uses lossless, hierarchical or arithmetic coding, which is not accepted")
        if marker in _SOF_ACCEPTED:
            if frame is not None:
                raise ImageError("JPEG is corrupt: two frame headers")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            if precision != 8:
                raise ImageError(f"JPEG of {precision}-bit samples is not accepted (8-bit only)")
            if components not in (1, 3):
                raise ImageError(f"JPEG with {components} colour components (CMYK?) is not accepted: send RGB")
            frame = (width, height)
        elif marker == 0xDA:  # SOS: the scan's header, then its entropy-coded data up to the next marker
            if frame is None:
                raise ImageError("JPEG is corrupt: a scan before the frame header")
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise ImageError(
                    f"JPEG has more than {limits.max_jpeg_scans} scans (this server's limit; "
                    "an ordinary progressive JPEG has about 10)"
                )
            m = _NEXT_MARKER.search(data, end)
            if m is None:
                raise ImageError("JPEG is truncated: it ends inside a scan")
            end = m.end() - 2
        pos = end
    if frame is None or scans == 0:
        raise ImageError("JPEG has no image data")
    return ImageInfo("JPEG", frame[0], frame[1], scans=scans)


def _decode_jpeg(data: bytes, info: ImageInfo):
    import simplejpeg
    from PIL import Image

    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except MemoryError:
        raise
    except Exception as e:
        if "Insufficient memory" in str(e):  # libjpeg's own allocation failed
            raise MemoryError from None
        raise ImageError(f"JPEG is corrupt: {_reason(e)}") from None
    if pixels.shape[:2] != (info.height, info.width):
        raise ImageError("JPEG is inconsistent: its size changed while decoding")
    return Image.fromarray(pixels, "RGB")


# --- PNG ----------------------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png(data: bytes, limits: ImageLimits) -> ImageInfo:
    pos, header, idat, frames, seen_iend, in_idat, after_idat = 8, None, [], 0, False, False, False
    while not seen_iend:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if length > 2**31 - 1 or body_end + 4 > len(data):
            raise ImageError("PNG is truncated")
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(data[pos + 4 : body_end]) != crc:
            raise ImageError(f"PNG is corrupt: the checksum of its {kind.decode('latin-1')!r} chunk is wrong")
        body = data[pos + 8 : body_end]
        if header is None and kind != b"IHDR":
            raise ImageError("PNG is corrupt: it does not start with its header chunk")
        if kind == b"IHDR":
            if header is not None or length != 13:
                raise ImageError("PNG is corrupt: bad header chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            if after_idat:
                raise ImageError("PNG is corrupt: its image data is split by other chunks")
            idat.append(body)
            in_idat = True
        elif kind == b"acTL":
            (frames,) = struct.unpack_from(">I", body)
        elif kind == b"IEND":
            seen_iend = True
        after_idat = after_idat or (in_idat and kind != b"IDAT")
        pos = body_end + 4
    width, height, depth, colour, compression, filtering, interlace = header
    if colour not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[colour] or compression or filtering or interlace > 1:
        raise ImageError("PNG is corrupt: impossible header values")
    if not idat:
        raise ImageError("PNG has no image data")
    if frames > limits.max_frames:
        raise ImageError(f"PNG has {frames:,} frames, over this server's limit of {limits.max_frames:,}")
    _check_size(width, height, limits.max_pixels, limits.max_aspect_ratio)
    _inflate_exactly(idat, _png_raw_size(width, height, depth * _PNG_CHANNELS[colour], interlace))
    return ImageInfo("PNG", width, height, frames=max(frames, 1))


def _png_raw_size(width: int, height: int, bits: int, interlace: int) -> int:
    """Bytes of filtered scanlines the header promises (one filter byte per line, per Adam7 pass)."""
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            total += h * (1 + (w * bits + 7) // 8)
    return total


def _inflate_exactly(chunks: list[bytes], expected: int) -> None:
    """Inflate the image data without keeping it: exactly `expected` bytes and a complete zlib stream
    (whose Adler-32 zlib checks); Pillow stops reading once it has its pixels and checks neither."""
    z, total = zlib.decompressobj(), 0
    try:
        for chunk in chunks:
            while chunk:
                total += len(z.decompress(chunk, 1 << 20))
                chunk = z.unconsumed_tail
                if total > expected:
                    raise ImageError("PNG is inconsistent: more image data than its header says")
        total += len(z.flush())
    except zlib.error:
        raise ImageError("PNG is corrupt: its compressed image data is broken") from None
    if not z.eof or total != expected or z.unused_data:
        raise ImageError("PNG is inconsistent: its image data does not match its header (truncated?)")


# --- GIF ----------------------------------------------------------------------------------------


def _gif(data: bytes, limits: ImageLimits) -> ImageInfo:
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames, canvas_w, canvas_h = 0, width, height
    while True:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # an image: descriptor, optional colour table, LZW code size, sub-blocks
            left, top, w, h, fflags = struct.unpack_from("<HHHHB", data, pos + 1)
            if w == 0 or h == 0:
                raise ImageError("GIF is corrupt: a frame of zero size")
            frames += 1
            if frames > limits.max_frames:
                raise ImageError(f"GIF has more than {limits.max_frames:,} frames (this server's limit)")
            # Pillow grows the canvas to hold a frame that sticks out of it.
            canvas_w, canvas_h = max(canvas_w, left + w), max(canvas_h, top + h)
            pos += 10 + (3 << ((fflags & 7) + 1) if fflags & 0x80 else 0)
            if not 1 <= data[pos] <= 11:
                raise ImageError("GIF is corrupt: bad LZW code size")
            pos = _gif_sub_blocks(data, pos + 1)
        else:
            raise ImageError(f"GIF is corrupt: unexpected byte 0x{block:02X} at {pos:,}")
    if frames == 0:
        raise ImageError("GIF has no image")
    return ImageInfo("GIF", canvas_w, canvas_h, frames=frames)


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    while data[pos]:
        pos += 1 + data[pos]
    if pos >= len(data):
        raise IndexError
    return pos + 1


# --- WebP ---------------------------------------------------------------------------------------


def _webp(data: bytes, limits: ImageLimits) -> ImageInfo:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 > len(data):
        raise ImageError("WebP is truncated")
    end, pos, size, frames = riff_size + 8, 12, None, 0
    while pos < end:
        kind, length = struct.unpack_from("<4sI", data, pos)
        body = pos + 8
        if body + length > end:
            raise ImageError("WebP is truncated")
        if kind == b"VP8X" and pos == 12:
            w1, h1 = (
                int.from_bytes(data[body + 4 : body + 7], "little"),
                int.from_bytes(data[body + 7 : body + 10], "little"),
            )
            size = (w1 + 1, h1 + 1)
        elif kind == b"VP8 " and size is None:
            if data[body + 3 : body + 6] != b"\x9d\x01\x2a":
                raise ImageError("WebP is corrupt: bad VP8 frame header")
            w, h = struct.unpack_from("<HH", data, body + 6)
            size = (w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L" and size is None:
            if data[body] != 0x2F:
                raise ImageError("WebP is corrupt: bad lossless header")
            bits = int.from_bytes(data[body + 1 : body + 5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"ANMF":
            frames += 1
            if frames > limits.max_frames:
                raise ImageError(f"WebP has more than {limits.max_frames:,} frames (this server's limit)")
        pos = body + length + (length & 1)
    if size is None:
        raise ImageError("WebP has no image")
    return ImageInfo("WEBP", size[0], size[1], frames=max(frames, 1))
