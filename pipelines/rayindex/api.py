"""The Python API: build (or reindex) an index, open it, search it, ask it.

    import rayindex
    manifest = rayindex.build("corpus/", output="out", id_column="id", text_columns=["title", "body"])
    index = rayindex.open_index("out")
    index.search("parse a JSON document", k=5)
    index.ask("How do I decode base64 data?")["answer"]

Keyword options are BuildConfig's fields (the command line's options, with underscores).
"""

from __future__ import annotations

from pathlib import Path

from rayindex import builder, incremental
from rayindex.config import BuildConfig, ReindexOptions
from rayindex.infra.storage import Store
from rayindex.manifest import Manifest
from rayindex.options import settings
from rayindex.parts.stdlib_corpus import write_stdlib_corpus
from rayindex.query.search import PublishedIndex, open_index

STDLIB_CORPUS = "corpus/python-stdlib-docstrings.parquet"  # inside the output (its local mirror for s3://)

__all__ = ["build", "reindex", "open_index", "PublishedIndex", "embedded_default"]


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


def reindex(output: str | None = None, inputs: str | Path | list | None = None, *, quiet: bool = True,
            drift_threshold: float | None = None, keep: int | None = None, **overrides) -> Manifest:
    """Incremental reindex of the output's published version (inputs: the corpus now, default the
    version's own inputs); overrides: BuildConfig fields such as ray_address or gpu."""
    options = settings(ReindexOptions, {"output": output, "drift_threshold": drift_threshold, "keep": keep})
    return incremental.reindex(options, dict(overrides, inputs=_inputs(inputs)), quiet)
