"""The run manifest and the typed records it holds: config, shard plan, per-shard state, what each
stage produced (the records the stages return), counts, timings and library versions.

A version's manifest.json is the complete state of its run: written atomically after every change,
so a killed driver leaves the last consistent state and any stage can be resumed from it.
"""

from __future__ import annotations

import datetime as dt
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from rayindex.config import BuildConfig, Metric
from rayindex.errors import RayIndexError
from rayindex.layout import MANIFEST, check_run_id, safe_rel, shard_rel

SHA256 = re.compile(r"[0-9a-f]{64}")
LAYOUT_VERSION = 4  # bumped when the manifest's or the output's layout changes incompatibly


class Piece(BaseModel):
    """Rows [row_start, row_start + num_rows) of one file; global ids start at global_start."""

    path: str
    row_start: int
    num_rows: int
    global_start: int
    byte_start: int | None = None  # JSONL: offset of a line at or before row_start, so readers can seek
    byte_start_row: int | None = None  # the row that starts at byte_start
    doc_id: str | None = None  # a document file (PDF, HTML, ...): its id, its path under its input


class Shard(BaseModel):
    shard_id: int
    pieces: list[Piece]
    global_start: int
    global_end: int  # exclusive
    cost: int | None = None  # estimated bytes of text, what the plan cut by (text/shard_plan.py)

    @property
    def num_rows(self) -> int:
        return self.global_end - self.global_start


class InputFile(BaseModel):
    """What the manifest records of an input file: enough to tell that a resumed run reads the same data."""

    path: str
    format: str
    rows: int
    size: int
    stamp: str  # mtime, or the object's ETag on S3


class ModelInfo(BaseModel):
    name: str
    path: str
    normalized: bool
    dimension: int | None = None
    device: str | None = None  # what the encoders used: "cuda" or "cpu"
    dtype: str | None = None  # their forward pass's: fp32, fp16 or bf16 (--encode-dtype)
    max_seq_length: int | None = None
    document_prompt: str | None = None  # put before every document when it was encoded
    query_prompt: str | None = None  # what search puts before every query


class PassageSplit(BaseModel):
    """How documents were split into passages (text/passages.py): tokens per passage and overlap."""

    tokens: int
    overlap: int


class CutDocument(BaseModel):
    """A document longer than --max-doc-chars: only its first kept_chars characters were indexed."""

    id: str  # the corpus id, as text
    where: str  # "file row N" / "file line N"
    chars: int  # the document's length, in characters
    kept_chars: int


class SkippedFile(BaseModel):
    """A document file that was not indexed: why (a skipped-count reason, text/files.py) and what was found."""

    path: str
    reason: str
    detail: str


class ShardState(BaseModel):
    shard_id: int
    rows_read: int = 0
    docs_encoded: int = 0
    passages: int = 0  # vectors: one per passage (one per document without passages)
    tokens_encoded: int = 0  # tokens through the model (special and prompt tokens included; copied vectors not)
    skipped: dict[str, int] = Field(default_factory=dict)
    vectors_reused: int = 0  # reindex: unchanged documents whose vectors were copied from the previous version
    ids_changed: int = 0  # reindex: documents encoded again because their content changed
    encode_seconds: float | None = None  # the encoder's time on this shard (reading to writing; no actor start)
    encoded_with: str | None = None  # device/dtype of the forward pass, e.g. "cuda/fp16": a resume never mixes two
    embeddings_sha256: str | None = None
    index_sha256: str | None = None
    trained_sha256: str | None = None  # the trained index this shard's index was built from
    docs_footer_sha256: str | None = (
        None  # of docs.parquet's footer (docstore.footer_sha256): checked when a reader opens it
    )
    cut_documents: list[CutDocument] = Field(default_factory=list)  # the first CUT_LISTED per shard
    skipped_files: list[SkippedFile] = Field(default_factory=list)  # the first SKIPPED_LISTED per shard
    lexical_of_docs: str | None = None  # the docs.parquet sha256 its lexical counts were made from


class EncodedShard(ShardState):
    """What an encoder returns for one shard: its state and its files' sha256."""

    files: dict[str, str] = Field(default_factory=dict)


class Counts(BaseModel):
    rows_read: int = 0
    docs_encoded: int = 0
    passages: int = 0
    tokens_encoded: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> rows


