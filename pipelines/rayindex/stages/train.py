"""Train stage: choose the index (or take --index, shrunk to what the corpus can train), sample
uniformly across all shards, train the FAISS index_factory string on one node (k-means on a GPU
when there is one), save the trained, empty index with its checksum.

On a reindex, the previous version's trained index is kept unless the new corpus drifted from it:
drift = coarse_mse of a sample of the new corpus under the old quantizer / the same figure on the old
training sample; past --drift-threshold, or when the versions are not comparable, it trains afresh.
"""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import ray

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.files import read_sample, sample_rows
from rayindex.infra.gpu import require_faiss_gpu
from rayindex.infra.progress import StageProgress
from rayindex.infra.ray_session import connect
from rayindex.infra.resources import gpu_task_resources, match_threads_to_ray_cpus, max_node_cpus
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf import index_params
from rayindex.ivf.index import (
    coarse_mse,
    gpus_usable,
    make_index,
    pre_transforms,
    read_index,
    trained_fingerprint,
    write_index,
)
from rayindex.ivf.index_params import MIN_POINTS_PER_CENTROID, suggest_for_too_few_points
from rayindex.layout import EMBEDDINGS_FILE, TRAINED_FILE, shard_rel
from rayindex.manifest import Drift, Manifest, TrainedIndex
from rayindex.versions import previous_version

DRIFT_SAMPLE = 20_000  # vectors of the new corpus on which a reindex measures drift


def check_trainable(index: faiss.Index, index_string: str, n_train: int) -> list[str]:
    """Refuse indexes the sample cannot train (with a suggestion); return warnings for weak ones.

    The build has already shrunk an --index the corpus is too small for (index_params.fit_index_to_corpus),
    so what is refused here is a --train-sample too small for it, or a string that function does not read."""
    ivf = faiss.extract_index_ivf(index)
    if n_train < ivf.nlist:
        raise RayIndexError(
            f"--index {index_string!r} has {ivf.nlist} centroids but only {n_train} vectors to train them; "
            f"use --index {suggest_for_too_few_points(n_train, index_string, ivf.nlist)!r} or a bigger --train-sample "
            f"or corpus"
        )
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None and n_train < (1 << pq.nbits):
        raise RayIndexError(
            f"--index {index_string!r}: its PQ needs at least {1 << pq.nbits} training vectors, the sample has "
            f"{n_train}; use --index 'IVF{max(1, ivf.nlist)},Flat' or a bigger --train-sample or corpus"
        )
    for transform in pre_transforms(index):
        if isinstance(transform, faiss.OPQMatrix) and n_train < transform.d_in:
            # FAISS's OPQ training crashes the process (invalid free) below this; refuse instead
            raise RayIndexError(
                f"--index {index_string!r}: OPQ needs at least {transform.d_in} training vectors (the dimension), "
                f"the sample has {n_train}; drop the OPQ prefix or use a bigger --train-sample or corpus"
            )
    warnings = []
    if ivf.nlist > 1 and n_train < MIN_POINTS_PER_CENTROID * ivf.nlist:  # one list needs no clustering
        warnings.append(
            f"{n_train} training vectors for {ivf.nlist} centroids is under FAISS's {MIN_POINTS_PER_CENTROID} per "
            f"centroid; recall may suffer (consider --index "
            f"{suggest_for_too_few_points(n_train, index_string, ivf.nlist)!r})"
        )
    return warnings


