"""sha256 of a file, the one routine for every identity and fingerprint (weights, encoders, data).

Memoized per process while the file's size and mtime stay the same: a training job that rebuilds
its data checks the download, fingerprints it, and the preprocessing job does both again (a
multi-GB file was read four times); a worker names its backbone's weights more than once.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
