"""Encode stage: a pool of Ray actors, each loading the model once, turns every shard into
normalized float32 embeddings, global row ids and doc-store rows, written into the shard folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import ray

from pipelines.config import BuildConfig
from pipelines.corpus import InputUnavailable, compose_text, document_id, read_piece
from pipelines.docstore import DOCS_FILE, ROW_IDS_FILE, DocWriter
from pipelines.model import TRUNCATED, clip_to_model
from pipelines.shard_plan import Shard
from pipelines.reuse import CONTENT_HASHES_FILE, PreviousVectors, content_hash
from pipelines.storage import Store, file_sha256

EMBEDDINGS_FILE = "embeddings.f32"  # raw little-endian float32, rows x dim, in row_ids order
DOC_HASHES_FILE = "doc_hashes.npy"
# what the encode stage writes per shard
SHARD_ENCODE_FILES = (EMBEDDINGS_FILE, ROW_IDS_FILE, DOCS_FILE, DOC_HASHES_FILE, CONTENT_HASHES_FILE)


def shard_rel(shard_id: int) -> str:
    """A shard's folder inside its version."""
    return f"shards/{shard_id:05d}"


def shard_dir(version_dir: str | Path, shard_id: int) -> Path:
    return Path(version_dir) / shard_rel(shard_id)


def doc_id_hash(doc_id) -> int:
    """64-bit hash of a document id, to find duplicates without holding the ids themselves."""
    digest = hashlib.blake2b(json.dumps(doc_id, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


def load_embeddings(directory: Path, count: int, dim: int) -> np.ndarray:
    """Memory-map one shard's embeddings."""
    if count == 0:
        return np.zeros((0, dim), np.float32)
    return np.memmap(directory / EMBEDDINGS_FILE, dtype="<f4", mode="r", shape=(count, dim))


class ShardEncoder:
    """Ray actor: the model stays loaded while shards stream through it."""

    def __init__(self, config: BuildConfig, use_gpu: bool, threads: int, previous: PreviousVectors | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        from pipelines.model import load_model

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

    def encode_shard(self, shard: Shard, version: Store) -> dict:
        """Encode one shard; returns its ShardState fields and its files' sha256. An input store that stops
        answering is waited out like the output store (the shard starts over when it is back)."""
        rows_before = self.rows

        def attempt() -> dict:
            self.rows = rows_before
            return self._encode_shard(shard, version)

        return version.retry(f"read the input of shard {shard.shard_id}", attempt, retry_on=(InputUnavailable,))

    def _encode_shard(self, shard: Shard, version: Store) -> dict:
        """Output files appear only when complete, and are pushed to the output store before the shard
        counts as done."""
        cfg = self.config
        out = version.local(shard_rel(shard.shard_id))
        out.mkdir(parents=True, exist_ok=True)
        fields = cfg.text_fields()
        skipped: dict[str, int] = {}
        hashes: list[int] = []
        contents: list[int] = []
        writer = DocWriter(out)
        rows_read = encoded = reused = changed = 0
        tmp = out / (EMBEDDINGS_FILE + ".tmp")
        with open(tmp, "wb") as emb_file:
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
        writer.close()
        np.save(out / DOC_HASHES_FILE, np.asarray(hashes, dtype=np.uint64))
        np.save(out / CONTENT_HASHES_FILE, np.asarray(contents, dtype=np.uint64))
        os.replace(tmp, out / EMBEDDINGS_FILE)
        files = {f"{shard_rel(shard.shard_id)}/{name}": file_sha256(out / name) for name in SHARD_ENCODE_FILES}
        version.push(list(files))
        return {
            "shard_id": shard.shard_id,
            "rows_read": rows_read,
            "docs_encoded": encoded,
            "skipped": skipped,
            "vectors_reused": reused,
            "ids_changed": changed,
            "embeddings_sha256": files[f"{shard_rel(shard.shard_id)}/{EMBEDDINGS_FILE}"],
            "files": files,
        }


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
    on_shard_done(state) as each shard finishes (in completion order). previous: a reindex's earlier
    version, whose vectors of unchanged documents are copied instead of encoded.
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
