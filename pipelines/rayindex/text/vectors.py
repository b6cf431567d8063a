"""Vectors brought by the corpus (--vector-column): the column's type and every row's vector checked, naming the
file and row and what to do (a list of numbers, one dimension, finite, of norm 1 for cosine), read column by column
into float32 without a Python object per value; the corpus's dimension (its first vector); the model that made them,
when it can be loaded from this machine's files, for its dimension; and the settings such a build records in place
of a model's (VectorSettings: no prompts for documents, no passages).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.manifest import Piece
from rayindex.text.corpus import read_piece
from rayindex.text.model import VectorSettings, embedding_dimension, load_model, resolve_model

NULL_VECTOR = "null_vector"  # the manifest's counts.skipped reason: a row whose vector is null (or missing)
# |norm - 1| allowed for metric cosine. Unit vectors stored in fp16 or bf16 and read back stay inside it (measured on
# the packaged model's normalized vectors of 360 stdlib docstrings: at most 5.5e-5 off 1 in fp16, 4.2e-4 in bf16),
# while a vector that was never normalized is off by far more than rounding. An inner product of a vector of norm
# 1 + 1e-3 is off by at most 0.1% of the score.
NORM_TOLERANCE = 1e-3
LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
# how Arrow prints a vector column's type in a Parquet schema (corpus.FileInfo.column_types)
DECLARED_VECTOR = re.compile(
    r"null|(large_)?(fixed_size_)?list<[^:]+: (halffloat|float|double|u?int(8|16|32|64))( not null)?>(\[\d+\])?"
)


def is_vector_type(kind: pa.DataType) -> bool:
    """A list (variable, large or fixed size) of integers or floats; null: a column with no value yet."""
    if pa.types.is_null(kind):
        return True
    return any(test(kind) for test in LIST_TYPES) and (
        pa.types.is_floating(kind.value_type)
        or pa.types.is_integer(kind.value_type)
        or pa.types.is_null(kind.value_type)
    )


def not_vectors(column: str, what: str, where: str) -> RayIndexError:
    return RayIndexError(
        f"{where}: vector column {column!r} holds {what}, not a list of numbers; give --vector-column the column "
        "with each row's vector (an Arrow list or fixed_size_list of floats, a JSON array in JSONL)"
    )


def check_vector_columns(tables: list, column: str) -> None:
    """Every table has the vector column, of a list type where the file declares one (Parquet): before any row is
    read. tables: corpus.FileInfo of the tables."""
    for info in tables:
        if column not in info.columns and info.num_rows:
            raise RayIndexError(
                f"{info.path}: no vector column {column!r}; its columns are: {', '.join(info.columns) or '(none)'}. "
                "Give --vector-column the column holding each row's vector"
            )
        declared = info.column_types.get(column)
        if declared is not None and not DECLARED_VECTOR.fullmatch(declared):
            raise not_vectors(column, f"{declared} values", info.path)


def present(table: pa.Table, column: str) -> np.ndarray:
    """Which rows have a vector (the column not null; a JSONL batch whose records all lack it has none)."""
    if column not in table.column_names:
        return np.zeros(table.num_rows, bool)
    return pc.is_valid(table.column(column)).to_numpy(zero_copy_only=False)


def column_vectors(
    values: pa.Array | pa.ChunkedArray, column: str, dimension: int, metric: str, where: Callable[[int], str]
) -> np.ndarray:
    """The rows' vectors (none null) as a float32 (rows x dimension) array, or a refusal naming the first bad row
    (where(i)): not a list of numbers, another dimension, a null element, NaN or infinity (after the cast to float32:
    a double past its range is infinite), and for metric cosine a norm off 1 by more than NORM_TOLERANCE."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    if len(values) == 0:
        return np.zeros((0, dimension), np.float32)
    if not is_vector_type(values.type) or pa.types.is_null(values.type):
        raise not_vectors(column, describe(values), where(first_not_a_list(values)))
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dimension)
    if len(wrong):
        row = int(wrong[0])
        raise RayIndexError(
            f"{where(row)}: vector column {column!r} has {lengths[row]} values, the corpus's vectors have {dimension} "
            "(its first vector's); every row's vector must have one dimension: fix or drop that row"
        )
    flat = pc.list_flatten(values)
    if flat.null_count:
        row = int(np.flatnonzero(pc.is_null(flat).to_numpy(zero_copy_only=False))[0]) // dimension
        raise RayIndexError(f"{where(row)}: vector column {column!r} has a null value inside the vector: fix that row")
    with np.errstate(over="ignore"):
        vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), dimension)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise RayIndexError(
            f"{where(row)}: vector column {column!r} holds NaN or infinite values ({int((~finite).sum())} such "
            "vector(s) in this batch): a NaN vector would be found by every query; fix or drop those rows"
        )
    if metric == "cosine":
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
        if len(off):
            row = int(off[0])
            raise RayIndexError(
                f"{where(row)}: vector column {column!r} has a vector of norm {norms[row]:.6g} ({len(off)} in this "
                f"batch off 1 by more than {NORM_TOLERANCE:g}); metric cosine compares unit vectors: normalize them, "
                "or build with --metric dot or --metric l2"
            )
    return vectors


