"""Encode stage: a pool of Ray actors, each loading the model once, turns every shard into float32
embeddings (one per passage: text/passages.py), their vector ids and doc-store rows, written into the
shard folder; then the counts, and the checks on them (no documents left, duplicate ids).

The data path of a shard: Arrow batches from the corpus, made into documents column by column
(text/documents.py), tokenized once by the model's own tokenizer and split into passages
(text/model.py split_passages; tokenize with --no-passages), all in a producer thread ahead of the
forward pass, which runs on length-sorted batches (embed); at most PREFETCH_CHUNKS batches wait in memory. Threads in
the actor rather than a Ray Data pipeline: the work
of a shard stays in one process (no token arrays through the object store) and the shard stays the
unit that is written, checksummed and resumed (docs/build.md).

On a reindex, documents whose id and content are unchanged since the previous version get their
vector copied from it instead of encoded (text/reuse.py).

With --vector-column the rows bring their own vectors (given_chunk; checked by text/vectors.py): the encoders
load no model, and a shard's data path reads, checks and writes them in place of the forward pass.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rayindex.config import BuildConfig
from rayindex.docstore.format import footer_sha256
from rayindex.docstore.reader import DocStore
from rayindex.docstore.writer import DocWriter
from rayindex.errors import RayIndexError
from rayindex.infra.actor_pool import run_pool
from rayindex.infra.faults import checkpoint
from rayindex.infra.files import atomic_file, save_npy
from rayindex.infra.gpu import encoder_device
from rayindex.infra.prefetch import prefetched, written_behind
from rayindex.infra.progress import StageProgress
from rayindex.infra.ray_session import check_shared_folder, connect
from rayindex.infra.resources import (
    GPU_ENV,
    GPU_ON_CPU_ENV,
    NodeGroup,
    autoscaler_adds_nodes,
    autoscaler_node_groups,
    autoscaler_status,
    cpus_per_gpu,
    encoders_use_gpus,
    gpu_from_environment,
    gpu_on_cpu,
    gpu_refusal,
    gpu_wait_reason,
    max_resource,
)
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf.index import make_index
from rayindex.layout import (
    CONTENT_HASHES_FILE,
    DOC_HASHES_FILE,
    DOCS_FILE,
    EMBEDDINGS_FILE,
    MAX_PASSAGES,
    SHARD_ENCODE_FILES,
    VECTOR_IDS_FILE,
    document_starts,
    passage_ids,
    shard_dir,
    shard_rel,
)
from rayindex.manifest import (
    Counts,
    CutDocument,
    EncodedShard,
    Manifest,
    PassageSplit,
    Shard,
    ShardState,
    SkippedFile,
)
from rayindex.text.corpus import InputUnavailable, RowBatch, read_pieces
from rayindex.text.documents import CUT, Documents, duplicate_ids_message, prepare, with_pages, with_vector_hashes
from rayindex.text.files import passage_pages
from rayindex.text.model import (
    TRUNCATED,
    Tokenized,
    VectorSettings,
    embed,
    embedding_dimension,
    encode_batch_size,
    encode_precision,
    load_model,
    nonfinite_rows,
    split_passages,
    tokenize,
    vector_settings,
)
from rayindex.text.reuse import PreviousVectors
from rayindex.text.shard_plan import locate_row
from rayindex.text.vectors import column_vectors, given_settings
from rayindex.versions import done_shards, previous_version, save_manifest

PREFETCH_CHUNKS = 4  # corpus batches (2,048 rows) read and tokenized ahead of the forward pass
WRITES_BEHIND = 2  # chunks whose vectors and doc-store rows wait for the writer thread (bounded memory)
CUT_LISTED = 100  # documents cut at --max-doc-chars listed per shard in the manifest (all are counted)
SKIPPED_LISTED = 100  # document files skipped (damaged, encrypted, ...) listed per shard (all are counted)
WAIT_NOTE_S = 30.0  # a line while the build waits for its first GPU node
# the encoder's concurrency group of its pushes (store_shard): one thread, a shard's upload at a time, beside the
# default group's two (encode_shard, and the driver's progress and settings calls)
STORE_GROUP = "store"


class Chunk(NamedTuple):
    """A batch of documents ready for the forward pass: what the producer thread made of a corpus batch."""

    rows_read: int
    documents: Documents
    tokenized: Tokenized  # every passage of the documents, in order
    passages: np.ndarray  # passages per document
    char_starts: np.ndarray  # each passage's span in its document's text
    char_ends: np.ndarray
    passage_texts: pa.Array  # each passage's text: its document's, cut by its span
    truncated: int  # --no-passages: documents cut at the model's window
    found: np.ndarray  # reindex: documents whose vectors are copied from the previous version
    reused: np.ndarray  # their passages' vectors
    changed: int  # reindex: documents encoded again because their content changed
    pages: np.ndarray | None  # document files: each passage's page (0: none), None for a table's rows
    given: np.ndarray | None = None  # --vector-column: the rows' own vectors (nothing to encode)


class ShardEncoder:
    """Ray actor: the model stays loaded while shards stream through it. In each shard, a producer thread
    reads, assembles, hashes and tokenizes the next batches (infra/prefetch.py) while this thread runs the
    forward pass and writes the results: the CPU work overlaps the model's."""

    def __init__(
        self,
        config: BuildConfig,
        use_gpu: bool,
        threads: int,
        previous: PreviousVectors | None = None,
        dimension: int | None = None,
    ):
        # the Rust tokenizer's parallelism (off in jobs/runtime_env.yaml for forked processes) is on here,
        # sized to the CPUs this actor reserved; RAYON_NUM_THREADS is read when its pool starts, below
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = encoder_device(use_gpu)  # refuses a GPU it cannot use, naming what is missing
        self.dtype = shard_precision(config, self.device)
        # --vector-column: the corpus brings the vectors (of this dimension, the plan's), no model is loaded
        self.model = None if config.vector_column else load_model(config.model, self.device, self.dtype)
        self.given_dimension = dimension
        self.batch_size = encode_batch_size(config.batch_size, self.device)
        self.config = config
        self.previous = previous  # a reindex: vectors of unchanged documents are copied, not encoded
        self.rows = 0
        self._settings: VectorSettings | None = None

    def dimension(self) -> int:
        return self.given_dimension if self.model is None else embedding_dimension(self.model)

    def settings(self) -> VectorSettings:
        """The build's metric, prompts and passage size resolved against the model (refused when they
        cannot work with it); resolved on first use, where a refusal is a task's error, not the actor's."""
        if self._settings is None:
            self._settings = (
                given_settings(self.config) if self.model is None else vector_settings(self.model, self.config)
            )
        return self._settings

    def device_used(self) -> str:
        """ "cuda", or "cpu" (also where RAYINDEX_GPU_ON_CPU=1 reserved a GPU for it: fake clusters)."""
        return self.device

    def encoded_with(self) -> str:
        """The device and dtype of the forward pass, as shards record them (precision_label)."""
        return precision_label(self.device, self.dtype)

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

    def _chunks(self, shard: Shard):
        """The producer's side: each corpus batch read, made into documents (columnar), tokenized and split
        into passages once, and looked up in the previous version (reindex)."""
        cfg, settings = self.config, self.settings()
        for batch, where in read_pieces(shard.pieces, cfg.id_column, cfg.max_file_bytes):
            if cfg.vector_column:
                yield given_chunk(batch, where, cfg, self.dimension(), settings.metric, self.previous)
                continue
            docs = prepare(batch, cfg.text_fields(), cfg.template, cfg.id_column, where, cfg.max_doc_chars)
            texts = docs.texts.to_pylist()
            if settings.passage_tokens:
                split = split_passages(
                    self.model, texts, settings.passage_tokens, settings.passage_overlap, settings.document_prompt
                )
                tokenized, passages, starts, ends, truncated = (
                    split.tokenized,
                    split.counts,
                    split.char_starts,
                    split.char_ends,
                    0,
                )
                if len(passages) and passages.max() >= MAX_PASSAGES:
                    too_long = int(np.argmax(passages))
                    raise RayIndexError(
                        f"{where(too_long)}: {passages[too_long]:,} passages, more than the "
                        f"{MAX_PASSAGES - 1:,} a document may have; raise --passage-tokens or split the document"
                    )
            else:
                tokenized = tokenize(self.model, texts, settings.document_prompt)
                passages, starts = np.ones(len(texts), np.int64), np.zeros(len(texts), np.int64)
                ends, truncated = np.fromiter(map(len, texts), np.int64, len(texts)), tokenized.truncated
            found, reused, changed = np.zeros(len(docs), bool), np.zeros((0, self.dimension()), "<f4"), 0
            if self.previous is not None and len(docs):
                found, reused, changed = self.previous.lookup(docs.content_hashes, docs.id_hashes, passages)
            passage_texts = cut_passages(docs.texts, texts, passages, starts, ends)
            pages = None if docs.page_starts is None else passage_pages(docs.page_starts, passages, starts)
            yield Chunk(
                len(batch.row_ids),
                docs,
                tokenized,
                passages,
                starts,
                ends,
                passage_texts,
                truncated,
                found,
                reused,
                changed,
                pages,
            )

    def store_shard(self, encoded: EncodedShard, version: Store) -> EncodedShard:
        """Push a shard's files to the output store (on S3, this node's copies then deleted: later stages pull
        them); returns the shard, which counts as done only now. Runs on the actor's store thread
        (STORE_GROUP) while the next shard encodes: the forward pass does not wait for the upload."""
        version.push(list(encoded.files), keep=False)
        return encoded

    def _encode_shard(self, shard: Shard, version: Store) -> EncodedShard:
        """Output files appear only when complete; store_shard then pushes them to the output store."""
        normalize = self.settings().metric == "cosine"
        out = version.local(shard_rel(shard.shard_id))
        out.mkdir(parents=True, exist_ok=True)
        skipped: dict[str, int] = {}
        cut: list[CutDocument] = []
        skipped_files: list[SkippedFile] = []
        id_hashes: list[np.ndarray] = []
        contents: list[np.ndarray] = []
        rows_read = encoded = passages = tokens = reused = changed = 0
        started = time.monotonic()
        with contextlib.ExitStack() as files:
            writer = files.enter_context(DocWriter(out))
            emb_file = open(files.enter_context(atomic_file(out / EMBEDDINGS_FILE)), "wb")
            files.callback(emb_file.close)  # closed before atomic_file fsyncs and renames it
            # every write done (or, when the block fails, stopped) before the files are closed or renamed
            with written_behind(WRITES_BEHIND) as write:
                for chunk in prefetched(self._chunks(shard), depth=PREFETCH_CHUNKS):
                    docs = chunk.documents
                    rows_read += chunk.rows_read
                    for reason, n in docs.skipped.items():
                        skipped[reason] = skipped.get(reason, 0) + n
                    cut += docs.cut[: CUT_LISTED - len(cut)]
                    skipped_files += (docs.skipped_files or [])[: SKIPPED_LISTED - len(skipped_files)]
                    if chunk.truncated:  # kept: embedded from their first max_seq_length tokens
                        skipped[TRUNCATED] = skipped.get(TRUNCATED, 0) + chunk.truncated
                    if len(docs):
                        copied = np.repeat(chunk.found, chunk.passages)
                        vectors = np.empty((len(copied), self.dimension()), dtype="<f4")
                        vectors[copied] = chunk.reused
                        if chunk.given is not None:
                            vectors = chunk.given
                        elif not copied.all():
                            vectors[~copied] = embed(
                                self.model, chunk.tokenized, self.batch_size, normalize, np.flatnonzero(~copied)
                            )
                            tokens += int(chunk.tokenized.lengths[~copied].sum())
                        refuse_nonfinite(vectors, shard.shard_id, self.encoded_with(), docs, chunk.passages)
                        write(write_chunk, emb_file, writer, vectors, docs, chunk)
                        id_hashes.append(docs.id_hashes)
                        contents.append(docs.content_hashes)
                        encoded += len(docs)
                        passages += len(copied)
                        reused += int(chunk.found.sum())
                        changed += chunk.changed
                    self.rows += chunk.rows_read
            save_npy(files.enter_context(atomic_file(out / DOC_HASHES_FILE)), concatenated(id_hashes))
            save_npy(files.enter_context(atomic_file(out / CONTENT_HASHES_FILE)), concatenated(contents))
        seconds = time.monotonic() - started
        shard_files = {shard_rel(shard.shard_id, name): written_sha256(out / name) for name in SHARD_ENCODE_FILES}
        footer = footer_sha256(out / DOCS_FILE)
        return EncodedShard(
            shard_id=shard.shard_id,
            rows_read=rows_read,
            docs_encoded=encoded,
            passages=passages,
            tokens_encoded=tokens,
            skipped=skipped,
            cut_documents=cut,
            skipped_files=skipped_files,
            vectors_reused=reused,
            ids_changed=changed,
            encode_seconds=round(seconds, 3),
            encoded_with=self.encoded_with(),
            embeddings_sha256=shard_files[shard_rel(shard.shard_id, EMBEDDINGS_FILE)],
            docs_footer_sha256=footer,
            files=shard_files,
        )


