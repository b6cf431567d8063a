"""Every setting of rayindex, once: typed models whose fields carry the name, type, default and help
that the command line (cli.py derives its options from them), the Python API and the Serve
application builder all use. A build's BuildConfig is recorded in its manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The bearer token a server requires (`rayindex serve`, query/gate.py) and a client sends (`rayindex search --server`)
API_KEY_ENV = "RAYINDEX_API_KEY"
# A document's cost is bounded by its characters, cut before anything reads them whole (hashing, tokenizing,
# the doc store). 500,000 characters of English (~4.2 a token) are ~120,000 tokens: ~530 passages of 256
# tokens (224 new each), about 1% of a default shard (50,000 documents, at least a passage each); text with
# about a character a token (CJK) gives ~2,200 passages, 4.5%. Measured on this 2-core machine: see
# docs/build.md ("Big documents").
MAX_DOC_CHARS = 500_000
# A document file (PDF, HTML, ...) past this size is skipped unread: a parse holds the whole file in memory, and
# 100 MB is past most books as PDF (a scanned one, which has no text to index without OCR, is often more)
MAX_FILE_BYTES = 100 << 20
# Tuning takes the largest nprobe that reaches the recall target while one query searched alone takes at most
# this (median, measured at tune time on the machine tuning runs on). 2 ms is a choice, not a measure of what
# users notice: about every list of a 12,624-entry IVF256,Flat index (benchmarks/short_questions_benchmark.py:
# 2.95 ms on this 2-core machine under a load of 12, about 1 ms quiet per issue #24), and small beside encoding
# the question itself (542 ms for one question alone under the same load).
DEFAULT_MAX_SEARCH_MS = 2.0
MAX_SEARCH_MS_HELP = (
    "Per-query search budget in ms, measured at tune time on this machine: the largest nprobe reaching the "
    "target within it is kept (0: the smallest nprobe reaching the target)."
)

# Encoding batch size by device: on a GPU a batch of 256 (benchmarks/encode_benchmark.py --gpu's forward-only
# rate) keeps it busy where 64 leaves it waiting on the host between batches; on CPU a bigger batch only pads
# more (batches are length-sorted) for no gain, so 64 stays.
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 64


def parse_bytes(text: str | int) -> int:
    """'8G', '512M', '1.5T' or a plain number of bytes -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(float(value))
    except ValueError:
        raise ValueError(f"{text!r} is not a size; use e.g. 8G, 512M or a number of bytes") from None


Bytes = Annotated[int, BeforeValidator(parse_bytes)]


