"""rayindex: turn a text corpus into one FAISS index on a Ray cluster, search it, and answer from it.

    import rayindex
    rayindex.build("corpus/", output="out", id_column="id", text_columns=["title", "body"])
    index = rayindex.open_index("out")
    index.search("parse a JSON document", k=5)
    index.ask("How do I decode base64 data?")

The layers (docs/architecture.md): foundation (errors, config, layout, manifest), infrastructure
(infra/), versions, the domains (text/, ivf/, docstore/: plain functions on numpy, FAISS and Arrow),
stages (stages/: plan, encode, train, add, merge, tune, partition), the build (builder, incremental),
the query side (query/), the framework retrievers beside the build (integrations/: LangChain,
LlamaIndex), and on top the API (api: build, reindex, open_index, tune, evaluate, partition, plan,
serve) and the command line (cli), a thin layer over the API.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rayindex")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# name -> module: imported on first use, so `import rayindex` (and the CLI's --help) does not load Ray,
# FAISS and torch until something needs them
_EXPORTS = {
    "build": "rayindex.api",
    "reindex": "rayindex.api",
    "tune": "rayindex.api",
    "evaluate": "rayindex.api",
    "partition": "rayindex.api",
    "plan": "rayindex.api",
    "serve": "rayindex.api",
    "open_index": "rayindex.api",
    "PublishedIndex": "rayindex.api",
    "BuildConfig": "rayindex.config",
    "ServeConfig": "rayindex.config",
    "AppConfig": "rayindex.config",
    "GeneratorConfig": "rayindex.config",
    "Manifest": "rayindex.manifest",
    "RayIndexError": "rayindex.errors",
    "UsageError": "rayindex.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rayindex' has no attribute {name!r}")