def sampled_vectors(
    version: Store,
    embeddings: dict[str, str],
    shard_rels: list[str],
    counts: list[int],
    dim: int,
    size: int,
    seed: int,
) -> np.ndarray:
    """A uniform sample of the shards' vectors (infra/files.py sample_rows), the same rows wherever the
    version lives: on a local output from the shards' memory maps (files checked against the manifest);
    on a remote store only the sampled rows' bytes, read as byte ranges (Store.read_ranges), instead of
    pulling every shard's whole embeddings onto this node (each object's size is checked by the read; its
    bytes were checked against the manifest when encoded and pushed)."""
    if not version.remote:
        version.pull(embeddings)
        return read_sample([version.local(rel) for rel in shard_rels], counts, dim, size, seed)
    row_bytes = dim * 4
    parts = []
    for rel, rows in zip(shard_rels, sample_rows(counts, size, seed)):
        if len(rows):
            chunks = version.read_ranges(
                f"{rel}/{EMBEDDINGS_FILE}", (rows * row_bytes).tolist(), ((rows + 1) * row_bytes).tolist()
            )
            parts.append(np.frombuffer(b"".join(chunks), "<f4").reshape(len(rows), dim))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def train_index(index_string: str, dim: int, metric: str, sample: np.ndarray, seed: int, use_gpu: bool) -> faiss.Index:
    """Train an empty index on the sample; k-means of the coarse quantizer runs on GPU when asked and possible."""
    index = make_index(index_string, dim, metric)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    if use_gpu and gpus_usable():
        # the FAISS-recommended way: run the coarse k-means assignment on GPU, keep the index on CPU
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise RayIndexError(
            f"--index {index_string!r}: FAISS could not train it on {len(sample)} vectors ({exc})"
        ) from exc
    ivf.clustering_index = None
    return index


def train_quantizer(
    index_string: str,
    metric: str,
    version: Store,
    embeddings: dict[str, str],
    shard_rels: list[str],
    counts: list[int],
    dim: int,
    sample_size: int,
    seed: int,
    use_gpu: bool,
) -> dict:
    """The Ray task: sample (from the shards' embeddings, pulled into this node's mirror and checked),
    train, write and push trained.faiss; returns the facts the stage records."""
    if use_gpu:
        require_faiss_gpu()  # never a quiet k-means on the CPU while a GPU is held
    match_threads_to_ray_cpus()
    n_train = min(sample_size, int(sum(counts)))
    warnings = check_trainable(make_index(index_string, dim, metric), index_string, n_train)
    sample = sampled_vectors(version, embeddings, shard_rels, counts, dim, n_train, seed)
    index = train_index(index_string, dim, metric, sample, seed, use_gpu)
    path = version.local(TRAINED_FILE)
    write_index(index, path)
    version.push([TRAINED_FILE])
    return {
        "sample_size": int(len(sample)),
        "trained_sha256": written_sha256(path),
        "trained_fingerprint": trained_fingerprint(index),
        "nlist": int(faiss.extract_index_ivf(index).nlist),
        "coarse_mse": coarse_mse(index, sample),
        "warnings": warnings,
        "gpu": bool(use_gpu and gpus_usable()),
    }


def choose_index(config: BuildConfig, n_vectors: int, dim: int) -> tuple[str, list[str]]:
    """--index, or the size-based choice (under --max-index-memory), shrunk to what n_vectors can train."""
    try:
        index_string = config.index or index_params.choose_index_string(n_vectors, dim, config.max_index_memory)
    except ValueError as exc:
        raise RayIndexError(f"--max-index-memory: {exc}") from exc
    index_string, fallback = index_params.fit_index_to_corpus(index_string, n_vectors, dim)
    return index_string, [fallback] if fallback else []