def parse_interval(text: str | float) -> float:
    """'90s', '15m', '1h', '1d' or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an interval; use e.g. 90s, 15m, 1h or 1d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


Seconds = Annotated[float, BeforeValidator(parse_interval)]


def cli(*decls: str, metavar: str | None = None, as_text: bool = False, envvar: str | None = None) -> dict:
    """How a field appears on the command line (cli.py): its flags when not --field-name, a metavar,
    as_text for fields the command line takes as text and the model parses (sizes), and the environment
    variable read when the option is not given."""
    return {"cli": {"decls": list(decls), "metavar": metavar, "as_text": as_text, "envvar": envvar}}


def _metric_name(value):
    """ "ip", the name before metrics followed the model, is cosine: the inner product of normalized vectors."""
    return "cosine" if value == "ip" else value


Metric = Annotated[Literal["cosine", "dot", "l2"], BeforeValidator(_metric_name)]


def _snowball_language(value):
    """A Snowball language (PyStemmer's names, any case), or "none" / None: no stemming and no stopwords."""
    if value is None or str(value).lower() == "none":
        return None
    import Stemmer

    name = str(value).lower()
    if name not in Stemmer.algorithms():
        raise ValueError(
            f"{value!r} is not a Snowball language: one of {', '.join(sorted(Stemmer.algorithms()))}, or none"
        )
    return name


LexicalLanguage = Annotated[str | None, BeforeValidator(_snowball_language)]


class Settings(BaseModel):
    """Unknown keys are refused: a typo in an option, a Serve config's args or an API call is an error."""

    model_config = ConfigDict(extra="forbid")


class BuildConfig(Settings):
    """Everything a build needs; recorded in the run manifest so a run can be resumed or repeated."""

    inputs: list[str] = Field(
        description="Parquet/JSONL files, PDF/HTML/Markdown/text files (a document each), or folders or globs of "
        "them, local paths or fsspec URIs (s3://...)."
    )
    output: str = Field(
        "rayindex-data",
        description="Output folder or s3:// prefix: versions/<run-id>/ and CURRENT go there.",
        json_schema_extra=cli("--output", "-o"),
    )
    id_column: str | None = Field(None, description="Column with unique document ids (default: row numbers).")
    text_columns: list[str] = Field(
        ["text"], description="Text column; repeat to join several with ': '.", json_schema_extra=cli("--text-column")
    )
    template: str | None = Field(None, description='Text template, e.g. "{title}: {body}" (overrides --text-column).')
    vector_column: str | None = Field(
        None,
        description="Column holding each row's vector, computed elsewhere (a list of numbers): no model runs, one "
        "vector per row (no passages); --model names the model that made them (text queries are encoded by it), "
        "--metric defaults to cosine (vectors of norm 1).",
        json_schema_extra=cli(metavar="NAME"),
    )
    shards: int | None = Field(
        None,
        ge=1,
        description="Number of shards, the encoders' work units (default: one per encoder the cluster can run at "
        "once, where each holds at least 64 KiB of text; more past --shard-size, in whole waves of encoders).",
    )
    shard_size: int = Field(
        50_000, ge=1, description="Documents per shard on average at most, when --shards is not given."
    )
    model: str = Field(
        PACKAGED_MODEL,
        description="sentence-transformers model name or local path (default: the packaged all-MiniLM-L6-v2, offline).",
    )
    batch_size: int | None = Field(
        None, ge=1, description=f"Encoding batch size (default: {GPU_BATCH_SIZE} on a GPU, {CPU_BATCH_SIZE} on CPU)."
    )
    encode_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="Precision of the encoder's forward pass: auto, fp32, fp16 or bf16 (default auto: fp16 on a "
        "GPU, fp32 on CPU). Each shard records the device and dtype it was encoded with; a resume re-encodes "
        "shards encoded otherwise. Does not apply with --vector-column (nothing is encoded: a warning says so).",
        json_schema_extra=cli(metavar="DTYPE"),
    )
    encoders: int | None = Field(None, ge=1, description="Encoder actors (default: one per GPU, or one per CPU).")
    encoder_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs each GPU encoder reserves for reading and tokenizing "
        "(default: a GPU node's CPUs divided by its GPUs).",
    )
    index: str | None = Field(
        None,
        description='FAISS index_factory string, e.g. "IVF4096,PQ32" or "OPQ32,IVF4096,PQ32" '
        "(default: chosen from the corpus size).",
    )
    metric: Metric | None = Field(
        None,
        description="cosine (inner product of normalized embeddings), dot (inner product) or "
        "l2 (default: the model's similarity function; ip means cosine).",
    )
    passages: bool = Field(
        True,
        description="Split documents longer than a passage into overlapping passages, one vector each "
        "(--no-passages: one vector per document, cut at the model's window).",
        json_schema_extra=cli("--passages/--no-passages"),
    )
    passage_tokens: int | None = Field(
        None,
        ge=8,
        description="Tokens per passage, the model's own (default: the model's "
        "window less its special and prompt tokens).",
    )
    passage_overlap: int | None = Field(
        None, ge=0, description="Tokens a passage shares with the one before (default: --passage-tokens / 8)."
    )
    max_doc_chars: int = Field(
        MAX_DOC_CHARS,
        ge=1_000,
        description="Characters of a document that are indexed; a longer one is cut at a whitespace before this "
        "and the rest left out (recorded in the manifest and warned about).",
    )
    max_file_bytes: Bytes = Field(
        MAX_FILE_BYTES,
        ge=1,
        description="Document files (PDF, HTML, Markdown, text) larger than this are skipped, e.g. 200M "
        "(counted and listed in the manifest).",
        json_schema_extra=cli(metavar="SIZE", as_text=True),
    )
    document_prompt: str | None = Field(
        None,
        description='Text put before every document, e.g. "passage: " for E5 (default: '
        "the model's configured document/passage prompt, if any).",
    )
    query_prompt: str | None = Field(
        None,
        description='Text put before every query, e.g. "query: " (default: the model\'s '
        "configured query prompt, if any).",
    )
    max_index_memory: Bytes | None = Field(
        None,
        ge=1,
        description="RAM budget of the index when --index is not given, "
        "e.g. 8G: picks code size, OPQ, HNSW coarse quantizer.",
        json_schema_extra=cli(metavar="SIZE", as_text=True),
    )
    train_sample: int | None = Field(
        None, ge=1, description="Training sample size (default: from the index's nlist and PQ)."
    )
    on_disk: bool | None = Field(
        None,
        description="Merge into on-disk inverted lists (default: automatic past --memory-budget).",
        json_schema_extra=cli("--on-disk/--in-ram"),
    )
    memory_budget: Bytes | None = Field(
        None,
        ge=1,
        description="Merge on disk when the shard indexes exceed this, e.g. 8G (default: half the RAM).",
        json_schema_extra=cli(metavar="SIZE", as_text=True),
    )
    target_recall: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Tune nprobe to reach this recall@10 of the documents found vs exhaustive search "
        "(stored in the manifest and the index; search/serve use it).",
    )
    max_search_ms: float = Field(DEFAULT_MAX_SEARCH_MS, ge=0, description=MAX_SEARCH_MS_HELP)
    tune: bool | None = Field(
        None,
        description="Tune nprobe for --target-recall after the merge (default: when the index "
        "holds at most 2M vectors, where it takes seconds).",
        json_schema_extra=cli("--tune/--no-tune"),
    )
    serving_shards: int | None = Field(
        None,
        ge=1,
        description="Also split the merged inverted lists into this many parts, "
        "balanced by size, for `rayindex serve --shards N` (each serving shard maps one part).",
    )
    lexical: bool = Field(
        True,
        description="Also build a BM25 index of the passages, searched with the vectors (hybrid search).",
        json_schema_extra=cli("--lexical/--no-lexical"),
    )
    lexical_language: LexicalLanguage = Field(
        "english",
        description="Stemmer and stopwords of the BM25 index (a Snowball language), or none.",
    )
    seed: int = Field(1234, description="Seed of the training sample and k-means.")
    gpu: bool | None = Field(
        None,
        description="Encode and train on GPUs (default: RAYINDEX_GPU=1/0, else whether the cluster has GPUs now).",
        json_schema_extra=cli("--gpu/--cpu"),
    )
    gpu_wait: Seconds = Field(
        600.0,
        gt=0,
        description="How long to wait for the first GPU node when GPUs are asked for and none is up "
        "(an autoscaler starting one), e.g. 10m, 90s; then the build is refused (default: 10m).",
        json_schema_extra=cli(metavar="DURATION", as_text=True),
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address, or auto to join the one running on this machine "
        "(default: RAY_ADDRESS, else a new local Ray).",
    )
    s3_endpoint: str | None = Field(
        None, description="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."
    )
    storage_retry: float = Field(
        300.0, gt=0, description="Seconds to keep retrying an unavailable store (with backoff) before failing."
    )

    @model_validator(mode="after")
    def _text_given(self) -> BuildConfig:
        if not self.template and not self.text_columns:
            raise ValueError("give at least one --text-column or a --template")
        if (
            self.passage_tokens is not None
            and self.passage_overlap is not None
            and self.passage_overlap >= self.passage_tokens
        ):
            raise ValueError(
                f"--passage-overlap {self.passage_overlap} must be smaller than --passage-tokens {self.passage_tokens}"
            )
        if not self.inputs:
            raise ValueError("give at least one input path")
        if self.vector_column and self.vector_column in ([self.id_column] + self.text_fields()):
            raise ValueError(
                f"--vector-column {self.vector_column!r} is also the id or a text column; name the vectors' column"
            )
        return self

    def text_fields(self) -> list[str]:
        """The corpus columns the document text is made of."""
        if self.template:
            return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        return list(self.text_columns)

    def fingerprint(self) -> str:
        """Hash of the settings that change the result (not where Ray runs), to resume only identical runs."""
        relevant = self.model_dump(
            exclude={
                "ray_address",
                "encoders",
                "encoder_cpus",
                "gpu",
                "gpu_wait",
                "encode_dtype",  # recorded per shard instead (ShardState.encoded_with): a resume re-encodes
                "on_disk",
                "memory_budget",
                "s3_endpoint",
                "storage_retry",
                "serving_shards",
            }
        )
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class ReindexOptions(Settings):
    """How `rayindex reindex` treats the published version it starts from."""

    output: str = Field(
        "rayindex-data",
        description="Output of an earlier build; its CURRENT version is the base.",
        json_schema_extra=cli("--output", "-o"),
    )
    drift_threshold: float = Field(
        1.2,
        gt=1,
        description="Retrain the quantizer when its fit to the new corpus (mean squared "
        "distance to the nearest centroid) is this many times worse than on its training sample.",
    )
    keep: int = Field(3, ge=1, description="Published versions to keep; older ones are deleted after publishing.")
    every: str | None = Field(
        None, description="Repeat forever at this interval, e.g. 1h, 15m (a failed run is reported, the next one runs)."
    )


