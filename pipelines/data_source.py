"""Where instruction data comes from: a local path or a URL (downloaded once into a cache,
optionally checked against an expected sha256), as a JSON array or JSON Lines.

Records are handed on as raw JSON strings with their index, so that a malformed record can be
validated, counted and set aside downstream instead of breaking the read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

CANONICAL_ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
CANONICAL_ALPACA_SHA256 = "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419"
DEFAULT_CACHE = Path(os.environ.get("LLAMA_ADAPTER_CACHE", Path.home() / ".cache" / "llama-adapter-ray"))


class DataSourceError(RuntimeError):
    """The data cannot be read at all (as opposed to single bad records, which are set aside)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(source: str, sha256: str | None = None, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A local file for `source`: the path itself, or a cached download of the URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https", "file"):
        name = Path(parsed.path).name or "data.json"
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        target = Path(cache_dir) / key / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with urllib.request.urlopen(source, timeout=60) as resp, \
                        tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                    shutil.copyfileobj(resp, tmp)
            except Exception as e:
                raise DataSourceError(f"could not download {source}: {e}") from None
            os.replace(tmp.name, target)
        path = target
    else:
        path = Path(source)
        if not path.is_file():
            raise DataSourceError(f"data file not found: {path}")
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256.lower():
            raise DataSourceError(f"{source}: sha256 {got} does not match the expected {sha256}")
    return path


def read_raw_records(path: Path) -> list[str]:
    """Each record as its raw JSON text (JSON array) or line (JSON Lines), in file order.

    A JSON array that does not parse as a whole is an error: there is no reliable way to say
    which records it held. A JSON Lines file keeps its bad lines, to be rejected one by one.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path} is not a valid JSON array: {e}") from None
        return [json.dumps(r, ensure_ascii=False) for r in records]
    return [line for line in text.splitlines() if line.strip()]
