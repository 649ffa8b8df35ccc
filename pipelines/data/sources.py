"""Where instruction data comes from, resolved to a list of files without reading any record.

A source is one file, a folder (every data file under it, recursively), a glob
(`shards/*.jsonl`, `s3://bucket/data/*.parquet`) or any URI pyarrow opens (`s3://`, `gs://`,
`hdfs://`, ...). An http(s)/file URL names one file, downloaded once into a cache and optionally
checked against an expected sha256 (a download that fails the check is removed from the cache,
so the next run downloads it again instead of failing on the same bytes).

Only the listing happens here (on the driver); the files are read by Ray Data's read tasks
(`pipelines/records_reader.py`).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from adapter.hashing import sha256_of
from adapter.models import cache_root
from adapter.settings import InputError

CANONICAL_ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
CANONICAL_ALPACA_SHA256 = "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419"
DEFAULT_CACHE = cache_root()  # downloaded data beside the fetched models (adapter/models.py)
DOWNLOAD_SCHEMES = ("http", "https", "file")
# What a folder or glob contributes: JSON (array or lines) and parquet, optionally compressed.
DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq")
COMPRESSED_SUFFIXES = ("", ".gz", ".bz2", ".zst", ".lz4")


class DataSourceError(InputError, RuntimeError):
    """The data cannot be read at all (as opposed to single bad records, which are set aside)."""


@dataclass(frozen=True)
class Source:
    """The files of a data source, in a fixed order (their number in it is part of each record's id)."""

    spec: str  # what the config said
    kind: str  # "file", "folder" or "glob"
    files: tuple[str, ...]  # paths as `filesystem` names them, sorted
    filesystem: object  # a pyarrow.fs.FileSystem

    @property
    def local_file(self) -> Path | None:
        """The one local file of a single-file source (a download is local too), else None."""
        from pyarrow.fs import LocalFileSystem

        if self.kind == "file" and isinstance(self.filesystem, LocalFileSystem):
            return Path(self.files[0])
        return None

    def __str__(self) -> str:
        return str(self.local_file or self.spec)


def _sha256_of_stream(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_digest(source: Source | Path) -> tuple[str, str]:
    """(what was hashed, sha256) for the fingerprint.

    One file: its content (a streamed read, as before: cheap next to tokenizing it). Several
    files: the sorted listing of (path, size, mtime in ns), not their content, because hashing
    every shard would read the whole data set on the driver before any worker starts (and from
    object storage, over the network); any ordinary rewrite, addition or removal of a shard
    changes the listing. The blind spot, said here: a shard rewritten in place with the same size
    and the same modification time is not noticed.
    """
    if isinstance(source, (str, Path)):
        return "content", sha256_of(Path(source))
    if source.kind == "file":
        local = source.local_file
        return "content", sha256_of(local) if local else _sha256_of_stream(source.filesystem, source.files[0])
    h = hashlib.sha256()
    for info in source.filesystem.get_file_info(list(source.files)):
        h.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return f"listing of {len(source.files)} files (path, size, mtime)", h.hexdigest()


def _download(url: str, cache_dir: Path) -> Path:
    parsed = urllib.parse.urlparse(url)
    name = Path(parsed.path).name or "data.json"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = Path(cache_dir) / key / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with (
                urllib.request.urlopen(url, timeout=60) as resp,
                tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp,
            ):
                shutil.copyfileobj(resp, tmp)
        except Exception as e:
            raise DataSourceError(f"could not download {url}: {e}") from None
        os.replace(tmp.name, target)
    return target


def _is_data_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith((".", "_")):  # .crc, _SUCCESS, hidden files: as Ray Data's listing skips them
        return False
    return any(base.endswith(s + c) for s in DATA_SUFFIXES for c in COMPRESSED_SUFFIXES)


def _filesystem_for(spec: str):
    """(pyarrow filesystem, path in it) for a local path or a pyarrow URI."""
    from pyarrow import fs as pafs

    if "://" in spec:
        # from_uri on the part before the first wildcard's folder; the pattern is re-attached.
        first = min((spec.index(c) for c in "*?[" if c in spec), default=len(spec))
        cut = spec.rfind("/", 0, first) if first < len(spec) else len(spec)
        try:
            fs, base = pafs.FileSystem.from_uri(spec[:cut])
        except Exception as e:
            raise DataSourceError(f"cannot open {spec}: {e}") from None
        return fs, base + spec[cut:]
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().absolute())


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _list_glob(fs, pattern: str) -> list[str]:
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _has_glob(p))
    base = "/".join(parts[:first])
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)]


def fetch(source: str, sha256: str | None = None, cache_dir: Path | None = None, download: str | None = None) -> Source:
    """The files of `source` (listed, not read); a URL is downloaded into the cache first.
    `download`: a URL to take the file from when `source` does not exist (checked by `sha256`)."""
    try:
        return _fetch(source, sha256, cache_dir)
    except DataSourceError as e:
        if download is None or not str(e).startswith("data file not found"):
            raise
        try:
            return _fetch(download, sha256, cache_dir)
        except DataSourceError as why:
            raise DataSourceError(
                f"{source} not found, and downloading it from {download} failed ({why}); put the file "
                "there or point data.source at a copy"
            ) from None


def _fetch(source: str, sha256: str | None = None, cache_dir: Path | None = None) -> Source:
    from pyarrow import fs as pafs

    parsed = urllib.parse.urlparse(source)
    # http(s) names one file; so does a file:// URL, unless it is a folder or a glob (then it is
    # a pyarrow URI like any other).
    one_file = parsed.scheme in DOWNLOAD_SCHEMES and not (
        parsed.scheme == "file" and (_has_glob(source) or Path(urllib.parse.unquote(parsed.path)).is_dir())
    )
    if one_file:
        path = _download(source, cache_dir or DEFAULT_CACHE)
        if sha256 is not None:
            got = sha256_of(path)
            if got != sha256.lower():
                # Removed: kept, it would fail every later run the same way without a new download.
                path.unlink(missing_ok=True)
                raise DataSourceError(
                    f"{source}: sha256 {got} does not match the expected {sha256} "
                    f"(the download was removed from the cache)"
                )
        return Source(source, "file", (str(path),), pafs.LocalFileSystem())

    fs, path = _filesystem_for(source)
    if _has_glob(path):
        files = sorted(f for f in _list_glob(fs, path) if _is_data_file(f))
        if not files:
            raise DataSourceError(f"no data files ({', '.join(DATA_SUFFIXES)}) match {source}")
        kind = "glob"
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files, kind = [info.path], "file"
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path))
            if not files:
                raise DataSourceError(f"no data files ({', '.join(DATA_SUFFIXES)}) found under {source}")
            kind = "folder"
        else:
            raise DataSourceError(f"data file not found: {source}")
    src = Source(source, kind, tuple(files), fs)
    if sha256 is not None:
        if kind != "file":
            raise DataSourceError(f"data.sha256 checks one file; {source} is a {kind} of {len(files)} files")
        got = source_digest(src)[1]
        if got != sha256.lower():
            raise DataSourceError(f"{source}: sha256 {got} does not match the expected {sha256}")
    return src