class TrainedIndex(BaseModel):
    """The train stage's record: the trained, empty index and how it was obtained."""

    index_string: str
    chosen_automatically: bool
    nlist: int
    nprobe: int  # the default: index_params.default_nprobe(nlist)
    sample_size: int
    trained_sha256: str
    trained_fingerprint: str
    coarse_mse: float | None = None  # the drift baseline of later reindex runs
    gpu: bool = False
    warnings: list[str] = Field(default_factory=list)
    embeddings_sha256: list[str | None] = Field(default_factory=list)  # trained from these shards' vectors
    reused_from: str | None = None  # reindex: the version whose trained index was taken


class LexicalIndex(BaseModel):
    """The BM25 index beside the vectors (stages/lexical.py): how passages and queries are analyzed, the BM25
    parameters, and the corpus statistics every passage was scored with."""

    language: str | None
    stopwords: bool
    k1: float
    b: float
    passages: int
    avg_length: float
    terms: int
    postings: int
    files: list[str]


class SweepPoint(BaseModel):
    nprobe: int
    refine: int  # re-rank factor (1: none)
    ms_per_query: float
    recall: dict[int, float]  # k -> recall@k vs exact search
    p50_ms: float | None = None  # median time of one query searched alone (tune measures it; eval does not)


class Tuning(BaseModel):
    """The tune stage's record: the nprobe (and re-rank factor) chosen for a recall target, within a per-query
    latency budget measured on the machine named in measured_on."""

    target: float
    k: int
    queries: int
    sweep: list[SweepPoint]
    reached: bool
    nprobe: int
    refine_factor: int
    recall: float
    note: str | None = None
    # recorded since issue #24 (None in older manifests): what the queries were, how recall was counted,
    # the latency budget and the machine its latencies were measured on
    queries_from: str | None = None
    recall_of: Literal["passages", "documents"] = "passages"
    max_search_ms: float | None = None
    p50_ms: float | None = None
    measured_on: str | None = None


class MergedIndex(BaseModel):
    """The merge stage's record."""

    on_disk: bool
    ntotal: int
    files: list[str]

    @field_validator("files")
    @classmethod
    def _inside_the_version(cls, files: list[str]) -> list[str]:
        return [safe_rel(f, "merge.files") for f in files]


class ServingPart(BaseModel):
    """One part of the merged inverted lists for sharded serving (ivf/serving_split.py): the lists it owns,
    their vectors, its files (index, on-disk lists), and the BM25 postings of those vectors' passages
    (`lexical`: empty when the version has no lexical index, or was split before parts held postings)."""

    lists: list[int]
    vectors: int
    files: list[str]
    lexical: list[str] = Field(default_factory=list)
    postings: int = 0  # in the part's lexical files

    @field_validator("files", "lexical")
    @classmethod
    def _inside_the_version(cls, files: list[str]) -> list[str]:
        return [safe_rel(f, "serving.files") for f in files]


class Drift(BaseModel):
    ratio: float
    threshold: float
    baseline_mse: float
    sample: int


class Reindex(BaseModel):
    """A reindex run: the version it started from, what changed, and the quantizer path taken."""

    previous: str
    drift_threshold: float
    previous_docs: int

    @field_validator("previous")
    @classmethod
    def _a_run_id(cls, previous: str) -> str:
        return check_run_id(previous, "reindex.previous")

    vectors_not_reused: str | None = None
    unchanged: int = 0
    changed: int = 0
    added: int = 0
    deleted: int = 0
    encoded: int = 0
    drift: Drift | None = None
    path: Literal["incremental", "full retrain"] | None = None
    reason: str | None = None


class Resumption(BaseModel):
    at: str
    previous_status: str
    previous_error: str | None = None


class Reused(BaseModel):
    """What the latest attempt found done and verified."""

    encode: list[int] = Field(default_factory=list)
    add: list[int] = Field(default_factory=list)
    train: bool = False
    merge: bool = False


