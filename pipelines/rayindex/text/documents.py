"""Documents from a batch of corpus rows, column by column (pyarrow compute over the whole batch, no
Python dict per row): which rows have text, the text to embed (--text-column joined with ": ", or a
--template), the corpus ids, the metadata the doc store keeps, and 64-bit hashes of ids and contents.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayindex.text.corpus import RowBatch, check_id

BLANK_LINE = "blank_line"  # a JSONL line with nothing on it
EMPTY_TEXT = "empty_or_null_text"  # every text column null or whitespace
NON_UTF8 = "non_utf8_replaced (kept)"  # text that was not Unicode, replaced with U+FFFD
JOINER = ": "  # between --text-column values


@dataclass
class Documents:
    """The documents of one batch, in row order (rows without text left out)."""

    row_ids: np.ndarray  # int64 global row ids
    texts: pa.Array  # string: what is embedded, and what the doc store keeps
    doc_ids: pa.Array  # string: the corpus id as text
    doc_id_is_int: pa.Array  # bool: the corpus id was an integer
    metadata: pa.Array  # string: JSON object of the other columns
    id_hashes: np.ndarray  # uint64
    content_hashes: np.ndarray  # uint64
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.row_ids)


def as_strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one string array (numbers cast as Arrow prints them)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_string(column.type) or not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    return column


def is_blank(column: pa.Array) -> pa.Array:
    """null, or nothing but whitespace."""
    return pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), "")).fill_null(True)


def compose_texts(table: pa.Table, fields: list[str], template: str | None) -> tuple[pa.Array, pa.Array]:
    """(texts, has_text): --template filled (a null field as ""), else the non-blank text columns joined
    with ": "; has_text is false where every text column is null or blank (the row is skipped)."""
    columns = {
        f: as_strings(table.column(f)) if f in table.column_names else pa.nulls(table.num_rows, pa.string())
        for f in fields
    }
    blanks = [is_blank(c) for c in columns.values()]
    has_text = pc.invert(blanks[0])
    for blank in blanks[1:]:
        has_text = pc.or_(has_text, pc.invert(blank))
    if template:
        parts = []
        for literal, field, spec, conversion in string.Formatter().parse(template):
            if spec or conversion:
                return _format_rows(table, fields, template), has_text  # "{x:>10}", "{x!r}": Python's own formatting
            if literal:
                parts.append(pa.scalar(literal))
            if field is not None:
                parts.append(pc.fill_null(columns[field], ""))
        if not parts:
            return pa.array([template] * table.num_rows, pa.string()), has_text
        if not any(isinstance(p, pa.Array) for p in parts):
            parts.append(pa.array([""] * table.num_rows))
        return pc.binary_join_element_wise(*parts, ""), has_text
    kept = [pc.if_else(blank, pa.scalar(None, pa.string()), column) for blank, column in zip(blanks, columns.values())]
    # an always-present last element, then its separator cut off again: pyarrow 26 drops the rows whose
    # values are all null from a join with null_handling="skip" (4 rows in, 3 out)
    joined = pc.binary_join_element_wise(
        *kept, pa.array([""] * table.num_rows, pa.string()), JOINER, null_handling="skip"
    )
    return pc.utf8_slice_codeunits(joined, 0, -len(JOINER)), has_text


def _format_rows(table: pa.Table, fields: list[str], template: str) -> pa.Array:
    values = table.select([f for f in fields if f in table.column_names]).to_pylist()
    return pa.array(
        [template.format(**{f: "" if row.get(f) is None else row.get(f) for f in fields}) for row in values],
        pa.string(),
    )


def corpus_ids(
    table: pa.Table, column: str | None, row_ids: np.ndarray, raw_ids: list | None, where
) -> tuple[pa.Array, pa.Array]:
    """(ids as text, whether each was an integer): the row numbers without an --id-column. Ids are strings
    or integers; a null or any other type is refused naming the first such row (where(i): "file row N").
    A typed (Parquet) column is checked as a whole; JSONL ids (raw_ids) value by value."""
    if column is None:
        return pa.array(row_ids.astype(str), pa.string()), pa.array(np.ones(len(row_ids), bool))
    if raw_ids is not None:
        ids = [check_id(value, column, where(i)) for i, value in enumerate(raw_ids)]
        return pa.array([str(v) for v in ids], pa.string()), pa.array([isinstance(v, int) for v in ids], pa.bool_())
    values = table.column(column).combine_chunks()
    nulls = np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))
    if len(nulls):
        check_id(None, column, where(int(nulls[0])))
    kind = values.type
    if pa.types.is_integer(kind):
        return values.cast(pa.string()), pa.array(np.ones(len(values), bool))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values.cast(pa.string()), pa.array(np.zeros(len(values), bool))
    check_id(values[0].as_py(), column, where(0))  # refuses it, naming the type: the whole column has it
    raise AssertionError("unreachable")


def metadata_json(table: pa.Table, columns: list[str]) -> pa.Array:
    """Each row's other columns as a JSON object, built column by column: strings quoted and escaped,
    numbers and booleans as JSON literals, nulls (and NaN) as null; nested values fall back to json.dumps."""
    if not columns:
        return pa.array(["{}"] * table.num_rows, pa.string())
    fields = []
    for name in columns:
        column = table.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        fields.append(
            pc.binary_join_element_wise(pa.scalar(json.dumps(name, ensure_ascii=False) + ":"), json_values(column), "")
        )
    return pc.binary_join_element_wise(pa.scalar("{"), pc.binary_join_element_wise(*fields, ","), pa.scalar("}"), "")


_JSON_ESCAPES = [
    ("\\", "\\\\"),
    ('"', '\\"'),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
    ("\b", "\\b"),
    ("\f", "\\f"),
]


def json_values(column: pa.Array) -> pa.Array:
    """The column's values as JSON text."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = column.cast(pa.string())
        for raw, escaped in _JSON_ESCAPES:
            text = pc.replace_substring(text, raw, escaped)
        if pc.any(pc.match_substring_regex(text, r"[\x00-\x1f]")).as_py():  # other control characters: \u00XX
            text = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False)[1:-1] for v in column.to_pylist()],
                pa.string(),
            )
        quoted = pc.binary_join_element_wise(pa.scalar('"'), text, pa.scalar('"'), "")
    elif pa.types.is_boolean(kind):
        quoted = pc.if_else(column, pa.scalar("true"), pa.scalar("false"))
    elif pa.types.is_integer(kind):
        quoted = column.cast(pa.string())
    elif pa.types.is_floating(kind):
        finite = pc.is_finite(column)
        quoted = pc.if_else(finite, column.cast(pa.string()), pa.scalar(None, pa.string()))
    elif pa.types.is_null(kind):
        quoted = pa.nulls(len(column), pa.string())
    else:  # lists, structs, dates: Python's json, with str() for what JSON has no type for
        quoted = pa.array([json.dumps(v, ensure_ascii=False, default=str) for v in column.to_pylist()], pa.string())
    return pc.fill_null(quoted, "null")


