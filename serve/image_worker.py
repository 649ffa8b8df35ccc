"""Image decoding in child processes, so that what an image costs is bounded and can be stopped.

A decoder is C code: a thread running it cannot be interrupted, and a request cancelled while its
decode thread runs would free its slot while the thread goes on (three decodes at once under a
limit of two, 19 CPU-seconds burnt for clients long gone). So each replica keeps at most
`max_concurrent_images` small child processes (`python -m serve.image_worker`: PIL, simplejpeg and
numpy, no torch: about 30 MB and 0.1 s to start). What bounds them:

- the child itself: a watch thread (the decoders release the GIL while they work) ends the child
  once the image has used `image_cpu_seconds`, after replying that it did; the reply, not the
  exit status, tells the replica why (an exit status can be lost: docs/limits.md);
- the kernel: before each image the child sets its own RLIMIT_CPU one to two seconds past the
  watch's limit (SIGXCPU ends it there, should a decoder ever hold the GIL) and, once, RLIMIT_AS to
  `image_memory_bytes` beyond its size at start (an allocation past that fails: a 400, and the
  child lives on);
- the replica: a request whose client leaves (Serve cancels its handler) SIGKILLs the child that
  decodes its image and waits for it to be gone before the slot is free again; a request still
  waiting for a slot just leaves the queue. A wall-clock bound kills a child that stops answering.

The child runs `adapter.image_decode.decode_image` with the server's limits (docs/serving-images.md)
and sends back the image already at the size CLIP's preprocessing resizes it to (about 224 pixels
on the short side), so a 40M-pixel photo never lands in the replica's memory.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapter.image_decode import ImageError, ImageLimits, decode_image, shrink_for_encoder

LENGTH = struct.Struct(">I")
ROOT = Path(__file__).resolve().parents[1]
WATCH_S = 0.05  # how often the watch thread reads the child's CPU time while an image decodes
ENDED_BY_CPU_LIMIT = 3  # the child's exit code after its watch ended it


def cpu_limit_message(seconds: int) -> str:
    return f"image needs more than this server's {seconds} CPU-seconds to decode"


@dataclass(frozen=True)
class WorkerSpec:
    """What a child needs to know: the limits, and CLIP's first resize (None: send the full image)."""

    limits: ImageLimits
    cpu_seconds: int
    memory_bytes: int
    shrink: tuple[int, int] | None  # (shortest edge, PIL resample filter)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        d = json.loads(text)
        limits = ImageLimits(**{**d["limits"], "formats": tuple(d["limits"]["formats"])})
        return cls(limits, d["cpu_seconds"], d["memory_bytes"], tuple(d["shrink"]) if d["shrink"] else None)


# --- the child ----------------------------------------------------------------------------------


def _cpu_used() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _preload() -> None:
    """Import every decoder now, so the memory limit counts images and not libraries."""
    import numpy  # noqa: F401
    import simplejpeg  # noqa: F401
    from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

    Image.init()


def _write(stdout, reply: dict, payload: bytes) -> None:
    header = json.dumps(reply).encode()
    stdout.write(LENGTH.pack(len(header)) + header + LENGTH.pack(len(payload)) + payload)
    stdout.flush()


class CpuWatch:
    """Ends this child once the image being decoded has used `seconds` of CPU, after writing the
    reply that says so (`ended: true`). One lock orders that reply and the decode's own: whichever
    comes first is the only one written."""

    def __init__(self, seconds: int, stdout):
        self.seconds, self.stdout = seconds, stdout
        self.ended = {"error": cpu_limit_message(seconds), "ended": True}
        self.lock = threading.Lock()
        self.busy = threading.Event()
        self.deadline: float | None = None
        threading.Thread(target=self._watch, daemon=True, name="cpu-watch").start()

    def start(self) -> None:
        """Before each image: the watch's deadline, and the kernel's backstop (RLIMIT_CPU) one to two
        seconds past it. Only the soft limit moves: a process can never raise a hard limit it lowered."""
        with self.lock:
            self.deadline = _cpu_used() + self.seconds
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(self.deadline) + 1, hard))
            self.busy.set()

    def reply(self, reply: dict, payload: bytes) -> None:
        with self.lock:
            self.deadline = None
            self.busy.clear()
            _write(self.stdout, reply, payload)

    def _watch(self) -> None:
        while True:
            self.busy.wait()
            time.sleep(WATCH_S)
            with self.lock:
                if self.deadline is not None and _cpu_used() > self.deadline:
                    try:
                        _write(self.stdout, self.ended, b"")
                    finally:  # replied or not (a closed pipe), the child ends here
                        os._exit(ENDED_BY_CPU_LIMIT)


