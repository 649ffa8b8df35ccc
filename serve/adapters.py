"""Where a replica finds adapters, and the bounded set it keeps loaded.

The adapter root is a local folder or a URI that pyarrow understands (s3://, gs://, file://).
Adapter `<name>` is the first of `<root>/<name>/adapter/adapter.safetensors` (a training run's
folder: an adapter root of `runs` serves every run), `<root>/<name>/adapter.safetensors` (an
exported adapter folder) and `<root>/<name>.safetensors`. A loaded adapter is kept as its
per-layer prompt keys/values, computed once through the frozen base, so a request pays nothing
for its adapter after the first load; the least recently used one is evicted past `max_loaded`.
A multimodal adapter also keeps its prompts and visual projection: an image request gets its own
keys/values (`LoadedAdapter.prefixes_for_image`), of the same shape as the text ones, so image
and text rows share a batch.

Loading is single-flight (concurrent first requests for a name wait for one load) and copies the
file to a private temp file first, size-capped, then renames it into place: a reader never sees
a half-written file, and a huge or endless remote object cannot fill the disk. Every way a file
can be malformed ends in `AdapterFileError` with a message that names the adapter, never a path
on the server.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from pyarrow import fs as pafs

from adapter.adapter import AdaptionPrompts
from adapter.adapter_file import ADAPTER_FILENAME, AdapterFileError, load_adapter, metadata_of, read_metadata
from adapter.image_encoder import describe_encoder, same_encoder
from adapter.model import Transformer
from adapter.prompts import template_of
from adapter.zero_init import PromptKV

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LAYOUTS = ("{name}/adapter/" + ADAPTER_FILENAME, "{name}/" + ADAPTER_FILENAME, "{name}.safetensors")
CHUNK = 1 << 20
MAX_HEADERS = 4096  # remembered adapter-file headers (for /v1/models) before the memo starts over


@dataclass
class LoadedAdapter:
    """An adapter ready to serve. `image_refusal`: why it cannot take an image here (a text-only
    adapter, no encoder on this server, or another encoder than the one it was trained with), or
    None when it can. `template`: how a chat becomes its prompt (serve.api.render_chat)."""

    prefixes: dict[int, PromptKV]
    prompts: AdaptionPrompts | None  # multimodal adapters only
    template: str
    image_refusal: str | None

    def prefixes_for_image(self, base: Transformer, features: torch.Tensor) -> dict[int, PromptKV]:
        """features: (1, F) from the server's encoder. Blocking: call it off the event loop."""
        with torch.no_grad():
            return self.prompts.prefixes(base, self.prompts.image_tokens(features))


def image_refusal(name: str, vision: dict | None, encoder: dict | None) -> str | None:
    if vision is None:
        return f"model {name!r} is a text-only adapter: it cannot take images"
    if encoder is None:
        return f"model {name!r} takes images, but this server has no image encoder (its config has no `vision:`)"
    if not same_encoder(vision.get("encoder") or {}, encoder):
        return (
            f"model {name!r} was trained with image encoder {describe_encoder(vision.get('encoder') or {})}; "
            f"this server runs {describe_encoder(encoder)}"
        )
    return None


class InvalidAdapterName(ValueError):
    pass


class UnknownAdapter(KeyError):
    pass


def check_name(name: str) -> str:
    if ".." in name or not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (no path separators)"
        )
    return name