class IndexLocation(Settings):
    """Where a published index is: a build's output folder or s3:// prefix (its CURRENT version)."""

    index: str = Field(
        "rayindex-data",
        description="Output folder or s3:// prefix of a build (its CURRENT version is used).",
        json_schema_extra=cli("--index", "-i"),
    )
    s3_endpoint: str | None = Field(
        None, description="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."
    )


class ServerLocation(Settings):
    """A running `rayindex serve` to search through instead of opening the index in this process."""

    server: str | None = Field(
        None,
        description="URL of a running `rayindex serve`, e.g. http://127.0.0.1:8000: search through it (no model "
        "loaded here; --index and --s3-endpoint are the server's own).",
        json_schema_extra=cli(metavar="URL"),
    )
    api_key: str | None = Field(
        None,
        description="The server's API key, sent as a bearer token (better in the environment variable: an option's "
        "value shows in the process list).",
        json_schema_extra=cli(metavar="KEY", envvar=API_KEY_ENV),
    )


def _json_object(value):
    """A filter given as JSON text (the command line) parsed; objects pass as they are."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f'not JSON ({exc.msg}): give e.g. \'{{"section": "8"}}\'') from None
    return value


class SearchParams(Settings):
    k: int = Field(10, ge=1, description="Number of documents.", json_schema_extra=cli("-k"))
    nprobe: int | None = Field(
        None, ge=1, description="Inverted lists to visit (default: the build's, stored in the index)."
    )
    per_document: int = Field(1, ge=1, le=100, description="Passages per document among the hits (best first).")
    filter: Annotated[dict, BeforeValidator(_json_object)] | None = Field(
        None,
        description='Only documents whose metadata match, as JSON: {"section": "8"} or {"section": {"in": ["8", '
        '"9"]}}.',
        json_schema_extra=cli(metavar="JSON", as_text=True),
    )
    mode: Literal["hybrid", "dense", "lexical"] | None = Field(
        None,
        description="hybrid (the vectors and BM25 fused: by score on a cosine index, else by rank), dense or lexical "
        "(BM25) (default: "
        "hybrid when the index has a lexical index, else dense).",
    )


class AskParams(SearchParams):
    k: int = Field(5, ge=1, description="Passages to retrieve and cite.", json_schema_extra=cli("-k"))


class GeneratorConfig(Settings):
    generator: Literal["extractive", "openai", "transformers"] = Field(
        "extractive",
        description="extractive (offline, default), openai (an OpenAI-compatible endpoint) or transformers "
        "(a local model directory).",
    )
    generator_model: str | None = Field(
        None, description="openai: model name (or RAYINDEX_OPENAI_MODEL); transformers: model directory."
    )
    generator_url: str | None = Field(
        None, description="openai: base URL (or RAYINDEX_OPENAI_BASE_URL / OPENAI_BASE_URL); key from OPENAI_API_KEY."
    )
    generator_timeout: float = Field(30.0, gt=0, description="Seconds before a remote generator call becomes a 504.")


class AppConfig(IndexLocation, GeneratorConfig):
    """The Serve application's settings: what every replica needs. `serve run
    rayindex.query.serve:app_builder index=/data/rayindex replicas=2` and a Serve config's `args:` are
    validated into this model."""

    replicas: int | None = Field(
        None,
        ge=1,
        description="Serve replicas, each memory-mapping the index and loading the model "
        "(default: 1, or what a Serve config's autoscaling_config decides).",
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    shards: int | None = Field(
        None,
        ge=1,
        description="Serve through this many shard deployments, each memory-mapping one part of "
        "the inverted lists (the version must be split that way: build --serving-shards N, or "
        "`rayindex partition --shards N`); the router keeps only the coarse quantizer.",
    )
    shard_replicas: int = Field(
        1, ge=1, description="Replicas of each shard deployment (the minimum when autoscaling)."
    )
    shard_max_replicas: int | None = Field(
        None,
        ge=1,
        description="Autoscale each shard deployment up to this many replicas (Serve autoscaling on ongoing requests).",
    )
    shard_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per shard replica.")
    shard_timeout: float = Field(5.0, gt=0, description="Seconds the router waits for the shards' answers to a search.")
    on_shard_failure: Literal["fail", "partial"] = Field(
        "fail",
        description="A shard that does not answer in time: fail the request "
        "(503, Retry-After) or answer from the others, marked partial: true.",
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between checks of CURRENT for a new version (hot swap)."
    )
    max_inflight: int = Field(
        64,
        ge=1,
        description="Searches a replica works on at once (two full batches); more are answered "
        "503 with Retry-After at once instead of queueing.",
    )
    request_timeout: float = Field(
        10.0, gt=0, description="Seconds a search or an answer may take before it is answered 504 with Retry-After."
    )
    api_key: str | None = Field(
        None, description="Bearer token clients must send (default: RAYINDEX_API_KEY).", json_schema_extra={"cli": None}
    )  # a secret: from the environment, never argv


class ServeConfig(AppConfig):
    """`rayindex serve`: the application, and where its HTTP proxy listens."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    ray_address: str | None = Field(
        None,
        description="Ray cluster address, or auto to join the one running on this machine "
        "(default: RAY_ADDRESS, else a new local Ray).",
    )
    insecure: bool = Field(
        False, description="Serve on a non-loopback host without RAYINDEX_API_KEY (refused otherwise)."
    )
    ingress: Literal["auto", "python", "haproxy"] = Field(
        "auto",
        description="For the Ray this command starts: haproxy, Ray Serve's HAProxy ingress (replicas answer HTTP "
        "themselves, on --host); python, Ray Serve's HTTP proxy with rayindex's gate in it; auto, HAProxy where it "
        "can run (Ray >= 2.55 and its binary), else python. A running cluster's nodes decide with "
        "RAY_SERVE_ENABLE_HA_PROXY=1 (docs/serving.md).",
    )


class EvalOptions(Settings):
    queries: str | None = Field(
        None,
        description='JSONL of {"query", "id"} pairs: adds hit@k and MRR of the whole pipeline in each search mode '
        "the version serves (dense, lexical, hybrid), at the default nprobe and with all lists probed.",
    )
    ks: str = Field("1,10,100", description="Comma-separated k values for recall@k.", json_schema_extra=cli("--k"))
    n_queries: int = Field(
        500, ge=1, description="Queries sampled from the corpus (held out: their own document is not counted)."
    )

    def k_values(self) -> list[int]:
        try:
            values = [int(v) for v in self.ks.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise ValueError(f"--k {self.ks!r}: give comma-separated positive integers such as 1,10,100")
        return values


class TuneOptions(Settings):
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@k of the documents found vs exhaustive search to reach."
    )
    k: int = Field(10, ge=1, description="k of recall@k.", json_schema_extra=cli("--k"))
    n_queries: int = Field(
        500,
        ge=1,
        description="Queries made from the corpus (sentences, titles, key phrases, short questions), "
        "or drawn from --queries when it holds more.",
    )
    queries: str | None = Field(
        None,
        description='JSONL of {"query": ...} lines (a query log, no labels needed): tune on these instead.',
    )
    max_search_ms: float = Field(DEFAULT_MAX_SEARCH_MS, ge=0, description=MAX_SEARCH_MS_HELP)


class PartitionOptions(Settings):
    shards: int = Field(ge=1, description="Serving shards to split the published version's inverted lists for.")


class PlanOptions(Settings):
    docs: float = Field(description="Number of documents, e.g. 1e9.", gt=0)
    dim: int = Field(384, ge=1, description="Embedding dimension.")
    index: str | None = Field(None, description="index_factory string (default: chosen as the build would).")
    max_index_memory: Bytes | None = Field(
        None,
        ge=1,
        description="RAM budget of the index, e.g. 64G (drives the index choice).",
        json_schema_extra=cli(metavar="SIZE", as_text=True),
    )
    gpus: int = Field(0, ge=0, description="GPUs for encoding and training.")
    cpus_per_gpu: float = Field(
        4, gt=0, description="CPUs of a GPU node per GPU: they feed its encoder (read, tokenize)."
    )
    cores: int = Field(2, ge=1, description="CPU cores for encoding (no GPUs) and adding.")
    passages_per_doc: float = Field(
        1.0,
        ge=1,
        description="Passages per document on average (a build reports its own: "
        "counts.passages / counts.docs_encoded in the manifest); vectors = docs x this.",
    )
    serving_shards: int = Field(
        1, ge=1, description="Serving shards the inverted lists are split over (rayindex serve --shards)."
    )
    nprobe: int | None = Field(
        None, ge=1, description="nprobe of the searches to plan for (default: the build's default)."
    )
    lexical: bool = Field(
        True,
        description="Plan the lexical (BM25) index built beside the vectors: its disk, RAM and query cost.",
        json_schema_extra=cli("--lexical/--no-lexical"),
    )