def describe(values: pa.Array) -> str:
    if pa.types.is_null(values.type):
        return "only nulls"
    return f"{values.type} values"


def first_not_a_list(values: pa.Array) -> int:
    """The first non-null row that is not a JSON array of numbers (a JSONL column of mixed types is JSON text)."""
    for row, value in enumerate(values.to_pylist()):
        if value is None:
            continue
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                return row
            if isinstance(parsed, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed
            ):
                continue
        return row
    return 0


def corpus_dimension(files: list[tuple[str, int]], column: str) -> int:
    """The dimension of the corpus's first vector (files: (path, rows) in plan order); refused when no row has one."""
    for path, rows in files:
        if not rows:
            continue
        piece = Piece(path=path, row_start=0, num_rows=rows, global_start=0)
        for batch in read_piece(piece):
            has = present(batch.table, column)
            if has.any():
                row = int(np.flatnonzero(has)[0])
                values = batch.table.column(column).slice(row, 1).combine_chunks()
                if not is_vector_type(values.type) or pa.types.is_null(values.type):
                    raise not_vectors(column, describe(values), batch.where(piece)(row))
                return int(pc.list_value_length(values)[0].as_py())
    raise RayIndexError(f"no row of the input has a vector in column {column!r}: check --vector-column")


def local_model(name: str):
    """The model named, loaded on the CPU from this machine's files only (a local folder, the packaged model, or
    the Hugging Face cache), or None when it cannot be: a model that made vectors elsewhere need not exist here."""
    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device="cpu", local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError):  # not found, not a model, not this library's
        return None


def check_model_dimension(model_name: str, dimension: int) -> None:
    """Refuse vectors whose dimension differs from the named model's, when that model loads here (text queries are
    encoded by it, and would not fit the index)."""
    model = local_model(model_name)
    if model is None:
        return
    made = embedding_dimension(model)
    if made != dimension:
        raise RayIndexError(
            f"the corpus's vectors have {dimension} values, but --model {model_name} makes vectors of {made}: give "
            "--model the model that made the vectors (text queries are encoded by it)"
        )


def given_settings(config: BuildConfig) -> VectorSettings:
    """What a build of given vectors records in place of a model's: --metric (default cosine, not read from a
    model that may not be here), --query-prompt for text queries, no document prompt, one vector per row."""
    return VectorSettings(config.metric or "cosine", None, config.query_prompt, None, None, None)


class ModelUnavailable(RayIndexError):
    """Text queries cannot be encoded for an index of given vectors: the model that made them is not here (or makes
    vectors of another dimension). Searching by vector still works."""


def query_model(name: str, dimension: int):
    """The model that made an index's given vectors, loaded to encode text queries; ModelUnavailable naming it when
    it cannot be loaded here or makes vectors of another dimension than the index's."""
    search_by_vector = 'search by vector instead (index.search_vector, or /search with "vector")'
    try:
        model = load_model(name)
    except (OSError, ValueError) as exc:  # not on this machine (offline), not on the Hub, not a model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(
            f"text search needs the model that made this index's vectors, {name}, and it cannot be loaded here "
            f"({reason[:200]}): {search_by_vector}, or make it loadable (a local folder, or the Hugging Face cache)"
        ) from None
    made = embedding_dimension(model)
    if made != dimension:
        raise ModelUnavailable(
            f"text search needs the model that made this index's vectors, but {name} makes vectors of {made} values "
            f"and the index's have {dimension}: {search_by_vector}"
        )
    return model
