"""Metadata filters at search time: {"section": "8"} (equality) or {"section": {"in": ["8", "9"]}},
several columns all required, turned into the sorted vector ids of the passages that match and a FAISS
IDSelector over them, so the IVF scan itself skips the others (no post-filtering that returns fewer
than k). Each column's value -> ids map is built once per open version, from the doc store's metadata,
when a filter first names it.
"""

from __future__ import annotations

import json

import faiss
import numpy as np

from rayindex.docstore.reader import DocStore
from rayindex.errors import RayIndexError, quoted

# What one filter may hold: it bounds the work a request can ask for and every string a message quotes
# (a 100,000-character column name once froze a replica; see errors.py)
MAX_IN_VALUES = 1_000  # values in one {"in": [...]}
MAX_COLUMNS = 32  # metadata columns in one filter
MAX_NAME_CHARS = 256  # characters of a column name (Parquet/JSON column names are far shorter)
MAX_VALUE_CHARS = 1_000  # characters of one value, as matched (canonical)


def canonical(value) -> str:
    """A metadata value as it is matched: strings as they are, anything else as JSON (so "8" and 8 match)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def wanted_values(column: str, condition) -> list[str]:
    """The values a filter condition accepts: one value, or {"in": [values]}; refused naming the column."""
    if isinstance(condition, dict):
        if set(condition) != {"in"} or not isinstance(condition["in"], list) or not condition["in"]:
            raise RayIndexError(
                f'filter.{column}: give a value or {{"in": [values]}} (a non-empty list), '
                f"not {json.dumps(condition)[:80]}"
            )
        if len(condition["in"]) > MAX_IN_VALUES:
            raise RayIndexError(f'filter.{column}: at most {MAX_IN_VALUES} values in "in"')
        values = [canonical(v) for v in condition["in"]]
    elif isinstance(condition, list):
        raise RayIndexError(f'filter.{column}: for several values write {{"in": {json.dumps(condition)[:60]}}}')
    else:
        values = [canonical(condition)]
    for value in values:
        if len(value) > MAX_VALUE_CHARS:
            raise RayIndexError(
                f"filter.{column}: a value of at most {MAX_VALUE_CHARS} characters, not {quoted(value)}"
            )
    return values


def checked_filter(conditions) -> dict[str, list[str]]:
    """column -> the values it accepts, for a filter as a request or the command line gives it; refused
    (naming the column, quoting at most errors.QUOTED_CHARS of what was given) past the bounds above."""
    if not isinstance(conditions, dict) or not conditions:
        raise RayIndexError('filter: give an object of metadata column -> value, e.g. {"section": "8"}')
    if len(conditions) > MAX_COLUMNS:
        raise RayIndexError(f"filter: at most {MAX_COLUMNS} columns, not {len(conditions)}")
    for column in conditions:
        if len(column) > MAX_NAME_CHARS:
            raise RayIndexError(f"filter: a column name of at most {MAX_NAME_CHARS} characters, not {quoted(column)}")
    return {column: wanted_values(column, condition) for column, condition in conditions.items()}


class MetadataFilter:
    """Matching vector ids for filters on one version's doc store."""

    def __init__(self, docs: DocStore):
        self.docs = docs
        self._columns: dict[str, dict[str, np.ndarray]] = {}

    def _column(self, name: str) -> dict[str, np.ndarray]:
        """value -> sorted vector ids of the passages whose document has it in this metadata column."""
        if name not in self._columns:
            by_value: dict[str, list[int]] = {}
            for ids, metadata in self.docs.column("metadata"):
                for vector_id, text in zip(ids.tolist(), metadata.to_pylist()):
                    value = json.loads(text).get(name, Missing)
                    if value is not Missing:
                        by_value.setdefault(canonical(value), []).append(vector_id)
            if not by_value:
                raise RayIndexError(
                    f"filter: this index has no metadata column {quoted(name)} (metadata holds the corpus columns "
                    "that are neither the id nor the text)"
                )
            self._columns[name] = {v: np.sort(np.asarray(ids, np.int64)) for v, ids in by_value.items()}
        return self._columns[name]

    def matching_ids(self, conditions: dict) -> np.ndarray:
        """Sorted vector ids matching every condition."""
        matched = None
        for column, wanted in checked_filter(conditions).items():
            values = self._column(column)
            ids = [values[v] for v in wanted if v in values]
            column_ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
            matched = column_ids if matched is None else np.intersect1d(matched, column_ids, assume_unique=True)
        return matched


class Missing:
    """A column absent from a document's metadata (distinct from a null value)."""


def id_selector(ids: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector over these ids (a hash set with a Bloom-style pre-check; its ids are copied)."""
    return faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
