"""Encode stage: a pool of Ray actors, each loading the model once, turns every shard into
normalized float32 embeddings, global row ids and doc-store rows, written into the shard folder;
then the counts, and the checks on them (no documents left, duplicate ids).

On a reindex, documents whose id and content are unchanged since the previous version get their
vector copied from it instead of encoded (parts/reuse.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import numpy as np
import ray

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.faults import checkpoint
from rayindex.infra.progress import StageProgress
from rayindex.infra.ray_session import connect
from rayindex.infra.resources import use_gpus
from rayindex.infra.storage import Store, file_sha256
from rayindex.layout import (CONTENT_HASHES_FILE, DOC_HASHES_FILE, DOCS_FILE, EMBEDDINGS_FILE, ROW_IDS_FILE, SHARD_ENCODE_FILES,
                             atomic_file, save_npy, shard_dir, shard_rel)
from rayindex.manifest import Counts, EncodedShard, Manifest, Shard, ShardState
from rayindex.parts.corpus import InputUnavailable, compose_text, document_id, read_piece
from rayindex.parts.docstore import DocStore, DocWriter
from rayindex.parts.ivf import make_index
from rayindex.parts.model import TRUNCATED, clip_to_model
from rayindex.parts.reuse import PreviousVectors, content_hash
from rayindex.versions import done_shards, previous_version, save_manifest


def doc_id_hash(doc_id) -> int:
    """64-bit hash of a document id, to find duplicates without holding the ids themselves."""
    digest = hashlib.blake2b(json.dumps(doc_id, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


class ShardEncoder:
    """Ray actor: the model stays loaded while shards stream through it."""

    def __init__(self, config: BuildConfig, use_gpu: bool, threads: int, previous: PreviousVectors | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        from rayindex.parts.model import load_model

        self.model = load_model(config.model, self.device, fp16=self.device == "cuda")
        self.config = config
        self.previous = previous  # a reindex: vectors of unchanged documents are copied, not encoded
        self.rows = 0

    def dimension(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def device_used(self) -> str:
        """"cuda", or "cpu" also on a node that advertises a GPU torch cannot use (fake clusters)."""
        return self.device

    def rows_done(self) -> int:
        return self.rows

    def encode_shard(self, shard: Shard, version: Store) -> EncodedShard:
        """Encode one shard; returns its state and its files' sha256. An input store that stops
        answering is waited out like the output store (the shard starts over when it is back)."""
        rows_before = self.rows

        def attempt() -> EncodedShard:
            self.rows = rows_before
            return self._encode_shard(shard, version)

        return version.retry(f"read the input of shard {shard.shard_id}", attempt, retry_on=(InputUnavailable,))

    def _encode_shard(self, shard: Shard, version: Store) -> EncodedShard:
        """Output files appear only when complete, and are pushed to the output store before the shard
        counts as done."""
        cfg = self.config
        out = version.local(shard_rel(shard.shard_id))
        out.mkdir(parents=True, exist_ok=True)
        fields = cfg.text_fields()
        skipped: dict[str, int] = {}
        hashes: list[int] = []
        contents: list[int] = []
        rows_read = encoded = reused = changed = 0
        with contextlib.ExitStack() as files:
            writer = files.enter_context(DocWriter(out))
            emb_file = open(files.enter_context(atomic_file(out / EMBEDDINGS_FILE)), "wb")
            files.callback(emb_file.close)  # closed before atomic_file fsyncs and renames it
            for piece in shard.pieces:
                for batch in read_piece(piece):
                    rows_read += len(batch.row_ids)
                    if batch.non_utf8:
                        skipped["non_utf8_replaced (kept)"] = skipped.get("non_utf8_replaced (kept)", 0) + batch.non_utf8
                    keep_ids, doc_ids, texts, metas = [], [], [], []
                    for row_id, record in zip(batch.row_ids.tolist(), batch.records):
                        text = None if record is None else compose_text(record, fields, cfg.template)
                        if text is None:
                            reason = "blank_line" if record is None else "empty_or_null_text"
                            skipped[reason] = skipped.get(reason, 0) + 1
                            continue
                        row = row_id - piece.global_start + piece.row_start
                        doc_id = row_id if cfg.id_column is None else document_id(record, cfg.id_column, piece.path, row)
                        keep_ids.append(row_id)
                        doc_ids.append(doc_id)
                        texts.append(text)
                        metas.append({k: v for k, v in record.items() if k != cfg.id_column and k not in fields})
                    if texts:
                        model_texts, truncated = clip_to_model(self.model, texts)
                        if truncated:  # kept: embedded from their first max_seq_length tokens
                            skipped[TRUNCATED] = skipped.get(TRUNCATED, 0) + truncated
                        id_hashes = np.array([doc_id_hash(d) for d in doc_ids], dtype=np.uint64)
                        content_hashes = np.array([content_hash(*doc) for doc in zip(doc_ids, texts, metas)], dtype=np.uint64)
                        vectors = np.empty((len(texts), self.dimension()), dtype="<f4")
                        found = np.zeros(len(texts), dtype=bool)
                        if self.previous is not None:
                            found, vectors[found], n_changed = self.previous.lookup(content_hashes, id_hashes)
                            reused += int(found.sum())
                            changed += n_changed
                        if not found.all():
                            vectors[~found] = self.model.encode(
                                [t for t, hit in zip(model_texts, found) if not hit],
                                batch_size=cfg.batch_size,
                                normalize_embeddings=cfg.metric == "ip",
                                convert_to_numpy=True,
                                show_progress_bar=False,
                            )
                        emb_file.write(vectors.tobytes())
                        writer.write(np.asarray(keep_ids, np.int64), doc_ids, texts, metas)
                        hashes.extend(id_hashes.tolist())
                        contents.extend(content_hashes.tolist())
                        encoded += len(texts)
                    self.rows += len(batch.row_ids)
            save_npy(files.enter_context(atomic_file(out / DOC_HASHES_FILE)), np.asarray(hashes, dtype=np.uint64))
            save_npy(files.enter_context(atomic_file(out / CONTENT_HASHES_FILE)), np.asarray(contents, dtype=np.uint64))
        shard_files = {shard_rel(shard.shard_id, name): file_sha256(out / name) for name in SHARD_ENCODE_FILES}
        version.push(list(shard_files))
        return EncodedShard(shard_id=shard.shard_id, rows_read=rows_read, docs_encoded=encoded, skipped=skipped,
                            vectors_reused=reused, ids_changed=changed,
                            embeddings_sha256=shard_files[shard_rel(shard.shard_id, EMBEDDINGS_FILE)], files=shard_files)


def encoder_resources(use_gpu: bool, cluster_cpus: float, cluster_gpus: float, encoders: int | None, n_shards: int) -> tuple[int, dict]:
    """How many encoder actors (never more than shards), and the resources each asks Ray for.

    On CPU the cores are split between the actors, so one shard still gets every core."""
    if use_gpu:
        count = min(encoders or max(1, int(cluster_gpus)), n_shards)
        return max(1, count), {"num_gpus": 1, "num_cpus": 1}
    count = max(1, min(encoders or max(1, int(cluster_cpus)), n_shards))
    return count, {"num_cpus": max(1, int(cluster_cpus) // count)}


def encode_shards(config: BuildConfig, shards: list[Shard], version: Store, use_gpu: bool, on_progress=None,
                  check_dimension=None, on_shard_done=None, previous: PreviousVectors | None = None) -> tuple[int, str]:
    """Run every shard through an actor pool; returns the embedding dimension and the device the
    encoders used ("cpu" on a node that advertises a GPU torch cannot use).

    check_dimension(dim) runs once the model is loaded and before any shard is encoded (to refuse
    an unusable --index early); on_progress(rows_done) is called while encoding runs, and
    on_shard_done(EncodedShard) as each shard finishes (in completion order). previous: a reindex's
    earlier version, whose vectors of unchanged documents are copied instead of encoded.
    """
    resources = ray.cluster_resources()
    count, per_actor = encoder_resources(use_gpu, resources.get("CPU", 1), resources.get("GPU", 0), config.encoders, len(shards))
    actor_cls = ray.remote(max_concurrency=2, max_restarts=2, max_task_retries=2, **per_actor)(ShardEncoder)
    actors = [actor_cls.remote(config, use_gpu, int(per_actor["num_cpus"]), previous) for _ in range(count)]
    try:
        dim, device = ray.get([actors[0].dimension.remote(), actors[0].device_used.remote()])
        if check_dimension:
            check_dimension(dim)
        pending = list(shards)
        running: dict = {}
        idle = list(actors)
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                running[actor.encode_shard.remote(pending.pop(0), version)] = actor
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                idle.append(running.pop(ref))
                state = ray.get(ref)
                if on_shard_done:
                    on_shard_done(state)
            if on_progress:
                on_progress(sum(ray.get([a.rows_done.remote() for a in actors])))
        return dim, device
    finally:
        for actor in actors:
            ray.kill(actor)


def locate_row(shards: list[Shard], row_id: int) -> str:
    """'file row N' for a global row id, for error messages."""
    for shard in shards:
        for piece in shard.pieces:
            if piece.global_start <= row_id < piece.global_start + piece.num_rows:
                return f"{piece.path} row {row_id - piece.global_start + piece.row_start}"
    return f"row {row_id}"


def check_unique_ids(manifest: Manifest, version: Store, id_column: str) -> None:
    """Refuse duplicate document ids, naming one and where it occurs."""
    version.pull(manifest.shard_files((DOC_HASHES_FILE,)))
    version_dir = version.local_root
    per_shard = [np.load(shard_dir(version_dir, s.shard_id) / DOC_HASHES_FILE) for s in manifest.shards]
    ordered = np.sort(np.concatenate(per_shard))
    dups = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(dups):
        return
    version.pull(manifest.shard_files((ROW_IDS_FILE, DOCS_FILE)))  # only now: the doc store names the duplicate
    store = DocStore([shard_dir(version_dir, s.shard_id) for s in manifest.shards], [s.global_start for s in manifest.shards])
    places, doc_id = [], None
    for shard, shard_hashes in zip(manifest.shards, per_shard):
        row_ids = np.load(shard_dir(version_dir, shard.shard_id) / ROW_IDS_FILE)
        for row_id in row_ids[shard_hashes == dups[0]][:2]:
            doc_id = store.get(int(row_id))["id"]
            places.append(locate_row(manifest.shards, int(row_id)))
    raise RayIndexError(
        f"duplicate id {doc_id!r} in column {id_column!r} ({len(dups)} duplicate(s) in all), at: {'; '.join(places[:2])}. "
        "Ids must be unique: fix the corpus or pick another --id-column"
    )


def previous_vectors(config: BuildConfig, manifest: Manifest) -> PreviousVectors | None:
    """The reindex's previous version as a vector source, when its vectors are comparable (same model,
    metric) and it recorded content hashes; otherwise every document is encoded (and the manifest says why)."""
    before, old = previous_version(Store(config.output, config.storage_retry), manifest)
    have_hashes = any(rel.endswith(CONTENT_HASHES_FILE) for rel in before.files_sha256)
    if before.model.name != config.model or before.metric != config.metric or not have_hashes:
        manifest.reindex.vectors_not_reused = "the previous version used another model or metric, or has no content hashes"
        return None
    return PreviousVectors(old, before.shard_files((EMBEDDINGS_FILE, DOC_HASHES_FILE, CONTENT_HASHES_FILE)),
                           [shard_rel(s.shard_id) for s in before.shards], before.shard_counts(), before.dimension)


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> Counts:
    """Embeddings, ids and doc store for every shard not already done (each finished shard saved in the
    manifest at once: a killed driver loses none); then the counts and the checks on them."""
    connect(config.ray_address, config.s3_endpoint)
    use_gpu = use_gpus(config.gpu)
    done = done_shards(manifest, version, "embeddings_sha256", SHARD_ENCODE_FILES)
    manifest.reused.encode = sorted(done)
    todo = [s for s in manifest.shards if s.shard_id not in done]

    def check_index_early(dim: int) -> None:
        if config.index:  # a typo in --index should fail before the encode; too few documents only shrink it (train)
            make_index(config.index, dim, config.metric)

    def record(encoded: EncodedShard) -> None:
        manifest.files_sha256.update(encoded.files)
        manifest.shard_states[encoded.shard_id] = ShardState(**encoded.model_dump(exclude={"files"}))
        save_manifest(version, manifest)
        checkpoint("encode", sum(1 for s in manifest.shard_states if s.embeddings_sha256))

    if todo:
        previous = previous_vectors(config, manifest) if manifest.reindex else None
        with progress.stage("encode", sum(s.num_rows for s in todo), "docs") as update:
            dim, device = encode_shards(config, todo, version, use_gpu, on_progress=update, check_dimension=check_index_early,
                                        on_shard_done=record, previous=previous)
        manifest.dimension = dim
        manifest.model = manifest.model.model_copy(update={"dimension": dim, "device": device})
    manifest.counts = count_documents(manifest.shard_states)
    if manifest.counts.docs_encoded == 0:
        total_rows = sum(s.num_rows for s in manifest.shards)
        raise RayIndexError(f"no documents to index: all {total_rows} rows were skipped ({manifest.counts.skipped}); "
                            "check --text-column")
    if config.id_column:
        check_unique_ids(manifest, version, config.id_column)
    if manifest.reindex:
        r, encoded = manifest.reindex, manifest.counts.docs_encoded
        r.unchanged = sum(s.vectors_reused for s in manifest.shard_states)
        r.changed = sum(s.ids_changed for s in manifest.shard_states)
        r.added, r.deleted, r.encoded = encoded - r.unchanged - r.changed, r.previous_docs - r.unchanged - r.changed, encoded - r.unchanged
    return manifest.counts


def count_documents(states: list[ShardState]) -> Counts:
    skipped: dict[str, int] = {}
    for s in states:
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return Counts(rows_read=sum(s.rows_read for s in states), docs_encoded=sum(s.docs_encoded for s in states), skipped=skipped)