def hash64(values: pa.Array, prefix: bytes = b"") -> np.ndarray:
    """64-bit blake2b of each string's UTF-8 bytes, read straight from the Arrow buffers (one C call per
    value, no Python string per value)."""
    values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    _, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[values.offset : values.offset + len(values) + 1]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    out = np.empty(len(values), dtype="<u8")
    view = out.view(np.uint8).reshape(-1, 8)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        h = hashlib.blake2b(prefix, digest_size=8)
        h.update(data[a:b])
        view[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def prepare(batch: RowBatch, fields: list[str], template: str | None, id_column: str | None, where) -> Documents:
    """The batch's documents: rows with text, their ids, metadata and hashes, and the skipped rows counted."""
    table, row_ids, raw_ids = batch.table, batch.row_ids, batch.raw_ids
    skipped: dict[str, int] = {}
    texts, has_text = compose_texts(table, fields, template)
    keep = has_text.to_numpy(zero_copy_only=False).copy()
    if batch.blank_lines is not None and batch.blank_lines.any():
        skipped[BLANK_LINE] = int(batch.blank_lines.sum())
        keep &= ~batch.blank_lines
    empty = int(len(keep) - keep.sum() - skipped.get(BLANK_LINE, 0))
    if empty:
        skipped[EMPTY_TEXT] = empty
    if batch.non_utf8:
        skipped[NON_UTF8] = batch.non_utf8
    positions = np.flatnonzero(keep)
    if len(positions) < table.num_rows:
        table, texts, row_ids = table.take(positions), texts.take(pa.array(positions)), row_ids[positions]
        raw_ids = None if raw_ids is None else [raw_ids[i] for i in positions]
    ids, is_int = corpus_ids(table, id_column, row_ids, raw_ids, lambda i: where(int(positions[i])))
    others = [c for c in table.column_names if c != id_column and c not in fields]
    metadata = metadata_json(table, others)
    typed_ids = pc.binary_join_element_wise(pc.if_else(is_int, pa.scalar("i"), pa.scalar("s")), ids, "")
    content = pc.binary_join_element_wise(typed_ids, texts, metadata, "\x1f")
    return Documents(
        row_ids=row_ids,
        texts=texts,
        doc_ids=ids,
        doc_id_is_int=is_int,
        metadata=metadata,
        id_hashes=hash64(typed_ids),
        content_hashes=hash64(content),
        skipped=skipped,
    )
