"""Ray Data reader of instruction records: JSON Lines, a JSON array, or parquet, one record a row.

A `FileBasedDatasource`: Ray Data lists nothing new (the files come from `data_source.fetch`),
opens each file in a read task (local paths and every pyarrow filesystem, compression by
extension) and streams the blocks this reader yields; the driver never sees a record.

Every row is (idx, raw, reject_reason, reject_detail, unterminated):
- `idx` = file number << 40 | record number in that file (a JSON Lines line number, counting
  blank lines, from 0; an array element number; a parquet row number): unique, stable for the
  same files, and in file order. 2**40 records per file and 2**23 files fit in an int64.
- `raw` is the record's JSON text (for parquet, its fields as JSON), validated downstream.
- A record the reader itself cannot hand on is a row with its reason: bytes that are not UTF-8
  (`invalid_utf8`) and records over `max_record_bytes` (`record_too_large`: only a sample is
  kept, the rest is skipped as it streams past, so a 50 MB line never sits in memory whole).

Bytes, not text, are split: JSON Lines only at b"\\n" (never at U+2028, U+2029 or U+0085, which
are legal inside JSON strings; `str.splitlines` splits at them), a CR before the LF is dropped,
a UTF-8 byte-order mark at the start of a file is skipped. A file whose first character (after a
BOM and whitespace) is `[` is a JSON array, streamed element by element by a byte scanner that
tracks strings, escapes and nesting; it is never parsed whole. An array that ends before its `]`
or has data after it is a `DataSourceError` (which records it held cannot be said reliably).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipelines.data.sources import DataSourceError, Source

FIELDS = ("instruction", "input", "output")
FILE_SHIFT = 40
BLOCK_RECORDS = 4096  # rows per block handed to Ray Data
CHUNK_BYTES = 4 << 20  # bytes read at a time
SAMPLE_BYTES = 1000  # what rejects.jsonl keeps of an oversized record
BOM = b"\xef\xbb\xbf"
READ_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("raw", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("unterminated", pa.bool_()),
    ]
)
PARQUET_SUFFIXES = (".parquet", ".pq")


class _Rows:
    """Rows of one file, handed out as blocks of BLOCK_RECORDS."""

    def __init__(self, file_no: int, max_record_bytes: int, limit: int | None):
        self.base = file_no << FILE_SHIFT
        self.max_bytes = max_record_bytes
        self.limit = limit
        self.count = 0
        self.cols = {name: [] for name in READ_SCHEMA.names}

    def add(self, n: int, data: bytes, oversize: int = 0, unterminated: bool = False) -> None:
        reason = detail = ""
        if oversize:
            raw = data[:SAMPLE_BYTES].decode("utf-8", "backslashreplace") + "..."
            reason, detail = "record_too_large", f"{oversize} bytes, over data.max_record_bytes {self.max_bytes}"
        else:
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = data.decode("utf-8", "backslashreplace")
                reason, detail = "invalid_utf8", f"byte {e.start}: {e.reason}"
        self.add_text(n, raw, reason, detail, unterminated)

    def add_text(self, n: int, raw: str, reason: str = "", detail: str = "", unterminated: bool = False) -> None:
        c = self.cols
        c["idx"].append(self.base + n)
        c["raw"].append(raw)
        c["reject_reason"].append(reason)
        c["reject_detail"].append(detail)
        c["unterminated"].append(unterminated)
        self.count += 1

    @property
    def done(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def full(self) -> bool:
        return len(self.cols["idx"]) >= BLOCK_RECORDS

    def take(self) -> pa.Table:
        table = pa.table(self.cols, schema=READ_SCHEMA)
        self.cols = {name: [] for name in READ_SCHEMA.names}
        return table


class _Pending:
    """The bytes of one record as they arrive across chunks, capped at max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        self.parts, self.size, self.oversize = [], 0, 0

    def add(self, piece: bytes) -> None:
        if self.oversize:
            self.oversize += len(piece)
            return
        self.size += len(piece)
        if self.size > self.max_bytes:
            self.oversize = self.size
            self.parts = [(b"".join(self.parts) + piece)[:SAMPLE_BYTES]]
        else:
            self.parts.append(piece)

    def data(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def read_lines(first: bytes, f, rows: _Rows) -> Iterator[pa.Table]:
    """JSON Lines: split at b"\\n" only; `first` is the file's first chunk (BOM already removed)."""
    pending = _Pending(rows.max_bytes)
    line_no = 0
    chunk = first
    while chunk:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            pending.add(part)
            yield from _emit_line(rows, line_no, pending, unterminated=False)
            line_no += 1
            if rows.done:
                yield rows.take()
                return
        pending.add(parts[-1])  # the line goes on in the next chunk
        chunk = f.read(CHUNK_BYTES)
    if pending.size or pending.oversize:
        yield from _emit_line(rows, line_no, pending, unterminated=True)
    yield rows.take()


def _emit_line(rows: _Rows, line_no: int, pending: _Pending, unterminated: bool) -> Iterator[pa.Table]:
    data = pending.data()
    if not pending.oversize:
        if data.endswith(b"\r"):
            data = data[:-1]
        if not data.strip():  # blank lines are not records
            pending.reset()
            return
    rows.add(line_no, data, pending.oversize, unterminated)
    pending.reset()
    if rows.full():
        yield rows.take()


_OUTSIDE = re.compile(rb'[\[\]{},"]')
_INSIDE = re.compile(rb'["\\]')


def read_array(first: bytes, f, rows: _Rows, path: str) -> Iterator[pa.Table]:
    """A JSON array streamed element by element; `first` starts at its `[`."""
    pending = _Pending(rows.max_bytes)
    depth, in_str, skip = 0, False, 0
    n, elements_expected = 0, False  # after a comma, an element must follow
    chunk, pos, start = first, 1, 1
    while chunk:
        end = len(chunk)
        pos += skip
        skip = 0
        while pos < end:
            if in_str:
                m = _INSIDE.search(chunk, pos)
                if m is None:
                    pos = end
                    break
                if chunk[m.start()] == 0x5C:  # backslash: the next byte is escaped
                    pos = m.start() + 2
                    if pos > end:
                        skip, pos = pos - end, end
                    continue
                in_str, pos = False, m.end()
                continue
            m = _OUTSIDE.search(chunk, pos)
            if m is None:
                pos = end
                break
            c, pos = chunk[m.start()], m.end()
            if c == 0x22:
                in_str = True
            elif c in (0x7B, 0x5B):
                depth += 1
            elif c in (0x7D, 0x5D) and depth > 0:
                depth -= 1
            elif depth == 0 and c in (0x2C, 0x5D):  # the end of an element (or of the array)
                pending.add(chunk[start : m.start()])
                start = pos
                data = pending.data().strip()
                if data or pending.oversize or c == 0x2C or elements_expected:
                    if data or pending.oversize:
                        rows.add(n, data, pending.oversize)
                    else:
                        rows.add_text(n, "", "invalid_json", "empty array element")
                    n += 1
                pending.reset()
                if rows.done:
                    yield rows.take()
                    return
                if rows.full():
                    yield rows.take()
                if c == 0x5D:
                    _expect_only_whitespace(chunk[pos:], f, path)
                    yield rows.take()
                    return
                elements_expected = True
        pending.add(chunk[start:end])
        chunk, pos, start = f.read(CHUNK_BYTES), 0, 0
    raise DataSourceError(f"{path} is not a valid JSON array: it ends before its closing ] (after {n} elements)")


def _expect_only_whitespace(rest: bytes, f, path: str) -> None:
    while True:
        if rest.strip():
            raise DataSourceError(
                f"{path} is not a valid JSON array: data after its closing ] "
                f"(JSON Lines whose first record is an array?)"
            )
        rest = f.read(CHUNK_BYTES)
        if not rest:
            return


def read_parquet_records(f, rows: _Rows, path: str) -> Iterator[pa.Table]:
    """Parquet: one row a record; columns other than instruction/input/output (the Hugging Face
    layout's `text`, say) are not part of a record; a null field counts as absent."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    cols = [c for c in FIELDS if c in pf.schema_arrow.names]
    if "instruction" not in cols and "output" not in cols:
        raise DataSourceError(
            f"{path}: a parquet file of records needs columns {', '.join(FIELDS)}; "
            f"it has {', '.join(pf.schema_arrow.names)}"
        )
    n = 0
    for batch in pf.iter_batches(batch_size=BLOCK_RECORDS, columns=cols):
        values = [batch.column(c).to_pylist() for c in cols]
        for rec in zip(*values):
            try:
                raw = json.dumps({c: v for c, v in zip(cols, rec) if v is not None}, ensure_ascii=False)
                rows.add_text(n, raw)
            except (TypeError, ValueError) as e:
                rows.add_text(n, repr(rec)[:SAMPLE_BYTES], "non_string_field", str(e))
            n += 1
            if rows.done:
                yield rows.take()
                return
        if rows.full():
            yield rows.take()
    yield rows.take()


class RecordsDatasource(FileBasedDatasource):
    """The files of a `Source`, each read by `read_lines`, `read_array` or `read_parquet_records`."""

    def __init__(self, source: Source, max_record_bytes: int, limit: int | None = None):
        super().__init__(list(source.files), filesystem=source.filesystem)
        paths = self._paths()
        if len(paths) != len(source.files):
            raise DataSourceError(f"{source.spec}: listed {len(source.files)} files, Ray Data sees {len(paths)}")
        self._numbers = {p: i for i, p in enumerate(paths)}
        self._max_record_bytes = max_record_bytes
        self._limit = limit

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(PARQUET_SUFFIXES):
            return filesystem.open_input_file(path)  # parquet needs random access (its footer)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows = _Rows(self._numbers[path], self._max_record_bytes, self._limit)
        if path.endswith(PARQUET_SUFFIXES):
            yield from read_parquet_records(f, rows, path)
            return
        first = f.read(CHUNK_BYTES)
        if first.startswith(BOM):
            first = first[len(BOM) :]
        head = first.lstrip()
        while first and not head:  # a file that starts with more whitespace than one chunk
            first = f.read(CHUNK_BYTES)
            head = first.lstrip()
        if head.startswith(b"["):
            yield from read_array(head, f, rows, path)
        else:
            yield from read_lines(first, f, rows)

    def get_name(self) -> str:
        return "ReadRecords"


def read_records(
    source: Source,
    max_record_bytes: int,
    limit: int | None = None,
    read_tasks: int | None = None,
    concurrency: int | None = None,
):
    """A Ray Dataset of READ_SCHEMA rows. Read tasks take no CPU slot: splitting bytes is a few per
    cent of the work, and a read task (a streaming generator, alive until its file ends) then never
    holds the slot that the tokenizer tasks consuming its blocks need (on a 1-CPU cluster, the only
    one). `concurrency` caps how many read at once."""
    import ray

    return ray.data.read_datasource(
        RecordsDatasource(source, max_record_bytes, limit),
        num_cpus=0,
        concurrency=concurrency,
        override_num_blocks=read_tasks,
    )
