"""Documents from a batch of corpus rows, column by column (pyarrow compute over the whole batch, no
Python dict per row): which rows have text, the text to embed (--text-column joined with ": ", or a
--template), the corpus ids, the metadata the doc store keeps, and 64-bit hashes of ids and contents;
a text longer than --max-doc-chars cut first. Also the corpus's duplicate ids, read without the model.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayindex.manifest import CutDocument, Shard, SkippedFile
from rayindex.text import files, vectors
from rayindex.text.corpus import RowBatch, check_id, check_text_type, is_document_file, read_piece
from rayindex.text.shard_plan import locate_row

BLANK_LINE = "blank_line"  # a JSONL line with nothing on it
EMPTY_TEXT = "empty_or_null_text"  # every text column null or whitespace
NON_UTF8 = "non_utf8_replaced (kept)"  # text that was not Unicode, replaced with U+FFFD
CUT = "cut_at_max_doc_chars (kept)"  # longer than --max-doc-chars: its head indexed, the rest left out
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
    cut: list[CutDocument]  # the documents longer than max_chars, cut
    page_starts: list[list[int]] | None = None  # document files: where each page starts in the text (PDF)
    skipped_files: list[SkippedFile] | None = None  # document files not indexed, and why

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


def compose_texts(
    table: pa.Table, fields: list[str], template: str | None, where: str = "the input"
) -> tuple[pa.Array, pa.Array]:
    """(texts, has_text): --template filled (a null field as ""), else the non-blank text columns joined
    with ": "; has_text is false where every text column is null or blank (the row is skipped). A text
    column that does not hold text is refused (corpus.check_text_type; a JSONL column is typed by its
    values), naming where; a template may format any value."""
    if not template:
        for name in fields:
            if name in table.column_names:
                check_text_type(name, str(table.column(name).type), where)
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
    """64-bit blake2b of each value's bytes (a string's UTF-8, a binary's own; other types as strings), read
    straight from the Arrow buffers (one C call per value, no Python object per value)."""
    kind = values.type
    if not (pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        values = values.cast(pa.string())
    _, offsets_buffer, data_buffer = values.buffers()
    width = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[values.offset : values.offset + len(values) + 1]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    out = np.empty(len(values), dtype="<u8")
    view = out.view(np.uint8).reshape(-1, 8)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        h = hashlib.blake2b(prefix, digest_size=8)
        h.update(data[a:b])
        view[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def with_vector_hashes(content_hashes: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each document's 64-bit content hash (id, text, metadata) extended by its vector's bytes (--vector-column):
    hash64 of each row's content hash followed by its float32 vector, so a row whose vector changed is a changed
    document to a reindex (text/reuse.py)."""
    rows = np.hstack(
        [
            content_hashes.astype("<u8").view(np.uint8).reshape(len(content_hashes), 8),
            np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8).reshape(len(vectors), 4 * vectors.shape[1]),
        ]
    )
    offsets = np.arange(len(rows) + 1, dtype=np.int64) * rows.shape[1]
    return hash64(
        pa.Array.from_buffers(pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(rows.tobytes())])
    )


def document_positions(batch: RowBatch, has_text: pa.Array) -> np.ndarray:
    """The positions of the batch's rows that become documents: with text, and not a blank JSONL line."""
    keep = has_text.to_numpy(zero_copy_only=False).copy()
    if batch.blank_lines is not None:
        keep &= ~batch.blank_lines
    return np.flatnonzero(keep)


def typed(ids: pa.Array, is_int: pa.Array) -> pa.Array:
    """Ids as "i1" / "s1": an integer id and the string of its digits are different ids (hashed so)."""
    return pc.binary_join_element_wise(pc.if_else(is_int, pa.scalar("i"), pa.scalar("s")), ids, "")


def cut_text(text: str, chars: int) -> str:
    """The text's first `chars` characters at most, ending before the last whitespace among them (no word is
    split) when one is in their second half; cut at `chars` otherwise."""
    if len(text) <= chars:
        return text
    end = max(text.rfind(space, 0, chars + 1) for space in " \n\t")
    return text[:end] if end > chars // 2 else text[:chars]


def cap_texts(texts: pa.Array, chars: int) -> tuple[pa.Array, list[tuple[int, int, int]]]:
    """The texts with every one longer than `chars` cut (cut_text), and (position, length, kept length) of
    each cut one. Only the heads of the long ones become Python strings (sliced in Arrow first)."""
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    long = np.flatnonzero(lengths > chars)
    if not len(long):
        return texts, []
    heads = pc.utf8_slice_codeunits(texts.take(pa.array(long)), 0, chars + 1).to_pylist()
    kept = {int(i): cut_text(head, chars) for i, head in zip(long, heads)}
    capped = pa.array([kept.get(i, None) for i in range(len(texts))], pa.string())
    return pc.if_else(pc.is_null(capped), texts, capped), [(i, int(lengths[i]), len(t)) for i, t in kept.items()]


