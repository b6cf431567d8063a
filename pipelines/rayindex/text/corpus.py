"""Read the corpus: list its files (local or any fsspec URI), check their columns, count rows, and stream
the rows of one shard piece in batches.

Tables (Parquet, JSONL) hold a document per row. JSONL rows are physical lines (a blank line is a row with
no text), so a row number is always "line - 1" and errors can name the line. A PDF, HTML, Markdown or text
file is one document (text/files.py parses it), named by its path under its input; consecutive files of a
shard are read into one batch (read_pieces).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayindex.config import MAX_FILE_BYTES
from rayindex.errors import RayIndexError
from rayindex.manifest import Piece
from rayindex.text import files
from rayindex.text.shard_plan import COST_MARKS

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
JSONL_CHECKPOINT_ROWS = 4096  # byte offset remembered every N lines, so shards can seek
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON's \ud800-\udfff: one half of a UTF-16 pair
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a half left unpaired after parsing: not text


TABLE_FORMATS = ("parquet", "jsonl")
CORPUS_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES + tuple(files.DOCUMENT_FORMATS)
# files of a shard read into one batch: enough documents for full forward-pass batches, their texts bounded
FILES_PER_BATCH = 64
FILE_BATCH_CHARS = 8 << 20


# a document file's row: its text, and its metadata in the doc store: where it is, what it was parsed as, its
# title, its pages (PDF), size and modification time (ISO 8601, UTC)
FILE_SCHEMA = pa.schema(
    [
        (files.TEXT, pa.string()),
        ("path", pa.string()),
        ("format", pa.string()),
        ("title", pa.string()),
        ("pages", pa.int64()),
        ("bytes", pa.int64()),
        ("mtime", pa.string()),
    ]
)


def file_format(path: str) -> str:
    """parquet, jsonl, or the format of a document file (text/files.py); refused for any other name."""
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    fmt = files.document_format(path)
    if fmt is None:
        raise RayIndexError(f"{path}: unknown file type; rayindex reads {', '.join(CORPUS_SUFFIXES)} files")
    return fmt


def is_document_file(path: str) -> bool:
    """A file that is one document (PDF, HTML, Markdown, text), not a table of them."""
    return files.document_format(path) is not None


def _filesystem(path: str):
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs, fs_path


def _with_protocol(fs, fs_path: str, original: str) -> str:
    return fs_path if "://" not in original else fs.unstrip_protocol(fs_path)


def list_input_files(inputs: list[str]) -> list[str]:
    """All corpus files named by the inputs (files, folders searched recursively, globs), sorted."""
    return sorted(input_files(inputs))


def input_files(inputs: list[str]) -> dict[str, str]:
    """Every corpus file named by the inputs -> its name under its input: its path below the folder, or below
    a glob's fixed part, or, for an input that is a file, its file name (a document file's id). A folder is
    searched recursively for the corpus's file types; hidden files and folders (a name starting with ".") in
    it are left out."""
    found: dict[str, str] = {}
    for item in inputs:
        fs, fs_path = _filesystem(item)
        try:
            if any(ch in fs_path for ch in "*?["):
                root = fixed_prefix(fs_path)
                matches = sorted(fs.glob(fs_path))
            elif fs.isdir(fs_path):
                root = fs_path.rstrip("/")
                matches = sorted(
                    p
                    for p in fs.find(fs_path)
                    if p.lower().endswith(CORPUS_SUFFIXES) and not hidden(posixpath.relpath(p, root))
                )
            elif fs.exists(fs_path):
                root, matches = posixpath.dirname(fs_path), [fs_path]
            else:
                raise RayIndexError(f"input path {item} does not exist; check the path (and credentials for s3://)")
        except PermissionError as exc:
            raise RayIndexError(f"input path {item} is not readable: {exc}") from exc
        if not matches:
            raise RayIndexError(f"input {item} contains no {', '.join(CORPUS_SUFFIXES)} files")
        for p in matches:
            file_format(p)
            found.setdefault(_with_protocol(fs, p, item), posixpath.relpath(p, root) if root else p)
    return found


def fixed_prefix(pattern: str) -> str:
    """The folder a glob starts in: its path up to the first part with a wildcard."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:fixed])


def hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def duplicate_names(names: dict[str, str]) -> str | None:
    """A refusal when two document files have the same name under their inputs (their ids), else None."""
    seen: dict[str, str] = {}
    for path, name in sorted(names.items()):
        if not is_document_file(path):
            continue
        if name in seen:
            return (
                f"two input files would have the same id {name!r}: {seen[name]} and {path}; a file's id is its path "
                "under the input folder it was found in: give their common parent folder as the input instead"
            )
        seen[name] = path
    return None


