"""Search a published index: open the version CURRENT names (memory-mapped), encode queries with
the model the build used (from the manifest), and return hits with the doc store's text and metadata;
`ask` answers a question from the hits with a generator (generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from rayindex.config import AskParams, GeneratorConfig, IndexLocation, SearchParams
from rayindex.errors import DamagedIndex, RayIndexError
from rayindex.infra.storage import use_s3_endpoint
from rayindex.layout import MERGED_FILE, shard_dir
from rayindex.manifest import Manifest
from rayindex.parts.docstore import DocStore
from rayindex.parts.ivf import read_merged
from rayindex.parts.refine import Refiner, search_ivf
from rayindex.versions import open_current


@dataclass
class PublishedIndex:
    """One version of an index, open for search: the memory-mapped FAISS index, the doc store, and the
    model (loaded on first use)."""

    version_dir: Path
    manifest: Manifest
    index: faiss.Index
    docs: DocStore
    model: object = None
    refiner: Refiner | None = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def encode(self, queries: list[str]) -> np.ndarray:
        if self.model is None:
            from rayindex.parts.model import load_model

            self.model = load_model(self.manifest.model.name)
        return self.model.encode(queries, normalize_embeddings=self.manifest.model.normalized,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def check_nprobe(self, nprobe: int | None) -> int:
        """nprobe, or the version's default, refused when outside 1..nlist."""
        nprobe = nprobe or self.manifest.nprobe or 1
        if not 1 <= nprobe <= self.manifest.nlist:
            raise RayIndexError(f"nprobe {nprobe} is out of range: this index has {self.manifest.nlist} lists (1..{self.manifest.nlist})")
        return nprobe

    def search_vectors(self, vectors: np.ndarray, k: int, nprobe: int | None = None,
                       refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search at nprobe (default: the manifest's); with a refine factor above 1 (default: the
        manifest's), k x factor candidates are re-ranked with exact distances (parts/refine.py)."""
        nprobe = self.check_nprobe(nprobe)
        refine = self.manifest.refine_factor if refine is None else refine
        if refine and refine > 1 and self.refiner is None:
            self.refiner = Refiner(self.version_dir, self.manifest)
        return search_ivf(self.index, vectors, k, nprobe, self.refiner, refine)

    def search(self, query: str, k: int | None = None, nprobe: int | None = None) -> list[dict]:
        """The k best documents for the query: {id, score, text, metadata} each."""
        params = SearchParams(**{n: v for n, v in (("k", k), ("nprobe", nprobe)) if v is not None})
        if not query.strip():
            raise RayIndexError("the query is empty")
        scores, ids = self.search_vectors(self.encode([query]), params.k, params.nprobe)
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

    def ask(self, question: str, k: int | None = None, nprobe: int | None = None, generator: GeneratorConfig | object | None = None) -> dict:
        """{answer, sources}: the question answered from the k best passages, which the answer cites as [n].
        generator: a GeneratorConfig, or a generator made by query.generate.make_generator (default: extractive)."""
        from rayindex.query.generate import make_generator

        params = AskParams(**{n: v for n, v in (("k", k), ("nprobe", nprobe)) if v is not None})
        if generator is None or isinstance(generator, GeneratorConfig):
            generator = make_generator(generator or GeneratorConfig(), self.encode)
        hits = self.search(question, params.k, params.nprobe)
        return {"answer": generator.generate(question, hits), "sources": [{"n": n, **hit} for n, hit in enumerate(hits, 1)]}


def open_version(version_dir: str | Path, manifest: Manifest) -> PublishedIndex:
    """Open one version folder whose merge is done."""
    version_dir = Path(version_dir)
    index = read_merged(version_dir)
    if index.ntotal != manifest.merge.ntotal or index.d != manifest.dimension:
        raise DamagedIndex(f"{version_dir / MERGED_FILE} holds {index.ntotal} vectors of dimension {index.d}, the manifest says "
                           f"{manifest.merge.ntotal} of {manifest.dimension}; the version is damaged: rebuild it")
    docs = DocStore([shard_dir(version_dir, s.shard_id) for s in manifest.shards], [s.global_start for s in manifest.shards])
    return PublishedIndex(version_dir, manifest, index, docs)


def open_index(index: str | Path = IndexLocation.model_fields["index"].default, s3_endpoint: str | None = None,
               with_vectors: bool = False) -> PublishedIndex:
    """Open the version that <index>/CURRENT names: a build's output folder, or an s3:// prefix (its
    serving files are cached locally by version, checked against the manifest's checksums; with_vectors:
    the stored embeddings too, for eval and tune)."""
    use_s3_endpoint(s3_endpoint)
    return open_version(*open_current(index, with_vectors))
