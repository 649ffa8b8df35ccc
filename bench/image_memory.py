"""Suite `image-memory`: what one served image costs in memory, measured where it is decoded.

Each image goes through the replica's real decoding path (`serve.image_worker.ImageDecoders`: a
child process running `adapter.image_decode.decode_image` with the server's limits, then CLIP's
first resize) and the child's peak resident memory (VmHWM) is read from /proc while it is still
alive, minus its peak after a 64x48 image (the child's own baseline). The replica itself only
receives the shrunk image (224 px on the short side: about 0.2 MB). Layouts: the costliest per
format at the pixel limit (progressive 4:4:4 JPEG keeps every coefficient in memory; RGBA PNG is
decoded at 4 bytes a pixel and converted). Also records CPU-seconds (this process's view of the
child) on this machine: a shared 2-core CPU, so they are indicative only.

    PYTHONPATH=. python -m bench.image_memory [--pixels 24000000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import psutil
from PIL import Image

from adapter.image_decode import ImageLimits
from bench.common import RESULTS, bar_chart, write_result
from serve.image_worker import ImageDecoders, WorkerSpec
from serve.serve_config import ServeConfig


def _image(mode: str, size: tuple[int, int]):
    """A smooth gradient (small files; decoding memory does not depend on the content)."""
    w, h = size
    grad = Image.linear_gradient("L").resize((w, h))
    bands = {"L": [grad], "RGB": [grad, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grad], "RGBA": None}
    if mode == "RGBA":
        return Image.merge("RGBA", [*bands["RGB"], grad.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    return Image.merge(mode, bands[mode]) if mode == "RGB" else grad


def _encode(fmt: str, img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cases(pixels: int) -> dict[str, bytes]:
    side_w = int((pixels * 4 / 3) ** 0.5)
    size = (side_w, pixels // side_w)  # 4:3, at the limit
    rgb = _image("RGB", size)
    out = {
        "JPEG baseline 4:2:0": _encode("JPEG", rgb, quality=90),
        "JPEG progressive 4:4:4": _encode("JPEG", rgb, quality=90, progressive=True, subsampling=0),
        "PNG RGB": _encode("PNG", rgb, compress_level=1),
        "PNG RGBA": _encode("PNG", _image("RGBA", size), compress_level=1),
        "WebP lossy": _encode("WEBP", rgb, quality=80, method=0),
        "WebP lossless": _encode("WEBP", rgb, lossless=True, quality=0, method=0),
        "GIF": _encode("GIF", rgb.convert("P")),
    }
    return out, size


async def measure(pixels: int) -> dict:
    # The Serve config's own memory limit: every layout at the pixel limit must decode under it.
    memory = ServeConfig.model_fields["image_memory_bytes"].default
    spec = WorkerSpec(ImageLimits(pixels, 100, 100), cpu_seconds=60, memory_bytes=memory, shrink=(224, 3))
    small = _encode("JPEG", _image("RGB", (64, 48)))
    images, size = cases(pixels)
    rows = {}
    for name, data in images.items():
        pool = ImageDecoders(1, spec)  # a fresh child per case: VmHWM is a high-water mark
        await pool.decode(small)
        child = psutil.Process(pool.idle[0].proc.pid)
        base, base_virtual = _hwm(child.pid), _status(child.pid, "VmSize:")
        cpu0, t0 = sum(child.cpu_times()[:2]), time.perf_counter()
        img = await pool.decode(data)
        rows[name] = {
            "bytes": len(data),
            "peak_mib": round((_hwm(child.pid) - base) / 2**20, 1),
            "peak_address_space_mib": round((_status(child.pid, "VmPeak:") - base_virtual) / 2**20, 1),
            "cpu_s": round(sum(child.cpu_times()[:2]) - cpu0, 2),
            "wall_s": round(time.perf_counter() - t0, 2),
            "sent_to_replica_mib": round(len(img.tobytes()) / 2**20, 2),
        }
        rows[name]["bytes_per_pixel"] = round(rows[name]["peak_mib"] * 2**20 / pixels, 2)
        print(name, rows[name], flush=True)
        await pool.close()
    return {
        "pixels": pixels,
        "size": list(size),
        "memory_limit_mib": memory // 2**20,
        "child_baseline_mib": round(base / 2**20, 1),
        "cases": rows,
    }


def _status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def _hwm(pid: int) -> int:
    return _status(pid, "VmHWM:")


def run(pixels: int = 24_000_000) -> dict:
    result = asyncio.run(measure(pixels))
    worst = max(r["peak_mib"] for r in result["cases"].values())
    result["note"] = (
        f"peak decode memory per image at {pixels:,} pixels: at most {worst:.0f} MiB above the child's "
        f"{result['child_baseline_mib']:.0f} MiB baseline; measured on a shared 2-core CPU (CPU times indicative only)"
    )
    write_result("image-memory", result)
    names = list(result["cases"])
    bar_chart(
        RESULTS / "image-memory.png",
        f"Peak decode memory of one image at {pixels / 1e6:.0f}M pixels (child process)",
        names,
        [result["cases"][n]["peak_mib"] for n in names],
        "MiB above baseline",
    )
    print(result["note"])
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixels", type=int, default=24_000_000)
    run(ap.parse_args().pixels)