def given_chunk(
    batch: RowBatch, where, config: BuildConfig, dimension: int, metric: str, previous: PreviousVectors | None = None
) -> Chunk:
    """A corpus batch whose rows bring their vectors (--vector-column): its documents (the rows with a vector), a
    passage each spanning the whole text, and their vectors checked (text/vectors.py column_vectors). Their content
    hashes cover the vectors, so that a reindex counts a row whose vector changed as changed (the vectors written
    are the column's either way)."""
    column = config.vector_column
    docs = prepare(batch, config.text_fields(), config.template, config.id_column, where, config.max_doc_chars, column)
    positions = np.searchsorted(batch.row_ids, docs.row_ids)
    values = batch.table.column(column).take(pa.array(positions)) if len(docs) else pa.array([], pa.null())
    given = column_vectors(values, column, dimension, metric, lambda i: where(int(positions[i])))
    docs.content_hashes = with_vector_hashes(docs.content_hashes, given)
    passages = np.ones(len(docs), np.int64)
    found, reused, changed = np.zeros(len(docs), bool), np.zeros((0, dimension), "<f4"), 0
    if previous is not None and len(docs):
        found, reused, changed = previous.lookup(docs.content_hashes, docs.id_hashes, passages)
    ends = pc.utf8_length(docs.texts).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(len(docs), np.int64)
    texts = docs.texts
    return Chunk(len(batch.row_ids), docs, None, passages, starts, ends, texts, 0, found, reused, changed, None, given)


