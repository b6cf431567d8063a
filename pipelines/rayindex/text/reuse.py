"""Vectors of an earlier version, looked up by document: a reindex encodes only documents whose
id is new or whose content (text and metadata) changed, and copies the others' embeddings.

Each document has two 64-bit hashes in its shard (text/documents.py): its id (doc_hashes.npy) and its
id together with its content, text and metadata (content_hashes.npy). A document whose content hash is in the
previous version is
unchanged; one whose id hash is there but not its content hash was changed; the rest are new. An
unchanged document's vectors are those of all its passages (contiguous in its shard, found from the
shard's vector ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rayindex.infra.files import load_embeddings
from rayindex.infra.storage import Store
from rayindex.layout import CONTENT_HASHES_FILE, DOC_HASHES_FILE, VECTOR_IDS_FILE, document_starts, numbered


@dataclass
class PreviousVectors:
    """What an encoder needs of the previous version: its store, and per shard the files to pull
    (embeddings, vector ids, id and content hashes), its folder and its vector count."""

    version: Store
    files: dict[str, str]
    shard_rels: list[str]
    counts: list[int]
    dim: int
    _index: tuple | None = field(default=None, repr=False)

    def _load(self) -> tuple:
        """(sorted content hashes, their documents' (shard, first vector, passages), sorted id hashes,
        memory-mapped embeddings)."""
        if self._index is None:
            self.version.pull(self.files)
            content, places, ids, vectors = [], [], [], []
            for shard, (rel, count) in enumerate(zip(self.shard_rels, self.counts)):
                folder = self.version.local(rel)
                content.append(np.load(folder / CONTENT_HASHES_FILE))
                ids.append(np.load(folder / DOC_HASHES_FILE))
                firsts = document_starts(np.load(folder / VECTOR_IDS_FILE, mmap_mode="r"))
                passages = np.diff(np.append(firsts, count))
                places.append(np.stack([np.full(len(firsts), shard), firsts, passages], axis=1))
                vectors.append(load_embeddings(folder, count, self.dim))
            content_all = np.concatenate(content) if content else np.zeros(0, np.uint64)
            order = np.argsort(content_all, kind="stable")
            self._index = (
                content_all[order],
                np.concatenate(places)[order] if places else np.zeros((0, 3), np.int64),
                np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.uint64),
                vectors,
            )
        return self._index

    def lookup(
        self, content_hashes: np.ndarray, id_hashes: np.ndarray, passages: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(mask of documents found unchanged, their passages' vectors in order, how many others had an id
        seen before). A document counts as unchanged when its content hash is there and it was split into
        as many passages as now (`passages` per document): the same text split by the same settings."""
        keys, places, ids, vectors = self._load()
        found, pos = in_sorted(keys, content_hashes)
        where = np.zeros((len(content_hashes), 3), np.int64)
        where[found] = places[pos[found]]
        found &= where[:, 2] == passages
        where = where[found]
        rows = np.repeat(where[:, 1], where[:, 2]) + numbered(where[:, 2])
        shards = np.repeat(where[:, 0], where[:, 2])
        out = np.empty((len(rows), self.dim), dtype="<f4")
        for shard in np.unique(shards):
            pick = np.flatnonzero(shards == shard)
            order = np.argsort(rows[pick])  # read each memory map in file order
            out[pick[order]] = vectors[shard][rows[pick[order]]]
        return found, out, int(in_sorted(ids, id_hashes[~found])[0].sum())


def in_sorted(ordered: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of values present in the sorted array, their positions there where present)."""
    pos = np.searchsorted(ordered, values)
    if not len(ordered):
        return np.zeros(len(values), dtype=bool), pos
    return ordered[np.minimum(pos, len(ordered) - 1)] == values, pos
