"""Read the corpus: list Parquet/JSONL files (local or any fsspec URI), check their columns,
count rows, and stream the rows of one shard piece in batches.

JSONL rows are physical lines (a blank line is a row with no text), so a row number is
always "line - 1" and errors can name the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.errors import RayIndexError
from rayindex.manifest import Piece

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
JSONL_CHECKPOINT_ROWS = 4096  # byte offset remembered every N lines, so shards can seek
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON's \ud800-\udfff: one half of a UTF-16 pair
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a half left unpaired after parsing: not text


def file_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise RayIndexError(f"{path}: unknown file type; rayindex reads {PARQUET_SUFFIXES + JSONL_SUFFIXES} files")


def _filesystem(path: str):
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs, fs_path


def _with_protocol(fs, fs_path: str, original: str) -> str:
    return fs_path if "://" not in original else fs.unstrip_protocol(fs_path)


def list_input_files(inputs: list[str]) -> list[str]:
    """All corpus files named by the inputs (files, folders searched recursively, globs), sorted."""
    found: list[str] = []
    for item in inputs:
        fs, fs_path = _filesystem(item)
        try:
            if any(ch in fs_path for ch in "*?["):
                matches = sorted(fs.glob(fs_path))
            elif fs.isdir(fs_path):
                matches = sorted(p for p in fs.find(fs_path) if p.lower().endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES))
            elif fs.exists(fs_path):
                matches = [fs_path]
            else:
                raise RayIndexError(f"input path {item} does not exist; check the path (and credentials for s3://)")
        except PermissionError as exc:
            raise RayIndexError(f"input path {item} is not readable: {exc}") from exc
        if not matches:
            raise RayIndexError(f"input {item} contains no {PARQUET_SUFFIXES + JSONL_SUFFIXES} files")
        found.extend(_with_protocol(fs, p, item) for p in matches)
    for path in found:
        file_format(path)
    return sorted(set(found))


@dataclass
class FileInfo:
    path: str
    format: str
    columns: list[str]
    column_types: dict[str, str]
    num_rows: int
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (row, byte offset), JSONL only


def inspect_file(path: str) -> FileInfo:
    """Columns and row count of one file, reading only Parquet metadata or one pass over JSONL lines."""
    fmt = file_format(path)
    fs, fs_path = _filesystem(path)
    try:
        if fmt == "parquet":
            with fs.open(fs_path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
                return FileInfo(path, fmt, schema.names, {f.name: str(f.type) for f in schema}, meta.num_rows)
        return _inspect_jsonl(path, fs, fs_path)
    except RayIndexError:
        raise
    except (OSError, ValueError) as exc:
        raise RayIndexError(
            f"{path}: cannot read this {fmt} file ({type(exc).__name__}: {exc}); fix or remove it"
        ) from exc


def _inspect_jsonl(path: str, fs, fs_path: str) -> FileInfo:
    checkpoints = []
    columns: list[str] | None = None
    offset = 0
    rows = 0
    line = b""
    with fs.open(fs_path, "rb") as fh:
        for line in fh:
            if rows % JSONL_CHECKPOINT_ROWS == 0:
                checkpoints.append((rows, offset))
            if columns is None and line.strip():
                record, _ = _parse_json_line(line, path, rows)
                columns = list(record)
            offset += len(line)
            rows += 1
    if line.strip() and not line.endswith(b"\n"):  # a file cut short ends mid-line: refuse it before encoding
        _parse_json_line(line, path, rows - 1)
    columns = columns or []
    return FileInfo(path, "jsonl", columns, {}, rows, checkpoints)


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
class RowBatch:
    """Rows of one piece, as a table: global row ids, the columns, which rows were blank JSONL lines (no
    record at all), and how many rows had text that was not Unicode (replaced with U+FFFD, kept)."""

    row_ids: np.ndarray
    table: pa.Table
    blank_lines: np.ndarray | None = None
    non_utf8: int = 0
    raw_ids: list | None = None  # JSONL: the id column's values as parsed (a JSONL column has no one type)

    def where(self, piece: Piece) -> Callable[[int], str]:
        """'file row N' (or 'file line N') of the batch's i-th row, for error messages."""
        jsonl = file_format(piece.path) == "jsonl"

        def at(i: int) -> str:
            row = int(self.row_ids[i]) - piece.global_start + piece.row_start
            return f"{piece.path} line {row + 1}" if jsonl else f"{piece.path} row {row}"

        return at


def read_piece(piece: Piece, batch_rows: int = 2048, id_column: str | None = None) -> Iterator[RowBatch]:
    """Stream the rows of a piece in batches of at most batch_rows (id_column: kept as parsed for JSONL)."""
    fmt = file_format(piece.path)
    fs, fs_path = _filesystem(piece.path)
    try:
        if fmt == "parquet":
            yield from _read_parquet_piece(piece, fs, fs_path, batch_rows)
        else:
            yield from _read_jsonl_piece(piece, fs, fs_path, batch_rows, id_column)
    except RayIndexError:
        raise
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        raise RayIndexError(f"{piece.path}: read failed ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # connection refused/reset, 5xx: the store may come back
        raise InputUnavailable(f"{piece.path}: read failed ({type(exc).__name__}: {exc})") from exc


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