def reuse_quantizer(config: BuildConfig, manifest: Manifest, version: Store) -> TrainedIndex | None:
    """Reindex: the previous version's trained index (copied into this version) unless the corpus drifted
    from it or the versions are not comparable; None (and the reason in the manifest) to train afresh."""
    before, old = previous_version(Store(config.output, config.storage_retry), manifest)
    record = manifest.reindex
    reason = None
    if (
        before.index_string != (config.index or before.index_string)
        or before.dimension != manifest.dimension
        or before.metric != manifest.metric
    ):
        reason = "the index string, dimension or metric differs from the previous version's"
    elif before.training.coarse_mse is None:
        reason = "the previous version recorded no drift baseline"
    if reason is None:
        old.pull({TRAINED_FILE: before.training.trained_sha256})
        trained = read_index(old.local(TRAINED_FILE))
        counts = manifest.shard_counts()
        sample = sampled_vectors(
            version,
            manifest.shard_files((EMBEDDINGS_FILE,)),
            [shard_rel(s.shard_id) for s in manifest.shards],
            counts,
            manifest.dimension,
            min(sum(counts), DRIFT_SAMPLE),
            config.seed,
        )
        drift = coarse_mse(trained, sample) / max(before.training.coarse_mse, 1e-12)
        record.drift = Drift(
            ratio=round(drift, 4),
            threshold=record.drift_threshold,
            baseline_mse=before.training.coarse_mse,
            sample=int(len(sample)),
        )
        if drift > record.drift_threshold:
            reason = (
                f"drift {drift:.3f} > threshold {record.drift_threshold}: the old centroids no longer fit the corpus"
            )
    if reason:
        record.path, record.reason = "full retrain", reason
        return None
    shutil.copyfile(old.local(TRAINED_FILE), version.local(TRAINED_FILE))
    version.push([TRAINED_FILE])
    record.path = "incremental"
    record.reason = (
        f"drift {drift:.3f} <= threshold {record.drift_threshold}: reused the trained quantizer of {before.run_id}"
    )
    # its nprobe too, tuned or not: the same lists hold the same kind of data (a --target-recall reindex tunes again)
    return before.training.model_copy(update={"reused_from": before.run_id, "warnings": [], "nprobe": before.nprobe})


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> TrainedIndex:
    """The trained index of this run: kept when its inputs are unchanged and it verifies, reused on a
    reindex when the corpus did not drift, else trained in a Ray task on one whole node (or one GPU)."""
    inputs = [s.embeddings_sha256 for s in manifest.shard_states]
    if (
        manifest.training
        and manifest.training.embeddings_sha256 == inputs
        and version.verified({TRAINED_FILE: manifest.training.trained_sha256})
    ):
        manifest.reused.train = True
        return manifest.training
    trained = reuse_quantizer(config, manifest, version) if manifest.reindex else None
    if trained is None:
        connect(config.ray_address, config.s3_endpoint)
        n_vectors, dim = manifest.counts.passages, manifest.dimension
        use_gpu = manifest.model.device == "cuda"
        with progress.stage("train", 1, "indexes"):
            index_string, warnings = choose_index(config, n_vectors, dim)
            probe = make_index(index_string, dim, manifest.metric)  # keep it alive: ivf points into it
            ivf = faiss.downcast_index(faiss.extract_index_ivf(probe))
            sample_size = config.train_sample or index_params.training_sample_size(
                n_vectors, ivf.nlist, uses_pq=hasattr(ivf, "pq")
            )
            # every core of one node (OPQ, PQ codebooks, the HNSW quantizer, coarse_mse and CPU k-means run on
            # FAISS's threads, set to the task's CPUs); on a GPU build a whole GPU node, k-means on its GPU
            resources = gpu_task_resources(ray.nodes(), whole_node=True) if use_gpu else {"num_cpus": max_node_cpus()}
            task = ray.remote(**resources)(train_quantizer)
            facts = ray.get(
                task.remote(
                    index_string,
                    manifest.metric,
                    version,
                    manifest.shard_files((EMBEDDINGS_FILE,)),
                    [shard_rel(s.shard_id) for s in manifest.shards],
                    manifest.shard_counts(),
                    dim,
                    sample_size,
                    config.seed,
                    use_gpu,
                )
            )
        facts["warnings"] = warnings + facts["warnings"]
        trained = TrainedIndex(
            index_string=index_string,
            chosen_automatically=config.index is None,
            nprobe=index_params.default_nprobe(facts["nlist"]),
            **facts,
        )
    trained.embeddings_sha256 = inputs  # trained from these: valid while they are unchanged
    manifest.training = trained
    manifest.files_sha256[TRAINED_FILE] = trained.trained_sha256
    manifest.nprobe, manifest.refine_factor = trained.nprobe, None
    manifest.warnings.extend(trained.warnings)
    return trained