class AdapterStore:
    def __init__(
        self,
        root: str | None,
        base: Transformer,
        max_loaded: int = 8,
        max_bytes: int = 256 * 2**20,
        encoder: dict | None = None,
    ):
        """encoder: the identity of this server's image encoder (`ImageEncoder.identity`), if any."""
        self.base, self.encoder = base, encoder
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}  # one lock per name: single-flight loads
        self.loads = 0  # completed loads (single-flight is tested on it)
        self.headers: dict[tuple, dict | None] = {}  # (path, size, mtime) -> the file's vision metadata
        self.fs, self.root = (None, None)
        if root:
            self.fs, self.root = pafs.FileSystem.from_uri(root if "://" in root else str(Path(root).resolve()))
        self.cache = Path(tempfile.mkdtemp(prefix="adapters-"))

    def available(self) -> list[str]:
        if self.fs is None:
            return []
        names = set()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.Directory:
                if NAME_PATTERN.fullmatch(name) and self._remote_path(name) is not None:
                    names.add(name)
            elif name.endswith(".safetensors"):
                names.add(name[: -len(".safetensors")])
        return sorted(n for n in names if NAME_PATTERN.fullmatch(n) and ".." not in n)

    def takes_images(self, name: str) -> bool:
        """For /v1/models: can `name` take an image on this server? Read from its file's header
        (a few KB, remembered while the file's size and mtime stay the same), not by loading it."""
        with self.lock:  # a look, not a use: the LRU order stays as requests made it
            hit = self.loaded.get(name)
        if hit is not None:
            return hit.image_refusal is None
        if self.fs is None or self.encoder is None:
            return False
        try:
            remote = self._remote_path(name)
            info = self.fs.get_file_info(remote) if remote else None
            key = remote and (remote, info.size, info.mtime_ns)
            if key and key not in self.headers:
                if len(self.headers) >= MAX_HEADERS:
                    self.headers.clear()
                vision = None
                if info.size is not None and info.size <= self.max_bytes:
                    with self.fs.open_input_file(remote) as f:
                        vision = metadata_of(f, info.size, name)["vision"]
                self.headers[key] = vision
        except Exception:  # an unreadable file says so when it is asked for; here it just takes no images
            return False
        vision = self.headers.get(key) if key else None
        return vision is not None and image_refusal(name, vision, self.encoder) is None

    def _remote_path(self, name: str) -> str | None:
        for layout in LAYOUTS:
            cand = f"{self.root}/{layout.format(name=name)}"
            if self.fs.get_file_info(cand).type == pafs.FileType.File:
                return cand
        return None

    def _cached(self, name: str) -> LoadedAdapter | None:
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
        return None

    def get(self, name: str) -> LoadedAdapter:
        """Adapter `name`, loading (and evicting) as needed; blocking, call it off the event loop."""
        check_name(name)
        hit = self._cached(name)
        if hit is not None:
            return hit
        remote = self._remote_path(name) if self.fs is not None else None
        if remote is None:
            raise UnknownAdapter(name)
        with self.lock:
            flight = self.loading.setdefault(name, threading.Lock())
        with flight:
            hit = self._cached(name)  # loaded by the request we waited for
            if hit is not None:
                return hit
            adapter = self._load(name, remote)
            with self.lock:
                self.loaded[name] = adapter
                self.loads += 1
                while len(self.loaded) > self.max_loaded:
                    self.loaded.popitem(last=False)
            return adapter

    def _load(self, name: str, remote: str) -> LoadedAdapter:
        local = self._download(name, remote)
        try:
            w = self.base.tok_embeddings.weight
            meta = read_metadata(local)
            prompts = load_adapter(local, self.base.args, device=w.device)
        except AdapterFileError as e:
            raise AdapterFileError(str(e).replace(str(local), f"adapter {name!r}")) from None
        except Exception as e:  # whatever else a malformed file makes a parser raise
            raise AdapterFileError(f"adapter {name!r}: unreadable adapter file ({type(e).__name__})") from None
        finally:
            local.unlink(missing_ok=True)
        if not (torch.isfinite(prompts.prompt).all() and torch.isfinite(prompts.gate).all()):
            raise AdapterFileError(f"adapter {name!r}: its prompt or gate holds NaN or infinite values")
        try:
            template = template_of(meta["extra"])
        except ValueError as e:
            raise AdapterFileError(f"adapter {name!r}: {e}") from None
        refusal = image_refusal(name, meta["vision"], self.encoder)
        with torch.no_grad():
            return LoadedAdapter(prompts.prefixes(self.base), prompts if refusal is None else None, template, refusal)

    def _download(self, name: str, remote: str) -> Path:
        """Copy to a private temp file, at most max_bytes, then rename: never a partial file in place."""
        too_big = AdapterFileError(f"adapter {name!r} is larger than this server's limit of {self.max_bytes} bytes")
        size = self.fs.get_file_info(remote).size
        if size is not None and size > self.max_bytes:
            raise too_big
        fd, tmp = tempfile.mkstemp(dir=self.cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, self.fs.open_input_stream(remote) as src:
                total = 0
                while chunk := src.read(CHUNK):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise too_big
                    dst.write(chunk)
            final = self.cache / f"{name}.{os.getpid()}.{threading.get_ident()}.safetensors"
            os.replace(tmp, final)
            return final
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def close(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
