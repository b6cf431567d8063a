"""Lexical stage: the BM25 index beside the vectors. One Ray task per shard analyzes the shard's passages
(the `text` of its doc store, as encoded) into term counts, saved with the shard's files; one pass over
every shard's counts gives the corpus statistics; each shard's postings are scored with those global
statistics and merged into the version's lexical/ folder, which search memory-maps. Counts already
recorded and verified are reused (a resumed run, a reindexed version's unchanged shards)."""

from __future__ import annotations

import pyarrow.parquet as pq
import ray

from rayindex.config import BuildConfig
from rayindex.infra.progress import StageProgress
from rayindex.infra.ray_session import connect
from rayindex.infra.storage import Store, written_sha256
from rayindex.layout import DOCS_FILE, LEXICAL_COUNTS_FILE, LEXICAL_DIR, LEXICAL_FILES, shard_rel
from rayindex.lexical.analyzer import Analyzer, AnalyzerSettings
from rayindex.lexical.counts import corpus_terms, count_terms, load_counts, save_counts, shard_terms
from rayindex.lexical.postings import BM25Params, write_merged_postings
from rayindex.manifest import LexicalIndex, Manifest, Shard
from rayindex.versions import save_manifest

TEXT_BATCH_ROWS = 4_096  # passages read from the doc store at once: bounds a task's memory for any shard size


def analyzer_settings(config: BuildConfig) -> AnalyzerSettings:
    return AnalyzerSettings(language=config.lexical_language, stopwords=config.lexical_language is not None)


def count_shard(version: Store, shard_id: int, docs: dict[str, str], settings: AnalyzerSettings) -> tuple[int, str]:
    """Analyze one shard's passages (its doc store, pulled and checked against its sha256) into its term
    counts file, pushed to the output store. Returns (passages, the file's sha256)."""
    version.pull(docs, verify=True)
    analyzer = Analyzer(settings)
    parquet = pq.ParquetFile(version.local(shard_rel(shard_id, DOCS_FILE)))
    ids = parquet.read(columns=["vector_id"]).column("vector_id").to_numpy()
    texts = (
        analyzer.analyze(text)
        for batch in parquet.iter_batches(batch_size=TEXT_BATCH_ROWS, columns=["text"])
        for text in batch.column("text").to_pylist()
    )
    counts = count_terms(ids, texts)
    rel = shard_rel(shard_id, LEXICAL_COUNTS_FILE)
    save_counts(counts, version.local(rel))
    version.push([rel])
    return len(ids), written_sha256(version.local(rel))


def counted(manifest: Manifest, version: Store, shard_id: int) -> bool:
    """Whether the shard's term counts are recorded, verify, and were made from its doc store as it is now."""
    files = manifest.shard_files((LEXICAL_COUNTS_FILE,), [shard_id])
    docs_sha = manifest.files_sha256.get(shard_rel(shard_id, DOCS_FILE))
    return bool(files) and manifest.shard_states[shard_id].lexical_of_docs == docs_sha and version.verified(files)


def count_shards(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """Term counts for every shard not counted() yet, saved in the manifest as each ends."""
    todo = [s.shard_id for s in manifest.shards if not counted(manifest, version, s.shard_id)]
    if not todo:
        return
    connect(config.ray_address, config.s3_endpoint)
    task = ray.remote(num_cpus=1, max_retries=2)(count_shard)
    settings = analyzer_settings(config)
    refs = {task.remote(version, sid, manifest.shard_files((DOCS_FILE,), [sid]), settings): sid for sid in todo}
    total = sum(manifest.shard_states[sid].passages for sid in todo)
    with progress.stage("lexical", total, "passages") as update:
        done = 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            sid = refs.pop(ready[0])
            passages, sha = ray.get(ready[0])
            manifest.files_sha256[shard_rel(sid, LEXICAL_COUNTS_FILE)] = sha
            manifest.shard_states[sid].lexical_of_docs = manifest.files_sha256[shard_rel(sid, DOCS_FILE)]
            save_manifest(version, manifest)
            done += passages
            update(done)


def sorted_shards(manifest: Manifest) -> list[Shard]:
    """The shards in the order of their rows, so of their vector ids (row << PASSAGE_BITS | passage): the shard
    plan cuts the rows into contiguous ranges, also on a reindex, so no two shards' ids interleave."""
    return sorted(manifest.shards, key=lambda s: s.global_start)


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> LexicalIndex:
    """The version's BM25 postings, kept when their recorded files still verify."""
    if (
        manifest.lexical
        and all(counted(manifest, version, s.shard_id) for s in manifest.shards)
        and version.verified({f: manifest.files_sha256.get(f, "") for f in manifest.lexical.files})
    ):
        return manifest.lexical
    count_shards(config, manifest, version, progress)
    version.pull(manifest.shard_files((LEXICAL_COUNTS_FILE,)), verify=True)
    # one shard's counts in memory at a time, twice (statistics, then postings), in the order of their ids
    paths = [version.local(shard_rel(s.shard_id, LEXICAL_COUNTS_FILE)) for s in sorted_shards(manifest)]
    corpus = corpus_terms(shard_terms(load_counts(path)) for path in paths)
    params = BM25Params()
    postings = write_merged_postings((load_counts(path) for path in paths), corpus, version.local(LEXICAL_DIR), params)
    for rel in LEXICAL_FILES:
        manifest.files_sha256[rel] = written_sha256(version.local(rel))
    version.push(list(LEXICAL_FILES))
    settings = analyzer_settings(config)
    manifest.lexical = LexicalIndex(
        language=settings.language,
        stopwords=settings.stopwords,
        k1=params.k1,
        b=params.b,
        passages=corpus.passages,
        avg_length=corpus.avg_length,
        terms=len(corpus.terms),
        postings=postings,
        files=list(LEXICAL_FILES),
    )
    return manifest.lexical
