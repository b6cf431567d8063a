"""The Python API: everything the command line does, as functions (the CLI is a thin layer over them).

    import rayindex
    manifest = rayindex.build("corpus/", output="out", id_column="id", text_columns=["title", "body"])
    index = rayindex.open_index("out")
    index.search("parse a JSON document", k=5)
    index.ask("How do I decode base64 data?")["answer"]
    rayindex.tune("out", target_recall=0.99)          # store the nprobe that reaches it (queries="log.jsonl")
    rayindex.evaluate("out", ks="1,10")               # recall@k vs exact search per nprobe
    rayindex.partition("out", shards=4)               # split for sharded serving
    rayindex.plan(1e9, gpus=8)                        # disk, RAM, hours
    rayindex.serve("out", port=8000)                  # Ray Serve app; returns once it answers

Keyword options are the settings models' fields (config.py: BuildConfig, TuneOptions, EvalOptions,
PartitionOptions, PlanOptions, ServeConfig), i.e. the command line's options with underscores; a
wrong name or value is a UsageError naming it.
"""

from __future__ import annotations

from pathlib import Path

from rayindex import builder, incremental
from rayindex.config import (
    BuildConfig,
    EvalOptions,
    IndexLocation,
    PartitionOptions,
    PlanOptions,
    ReindexOptions,
    ServeConfig,
    TuneOptions,
)
from rayindex.infra.storage import Store, use_s3_endpoint
from rayindex.manifest import Manifest, ServingPart, Tuning
from rayindex.options import settings
from rayindex.query.search import PublishedIndex, open_index
from rayindex.text.stdlib_corpus import write_stdlib_corpus

STDLIB_CORPUS = "corpus/python-stdlib-docstrings.parquet"  # inside the output (its local mirror for s3://)

__all__ = [
    "build",
    "reindex",
    "open_index",
    "PublishedIndex",
    "embedded_default",
    "tune",
    "evaluate",
    "partition",
    "plan",
    "serve",
]


def embedded_default(output: str) -> dict:
    """The embedded default corpus, the docstrings of this Python's standard library, written beside the
    output; the options that read it."""
    path = write_stdlib_corpus(Store(output).local(STDLIB_CORPUS))
    return {"inputs": [str(path)], "id_column": "id", "template": "{title}: {body}"}


def _inputs(inputs: str | Path | list | None) -> list[str] | None:
    if inputs is None or isinstance(inputs, list) and not inputs:
        return None
    return [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]


def build(inputs: str | Path | list | None = None, *, quiet: bool = True, **options) -> Manifest:
    """Build and publish an index of inputs (files, folders, globs, s3:// URIs; None: the embedded
    default corpus) with BuildConfig options; returns the published version's manifest."""
    paths = _inputs(inputs)
    output = options.get("output") or BuildConfig.model_fields["output"].default
    base = {"inputs": paths} if paths else embedded_default(output)
    return builder.build(settings(BuildConfig, base, options), quiet=quiet)


def reindex(
    output: str | None = None,
    inputs: str | Path | list | None = None,
    *,
    quiet: bool = True,
    drift_threshold: float | None = None,
    keep: int | None = None,
    **overrides,
) -> Manifest:
    """Incremental reindex of the output's published version (inputs: the corpus now, default the
    version's own inputs); overrides: BuildConfig fields such as ray_address or gpu."""
    options = settings(ReindexOptions, {"output": output, "drift_threshold": drift_threshold, "keep": keep})
    return incremental.reindex(options, dict(overrides, inputs=_inputs(inputs)), quiet)


def located(index: str | Path | None = None, s3_endpoint: str | None = None) -> str:
    """The published index's location (default: IndexLocation's), with the S3 endpoint put in effect."""
    where = settings(IndexLocation, {"index": str(index) if index is not None else None, "s3_endpoint": s3_endpoint})
    use_s3_endpoint(where.s3_endpoint)
    return where.index


def tune(index: str | Path | None = None, *, s3_endpoint: str | None = None, **options) -> Tuning:
    """Store the nprobe (and re-rank factor, when nprobe alone cannot) for target_recall (TuneOptions): the
    largest reaching it whose query takes at most max_search_ms here, else the smallest reaching it, on
    queries made from the corpus or read from queries=JSONL; in the published version's manifest and
    index.faiss. Returns the tuning with its sweep."""
    from rayindex.stages.tune import tune as tune_version
    from rayindex.versions import save_published

    tune_options = settings(TuneOptions, options)
    where = located(index, s3_endpoint)
    published = open_index(where, with_vectors=True)
    tuning, written = tune_version(published.version_dir, published.manifest, tune_options)
    save_published(where, published.version_dir, published.manifest, written)
    return tuning


def evaluate(index: str | Path | None = None, *, s3_endpoint: str | None = None, **options) -> dict:
    """recall@k vs exact search and latency for a sweep of nprobe (EvalOptions; with queries=JSONL, hit@k
    and MRR at the default nprobe and with all lists probed), written to eval.json and PNG plots in the
    version; returns what eval.json holds."""
    from rayindex.query.evaluate import evaluate as evaluate_version

    eval_options = settings(EvalOptions, options)
    eval_options.k_values()  # a bad ks is refused before the index is opened
    return evaluate_version(open_index(located(index, s3_endpoint), with_vectors=True), eval_options)


def partition(
    index: str | Path | None = None, shards: int | None = None, *, s3_endpoint: str | None = None
) -> tuple[Manifest, list[ServingPart]]:
    """Split the published version's inverted lists for `shards` serving shards (balanced by size),
    recorded and checksummed in its manifest; returns the manifest and the parts."""
    from rayindex.stages.partition import partition_published

    wanted = settings(PartitionOptions, {"shards": shards}).shards
    return partition_published(located(index, s3_endpoint), wanted)


def plan(docs: float | None = None, **options) -> dict:
    """Disk, RAM and hours per stage, and serving (the dense scan, the lexical index: `lexical`) for a corpus of
    `docs` documents (PlanOptions), from throughputs measured on the development machine (each figure labelled
    measured or estimate)."""
    from rayindex.ivf.capacity import plan_capacity

    o = settings(PlanOptions, {"docs": docs}, options)
    return plan_capacity(
        o.docs,
        o.dim,
        o.index,
        gpus=o.gpus,
        max_index_bytes=o.max_index_memory,
        cores=o.cores,
        cpus_per_gpu=o.cpus_per_gpu,
        passages_per_doc=o.passages_per_doc,
        serving_shards=o.serving_shards,
        nprobe=o.nprobe,
        lexical=o.lexical,
    )


def serve(index: str | Path | None = None, **options) -> ServeConfig:
    """Serve /search, /ask, /healthz, /metrics over HTTP with Ray Serve (ServeConfig options); returns the
    settings once the application answers, ingress the one it got ("auto" on a running Ray, whose nodes decide).
    Stop it with ray.serve.shutdown()."""
    from rayindex.query.launch import start_serving

    config = settings(ServeConfig, {"index": str(index) if index is not None else None}, options)
    use_s3_endpoint(config.s3_endpoint)
    ingress = start_serving(config)
    return config if ingress == "cluster" else config.model_copy(update={"ingress": ingress})
