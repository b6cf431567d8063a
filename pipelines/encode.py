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
from pipelines.corpus import compose_text, read_piece
from pipelines.docstore import DocWriter
from pipelines.errors import RayIndexError
from pipelines.shard_plan import Shard

EMBEDDINGS_FILE = "embeddings.f32"  # raw little-endian float32, rows x dim, in row_ids order
DOC_HASHES_FILE = "doc_hashes.npy"


def shard_dir(version_dir: str | Path, shard_id: int) -> Path:
    return Path(version_dir) / "shards" / f"{shard_id:05d}"


def doc_id_hash(doc_id) -> int:
    """64-bit hash of a document id, to find duplicates without holding the ids themselves."""
    digest = hashlib.blake2b(json.dumps(doc_id, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_embeddings(directory: Path, count: int, dim: int) -> np.ndarray:
    """Memory-map one shard's embeddings."""
    if count == 0:
        return np.zeros((0, dim), np.float32)
    return np.memmap(directory / EMBEDDINGS_FILE, dtype="<f4", mode="r", shape=(count, dim))


class ShardEncoder:
    """Ray actor: the model stays loaded while shards stream through it."""

    def __init__(self, config: BuildConfig, use_gpu: bool, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        from pipelines.model import load_model

        self.model = load_model(config.model, self.device, fp16=self.device == "cuda")
        self.config = config
        self.rows = 0

    def dimension(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def rows_done(self) -> int:
        return self.rows

    def encode_shard(self, shard: Shard, version_dir: str) -> dict:
        """Encode one shard; returns its ShardState fields. Output files appear only when complete."""
        cfg = self.config
        out = shard_dir(version_dir, shard.shard_id)
        out.mkdir(parents=True, exist_ok=True)
        fields = cfg.text_fields()
        skipped: dict[str, int] = {}
        sha = hashlib.sha256()
        hashes: list[int] = []
        writer = DocWriter(out)
        rows_read = encoded = 0
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
                        doc_id = row_id if cfg.id_column is None else record.get(cfg.id_column)
                        if doc_id is None:
                            row = row_id - piece.global_start + piece.row_start
                            raise RayIndexError(
                                f"{piece.path} row {row}: id column {cfg.id_column!r} is null; every document needs an id"
                            )
                        keep_ids.append(row_id)
                        doc_ids.append(doc_id)
                        texts.append(text)
                        metas.append({k: v for k, v in record.items() if k != cfg.id_column and k not in fields})
                    if texts:
                        vectors = self.model.encode(
                            texts,
                            batch_size=cfg.batch_size,
                            normalize_embeddings=cfg.metric == "ip",
                            convert_to_numpy=True,
                            show_progress_bar=False,
                        ).astype("<f4", copy=False)
                        block = np.ascontiguousarray(vectors).tobytes()
                        emb_file.write(block)
                        sha.update(block)
                        writer.write(np.asarray(keep_ids, np.int64), doc_ids, texts, metas)
                        hashes.extend(doc_id_hash(d) for d in doc_ids)
                        encoded += len(texts)
                    self.rows += len(batch.row_ids)
        writer.close()
        np.save(out / DOC_HASHES_FILE, np.asarray(hashes, dtype=np.uint64))
        os.replace(tmp, out / EMBEDDINGS_FILE)
        return {
            "shard_id": shard.shard_id,
            "rows_read": rows_read,
            "docs_encoded": encoded,
            "skipped": skipped,
            "embeddings_sha256": sha.hexdigest(),
        }


def encoder_resources(use_gpu: bool, cluster_cpus: float, cluster_gpus: float, encoders: int | None, n_shards: int) -> tuple[int, dict]:
    """How many encoder actors (never more than shards), and the resources each asks Ray for.

    On CPU the cores are split between the actors, so one shard still gets every core."""
    if use_gpu:
        count = min(encoders or max(1, int(cluster_gpus)), n_shards)
        return max(1, count), {"num_gpus": 1, "num_cpus": 1}
    count = max(1, min(encoders or max(1, int(cluster_cpus)), n_shards))
    return count, {"num_cpus": max(1, int(cluster_cpus) // count)}


def encode_shards(config: BuildConfig, shards: list[Shard], version_dir: str, use_gpu: bool, on_progress=None,
                  check_dimension=None) -> tuple[int, list[dict]]:
    """Run every shard through an actor pool; returns (dimension, per-shard states in completion order).

    check_dimension(dim) runs once the model is loaded and before any shard is encoded (to refuse
    an unusable --index early); on_progress(rows_done) is called while encoding runs.
    """
    resources = ray.cluster_resources()
    count, per_actor = encoder_resources(use_gpu, resources.get("CPU", 1), resources.get("GPU", 0), config.encoders, len(shards))
    actor_cls = ray.remote(max_concurrency=2, max_restarts=2, max_task_retries=2, **per_actor)(ShardEncoder)
    actors = [actor_cls.remote(config, use_gpu, int(per_actor["num_cpus"])) for _ in range(count)]
    try:
        dim = ray.get(actors[0].dimension.remote())
        if check_dimension:
            check_dimension(dim)
        pending = list(shards)
        running: dict = {}
        idle = list(actors)
        states = []
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                running[actor.encode_shard.remote(pending.pop(0), str(version_dir))] = actor
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                idle.append(running.pop(ref))
                states.append(ray.get(ref))
            if on_progress:
                on_progress(sum(ray.get([a.rows_done.remote() for a in actors])))
        return dim, states
    finally:
        for actor in actors:
            ray.kill(actor)
