"""Where a replica finds adapters, and the bounded set it keeps loaded.

The adapter root is a local folder or a URI that pyarrow understands (s3://, gs://, file://).
Each adapter is `<root>/<name>/adapter.safetensors` (the training job's adapter folder) or
`<root>/<name>.safetensors`. A loaded adapter is kept as its per-layer prompt keys/values,
computed once through the frozen base, so a request pays nothing for its adapter after the
first load. The least recently used adapter is evicted past `max_loaded`.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from pyarrow import fs as pafs

from adapter.adapter_file import ADAPTER_FILENAME, load_adapter
from adapter.model import PromptKV, Transformer

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidAdapterName(ValueError):
    pass


class UnknownAdapter(KeyError):
    pass


def check_name(name: str) -> str:
    if "/" in name or "\\" in name or ".." in name or not NAME_PATTERN.match(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (no path separators)")
    return name


class AdapterStore:
    def __init__(self, root: str | None, base: Transformer, max_loaded: int = 8):
        self.base = base
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, dict[int, PromptKV]] = OrderedDict()
        self.lock = threading.Lock()
        self.fs, self.root = (None, None)
        if root:
            self.fs, self.root = pafs.FileSystem.from_uri(root if "://" in root else str(Path(root).resolve()))
        self.cache = Path(tempfile.mkdtemp(prefix="adapters-"))

    def available(self) -> list[str]:
        if self.fs is None:
            return []
        names = set()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            base = info.base_name
            if info.type == pafs.FileType.Directory:
                inner = self.fs.get_file_info(f"{info.path}/{ADAPTER_FILENAME}")
                if inner.type == pafs.FileType.File:
                    names.add(base)
            elif base.endswith(".safetensors"):
                names.add(base[: -len(".safetensors")])
        return sorted(n for n in names if NAME_PATTERN.match(n))

    def _remote_path(self, name: str) -> str | None:
        for cand in (f"{self.root}/{name}/{ADAPTER_FILENAME}", f"{self.root}/{name}.safetensors"):
            if self.fs.get_file_info(cand).type == pafs.FileType.File:
                return cand
        return None

    def get(self, name: str) -> dict[int, PromptKV]:
        """Prefixes for `name`, loading (and evicting) as needed."""
        check_name(name)
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
        remote = self._remote_path(name) if self.fs is not None else None
        if remote is None:
            raise UnknownAdapter(name)
        local = self.cache / f"{name}.safetensors"
        with self.fs.open_input_stream(remote) as src, open(local, "wb") as dst:
            dst.write(src.read())
        w = self.base.tok_embeddings.weight
        prompts = load_adapter(local, self.base.args, device=w.device)
        with torch.no_grad():
            prefixes = prompts.prefixes(self.base)
        with self.lock:
            self.loaded[name] = prefixes
            self.loaded.move_to_end(name)
            while len(self.loaded) > self.max_loaded:
                self.loaded.popitem(last=False)
        return prefixes
