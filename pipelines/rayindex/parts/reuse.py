"""Vectors of an earlier version, looked up by document: a reindex encodes only documents whose
id is new or whose content (text and metadata) changed, and copies the others' embeddings.

Each document has two 64-bit hashes in its shard (parts/documents.py): its id (doc_hashes.npy) and its
id together with its content, text and metadata (content_hashes.npy). A document whose content hash is in the previous version is
unchanged; one whose id hash is there but not its content hash was changed; the rest are new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rayindex.infra.storage import Store
from rayindex.layout import CONTENT_HASHES_FILE, DOC_HASHES_FILE, load_embeddings


@dataclass
class PreviousVectors:
    """What an encoder needs of the previous version: its store, and per shard the files to pull
    (embeddings, id and content hashes), its folder and its vector count."""

    version: Store
    files: dict[str, str]
    shard_rels: list[str]
    counts: list[int]
    dim: int
    _index: tuple | None = field(default=None, repr=False)

    def _load(self) -> tuple:
        """(sorted content hashes, their (shard, row) places, sorted id hashes, memory-mapped embeddings)."""
        if self._index is None:
            self.version.pull(self.files)
            content, places, ids, vectors = [], [], [], []
            for shard, (rel, count) in enumerate(zip(self.shard_rels, self.counts)):
                folder = self.version.local(rel)
                content.append(np.load(folder / CONTENT_HASHES_FILE))
                ids.append(np.load(folder / DOC_HASHES_FILE))
                places.append(np.stack([np.full(count, shard), np.arange(count)], axis=1))
                vectors.append(load_embeddings(folder, count, self.dim))
            content_all = np.concatenate(content) if content else np.zeros(0, np.uint64)
            order = np.argsort(content_all, kind="stable")
            self._index = (content_all[order], np.concatenate(places)[order] if places else np.zeros((0, 2), np.int64),
                           np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.uint64), vectors)
        return self._index

    def lookup(self, content_hashes: np.ndarray, id_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(mask of documents found unchanged, their vectors in order, how many others had an id seen before)."""
        keys, places, ids, vectors = self._load()
        found, pos = in_sorted(keys, content_hashes)
        out = np.empty((int(found.sum()), self.dim), dtype="<f4")
        where = places[pos[found]]
        for shard in np.unique(where[:, 0]):
            pick = np.nonzero(where[:, 0] == shard)[0]
            order = np.argsort(where[pick, 1])  # read each memory map in file order
            out[pick[order]] = vectors[shard][where[pick[order], 1]]
        return found, out, int(in_sorted(ids, id_hashes[~found])[0].sum())


def in_sorted(ordered: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of values present in the sorted array, their positions there where present)."""
    pos = np.searchsorted(ordered, values)
    if not len(ordered):
        return np.zeros(len(values), dtype=bool), pos
    return ordered[np.minimum(pos, len(ordered) - 1)] == values, pos