class Manifest(BaseModel):
    layout_version: int = LAYOUT_VERSION
    run_id: str
    created_at: str
    status: Literal["running", "failed", "published"] = "running"
    error: str | None = None
    config: BuildConfig
    config_fingerprint: str
    metric: Metric | None = None  # resolved by the encode stage: --metric, else the model's similarity function
    model: ModelInfo | None = None
    passages: PassageSplit | None = None  # None: one vector per document
    files: list[InputFile] = Field(default_factory=list)
    shards: list[Shard] = Field(default_factory=list)
    encoder_slots: int | None = None  # encoders that could run at once when the plan was cut (stages/plan.py)
    shard_states: list[ShardState] = Field(default_factory=list)
    dimension: int | None = None
    counts: Counts = Field(default_factory=Counts)
    training: TrainedIndex | None = None
    merge: MergedIndex | None = None
    lexical: LexicalIndex | None = None
    tuning: Tuning | None = None
    nprobe: int | None = None  # what search uses by default: the trained default, or the tuned one
    refine_factor: int | None = None  # re-rank k x factor PQ candidates with exact fp16 distances (refine.py)
    timings_s: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    files_sha256: dict[str, str] = Field(default_factory=dict)  # every output file (path in the version) -> sha256
    resumed: list[Resumption] = Field(default_factory=list)
    reused: Reused = Field(default_factory=Reused)
    reindex: Reindex | None = None
    pruned: list[str] = Field(default_factory=list)  # versions deleted after this one was published (--keep)
    lock_generation: int | None = None  # the output lock's generation this run held: its fencing token
    serving: dict[int, list[ServingPart]] = Field(
        default_factory=dict
    )  # serving shards -> the merged lists split that many ways

    @field_validator("layout_version")
    @classmethod
    def _this_layout(cls, version: int) -> int:
        if version != LAYOUT_VERSION:
            raise ValueError(f"layout {version}, this rayindex reads layout {LAYOUT_VERSION}")
        return version

    @field_validator("run_id")
    @classmethod
    def _a_run_id(cls, run_id: str) -> str:
        return check_run_id(run_id, "run_id")

    @field_validator("files_sha256")
    @classmethod
    def _files_inside_the_version(cls, files: dict[str, str]) -> dict[str, str]:
        """Keys name files that a reader pulls and opens: each must stay inside the version folder."""
        for rel, sha in files.items():
            safe_rel(rel, "files_sha256")
            if not SHA256.fullmatch(sha):
                raise ValueError(f"files_sha256[{rel!r}]: {sha[:70]!r} is not a sha256")
        return files

    @property
    def index_string(self) -> str | None:
        return self.training.index_string if self.training else None

    @property
    def nlist(self) -> int | None:
        return self.training.nlist if self.training else None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse a manifest; a damaged one or one of another layout is refused naming the file."""
        try:
            manifest = cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise RayIndexError(
                f"{where} is not a rayindex manifest of layout {LAYOUT_VERSION} ({loc}: {first['msg']}); "
                "it was damaged, or written by another rayindex version: rebuild the index"
            ) from None
        return manifest

    @classmethod
    def load(cls, version_dir: str | Path) -> Manifest:
        """The manifest of a local version folder."""
        path = Path(version_dir) / MANIFEST
        try:
            text = path.read_text()
        except OSError as exc:
            raise RayIndexError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
        return cls.from_json(text, str(path))

    def shard_files(self, names: tuple[str, ...], shard_ids: list[int] | None = None) -> dict[str, str]:
        """rel path -> sha256 of these files of these shards (default: all), from files_sha256."""
        wanted = {
            shard_rel(s.shard_id, name)
            for s in self.shards
            if shard_ids is None or s.shard_id in shard_ids
            for name in names
        }
        return {rel: sha for rel, sha in self.files_sha256.items() if rel in wanted}

    def shard_counts(self) -> list[int]:
        """Vectors (passages) per shard, in shard order."""
        return [s.passages for s in self.shard_states]

    def parts_hold_postings(self, shards: int) -> bool:
        """Whether each part of the split for `shards` serving shards holds its passages' BM25 postings (a
        version with a lexical index split before parts held them does not)."""
        return self.lexical is not None and all(part.lexical for part in self.serving.get(shards, []))

    def first_fetch(self, k: int, per_document: int = 1) -> int:
        """Passages a search fetches first to find k documents (query/search.py search_documents; tune ranks
        the same number): twice the passages of an average document per document, at most every vector."""
        passages_per_doc = max(1, -(-self.counts.passages // max(1, self.counts.docs_encoded)))
        return min(self.merge.ntotal, k * max(per_document, 2 * passages_per_doc))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in (
        "rayindex",
        "ray",
        "faiss-cpu",
        "faiss-gpu",
        "torch",
        "sentence-transformers",
        "transformers",
        "pyarrow",
        "numpy",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
