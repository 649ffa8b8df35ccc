"""Hostile and costly image files, crafted byte by byte (issue #24's cases), for the decoding tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG segment; a scan's entropy-coded data belongs to its SOS."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        end = i + 2 + struct.unpack_from(">H", data, i + 2)[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, i, end))
        i = end
    return out


def progressive_bomb(size: int = 6000, repeats: int = 3000) -> bytes:
    """A flat progressive JPEG whose last scan is repeated: libjpeg only warns about the scan order
    and runs every repeat over the whole image (3,000 repeats at 6000x6000: 13 CPU-seconds)."""
    data = encode(Image.new("L", (size, size), 128), "JPEG", progressive=True, quality=50)
    _, start, end = [s for s in jpeg_segments(data) if s[0] == 0xDA][-1]
    return data[:end] + data[start:end] * repeats + data[end:]


def lying_jpeg(width: int = 6000, height: int = 6000) -> bytes:
    """A 64x48 JPEG whose frame header claims width x height (libjpeg fills the rest, warning)."""
    data = bytearray(encode(Image.new("RGB", (64, 48), (200, 30, 40)), "JPEG", quality=90))
    (start,) = [s[1] for s in jpeg_segments(bytes(data)) if s[0] == 0xC0]
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


class _Bits:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value: int, length: int) -> None:
        for i in range(length - 1, -1, -1):
            self.acc, self.n = (self.acc << 1) | ((value >> i) & 1), self.n + 1
            if self.n == 8:
                self.out += b"\xff\x00" if self.acc == 0xFF else bytes([self.acc])
                self.acc = self.n = 0

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def many_scan_jpeg(width: int, height: int, ac_bits: int = 13, coefficients: int = 63) -> bytes:
    """A VALID progressive grayscale JPEG of flat gray with 1 + coefficients x (ac_bits + 1) scans:
    one DC scan, then per AC coefficient a first scan and a refinement scan per bit. Each scan is
    a pass over every block, so it is small and slow (5000x5000, 883 scans: ~6 CPU-seconds here)."""
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    out = bytearray(b"\xff\xd8")
    out += _segment(0xDB, b"\x00" + bytes([1] * 64))
    out += _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    # DC table 0: one symbol (difference category 0), code '0'; AC table 0: EOBn (n << 4), 4-bit codes.
    out += _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    out += _segment(0xC4, b"\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(n << 4 for n in range(15)))
    dc = _Bits()
    for _ in range(blocks):
        dc.put(0, 1)
    out += _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + dc.flush()
    eob, left = _Bits(), blocks
    while left:  # every block empty: end-of-band runs of up to 32,767 blocks
        run = min(left, 32767)
        n = run.bit_length() - 1
        eob.put(n, 4)
        eob.put(run - (1 << n), n)
        left -= run
    runs = eob.flush()
    for k in range(1, coefficients + 1):
        out += _segment(0xDA, b"\x01\x01\x00" + bytes([k, k, ac_bits])) + runs
        for al in range(ac_bits - 1, -1, -1):
            out += _segment(0xDA, b"\x01\x01\x00" + bytes([k, k, ((al + 1) << 4) | al])) + runs
    return bytes(out + b"\xff\xd9")


def _png_chunk(data: bytes, kind: bytes) -> tuple[int, int]:
    """(start of the chunk's body, its length)."""
    i = data.index(kind)
    return i + 4, struct.unpack_from(">I", data, i - 4)[0]


def png_bad_crc() -> bytes:
    """A PNG whose image-data checksum is wrong (Pillow does not check it)."""
    data = bytearray(encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    body, length = _png_chunk(bytes(data), b"IDAT")
    data[body + length] ^= 0xFF
    return bytes(data)


def png_bad_zlib() -> bytes:
    """A PNG whose image data is broken zlib under a correct chunk checksum."""
    data = bytearray(encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    body, length = _png_chunk(bytes(data), b"IDAT")
    data[body + length // 2] ^= 0x55
    data[body + length : body + length + 4] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data[body : body + length])))
    return bytes(data)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def other_formats() -> dict[str, bytes]:
    """Formats Pillow opens and users have no reason to send."""
    rgb = Image.new("RGB", (32, 32), (9, 9, 9))
    return {
        "EPS": EPS,
        "TIFF": encode(rgb, "TIFF"),
        "ICO": encode(rgb, "ICO"),
        "PCX": encode(rgb, "PCX"),
        "DDS": encode(rgb.convert("RGBA"), "DDS"),
        "BMP": encode(rgb, "BMP"),
    }
