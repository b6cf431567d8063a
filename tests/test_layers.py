"""The package's shape: `rayindex` is importable and `pipelines` is not; every import inside the package
goes down the layers of docs/architecture.md (stages never import each other, the query side never
imports the build or the stages, the integrations never the build); there is no import cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines" / "rayindex"

# (layer, rank, modules): a module may import modules of a lower rank, and of its own layer where the
# layer allows it. stages and query share a rank and may not import each other; so do build and integrations.
LAYERS = [
    ("foundation", 0, {"errors", "config", "layout", "manifest"}),
    (
        "infrastructure",
        1,
        {
            "infra.storage",
            "infra.lock",
            "infra.ray_session",
            "infra.progress",
            "infra.faults",
            "infra.resources",
            "infra.prefetch",
            "infra.files",
            "infra.gpu",
            "infra.actor_pool",
        },
    ),
    ("versions", 2, {"versions"}),
    # the domains: plain functions and small classes on numpy, FAISS and Arrow objects, one job per module;
    # they may import each other (no cycle), never a stage or the query side
    (
        "domains",
        3,
        {
            "text.corpus",
            "text.files",
            "text.shard_plan",
            "text.model",
            "text.reuse",
            "text.stdlib_corpus",
            "text.documents",
            "text.passages",
            "text.queries",
            "text.vectors",
            "ivf.index_params",
            "ivf.capacity",
            "ivf.index",
            "ivf.recall",
            "ivf.refine",
            "ivf.serving_split",
            "docstore.format",
            "docstore.writer",
            "docstore.reader",
            "lexical.analyzer",
            "lexical.counts",
            "lexical.postings",
            "lexical.capacity",
        },
    ),
    (
        "stages",
        4,
        {
            "stages.plan",
            "stages.encode",
            "stages.train",
            "stages.add",
            "stages.merge",
            "stages.tune",
            "stages.partition",
            "stages.lexical",
        },
    ),
    (
        "query",
        4,
        {
            "query.search",
            "query.filters",
            "query.evaluate",
            "query.generate",
            "query.serve",
            "query.gate",
            "query.requests",
            "query.metrics",
            "query.batching",
            "query.launch",
            "query.sharded",
            "query.fusion",
            "query.mcp_tools",
            "query.client",
        },
    ),
    ("build", 5, {"builder", "incremental"}),
    # the plug-ins to other stacks (framework retrievers, MCP): over the query side, beside the build (same rank:
    # neither imports the other)
    (
        "integrations",
        5,
        {"integrations.searcher", "integrations.langchain", "integrations.llama_index", "integrations.mcp"},
    ),
    ("interface", 6, {"api", "options", "cli", "__main__", ""}),  # "": the package's __init__
]
NO_IMPORTS_WITHIN = {"stages"}
PACKAGES = {
    "infra",
    "text",
    "ivf",
    "docstore",
    "lexical",
    "stages",
    "query",
    "integrations",
}  # their __init__.py files are empty


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Modules of the package this file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "rayindex" or name.startswith("rayindex."):
                found.add(name.removeprefix("rayindex").lstrip("."))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(modules)
    return {
        name: {m for m in imports_of(path) if m in known and m != name and m not in PACKAGES}
        for name, path in modules.items()
        if name not in PACKAGES
    }


def test_every_module_has_a_layer(graph):
    placed = set().union(*(mods for _, _, mods in LAYERS))
    assert set(graph) == placed, f"unplaced: {set(graph) - placed}, gone: {placed - set(graph)}"


def test_imports_only_go_down(graph):
    layer_of = {m: (layer, rank) for layer, rank, mods in LAYERS for m in mods}
    upward = []
    for module, imported in graph.items():
        layer, rank = layer_of[module]
        for target in imported:
            t_layer, t_rank = layer_of[target]
            same_layer_ok = t_layer == layer and layer not in NO_IMPORTS_WITHIN
            if not (t_rank < rank or same_layer_ok):
                upward.append(f"{module} ({layer}) imports {target} ({t_layer})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join(path[path.index(target) :] + [target])
                    if target in path
                    else f"import cycle through {target}"
                )
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_rayindex_imports_and_pipelines_does_not(tmp_path):
    """From the repository root too, where the source folder pipelines/ sits in the working directory."""
    for cwd in (tmp_path, PACKAGE.parents[1]):
        ok = subprocess.run(
            [sys.executable, "-c", "import rayindex; print(rayindex.__version__)"],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
        shadow = subprocess.run([sys.executable, "-c", "import pipelines"], cwd=cwd, capture_output=True, text=True)
        assert shadow.returncode != 0, f"`import pipelines` worked in {cwd}"
