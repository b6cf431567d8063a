"""Search a published index: open the version CURRENT names (memory-mapped), encode queries with
the model and query prompt the build recorded, search passages (optionally only those whose metadata
matches a filter: filters.py) by their vectors, by BM25 (the version's lexical postings) or both fused
(fusion.py: by score on a cosine index, else by reciprocal rank), and return documents, each by its best
passage with its span, text and the document's metadata; `ask` answers a question from the hits with a
generator (generate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import faiss
import numpy as np

from rayindex.config import AskParams, GeneratorConfig, IndexLocation, SearchParams
from rayindex.docstore.reader import DocStore
from rayindex.errors import DamagedIndex, RayIndexError, UsageError
from rayindex.infra.storage import Store, use_s3_endpoint
from rayindex.ivf.index import read_merged
from rayindex.ivf.refine import Refiner, search_ivf
from rayindex.layout import LEXICAL_DIR, MERGED_FILE, document_row
from rayindex.lexical.analyzer import Analyzer, AnalyzerSettings
from rayindex.lexical.counts import term_hashes
from rayindex.lexical.postings import Postings, bm25_ceiling, open_postings, search_postings, term_doc_freqs
from rayindex.manifest import Manifest
from rayindex.query.filters import MetadataFilter, id_selector
from rayindex.query.fusion import Side, by_rank, by_score, fuse_documents
from rayindex.versions import open_current

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from rayindex.query.generate import Generator

FETCH_LIMIT = 4_096  # passages fetched per query at most while looking for k distinct documents
# documents each side brings to hybrid fusion: at least this many, k when more (Elasticsearch's
# rank_window_size plays this part; a window of k alone lets one side's k-th document decide). Score fusion's
# hit@10 by depth 10 / 20 / 30 / 50 (docs/quality.md): definitions in other words 0.307 / 0.320 / 0.320 /
# 0.307, quoted sentences 1.000 from 20 up
FUSION_DEPTH = 30
DOCUMENT_FIELDS = ("id", "passage", "start", "end", "text", "metadata")  # a passage of `document`


class LexicalPassages(NamedTuple):
    """A query's best passages by BM25, best first, ties to the lower id, and its terms' document frequencies in
    the corpus. Searched already: result() is itself (PendingLexical), cancel() has nothing to stop."""

    ids: np.ndarray
    scores: np.ndarray
    doc_freqs: np.ndarray

    def result(self, missing: set | None = None) -> LexicalPassages:
        return self

    def cancel(self) -> None:
        pass


class PendingLexical(Protocol):
    """A lexical search sent (PublishedIndex.send_lexical): result() gives its LexicalPassages once answered
    (serving shards that did not answer added to `missing`, as for search_vectors); cancel() stops what has not
    answered, when the caller will not ask for the result."""

    def result(self, missing: set | None = None) -> LexicalPassages: ...

    def cancel(self) -> None: ...


class ListSearch(Protocol):
    """Where a version's inverted lists are searched when they are not in this process: the serving shards
    behind the router of `rayindex serve --shards N` (query/sharded.py ShardedSearch)."""

    failing: dict[int, str]
    lexical: bool  # the shards hold the version's BM25 postings, each those of its passages

    def search(
        self, vectors: np.ndarray, k: int, nprobe: int, matching: np.ndarray | None = None, missing: set | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def send_lexical(self, terms: np.ndarray, k: int, matching: np.ndarray | None = None) -> PendingLexical: ...


@dataclass
class PublishedIndex:
    """One version of an index, open for search: the memory-mapped FAISS index (or, as the router of sharded
    serving, the shards that hold its lists: query/sharded.py), the doc store, and the model (loaded on
    first use)."""

    version_dir: Path
    manifest: Manifest
    index: faiss.Index | None
    docs: DocStore
    model: SentenceTransformer | None = None
    refiner: Refiner | None = field(default=None, repr=False)
    filters: MetadataFilter | None = field(default=None, repr=False)
    shards: ListSearch | None = None  # sharded serving: searches go to the serving shards
    # BM25 postings, memory-mapped (None: --no-lexical, or held by the serving shards: has_lexical)
    lexical: Postings | None = field(default=None, repr=False)
    analyzer: Analyzer | None = field(default=None, repr=False)
    model_missing: str | None = None  # why text queries are refused (given vectors, their model not here)

    @property
    def ntotal(self) -> int:
        return self.manifest.merge.ntotal

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def encode(self, queries: list[str]) -> np.ndarray:
        """Query vectors: the build's model, with its query prompt and its normalization. An index of given
        vectors (--vector-column) whose model cannot be loaded here refuses text (text/vectors.py ModelUnavailable),
        every time without trying again. The model is loaded and run in one thread whatever the caller's
        (text/model.py MODEL_THREAD: why)."""
        from rayindex.text.model import in_model_thread

        return in_model_thread(self._encode, queries)

    def _encode(self, queries: list[str]) -> np.ndarray:
        from rayindex.text.model import encode_queries, load_model
        from rayindex.text.vectors import ModelUnavailable, query_model

        if self.model is None:
            if self.model_missing:
                raise ModelUnavailable(self.model_missing)
            if self.manifest.config.vector_column:
                try:
                    self.model = query_model(self.manifest.model.name, self.manifest.dimension)
                except ModelUnavailable as exc:
                    self.model_missing = str(exc)
                    raise
            else:
                self.model = load_model(self.manifest.model.name)
        return encode_queries(self.model, queries, self.manifest.model.query_prompt, self.manifest.model.normalized)

    def query_vectors(self, vector) -> np.ndarray:
        """A vector given as a query, checked against the index (field `vector`: one vector of its dimension, finite
        values), as a float32 (1 x dimension) array; normalized when the index's metric is cosine, as text queries
        are."""
        try:
            array = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError("vector: give a list of numbers") from None
        dimension = self.manifest.dimension
        if array.ndim != 1 or len(array) != dimension:
            shape = f"{len(array)} values" if array.ndim == 1 else f"shape {array.shape}"
            raise UsageError(f"vector: has {shape}, this index's vectors have {dimension} values; give one vector")
        array = array.reshape(1, -1)
        if not np.isfinite(array).all():
            raise UsageError("vector: holds NaN or infinite values; give finite numbers")
        if self.manifest.model.normalized:
            norms = np.linalg.norm(array, axis=1, keepdims=True)
            if not norms.all():
                raise UsageError("vector: is all zeros, which has no direction to compare (metric cosine)")
            array = array / norms
        return np.ascontiguousarray(array, dtype=np.float32)

    def check_nprobe(self, nprobe: int | None) -> int:
        """nprobe, or the version's default, refused when outside 1..nlist."""
        nprobe = nprobe or self.manifest.nprobe or 1
        if not 1 <= nprobe <= self.manifest.nlist:
            raise RayIndexError(
                f"nprobe {nprobe} is out of range: this index has {self.manifest.nlist} lists "
                f"(1..{self.manifest.nlist})"
            )
        return nprobe

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        nprobe: int | None = None,
        refine: int | None = None,
        matching: np.ndarray | None = None,
        missing: set | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest passages: FAISS search at nprobe (default: the manifest's) among the `matching` ids
        (all when None); with a refine factor above 1 (default: the manifest's), k x factor candidates are
        re-ranked with exact distances (ivf/refine.py). Sharded: the serving shards that did not answer
        are added to `missing` when partial answers are allowed."""
        nprobe = self.check_nprobe(nprobe)
        if self.shards is not None:
            return self.shards.search(vectors, k, nprobe, matching, missing)
        refine = self.manifest.refine_factor if refine is None else refine
        if refine and refine > 1 and self.refiner is None:
            self.refiner = Refiner(self.version_dir, self.manifest)
        selector = id_selector(matching) if matching is not None else None
        return search_ivf(self.index, vectors, k, nprobe, self.refiner, refine, selector)

    def matching_ids(self, filter: dict) -> np.ndarray:
        """The vector ids of the passages whose document's metadata match the filter (filters.py)."""
        if self.filters is None:
            self.filters = MetadataFilter(self.docs)
        return self.filters.matching_ids(filter)

    def search_documents(
        self,
        vectors: np.ndarray,
        k: int,
        nprobe: int | None = None,
        per_document: int = 1,
        filter: dict | None = None,
        missing: set | None = None,
    ) -> list[list[tuple[float, int]]]:
        """Per query, up to k documents' best passages (at most per_document each) as (score, vector id),
        best first. Passages are fetched until k documents are found (fetch grows x4, up to FETCH_LIMIT or
        every vector); with a filter only matching passages are scanned, and a query that finds fewer than
        k within nprobe lists searches again with twice the lists (up to all), so k matching hits come
        back whenever k exist. missing: as for search_vectors."""
        nprobe = self.check_nprobe(nprobe)
        matching = None
        if filter:
            matching = self.matching_ids(filter)
            if not len(matching):
                return [[] for _ in range(len(vectors))]
            # the lists probed hold len(matching) / ntotal as many candidates as without the filter: probe
            # that many times more lists (measured on 400 man pages, 60% matching: filtered recall@10 0.91 at
            # the tuned nprobe 32, 0.98 at 64)
            nprobe = min(self.manifest.nlist, math.ceil(nprobe * self.ntotal / len(matching)))
        ntotal = self.ntotal
        fetch_cap = min(ntotal, FETCH_LIMIT)
        fetch = self.manifest.first_fetch(k, per_document)
        results: list = [None] * len(vectors)
        todo = np.arange(len(vectors))
        while len(todo):
            scores, ids = self.search_vectors(vectors[todo], fetch, nprobe, matching=matching, missing=missing)
            again = []
            for row, q in enumerate(todo):
                results[q], documents = best_per_document(scores[row], ids[row], per_document, k)
                exhausted = bool((ids[row] < 0).any())  # the lists probed hold fewer than `fetch` passages
                can_fetch_more = not exhausted and fetch < fetch_cap
                can_widen = exhausted and matching is not None and nprobe < self.manifest.nlist
                if documents < k and (can_fetch_more or can_widen):
                    again.append(q)
            if not again:
                break
            todo = np.asarray(again)
            if matching is not None and nprobe < self.manifest.nlist:
                nprobe = min(self.manifest.nlist, nprobe * 2)
            fetch = max(fetch, min(fetch_cap, fetch * 4))  # never below a first fetch already past the cap
        return results

    @property
    def has_lexical(self) -> bool:
        """Whether the version can be searched by BM25: its postings memory-mapped here, or held by the serving
        shards."""
        return self.lexical is not None or (self.shards is not None and self.shards.lexical)

    def check_mode(self, mode: str | None) -> str:
        """The search mode: the one asked for, else hybrid when the version has a lexical index, else dense.
        A mode that needs the lexical index of a version built without one is refused (UsageError)."""
        if mode is None:
            return "hybrid" if self.has_lexical else "dense"
        if mode != "dense" and not self.has_lexical:
            raise UsageError(
                f"mode {mode} needs a lexical (BM25) index, and version {self.run_id} was built with --no-lexical: "
                "search it with mode dense, or rebuild it without --no-lexical"
            )
        return mode

    def send_lexical(self, terms: np.ndarray, k: int, matching: np.ndarray | None) -> PendingLexical:
        """The k best passages by BM25 for a query's term hashes, among `matching` ids (all when None), and the
        terms' document frequencies: searched now in the postings mapped here, or asked now of the serving shards,
        their top k merged (the same: postings.merge_top) and their frequencies summed (each shard's passages its
        own) by result(), so that the shards score while the caller goes on."""
        if self.lexical is None and self.shards is not None:
            return self.shards.send_lexical(terms, k, matching)
        ids, scores = search_postings(self.lexical, terms, k, allowed_ids(matching))
        return LexicalPassages(ids, scores, term_doc_freqs(self.lexical, terms))

    def lexical_passages(
        self, terms: np.ndarray, k: int, matching: np.ndarray | None, missing: set | None = None
    ) -> LexicalPassages:
        """send_lexical's passages, waited for. missing: as for search_vectors."""
        return self.send_lexical(terms, k, matching).result(missing)

    def lexical_fetch(self, k: int, per_document: int) -> int:
        """Passages a lexical search fetches for k documents (at most per_document each)."""
        return min(FETCH_LIMIT, self.manifest.first_fetch(k, per_document))

    def query_terms(self, query: str) -> np.ndarray:
        """The query's terms as the lexical index holds them (hashed), analyzed as its passages were."""
        if self.analyzer is None:
            lexical = self.manifest.lexical
            self.analyzer = Analyzer(AnalyzerSettings(lexical.language, lexical.stopwords))
        return term_hashes(self.analyzer.analyze(query))

    def fusion_sides(
        self, doc_freqs: np.ndarray, dense: list[tuple[float, int]], lexical: list[tuple[float, int]], depth: int
    ) -> list[Side]:
        """The two sides of a hybrid query, fused by score when the dense scores are cosines (each side over
        the most it can score: 1, and the query's BM25 ceiling from its terms' document frequencies), else by
        reciprocal rank (fusion.py)."""
        if self.manifest.metric in (None, "cosine"):
            ceiling = bm25_ceiling(doc_freqs, self.manifest.lexical.passages)
            return [by_score(dense, document_row, 1.0, depth), by_score(lexical, document_row, ceiling, depth)]
        return [by_rank(dense, document_row), by_rank(lexical, document_row)]

    def rank(
        self,
        queries: list[str],
        k: int,
        nprobe: int | None = None,
        per_document: int = 1,
        filter: dict | None = None,
        mode: str | None = None,
        missing: set | None = None,
    ) -> list[list[tuple[float, int]]]:
        """Per query, up to k documents' best passages (at most per_document each) as (score, vector id), best
        first, in the mode asked (check_mode). Scores: the vectors' similarity (dense), the BM25 score
        (lexical), the fused score (hybrid: fusion.py). missing: as for search_vectors."""
        mode = self.check_mode(mode)
        if mode == "dense":
            return self.search_documents(self.encode(queries), k, nprobe, per_document, filter, missing)
        matching = self.matching_ids(filter) if filter else None
        if matching is not None and not len(matching):
            return [[] for _ in queries]
        depth = k if mode == "lexical" else max(k, FUSION_DEPTH)
        fetch = self.lexical_fetch(depth, per_document)
        # every query's lexical search sent before the dense search and gathered after it: the serving shards
        # score BM25 while the router encodes and searches by vector (3 shards, 2 shared cores, paired in
        # process: hybrid 1.26x to 1.27x dense, 1.38x to 1.41x one after the other; docs/serving.md)
        sent = [self.send_lexical(self.query_terms(query), fetch, matching) for query in queries]
        try:
            dense = None
            if mode == "hybrid":
                dense = self.search_documents(self.encode(queries), depth, nprobe, per_document, filter, missing)
            ranked = []
            for query, lexical in enumerate(sent):
                found = lexical.result(missing)
                documents = best_per_document(found.scores, found.ids, per_document, depth)[0]
                if dense is not None:
                    sides = self.fusion_sides(found.doc_freqs, dense[query], documents, depth)
                    documents = fuse_documents(sides, document_row, per_document, k)
                ranked.append(documents)
        except BaseException:
            for lexical in sent:  # a failed search: its shards need not finish what nobody will read
                lexical.cancel()
            raise
        return ranked

    def search(
        self,
        query: str,
        k: int | None = None,
        nprobe: int | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
        mode: str | None = None,
    ) -> list[dict]:
        """The k best documents for the query, each by its best passage(s): {id, score, passage, start, end,
        text, metadata}, and page where the passage has one (text: the passage; start/end: its span in the
        document; page: 1-based, a PDF's). mode: hybrid, dense or
        lexical (default: hybrid when the version has a lexical index)."""
        params = settings_given(SearchParams, k=k, nprobe=nprobe, per_document=per_document, filter=filter, mode=mode)
        if not query.strip():
            raise RayIndexError("the query is empty")
        found = self.rank([query], params.k, params.nprobe, params.per_document, params.filter, params.mode)
        return self.hits(found[0])

    def search_vector(
        self,
        vector,
        k: int | None = None,
        nprobe: int | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
    ) -> list[dict]:
        """The k best documents for a query vector (a list or array of the index's dimension; normalized when its
        metric is cosine), as search returns them: dense search only, no model loaded (an index of vectors made
        elsewhere, --vector-column, is searched this way when its model is not here)."""
        params = settings_given(SearchParams, k=k, nprobe=nprobe, per_document=per_document, filter=filter)
        found = self.search_documents(
            self.query_vectors(vector), params.k, params.nprobe, params.per_document, params.filter
        )
        return self.hits(found[0])

    def hits(self, found: list[tuple[float, int]]) -> list[dict]:
        """One query's results from the doc store: the document's id and metadata, the passage's text and span,
        and its page (1-based) where it has one (passage_page)."""
        hits = []
        for score, vector_id in found:
            passage = self.docs.get(vector_id)
            hit = {
                "id": passage["id"],
                "score": score,
                "passage": passage["passage"],
                "start": passage["start"],
                "end": passage["end"],
                "text": passage["text"],
                "metadata": passage["metadata"],
            }
            page = passage_page(passage["metadata"])
            if page is not None:
                hit["page"] = page
            hits.append(hit)
        return hits

    def document(self, doc_id: str | int) -> list[dict]:
        """The passages of the document with this corpus id, in order: {id, passage, start, end, text, metadata}
        (text: the passage, start/end: its span in the document). NotFound when no document has the id: ids keep
        their corpus type, the integer 1 and the string "1" are different ids (docstore/reader.py DocStore.document)."""
        return [{field: passage[field] for field in DOCUMENT_FIELDS} for passage in self.docs.document(doc_id)]

    def ask(
        self,
        question: str,
        k: int | None = None,
        nprobe: int | None = None,
        generator: GeneratorConfig | Generator | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
        mode: str | None = None,
    ) -> dict:
        """{answer, sources}: the question answered from the k best passages (one per document), which the
        answer cites as [n]; each source names its document and the passage's span in it.
        generator: a GeneratorConfig, or a generator made by query.generate.make_generator (default: extractive)."""
        from rayindex.query.generate import make_generator

        params = settings_given(AskParams, k=k, nprobe=nprobe, per_document=per_document, filter=filter, mode=mode)
        if generator is None or isinstance(generator, GeneratorConfig):
            generator = make_generator(generator or GeneratorConfig(), self.encode)
        hits = self.search(question, params.k, params.nprobe, params.per_document, params.filter, params.mode)
        return {
            "answer": generator.generate(question, hits),
            "sources": [{"n": n, **hit} for n, hit in enumerate(hits, 1)],
        }


def passage_page(metadata: dict) -> int | None:
    """The page of a passage: its metadata's "page" when that is a positive integer (a PDF's passages have it,
    the page holding their first character; so may a table's rows, from a column named page), else None."""
    page = metadata.get("page")
    return page if isinstance(page, int) and not isinstance(page, bool) and page > 0 else None


def allowed_ids(matching: np.ndarray | None):
    """search_postings's filter of a filter's matching ids (None: every passage)."""
    return None if matching is None else (lambda ids: np.isin(ids, matching))


def settings_given(model: type[SearchParams], **values) -> SearchParams:
    """The parameters a caller gave (not None), validated; the model's defaults for the rest."""
    return model(**{name: value for name, value in values.items() if value is not None})


def best_per_document(
    scores: np.ndarray, ids: np.ndarray, per_document: int, k: int
) -> tuple[list[tuple[float, int]], int]:
    """The ranked passages kept at most per_document per document (layout.document_row) and from k
    documents at most; and how many documents that is."""
    kept, taken = [], {}
    for score, vector_id in zip(scores.tolist(), ids.tolist()):
        if vector_id < 0:
            break
        row = document_row(vector_id)
        if row not in taken:
            if len(taken) == k:
                continue
            taken[row] = 0
        if taken[row] < per_document:
            taken[row] += 1
            kept.append((score, vector_id))
    return kept, len(taken)


def open_version(version_dir: str | Path, manifest: Manifest, shards: ListSearch | None = None) -> PublishedIndex:
    """Open one version folder whose merge is done: its merged index memory-mapped, or, given the serving
    shards that hold its lists (query/sharded.py), none."""
    version_dir = Path(version_dir)
    index = None
    if shards is None:
        index = read_merged(version_dir)
        if index.ntotal != manifest.merge.ntotal or index.d != manifest.dimension:
            raise DamagedIndex(
                f"{version_dir / MERGED_FILE} holds {index.ntotal} vectors of dimension {index.d}, the manifest says "
                f"{manifest.merge.ntotal} of {manifest.dimension}; the version is damaged: rebuild it"
            )
    docs = DocStore.of_version(Store.of_folder(version_dir), manifest)  # read on demand, where the version lives
    lexical = None
    if manifest.lexical and not (shards is not None and shards.lexical):  # else the serving shards hold them
        try:
            lexical = open_postings(version_dir / LEXICAL_DIR)
        except (OSError, ValueError) as exc:
            raise DamagedIndex(f"{version_dir / LEXICAL_DIR}: {exc}; the version is damaged: rebuild it") from exc
    return PublishedIndex(version_dir, manifest, index, docs, shards=shards, lexical=lexical)


def open_index(
    index: str | Path = IndexLocation.model_fields["index"].default,
    s3_endpoint: str | None = None,
    with_vectors: bool = False,
) -> PublishedIndex:
    """Open the version that <index>/CURRENT names: a build's output folder, or an s3:// prefix (its
    serving files are cached locally by version, checked against the manifest's checksums; with_vectors:
    the stored embeddings too, for eval and tune)."""
    use_s3_endpoint(s3_endpoint)
    return open_version(*open_current(index, with_vectors))