@dataclass
class FileInfo:
    path: str
    format: str
    columns: list[str]
    column_types: dict[str, str]
    num_rows: int
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (row, byte offset), JSONL only
    # (row, bytes before it) from (0, 0) to (rows, bytes): what a row range costs (text/shard_plan.py); tables only
    cost_marks: list[tuple[int, int]] | None = None


def inspect_file(path: str) -> FileInfo:
    """Columns and row count of one file, reading only Parquet metadata or one pass over JSONL lines; a
    document file is one row, read when it is encoded."""
    fmt = file_format(path)
    if fmt not in TABLE_FORMATS:
        return FileInfo(path, fmt, FILE_SCHEMA.names, {}, 1)
    fs, fs_path = _filesystem(path)
    try:
        if fmt == "parquet":
            with fs.open(fs_path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
                return FileInfo(
                    path,
                    fmt,
                    schema.names,
                    {f.name: str(f.type) for f in schema},
                    meta.num_rows,
                    [],
                    row_group_marks(meta),
                )
        return _inspect_jsonl(path, fs, fs_path)
    except RayIndexError:
        raise
    except (OSError, ValueError) as exc:
        raise RayIndexError(
            f"{path}: cannot read this {fmt} file ({type(exc).__name__}: {exc}); fix or remove it"
        ) from exc


def row_group_marks(meta: pq.FileMetaData) -> list[tuple[int, int]]:
    """A Parquet file's cost marks: at each row group's end, the uncompressed bytes of the row groups before."""
    marks, rows, size = [(0, 0)], 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        rows, size = rows + group.num_rows, size + group.total_byte_size
        marks.append((rows, size))
    return marks


def row_group_text_bytes(path: str, group: int, columns: list[str]) -> list[int]:
    """Each row's text bytes in one row group of a Parquet file, reading only those columns of that group: their
    values' UTF-8 (or binary) lengths summed, a null 0; a column a template formats (numbers, dates) by its values
    as text, and one that has no text form (lists, structs) as 0."""
    fs, fs_path = _filesystem(path)
    with read_errors(path), fs.open(fs_path, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_group(group, columns=columns)
    total = np.zeros(table.num_rows, np.int64)
    for column in table.columns:
        for as_type in (pa.large_binary(), pa.large_string()):
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                total += pc.fill_null(pc.binary_length(column.cast(as_type)), 0).to_numpy()
                break
    return total.tolist()


def _inspect_jsonl(path: str, fs, fs_path: str) -> FileInfo:
    checkpoints = []
    columns: list[str] | None = None
    offset = 0
    rows = 0
    line = b""
    marks, step = [(0, 0)], max(1, int(fs.size(fs_path) or 0) // COST_MARKS)
    with fs.open(fs_path, "rb") as fh:
        for line in fh:
            if rows % JSONL_CHECKPOINT_ROWS == 0:
                checkpoints.append((rows, offset))
            if offset >= marks[-1][1] + step:
                marks.append((rows, offset))
            if columns is None and line.strip():
                record, _ = _parse_json_line(line, path, rows)
                columns = list(record)
            offset += len(line)
            rows += 1
    if line.strip() and not line.endswith(b"\n"):  # a file cut short ends mid-line: refuse it before encoding
        _parse_json_line(line, path, rows - 1)
    columns = columns or []
    if rows > marks[-1][0]:
        marks.append((rows, offset))
    return FileInfo(path, "jsonl", columns, {}, rows, checkpoints, marks)


def _parse_json_line(line: bytes, path: str, row: int) -> tuple[dict, bool]:
    """The line's object, and whether text in it that is not Unicode was replaced with U+FFFD: bytes
    that are not UTF-8, or escaped unpaired surrogates ("\\ud800"), which no UTF-8 writer accepts."""
    try:
        text, replaced = line.decode("utf-8"), False
    except UnicodeDecodeError:
        text, replaced = line.decode("utf-8", errors="replace"), True
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        advice = (
            "fix or remove that line"
            if line.endswith(b"\n")
            else (
                "the file ends there without a newline, so it looks cut short (an interrupted copy or upload?): "
                "copy it again, or fix or remove that line"
            )
        )
        raise RayIndexError(f"{path} line {row + 1}: not valid JSON ({exc.msg}); {advice}") from exc
    if not isinstance(record, dict):
        raise RayIndexError(f"{path} line {row + 1}: expected a JSON object per line, got {type(record).__name__}")
    if SURROGATE_ESCAPE.search(text):
        dumped = json.dumps(record, ensure_ascii=False)
        if LONE_SURROGATE.search(dumped):
            record, replaced = json.loads(LONE_SURROGATE.sub("\ufffd", dumped)), True
    return record, replaced


def check_columns(files: list[FileInfo], required: list[str]) -> None:
    """Every required column in every file, and one schema across files; otherwise a clear error."""
    for info in files:
        missing = [c for c in required if c not in info.columns]
        if missing and info.num_rows:
            raise RayIndexError(
                f"{info.path}: no column {', '.join(repr(c) for c in missing)}; "
                f"its columns are: {', '.join(info.columns) or '(none)'}. "
                "Pass the right --id-column/--text-column/--template."
            )
    non_empty = [f for f in files if f.num_rows]
    if not non_empty:
        return
    first = non_empty[0]
    for info in non_empty[1:]:
        if set(info.columns) != set(first.columns):
            raise RayIndexError(
                f"mixed schemas: {first.path} has columns [{', '.join(first.columns)}] but "
                f"{info.path} has [{', '.join(info.columns)}]; give files with one schema"
            )
        differing = [
            c for c in first.column_types if c in info.column_types and info.column_types[c] != first.column_types[c]
        ]
        if differing:
            c = differing[0]
            raise RayIndexError(
                f"mixed schemas: column {c!r} is {first.column_types[c]} in {first.path} "
                f"but {info.column_types[c]} in {info.path}; give files with one schema"
            )


# Arrow types a text column may have: strings, bytes (writers that store strings without the UTF-8 annotation:
# decoded as before), null (all empty)
TEXT_TYPES = ("string", "large_string", "string_view", "binary", "large_binary", "binary_view", "null")


def check_text_type(column: str, type_name: str, where: str) -> None:
    """A --text-column holds text. One of numbers, booleans, dates or lists has no words for the model: its
    values would be indexed as digits, and it is almost always the wrong column. Refused, naming where, the
    column and its type; a --template formats any value, so naming the column there indexes it as text."""
    if type_name in TEXT_TYPES or type_name.startswith("dictionary<values=string"):
        return
    raise RayIndexError(
        f"{where}: text column {column!r} holds {type_name} values, not text; give --text-column the column with "
        f'the documents\' text, or name this one in a --template (e.g. --template "{{{column}}}") to index its '
        "values as text"
    )


def check_text_columns(files: list[FileInfo], fields: list[str]) -> None:
    """check_text_type for every text column whose type the file declares (Parquet), before any row is read."""
    for info in files:
        for column in fields:
            if column in info.column_types:
                check_text_type(column, info.column_types[column], info.path)


def attach_byte_offsets(piece: Piece, info: FileInfo) -> Piece:
    """For JSONL, the checkpoint at or before the piece's first row, so a reader can seek there."""
    if info.format != "jsonl":
        return piece
    rows = [r for r, _ in info.checkpoints]
    idx = int(np.searchsorted(rows, piece.row_start, side="right")) - 1
    return piece.model_copy(update={"byte_start": info.checkpoints[idx][1], "byte_start_row": info.checkpoints[idx][0]})


class InputUnavailable(RayIndexError):
    """Reading an input failed in a way that may pass (the store is down): the reader may retry."""


@dataclass
class FileRows:
    """What a batch of document files holds besides its table (FILE_SCHEMA): each file's id (its name
    under its input), path, where its pages start in its text (PDF; [] otherwise), and why it was skipped
    (None: parsed; else the reason and what the parser said, its text null)."""

    ids: list[str]
    paths: list[str]
    page_starts: list[list[int]]
    skipped: list[tuple[str, str] | None]


@dataclass
class RowBatch:
    """Rows of one piece, as a table: global row ids, the columns, which rows were blank JSONL lines (no
    record at all), and how many rows had text that was not Unicode (replaced with U+FFFD, kept). A batch of
    document files (a row each) also has their FileRows."""

    row_ids: np.ndarray
    table: pa.Table
    blank_lines: np.ndarray | None = None
    non_utf8: int = 0
    raw_ids: list | None = None  # JSONL: the id column's values as parsed (a JSONL column has no one type)
    files: FileRows | None = None

    def where(self, piece: Piece | None) -> Callable[[int], str]:
        """'file row N' (or 'file line N') of the batch's i-th row, for error messages; a document file's path."""
        if self.files is not None:
            return lambda i: self.files.paths[i]
        jsonl = file_format(piece.path) == "jsonl"

        def at(i: int) -> str:
            row = int(self.row_ids[i]) - piece.global_start + piece.row_start
            return f"{piece.path} line {row + 1}" if jsonl else f"{piece.path} row {row}"

        return at


def read_piece(
    piece: Piece, batch_rows: int = 2048, id_column: str | None = None, max_file_bytes: int = MAX_FILE_BYTES
) -> Iterator[RowBatch]:
    """Stream the rows of a piece in batches of at most batch_rows (id_column: kept as parsed for JSONL); a
    document file's piece is one row, its parsed text (a file over max_file_bytes is skipped unread)."""
    fmt = file_format(piece.path)
    if fmt not in TABLE_FORMATS:
        yield from _file_batches([piece], max_file_bytes)
        return
    fs, fs_path = _filesystem(piece.path)
    with read_errors(piece.path):
        if fmt == "parquet":
            yield from _read_parquet_piece(piece, fs, fs_path, batch_rows)
        else:
            yield from _read_jsonl_piece(piece, fs, fs_path, batch_rows, id_column)


@contextlib.contextmanager
def read_errors(path: str):
    """A failed read as a RayIndexError naming the file; InputUnavailable when the store may come back."""
    try:
        yield
    except RayIndexError:
        raise
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        raise RayIndexError(f"{path}: read failed ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # connection refused/reset, 5xx: the store may come back
        raise InputUnavailable(f"{path}: read failed ({type(exc).__name__}: {exc})") from exc


def read_pieces(
    pieces: list[Piece], id_column: str | None = None, max_file_bytes: int = MAX_FILE_BYTES, batch_rows: int = 2048
) -> Iterator[tuple[RowBatch, Callable[[int], str]]]:
    """A shard's rows in batches, each with where(i) for messages: a table's pieces as read_piece reads them,
    consecutive document files together (up to FILES_PER_BATCH, or FILE_BATCH_CHARS of text), so that short
    files still fill the model's batches."""
    for documents, group in itertools.groupby(pieces, key=lambda p: is_document_file(p.path)):
        if documents:
            for batch in _file_batches(list(group), max_file_bytes):
                yield batch, batch.where(None)
            continue
        for piece in group:
            for batch in read_piece(piece, batch_rows, id_column):
                yield batch, batch.where(piece)


def _file_batches(pieces: list[Piece], max_file_bytes: int) -> Iterator[RowBatch]:
    rows: list[tuple[Piece, dict, files.ParsedDocument | files.Unreadable]] = []
    chars = 0
    for piece in pieces:
        row, parsed = _read_file(piece, max_file_bytes)
        rows.append((piece, row, parsed))
        chars += len(parsed.text) if isinstance(parsed, files.ParsedDocument) else 0
        if len(rows) == FILES_PER_BATCH or chars >= FILE_BATCH_CHARS:
            yield _files_batch(rows)
            rows, chars = [], 0
    if rows:
        yield _files_batch(rows)


def _read_file(piece: Piece, max_file_bytes: int) -> tuple[dict, files.ParsedDocument | files.Unreadable]:
    """A document file's metadata, and its parsed text or why it was skipped (over max_file_bytes: unread)."""
    fs, fs_path = _filesystem(piece.path)
    fmt = file_format(piece.path)
    with read_errors(piece.path):
        info = fs.info(fs_path)
        size = int(info.get("size") or 0)
        if size > max_file_bytes:
            parsed = files.Unreadable(files.TOO_BIG, f"{size:,} bytes, over --max-file-bytes {max_file_bytes:,}")
        else:
            data = fs.cat_file(fs_path)
            try:
                parsed = files.parse_document(data, fmt)
            except files.Unreadable as exc:
                parsed = exc
    row = {
        "path": piece.path,
        "format": fmt,
        "title": parsed.title if isinstance(parsed, files.ParsedDocument) else None,
        "pages": len(parsed.page_starts) if isinstance(parsed, files.ParsedDocument) and fmt == "pdf" else None,
        "bytes": size,
        "mtime": modified(info),
    }
    return row, parsed


def modified(info: dict) -> str | None:
    """A file's modification time as ISO 8601 UTC: a local file's mtime, an object's LastModified."""
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(stamp, (int, float)):
        stamp = dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
    if isinstance(stamp, dt.datetime):
        return stamp.astimezone(dt.timezone.utc).isoformat(timespec="seconds")
    return None if stamp is None else str(stamp)


def _files_batch(rows: list[tuple[Piece, dict, files.ParsedDocument | files.Unreadable]]) -> RowBatch:
    parsed = [p if isinstance(p, files.ParsedDocument) else None for _, _, p in rows]
    table = pa.Table.from_pylist([dict(row, text=p and p.text) for (_, row, _), p in zip(rows, parsed)], FILE_SCHEMA)
    return RowBatch(
        np.array([piece.global_start for piece, _, _ in rows], np.int64),
        table,
        files=FileRows(
            ids=[piece.doc_id or posixpath.basename(piece.path) for piece, _, _ in rows],
            paths=[piece.path for piece, _, _ in rows],
            page_starts=[p.page_starts if p else [] for p in parsed],
            skipped=[None if p else (u.reason, u.detail) for (_, _, u), p in zip(rows, parsed)],
        ),
    )


def _read_parquet_piece(piece: Piece, fs, fs_path: str, batch_rows: int) -> Iterator[RowBatch]:
    with fs.open(fs_path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata
        lo, hi = piece.row_start, piece.row_start + piece.num_rows
        group_start = 0
        for g in range(meta.num_row_groups):
            group_rows = meta.row_group(g).num_rows
            a, b = max(lo, group_start), min(hi, group_start + group_rows)
            if a < b:
                table = pf.read_row_group(g).slice(a - group_start, b - a)
                for off in range(0, table.num_rows, batch_rows):
                    chunk = table.slice(off, batch_rows)
                    first = piece.global_start + (a - lo) + off
                    yield RowBatch(np.arange(first, first + chunk.num_rows, dtype=np.int64), chunk)
            group_start += group_rows


def _read_jsonl_piece(piece: Piece, fs, fs_path: str, batch_rows: int, id_column: str | None) -> Iterator[RowBatch]:
    with fs.open(fs_path, "rb") as fh:
        fh.seek(piece.byte_start or 0)
        row = piece.byte_start_row or 0
        while row < piece.row_start:
            fh.readline()
            row += 1
        records: list[dict | None] = []
        non_utf8 = 0
        first_row = row
        for _ in range(piece.num_rows):
            line = fh.readline()
            if not line.strip():
                records.append(None)
            else:
                record, replaced = _parse_json_line(line, piece.path, row)
                records.append(record)
                non_utf8 += replaced
            row += 1
            if len(records) == batch_rows:
                yield _jsonl_batch(records, piece.global_start + first_row - piece.row_start, non_utf8, id_column)
                records, non_utf8, first_row = [], 0, row
        if records:
            yield _jsonl_batch(records, piece.global_start + first_row - piece.row_start, non_utf8, id_column)


def _jsonl_batch(records: list[dict | None], start: int, non_utf8: int, id_column: str | None) -> RowBatch:
    """JSONL records as a table: a column per key (null where a record lacks it). A column whose values
    mix types (a JSONL file has no schema) keeps strings as they are and the other values as JSON text;
    the id column's values are also kept as parsed (1 and "1" are different ids)."""
    blank = np.array([r is None for r in records], dtype=bool)
    names = list(dict.fromkeys(k for r in records if r for k in r))
    columns = {}
    for name in names:
        values = [None if r is None else r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
                pa.string(),
            )
    table = pa.table(columns) if columns else pa.table({"__empty": pa.nulls(len(records))}).drop(["__empty"])
    raw_ids = None if id_column is None else [None if r is None else r.get(id_column) for r in records]
    return RowBatch(np.arange(start, start + len(records), dtype=np.int64), table, blank, non_utf8, raw_ids)


def check_id(value, column: str, where: str) -> str | int:
    """A corpus id as parsed: a string or an integer. Search returns ids and duplicates are found by them;
    a float is not an id (a float column is usually integer ids with NaN where one is missing)."""
    if value is None:
        raise RayIndexError(f"{where}: id column {column!r} is null; every document needs an id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RayIndexError(
            f"{where}: id column {column!r} holds a {type(value).__name__} ({repr(value)[:40]}); ids must be strings "
            "or integers: fix or cast that column, or leave out --id-column to number the rows"
        )
    return value


def file_signature(path: str) -> dict:
    """Size and modification stamp (mtime, or the object's ETag on S3): a resumed run must read the same bytes."""
    fs, fs_path = _filesystem(path)
    info = fs.info(fs_path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return {"size": int(info.get("size") or 0), "stamp": str(stamp)}