def cut_passages(
    texts: pa.Array, as_list: list[str], passages: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> pa.Array:
    """Each passage's text, cut from its document's (as_list: the texts already in Python) by its span;
    the texts themselves when every document is one passage."""
    if len(starts) == len(as_list):
        return texts
    of_document = np.repeat(np.arange(len(as_list)), passages)
    return pa.array(
        [as_list[d][a:b] for d, a, b in zip(of_document.tolist(), starts.tolist(), ends.tolist())], pa.string()
    )


def shard_precision(config: BuildConfig, device: str) -> str:
    """The dtype of a shard's vectors: --encode-dtype resolved for the device (encode_precision), or fp32 where the
    corpus brings its vectors (--vector-column: read as float32, nothing encoded, so the option does not apply and
    is not refused; the plan warns when it was given)."""
    return "fp32" if config.vector_column else encode_precision(config.encode_dtype, device)


def precision_label(device: str, dtype: str) -> str:
    """What a shard records of how it was encoded, e.g. "cuda/fp16"."""
    return f"{device}/{dtype}"


def refuse_nonfinite(vectors: np.ndarray, shard_id: int, encoded_with: str, docs: Documents, passages: np.ndarray):
    """Refuse a chunk whose vectors hold a NaN or an infinity, naming the shard and the documents (a NaN
    vector would be indexed and found by every query, or poison k-means)."""
    bad = nonfinite_rows(vectors)
    if not len(bad):
        return
    of_document = np.repeat(np.arange(len(docs)), passages)[bad]
    ids = docs.doc_ids.take(pa.array(np.unique(of_document)[:5])).to_pylist()
    raise RayIndexError(
        f"shard {shard_id}: the encoder ({encoded_with}) gave {len(bad):,} vector(s) with NaN or infinite values, "
        f"for documents {', '.join(map(repr, ids))}{' and more' if len(np.unique(of_document)) > 5 else ''}; "
        "fp16 overflows on some models: build with --encode-dtype fp32 (or bf16)"
    )


def write_chunk(emb_file, writer: DocWriter, vectors: np.ndarray, docs: Documents, chunk: Chunk) -> None:
    """A chunk's results written (the writer thread's work): its vectors, then its doc-store rows."""
    emb_file.write(vectors.tobytes())
    write_passages(writer, docs, chunk)


def write_passages(writer: DocWriter, docs: Documents, chunk: Chunk) -> None:
    """The doc-store rows of a chunk: a row per passage, the document's id and metadata repeated (a PDF's
    passages' metadata with each one's page)."""
    of_document = pa.array(np.repeat(np.arange(len(docs)), chunk.passages))
    ids = passage_ids(docs.row_ids, chunk.passages)
    metadata = docs.metadata.take(of_document)
    writer.write(
        ids,
        docs.doc_ids.take(of_document),
        docs.doc_id_is_int.take(of_document),
        ids & (MAX_PASSAGES - 1),
        chunk.char_starts,
        chunk.char_ends,
        chunk.passage_texts,
        metadata if chunk.pages is None else with_pages(metadata, chunk.pages),
    )


def concatenated(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<u8")


def encoder_resources(
    use_gpu: bool,
    cluster_cpus: float,
    cluster_gpus: float,
    encoders: int | None,
    n_shards: int,
    encoder_cpus: float | None = None,
    gpu_node_cpus_per_gpu: float | None = None,
) -> tuple[int, dict]:
    """How many encoder actors the cluster runs now (never more than shards), and the resources each asks Ray for.

    On GPUs one actor per GPU, with the CPUs it reads and tokenizes on: --encoder-cpus, else a GPU node's
    CPUs divided by its GPUs (1 when no GPU node is up yet to tell). On CPU the cores are split between
    the actors, so one shard still gets every core."""
    if use_gpu:
        count = min(encoders or max(1, int(cluster_gpus)), n_shards)
        cpus = encoder_cpus or max(1.0, float(int(gpu_node_cpus_per_gpu or 1)))
        return max(1, count), {"num_gpus": 1, "num_cpus": cpus}
    count = max(1, min(encoders or max(1, int(cluster_cpus)), n_shards))
    return count, {"num_cpus": encoder_cpus or max(1, int(cluster_cpus) // count)}


def pool_ceiling(encoders: int | None, per_actor: dict, groups: list[NodeGroup] | None, n_shards: int) -> int:
    """At most how many encoders the pool runs at once: --encoders, else as many as the autoscaler's node types
    can hold at their maximum (when it reported them), else one per shard: the pool asks for encoders while
    shards wait, and the cluster places what it can."""
    if encoders:
        return min(encoders, n_shards)
    if groups is not None:
        fits = min(max_resource(groups, name) / need for name, need in per_actor_needs(per_actor).items() if need)
        if fits != float("inf"):
            return max(1, min(int(fits), n_shards))
    return n_shards


def per_actor_needs(per_actor: dict) -> dict[str, float]:
    """Ray actor options as resource names: {"num_gpus": 1, "num_cpus": 4} -> {"GPU": 1, "CPU": 4}."""
    return {"GPU": per_actor.get("num_gpus", 0), "CPU": per_actor.get("num_cpus", 0)}


def encode_shards(
    config: BuildConfig,
    shards: list[Shard],
    version: Store,
    use_gpu: bool,
    on_progress=None,
    on_model=None,
    on_shard_done=None,
    previous: PreviousVectors | None = None,
    on_wait=None,
    dimension: int | None = None,
) -> None:
    """Run every shard through a pool of encoders that follows the cluster (infra/actor_pool.py): encoders are
    asked for while shards wait, start as nodes join (each GPU encoder with its node's CPUs per GPU), and exit
    once no shard is left for them.

    GPUs asked for but none up: refused at once when none can come (resources.gpu_refusal), else waited for up to
    --gpu-wait, on_wait(line) saying so every WAIT_NOTE_S. on_model(dim, device, settings) runs once the first
    encoder has loaded the model and before any shard is encoded, with the embedding dimension, the device the
    encoders use and the VectorSettings (to record them, and refuse an unusable --index early);
    on_progress(rows_done) is called while encoding runs, and on_shard_done(EncodedShard) as each shard
    finishes (in completion order). previous: a reindex's earlier version, whose vectors of unchanged documents
    are copied instead of encoded. dimension: the corpus's vectors' (--vector-column), where no model tells it.
    """
    resources, groups = ray.cluster_resources(), autoscaler_node_groups()
    address = ray.get_runtime_context().gcs_address
    gpus_at_start = resources.get("GPU", 0)
    if use_gpu:
        adds_nodes = autoscaler_adds_nodes(autoscaler_status(), [n["NodeID"] for n in ray.nodes()])
        refusal = gpu_refusal(gpus_at_start, groups, gpu_from_environment() is True, address, adds_nodes)
        if refusal:
            raise RayIndexError(refusal)
    _, per_actor = encoder_resources(
        use_gpu,
        resources.get("CPU", 1),
        gpus_at_start,
        config.encoders,
        len(shards),
        config.encoder_cpus,
        cpus_per_gpu(ray.nodes(), groups),
    )
    on_cpu = use_gpu and gpu_on_cpu()  # explicit: fake clusters' GPUs are resources, not devices
    actor_cls = ray.remote(max_concurrency=2, concurrency_groups={STORE_GROUP: 1}, max_restarts=2, max_task_retries=2)(
        ShardEncoder
    )

    def actor_options() -> dict:
        if not use_gpu or config.encoder_cpus:
            return per_actor
        ratio = cpus_per_gpu(ray.nodes(), groups)  # known once a GPU node is up: waiting encoders re-asked
        return dict(per_actor, num_cpus=max(1.0, float(int(ratio or 1))))

    def new_actor(options: dict):
        threads = max(1, int(options["num_cpus"]))
        return actor_cls.options(**options).remote(config, use_gpu and not on_cpu, threads, previous, dimension)

    retired_rows, described = [0], []

    def on_started(actor) -> None:
        if not described:
            described.append(ray.get([actor.dimension.remote(), actor.device_used.remote(), actor.settings.remote()]))
            if on_model:
                on_model(*described[0])

    def on_retire(actor) -> None:
        retired_rows[0] += ray.get(actor.rows_done.remote())

    def on_tick(started: list) -> None:
        if on_progress:
            on_progress(retired_rows[0] + sum(ray.get([a.rows_done.remote() for a in started])))

    noted = [-WAIT_NOTE_S]

    def on_none_started(waited_s: float) -> None:
        if not use_gpu or ray.cluster_resources().get("GPU", 0) > 0:
            return  # a GPU node is up: its encoder is starting (runtime environment, model)
        if waited_s > config.gpu_wait:
            raise RayIndexError(
                f"no GPU node joined the Ray cluster at {address} within --gpu-wait {config.gpu_wait:g} s: the "
                "autoscaler may be at its GPU node type's max_workers, out of capacity or failing to launch (see "
                "`ray status` and its monitor.log)"
                + ("" if groups is not None else f", or have no GPU node type ({GPU_ENV}=1 said it has one)")
                + ". Raise --gpu-wait, or build with --cpu"
            )
        if on_wait and waited_s - noted[0] >= WAIT_NOTE_S:
            noted[0] = waited_s
            asks = ", ".join(f"{n:g} {name}" for name, n in per_actor_needs(actor_options()).items())
            on_wait(
                f"encode: waiting for a GPU node, {waited_s:.0f} s of --gpu-wait {config.gpu_wait:g} s "
                f"(an encoder asks for {asks}): {gpu_wait_reason(groups)}"
            )

    run_pool(
        shards,
        pool_ceiling(config.encoders, per_actor, groups, len(shards)),
        actor_options,
        new_actor,
        lambda actor, shard: actor.encode_shard.remote(shard, version),
        on_shard_done or (lambda state: None),
        # the push overlaps the actor's next shard; not retried by Ray on a restarted actor (maybe on another
        # node, without the files): the pool gives the shard to an encoder again
        finish=lambda actor, encoded: actor.store_shard.options(
            concurrency_group=STORE_GROUP, max_task_retries=0
        ).remote(encoded, version),
        on_started=on_started,
        on_tick=on_tick,
        on_none_started=on_none_started,
        on_retire=on_retire,
    )


def check_unique_ids(manifest: Manifest, version: Store, id_column: str) -> None:
    """Refuse duplicate document ids, naming one and where it occurs."""
    version.pull(manifest.shard_files((DOC_HASHES_FILE,)))
    version_dir = version.local_root
    per_shard = [np.load(shard_dir(version_dir, s.shard_id) / DOC_HASHES_FILE) for s in manifest.shards]
    ordered = np.sort(np.concatenate(per_shard))
    dups = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(dups):
        return
    version.pull(manifest.shard_files((VECTOR_IDS_FILE,)))  # only now: the doc store names the duplicate
    store = DocStore.of_version(version, manifest)
    places, doc_id = [], None
    for shard, shard_hashes in zip(manifest.shards, per_shard):
        vector_ids = np.load(shard_dir(version_dir, shard.shard_id) / VECTOR_IDS_FILE)
        firsts = vector_ids[document_starts(vector_ids)]  # each document's passage 0, in document order
        for vector_id in firsts[shard_hashes == dups[0]][:2]:
            passage = store.get(int(vector_id))
            doc_id = passage["id"]
            places.append(locate_row(manifest.shards, passage["row_id"]))
    raise RayIndexError(duplicate_ids_message(doc_id, id_column, len(dups), places))


VECTOR_SETTINGS = (
    "model",
    "metric",
    "passages",
    "passage_tokens",
    "passage_overlap",
    "document_prompt",
)  # what a vector depends on


def previous_vectors(config: BuildConfig, manifest: Manifest, encoded_with: str) -> PreviousVectors | None:
    """The reindex's previous version as a vector source, when its vectors are comparable (same model,
    metric, passages, document prompt, device and dtype) and it recorded content hashes; otherwise every
    document is encoded (and the manifest says why)."""
    before, old = previous_version(Store(config.output, config.storage_retry), manifest)
    have_hashes = any(rel.endswith(CONTENT_HASHES_FILE) for rel in before.files_sha256)
    differing = [name for name in VECTOR_SETTINGS if getattr(before.config, name) != getattr(config, name)]
    if {s.encoded_with for s in before.shard_states} != {encoded_with}:
        differing.append("device/dtype")
    if differing or not have_hashes:
        manifest.reindex.vectors_not_reused = (
            f"the previous version's {', '.join(differing)} differ"
            if differing
            else "the previous version has no content hashes"
        )
        return None
    return PreviousVectors(
        old,
        before.shard_files((EMBEDDINGS_FILE, VECTOR_IDS_FILE, DOC_HASHES_FILE, CONTENT_HASHES_FILE)),
        [shard_rel(s.shard_id) for s in before.shards],
        before.shard_counts(),
        before.dimension,
    )


def record_settings(manifest: Manifest, dim: int, device: str, settings: VectorSettings) -> None:
    """What the model made of the build's options, in the manifest: search and reindex read it there."""
    manifest.dimension, manifest.metric = dim, settings.metric
    manifest.model = manifest.model.model_copy(
        update={
            "dimension": dim,
            "device": device,
            "normalized": settings.metric == "cosine",
            "max_seq_length": settings.max_seq_length,
            "document_prompt": settings.document_prompt,
            "query_prompt": settings.query_prompt,
        }
    )
    manifest.passages = (
        PassageSplit(tokens=settings.passage_tokens, overlap=settings.passage_overlap)
        if settings.passage_tokens
        else None
    )


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> Counts:
    """Embeddings, ids and doc store for every shard not already done (each finished shard saved in the
    manifest at once: a killed driver loses none), after checking that every node sees a local output;
    then the counts, and the checks on them."""
    connect(config.ray_address, config.s3_endpoint)
    if not version.remote:
        check_shared_folder(version.local_root)
    use_gpu = encoders_use_gpus(config.gpu, bool(config.vector_column))
    if use_gpu and gpu_on_cpu():
        warning = f"{GPU_ON_CPU_ENV}=1: the encoders reserved GPUs but ran on the CPU (a fake cluster's GPUs)"
        if warning not in manifest.warnings:
            manifest.warnings.append(warning)
    device = "cuda" if use_gpu and not gpu_on_cpu() else "cpu"  # what the encoders run on
    wanted = precision_label(device, shard_precision(config, device))
    done = done_shards(manifest, version, "embeddings_sha256", SHARD_ENCODE_FILES)
    encoded_otherwise = sorted(
        s.shard_id for s in manifest.shard_states if s.shard_id in done and s.encoded_with != wanted
    )
    if encoded_otherwise:
        progress.note(
            f"re-encoding {len(encoded_otherwise)} shard(s) encoded with "
            f"{', '.join(sorted({str(manifest.shard_states[i].encoded_with) for i in encoded_otherwise}))}: "
            f"this run encodes with {wanted} (--gpu/--cpu, --encode-dtype), and one index never mixes the two"
        )
        done -= set(encoded_otherwise)
    manifest.reused.encode = sorted(done)
    todo = [s for s in manifest.shards if s.shard_id not in done]

    def on_model(dim: int, device: str, settings: VectorSettings) -> None:
        record_settings(manifest, dim, device, settings)
        save_manifest(version, manifest)
        if config.index:  # a typo in --index should fail before the encode; too few documents only shrink it (train)
            make_index(config.index, dim, settings.metric)

    def record(encoded: EncodedShard) -> None:
        manifest.files_sha256.update(encoded.files)
        manifest.shard_states[encoded.shard_id] = ShardState(**encoded.model_dump(exclude={"files"}))
        save_manifest(version, manifest)
        checkpoint("encode", sum(1 for s in manifest.shard_states if s.embeddings_sha256))

    if todo:
        previous = previous_vectors(config, manifest, wanted) if manifest.reindex else None
        with progress.stage("encode", sum(s.num_rows for s in todo), "docs") as update:
            encode_shards(
                config,
                todo,
                version,
                use_gpu,
                on_progress=update,
                on_model=on_model,
                on_shard_done=record,
                previous=previous,
                on_wait=progress.note,
                dimension=manifest.dimension,
            )
    check_one_precision(manifest)
    manifest.counts = count_documents(manifest.shard_states)
    for warning in (cut_warning(manifest.shard_states, config.max_doc_chars), skipped_files_warning(manifest)):
        if warning and warning not in manifest.warnings:
            manifest.warnings.append(warning)
    if manifest.counts.docs_encoded == 0:
        total_rows = sum(s.num_rows for s in manifest.shards)
        listed = [f for s in manifest.shard_states for f in s.skipped_files]
        raise RayIndexError(
            f"no documents to index: all {total_rows} rows were skipped ({manifest.counts.skipped}); "
            + (
                f"files skipped: {files_named(listed)}"
                if listed
                else "check --vector-column"
                if config.vector_column
                else "check --text-column"
            )
        )
    if config.id_column:
        check_unique_ids(manifest, version, config.id_column)
    if manifest.reindex:
        r, encoded = manifest.reindex, manifest.counts.docs_encoded
        r.unchanged = sum(s.vectors_reused for s in manifest.shard_states)
        r.changed = sum(s.ids_changed for s in manifest.shard_states)
        r.added, r.deleted, r.encoded = (
            encoded - r.unchanged - r.changed,
            r.previous_docs - r.unchanged - r.changed,
            encoded - r.unchanged,
        )
    return manifest.counts


def check_one_precision(manifest: Manifest) -> None:
    """Every shard encoded on one device in one dtype (recorded in the manifest's model), or a refusal: an
    encoder that fell back to another device would otherwise mix fp16 and fp32 vectors in one index."""
    used = sorted({str(s.encoded_with) for s in manifest.shard_states})
    if len(used) > 1:
        raise RayIndexError(
            f"shards were encoded with {' and '.join(used)}: one index must not mix them; "
            "check that every encoder's node can use its GPU (or build with --cpu), then run the build again"
        )
    manifest.model = manifest.model.model_copy(update={"dtype": used[0].split("/")[-1]})


def cut_warning(states: list[ShardState], max_chars: int) -> str | None:
    """What the CLI prints when documents were cut at --max-doc-chars: how many, and the longest listed."""
    cut = sum(s.skipped.get(CUT, 0) for s in states)
    if not cut:
        return None
    longest = max((d for s in states for d in s.cut_documents), key=lambda d: d.chars)
    return (
        f"{cut:,} document(s) longer than --max-doc-chars {max_chars:,} were cut, only their start indexed: "
        f"the longest listed, id {longest.id!r} ({longest.where}), has {longest.chars:,} characters, "
        f"{longest.kept_chars:,} kept; listed (up to {CUT_LISTED} a shard) in manifest.json, "
        "shard_states[].cut_documents"
    )


def files_named(listed: list[SkippedFile], at_most: int = 3) -> str:
    """The first files skipped and why, for a message."""
    named = "; ".join(f"{f.path} ({f.reason}: {f.detail})" for f in listed[:at_most])
    return named + (f"; and {len(listed) - at_most:,} more" if len(listed) > at_most else "")


def skipped_files_warning(manifest: Manifest) -> str | None:
    """What the CLI prints when document files were skipped: how many, the first named, where all are listed."""
    listed = [f for s in manifest.shard_states for f in s.skipped_files]
    if not listed or not manifest.counts.docs_encoded:
        return None
    return (
        f"{len(listed):,} file(s) could not be indexed and were skipped: {files_named(listed)}; "
        f"listed (up to {SKIPPED_LISTED} a shard) in manifest.json, shard_states[].skipped_files"
    )


def count_documents(states: list[ShardState]) -> Counts:
    skipped: dict[str, int] = {}
    for s in states:
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return Counts(
        rows_read=sum(s.rows_read for s in states),
        docs_encoded=sum(s.docs_encoded for s in states),
        passages=sum(s.passages for s in states),
        tokens_encoded=sum(s.tokens_encoded for s in states),
        skipped=skipped,
    )