def serve_requests(spec: WorkerSpec, stdin, stdout) -> None:
    """Length-prefixed image bytes in; a length-prefixed JSON header and the RGB bytes out."""
    _preload()
    watch = CpuWatch(spec.cpu_seconds, stdout)  # its thread's stack exists before the memory limit
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a child ended by SIGXCPU leaves no core file
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + spec.memory_bytes, hard))
    mib = spec.memory_bytes // 2**20
    while True:
        head = stdin.read(LENGTH.size)
        if len(head) < LENGTH.size:
            return  # the replica closed our stdin (or is gone): nothing more to do
        data = stdin.read(LENGTH.unpack(head)[0])
        watch.start()
        payload = b""
        try:
            img = decode_image(data, spec.limits)
            if spec.shrink is not None:
                img = shrink_for_encoder(img, *spec.shrink)
            payload = img.tobytes()
            reply = {"width": img.width, "height": img.height}
            del img
        except ImageError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"image needs more than this server's {mib} MiB to decode"}
        watch.reply(reply, payload)


def main() -> None:
    spec = WorkerSpec.from_json(sys.argv[1])
    serve_requests(spec, sys.stdin.buffer, sys.stdout.buffer)


# --- the replica's side -------------------------------------------------------------------------


class ChildEnded(Exception):
    """The child replied with an error and ended itself (its CPU limit): it takes no more images."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, spec: WorkerSpec) -> _Worker:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",  # one image, one core: no thread pools (or their address space)
            "OPENBLAS_NUM_THREADS": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serve.image_worker",
            spec.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    async def decode(self, data: bytes):
        from PIL import Image

        self.proc.stdin.write(LENGTH.pack(len(data)) + data)
        await self.proc.stdin.drain()
        read = self.proc.stdout.readexactly
        reply = json.loads(await read(LENGTH.unpack(await read(LENGTH.size))[0]))
        payload = await read(LENGTH.unpack(await read(LENGTH.size))[0])
        if reply.get("ended"):
            raise ChildEnded(reply["error"])
        if "error" in reply:
            raise ImageError(reply["error"])
        return Image.frombytes("RGB", (reply["width"], reply["height"]), payload)

    async def kill(self) -> None:
        """SIGKILL, and return only once the process is gone (its CPU and memory with it)."""
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.shield(self.proc.wait())


class ImageDecoders:
    """At most `size` images decoded at once, each in its own child process (see the module doc)."""

    def __init__(self, size: int, spec: WorkerSpec):
        self.spec = spec
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Worker] = []
        # A wall-clock backstop only: a child under CPU contention takes longer than its CPU time.
        self.timeout_s = 4 * spec.cpu_seconds + 10

    async def decode(self, data: bytes):
        """The RGB image (shrunk for the encoder), or ImageError saying what is wrong with it."""
        async with self.slots:  # a cancelled request waiting here simply leaves the queue
            worker = self.idle.pop() if self.idle else await _Worker.start(self.spec)
            try:
                img = await asyncio.wait_for(worker.decode(data), self.timeout_s)
            except ImageError:
                self.idle.append(worker)
                raise
            except ChildEnded as e:
                await worker.kill()  # collect it
                raise ImageError(str(e)) from None
            except asyncio.TimeoutError:
                await worker.kill()
                raise ImageError(f"image took longer than {self.timeout_s} s to decode") from None
            except (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError):
                await worker.kill()  # already dead: collect its exit status
                raise ImageError(self._death(worker.proc.returncode)) from None
            except BaseException:  # cancelled: the client left. Stop the decode, then free the slot.
                await worker.kill()
                raise
            self.idle.append(worker)
            return img

    def _death(self, returncode: int | None) -> str:
        if returncode == -signal.SIGXCPU:  # the kernel's backstop (the watch replies first)
            return cpu_limit_message(self.spec.cpu_seconds)
        return "image could not be decoded (the decoder stopped on it)"

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().kill()


if __name__ == "__main__":
    main()
