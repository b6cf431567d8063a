"""Tune stage: the smallest nprobe whose recall@k against exact search reaches a target, on queries made
of sentences of the corpus's passages encoded as queries (ivf/recall.py sentence_queries); when no
nprobe does (PQ codes cap recall), re-ranking turns on with the smallest factor that does. The choice
goes into the manifest and into index.faiss itself, so search, serving and a plain faiss.read_index all use it.

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
from rayindex.ivf.recall import exact_truth, measure_sweep, nprobe_sweep, select_nprobe, sentence_queries
from rayindex.ivf.refine import Refiner, search_ivf, write_fp16_embeddings
from rayindex.layout import EMBEDDINGS_FILE, IVFDATA_FILE, MERGED_FILE, VECTOR_IDS_FILE, is_serving_file
from rayindex.manifest import Manifest, Tuning
from rayindex.text.model import encode_queries, load_model

REFINE_FACTORS = (2, 4, 8, 16)
AUTO_TUNE_VECTORS = 2_000_000  # exact search of 500 queries over 2M x 384 floats: ~15 s on 2 cores
TUNE_SEED = 11


def tune(version_dir: Path, manifest: Manifest, options: TuneOptions) -> tuple[Tuning, list[str]]:
    """Choose nprobe (and a re-rank factor) for options.target_recall, record them in the manifest and
    write them into index.faiss; returns the tuning and the files (paths in the version) it wrote."""
    ntotal = manifest.merge.ntotal
    n_queries = min(options.n_queries, ntotal)
    k = min(options.k, ntotal - 1) or 1
    index = read_index(
        version_dir / MERGED_FILE, faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.merge.on_disk else faiss.IO_FLAG_MMAP
    )
    refiner: list[Refiner] = []

    def search(queries, kk, nprobe, refine):
        if refine > 1 and not refiner:
            refiner.append(Refiner(version_dir, manifest))
        return search_ivf(index, queries, kk, nprobe, refiner[0] if refiner else None, refine)

    queries = sentence_queries(version_dir, manifest, n_queries, TUNE_SEED, query_encoder(manifest))
    self_ids = np.full(len(queries), -1, np.int64)  # a sentence is not a stored vector: nothing to leave out
    truth = exact_truth(version_dir, manifest, queries, self_ids, k)
    nprobes = nprobe_sweep(manifest.nlist)
    sweep = measure_sweep(search, queries, self_ids, truth, [k], nprobes)
    chosen, written = select_nprobe(sweep, options.target_recall, k), []
    if chosen is None:
        written = write_fp16_embeddings(version_dir, manifest)
        for factor in REFINE_FACTORS:
            refined = measure_sweep(search, queries, self_ids, truth, [k], nprobes, refine=factor)
            sweep += refined
            chosen = select_nprobe(refined, options.target_recall, k)
            if chosen:
                break
    best = max(sweep, key=lambda p: (p.recall[k], -p.ms_per_query))
    pick = chosen or best
    tuning = Tuning(
        target=options.target_recall,
        k=k,
        queries=n_queries,
        sweep=sweep,
        reached=chosen is not None,
        nprobe=pick.nprobe,
        refine_factor=pick.refine,
        recall=pick.recall[k],
    )
    if chosen is None:
        tuning.note = (
            f"recall@{k} {best.recall[k]:.3f} at nprobe {best.nprobe} (re-rank x{best.refine}) is the best "
            "this index reaches; a finer index (more PQ bytes, or Flat/SQ8) is needed for the target"
        )
    manifest.tuning = tuning
    manifest.refine_factor = tuning.refine_factor if tuning.refine_factor > 1 else None
    if tuning.nprobe != manifest.nprobe:
        manifest.nprobe = tuning.nprobe
        store_nprobe(version_dir, manifest)
        written.append(MERGED_FILE)
    return tuning, written


def query_encoder(manifest: Manifest):
    """The build's model as search runs it: its query prompt and normalization."""
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
        tuning, written = tune(version.local_root, manifest, TuneOptions(target_recall=config.target_recall))
    if not tuning.reached:
        manifest.warnings.append(f"--target-recall {config.target_recall}: {tuning.note}")
    for rel in written:
        manifest.files_sha256[rel] = written_sha256(version.local(rel))
    version.push(written)
    return tuning