def prepare(
    batch: RowBatch,
    fields: list[str],
    template: str | None,
    id_column: str | None,
    where,
    max_chars: int | None = None,
    vector_column: str | None = None,
) -> Documents:
    """The batch's documents: rows with text, their ids, metadata and hashes, and the skipped rows counted;
    texts longer than max_chars cut (before anything else reads them) and listed. A batch of document files
    (batch.files) is their text, each named by its id; those that could not be parsed are counted by reason,
    and listed. With a vector_column (vectors brought by the corpus) the rows with a vector are the documents,
    with or without text, and the vectors are not metadata."""
    table, row_ids, raw_ids, from_files = batch.table, batch.row_ids, batch.raw_ids, batch.files
    if from_files is not None:
        fields, template, id_column = [files.TEXT], None, None
    skipped: dict[str, int] = {}
    texts, has_text = compose_texts(table, fields, template, where(0) if len(row_ids) else "the input")
    if vector_column:
        has_text, texts = pa.array(vectors.present(table, vector_column)), pc.fill_null(texts, "")
    positions = document_positions(batch, has_text)
    blank = 0 if batch.blank_lines is None else int(batch.blank_lines.sum())
    if blank:
        skipped[BLANK_LINE] = blank
    unreadable = [] if from_files is None else [(i, s) for i, s in enumerate(from_files.skipped) if s is not None]
    for _, (reason, _) in unreadable:
        skipped[reason] = skipped.get(reason, 0) + 1
    empty = table.num_rows - len(positions) - blank - len(unreadable)
    if empty:
        skipped[vectors.NULL_VECTOR if vector_column else EMPTY_TEXT] = empty
    if batch.non_utf8:
        skipped[NON_UTF8] = batch.non_utf8
    if len(positions) < table.num_rows:
        table, texts, row_ids = table.take(positions), texts.take(pa.array(positions)), row_ids[positions]
        raw_ids = None if raw_ids is None else [raw_ids[i] for i in positions]
    texts, long = cap_texts(texts, max_chars) if max_chars is not None else (texts, [])
    if long:
        skipped[CUT] = len(long)
    if from_files is not None:
        ids = pa.array([from_files.ids[i] for i in positions], pa.string())
        is_int = pa.array(np.zeros(len(positions), bool))
    else:
        ids, is_int = corpus_ids(table, id_column, row_ids, raw_ids, lambda i: where(int(positions[i])))
    cut = [CutDocument(id=ids[i].as_py(), where=where(int(positions[i])), chars=n, kept_chars=k) for i, n, k in long]
    others = [c for c in table.column_names if c not in (id_column, vector_column) and c not in fields]
    metadata = metadata_json(table, others)
    hashed = metadata
    if from_files is not None:  # a file copied, moved or touched keeps its vectors
        hashed = metadata_json(table, [c for c in others if c not in files.UNHASHED_COLUMNS])
    typed_ids = typed(ids, is_int)
    content = pc.binary_join_element_wise(typed_ids, texts, hashed, "\x1f")
    return Documents(
        row_ids=row_ids,
        texts=texts,
        doc_ids=ids,
        doc_id_is_int=is_int,
        metadata=metadata,
        id_hashes=hash64(typed_ids),
        content_hashes=hash64(content),
        skipped=skipped,
        cut=cut,
        page_starts=None if from_files is None else [from_files.page_starts[i] for i in positions],
        skipped_files=None
        if from_files is None
        else [SkippedFile(path=from_files.paths[i], reason=r, detail=d) for i, (r, d) in unreadable],
    )


def with_pages(metadata: pa.Array, pages: np.ndarray) -> pa.Array:
    """Passages' metadata (JSON objects) with `"page": n` added where n > 0 (a PDF's passages)."""
    paged = pages > 0
    if not paged.any():
        return metadata
    inside = pc.utf8_slice_codeunits(metadata, 1, -1)  # the members, without the braces
    separator = pc.if_else(pc.equal(inside, ""), pa.scalar(""), pa.scalar(","))
    added = pc.binary_join_element_wise(
        pa.scalar("{"), inside, separator, pa.scalar('"page":'), pa.array(pages.astype(str)), pa.scalar("}"), ""
    )
    return pc.if_else(pa.array(paged), added, metadata)


def duplicate_ids_message(doc_id: str | int, column: str, duplicates: int, places: list[str]) -> str:
    return (
        f"duplicate id {doc_id!r} in column {column!r} ({duplicates} duplicate(s) in all), at: "
        f"{'; '.join(places[:2])}. Ids must be unique: fix the corpus or pick another --id-column"
    )


def document_ids(batch: RowBatch, fields: list[str], template: str | None, id_column: str, where) -> tuple[list, list]:
    """(typed ids, global rows) of the batch's rows that become documents (with text), as prepare types them
    ("i1" and "s1": 1 and "1" differ in JSONL)."""
    _, has_text = compose_texts(batch.table, fields, template, where(0) if len(batch.row_ids) else "the input")
    positions = document_positions(batch, has_text)
    raw = None if batch.raw_ids is None else [batch.raw_ids[i] for i in positions]
    rows = batch.row_ids[positions]
    ids, is_int = corpus_ids(batch.table.take(positions), id_column, rows, raw, lambda i: where(int(positions[i])))
    return typed(ids, is_int).to_pylist(), rows.tolist()


def find_duplicate_ids(shards: list[Shard], fields: list[str], template: str | None, id_column: str) -> str | None:
    """duplicate_ids_message for the corpus, or None when the ids of its documents are unique: read without
    the model. The first id (in row order) seen twice is named with its first two rows."""
    first_row: dict[str, int] = {}
    places: dict[str, list[int]] = {}
    duplicates = 0
    for shard in shards:
        for piece in shard.pieces:
            if is_document_file(piece.path):  # named by its path, unique (plan): not read here
                continue
            for batch in read_piece(piece, id_column=id_column):
                for key, row in zip(*document_ids(batch, fields, template, id_column, batch.where(piece))):
                    if key in first_row:
                        duplicates += 1
                        places.setdefault(key, [first_row[key]]).append(row)
                    else:
                        first_row[key] = row
    if not duplicates:
        return None
    key, rows = next(iter(places.items()))  # the first id to repeat
    doc_id = int(key[1:]) if key[0] == "i" else key[1:]
    return duplicate_ids_message(doc_id, id_column, duplicates, [locate_row(shards, r) for r in rows[:2]])
