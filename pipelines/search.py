"""Search a published index: open the version CURRENT names (memory-mapped), encode queries with
the model the build used (from the manifest), and return hits with the doc store's text and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from pipelines.build import current_version
from pipelines.docstore import DocStore
from pipelines.encode import shard_dir
from pipelines.errors import RayIndexError
from pipelines.manifest import Manifest
from pipelines.merge import read_merged


@dataclass
class PublishedIndex:
    version_dir: Path
    manifest: Manifest
    index: faiss.Index
    docs: DocStore
    model: object = None
    refiner: object = None

    def encode(self, queries: list[str]) -> np.ndarray:
        if self.model is None:
            from pipelines.model import load_model

            self.model = load_model(self.manifest.model["name"])
        return self.model.encode(queries, normalize_embeddings=self.manifest.model.get("normalized", True),
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def search_vectors(self, vectors: np.ndarray, k: int, nprobe: int | None = None,
                       refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search at nprobe (default: the manifest's); with a refine factor above 1 (default: the
        manifest's), k x factor candidates are re-ranked with exact distances (refine.py)."""
        nprobe = nprobe or self.manifest.nprobe or 1
        if not 1 <= nprobe <= self.manifest.nlist:
            raise RayIndexError(f"--nprobe {nprobe} is out of range: this index has {self.manifest.nlist} lists (1..{self.manifest.nlist})")
        refine = self.manifest.refine_factor if refine is None else refine
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if not refine or refine <= 1:
            return self.index.search(queries, k, params=params)
        if self.refiner is None:
            from pipelines.refine import Refiner

            self.refiner = Refiner(self.version_dir, self.manifest)
        _, candidates = self.index.search(queries, k * refine, params=params)
        return self.refiner.rerank(queries, candidates, k)

    def search(self, query: str, k: int = 10, nprobe: int | None = None) -> list[dict]:
        if not query.strip():
            raise RayIndexError("the query is empty")
        if k < 1:
            raise RayIndexError(f"-k {k}: must be at least 1")
        scores, ids = self.search_vectors(self.encode([query]), k, nprobe)
        return self.hits(scores[0], ids[0])

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        """One query's results as {id, score, text, metadata}, from the doc store."""
        hits = []
        for score, row_id in zip(scores.tolist(), ids.tolist()):
            if row_id < 0:
                continue  # fewer than k results
            doc = self.docs.get(row_id)
            hits.append({"id": doc["id"], "score": score, "text": doc["text"], "metadata": doc["metadata"]})
        return hits


def published_manifest(output: str | Path) -> tuple[Path, Manifest]:
    """The version folder CURRENT names and its manifest, or a clear error when it is not complete."""
    version_dir = current_version(output)
    manifest = Manifest.load(version_dir)
    if manifest.status != "published":
        raise RayIndexError(f"{version_dir} is not a complete version (status {manifest.status!r}); publish a build first")
    return version_dir, manifest


def open_published(output: str | Path) -> PublishedIndex:
    """Open the version that <output>/CURRENT names."""
    return open_version(*published_manifest(output))


def open_version(version_dir: str | Path, manifest: Manifest | None = None) -> PublishedIndex:
    """Open one version folder whose merge is done (published or about to be)."""
    version_dir = Path(version_dir)
    manifest = manifest or Manifest.load(version_dir)
    index = read_merged(version_dir)
    docs = DocStore([shard_dir(version_dir, s.shard_id) for s in manifest.shards], [s.global_start for s in manifest.shards])
    return PublishedIndex(version_dir, manifest, index, docs)
