"""Tune stage: the nprobe to search with, for a recall@k target against exhaustive search counted over the
documents a user sees (search returns documents by their best passage), within a per-query latency budget:
of the nprobe values reaching the target, the largest whose query searched alone takes at most
--max-search-ms (median, measured here and recorded with this machine's description), else the smallest
reaching it. The queries are made from the corpus in the shapes users send (ivf/recall.py corpus_queries:
sentences, titles and headings, key phrases, short questions), or read from a query log (--queries). When no
nprobe reaches the target (PQ codes cap recall), re-ranking turns on with the smallest factor that does. The
choice goes into the manifest and into index.faiss itself, so search, serving and a plain faiss.read_index
all use it.

Runs at the end of a build (by default when the index holds at most AUTO_TUNE_VECTORS vectors, where
exact ground truth for 500 queries takes seconds: a newcomer's index reaches recall@10 0.95 without
asking; --tune/--no-tune decide otherwise), and on a published version (`rayindex tune`).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from rayindex.config import BuildConfig, TuneOptions
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf.index import read_index, set_nprobe, write_index
from rayindex.ivf.recall import (
    corpus_queries,
    document_truth,
    measure_sweep,
    nprobe_sweep,
    sample_queries,
    select_nprobe,
    this_machine,
)
from rayindex.ivf.refine import Refiner, search_ivf, write_fp16_embeddings
from rayindex.layout import EMBEDDINGS_FILE, IVFDATA_FILE, MERGED_FILE, VECTOR_IDS_FILE, is_serving_file
from rayindex.manifest import Manifest, Tuning
from rayindex.text.model import encode_queries, load_model
from rayindex.text.queries import read_query_file
from rayindex.text.vectors import ModelUnavailable, query_model

REFINE_FACTORS = (2, 4, 8, 16)
AUTO_TUNE_VECTORS = 2_000_000  # exact search of 500 queries over 2M x 384 floats: ~15 s on 2 cores
TUNE_SEED = 11
# queries timed one at a time per sweep point for the budget: their median (p50_ms) is what the budget is
# compared with
LATENCY_QUERIES = 50


def tune(version_dir: Path, manifest: Manifest, options: TuneOptions) -> tuple[Tuning, list[str]]:
    """Choose nprobe (and a re-rank factor) for options.target_recall within options.max_search_ms, record
    them in the manifest and write them into index.faiss; returns the tuning and the files (paths in the
    version) it wrote."""
    ntotal = manifest.merge.ntotal
    k = min(options.k, ntotal - 1) or 1
    index = read_index(
        version_dir / MERGED_FILE, faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.merge.on_disk else faiss.IO_FLAG_MMAP
    )
    refiner: list[Refiner] = []

    def search(queries, kk, nprobe, refine):
        if refine > 1 and not refiner:
            refiner.append(Refiner(version_dir, manifest))
        return search_ivf(index, queries, kk, nprobe, refiner[0] if refiner else None, refine)

    encoder = query_encoder(manifest)
    texts, queries_from = tuning_texts(version_dir, manifest, options) if encoder else ([], "")
    if any(text.strip() for text in texts):
        queries = np.ascontiguousarray(encoder(texts), dtype=np.float32)
    else:  # given vectors whose model is not here, or rows without text: the stored vectors are the queries
        queries, _ = sample_queries(version_dir, manifest, min(options.n_queries, ntotal), TUNE_SEED)
        why = "the corpus has no text" if encoder else f"the model that made them, {manifest.model.name}, is not here"
        queries_from = f"stored vectors ({why})"
    no_self = np.full(len(queries), -1, np.int64)  # not stored vectors: nothing to leave out
    fetch = manifest.first_fetch(k)  # the passages search ranks into its first k documents
    truth = document_truth(version_dir, manifest, queries, k, fetch)
    nprobes = nprobe_sweep(manifest.nlist)

    def sweep_at(refine: int):
        return measure_sweep(
            search, queries, no_self, truth, [k], nprobes, refine, fetch=fetch, latency_queries=LATENCY_QUERIES
        )

    sweep = sweep_at(1)
    chosen, written = select_nprobe(sweep, options.target_recall, k, options.max_search_ms), []
    if chosen is None:
        written = write_fp16_embeddings(version_dir, manifest)
        for factor in REFINE_FACTORS:
            refined = sweep_at(factor)
            sweep += refined
            chosen = select_nprobe(refined, options.target_recall, k, options.max_search_ms)
            if chosen:
                break
    best = max(sweep, key=lambda p: (p.recall[k], -p.ms_per_query))
    pick = chosen or best
    tuning = Tuning(
        target=options.target_recall,
        k=k,
        queries=len(queries),
        sweep=sweep,
        reached=chosen is not None,
        nprobe=pick.nprobe,
        refine_factor=pick.refine,
        recall=pick.recall[k],
        queries_from=queries_from,
        recall_of="documents",
        max_search_ms=options.max_search_ms,
        p50_ms=pick.p50_ms,
        measured_on=this_machine(),
    )
    if chosen is None:
        tuning.note = (
            f"recall@{k} {best.recall[k]:.3f} at nprobe {best.nprobe} (re-rank x{best.refine}) is the best "
            "this index reaches; a finer index (more PQ bytes, or Flat/SQ8) is needed for the target"
        )
    elif options.max_search_ms and chosen.p50_ms > options.max_search_ms:
        tuning.note = (
            f"nprobe {chosen.nprobe}, the smallest reaching the target, takes {chosen.p50_ms:.2f} ms a query here, "
            f"over --max-search-ms {options.max_search_ms:g}"
        )
    manifest.tuning = tuning
    manifest.refine_factor = tuning.refine_factor if tuning.refine_factor > 1 else None
    if tuning.nprobe != manifest.nprobe:
        manifest.nprobe = tuning.nprobe
        store_nprobe(version_dir, manifest)
        written.append(MERGED_FILE)
    return tuning, written


def tuning_texts(version_dir: Path, manifest: Manifest, options: TuneOptions) -> tuple[list[str], str]:
    """The queries to tune on and where they come from: options.queries' lines (a seeded sample of
    n_queries when it holds more), else n_queries made from the corpus (corpus_queries)."""
    if options.queries:
        texts = [item["query"] for item in read_query_file(options.queries)]
        total = len(texts)
        if total > options.n_queries:
            rows = np.random.default_rng(TUNE_SEED).choice(total, options.n_queries, replace=False)
            texts = [texts[row] for row in sorted(rows)]
        return texts, f"{options.queries} ({len(texts)} of its {total} queries)"
    texts = corpus_queries(version_dir, manifest, min(options.n_queries, manifest.merge.ntotal), TUNE_SEED)
    return texts, "the corpus: sentences, titles and headings, key phrases, short questions"


def query_encoder(manifest: Manifest):
    """The build's model as search runs it: its query prompt and normalization; None for an index of given vectors
    (--vector-column) whose model cannot be loaded here."""
    if manifest.config.vector_column:
        try:
            model = query_model(manifest.model.name, manifest.dimension)
        except ModelUnavailable:
            return None
    else:
        model = load_model(manifest.model.name)
    return lambda texts: encode_queries(model, texts, manifest.model.query_prompt, manifest.model.normalized)


def store_nprobe(version_dir: Path, manifest: Manifest) -> None:
    """Rewrite index.faiss with the manifest's nprobe (atomically: a server mapping the old file keeps it).
    An on-disk index is only its header here: its lists stay in index.ivfdata."""
    on_disk = (version_dir / IVFDATA_FILE).exists()
    index = read_index(version_dir / MERGED_FILE, faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0)
    set_nprobe(index, manifest.nprobe)
    write_index(index, version_dir / MERGED_FILE)


def wanted(config: BuildConfig, vectors: int) -> bool:
    """Whether the build tunes: --tune/--no-tune, else when the index is small enough for it to be cheap."""
    return config.tune if config.tune is not None else vectors <= AUTO_TUNE_VECTORS


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> Tuning:
    """--target-recall at the end of a build: tune, then record and push what tuning wrote."""
    version.pull(
        {rel: sha for rel, sha in manifest.files_sha256.items() if is_serving_file(rel)}
        | manifest.shard_files((EMBEDDINGS_FILE, VECTOR_IDS_FILE))
    )
    with progress.stage("tune", 1, "sweeps"):
        options = TuneOptions(target_recall=config.target_recall, max_search_ms=config.max_search_ms)
        tuning, written = tune(version.local_root, manifest, options)
    if not tuning.reached:
        manifest.warnings.append(f"--target-recall {config.target_recall}: {tuning.note}")
    for rel in written:
        manifest.files_sha256[rel] = written_sha256(version.local(rel))
    version.push(written)
    return tuning
