"""The embedded default corpus: docstrings of the Python standard library that this interpreter
ships, read with ast (nothing is imported), written as one Parquet file."""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.infra.files import atomic_file

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "__pycache__",
    "encodings",
    "distutils",
}
MIN_CHARS = 80  # shorter docstrings ("Return self.") carry nothing to retrieve


def stdlib_docstrings(root: str | None = None) -> list[dict]:
    """One record per module, class and function docstring of at least MIN_CHARS, in a stable order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / filename
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            records.extend(_docstrings(tree, module))
    return records


def _docstrings(tree: ast.Module, module: str) -> list[dict]:
    found = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                add(child, name, "class" if isinstance(child, ast.ClassDef) else "function")
                visit(child, name)

    def add(node, qualname: str, kind: str) -> None:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_CHARS:
            full = f"{module}.{qualname}" if qualname else module
            found.append({"id": full, "title": full, "body": doc, "module": module, "kind": kind})

    add(tree, "", "module")
    visit(tree, "")
    return found


def write_stdlib_corpus(path: str | Path) -> Path:
    """Write the corpus to path (Parquet) unless it is already there; returns the path."""
    path = Path(path)
    if not path.exists():
        with atomic_file(path) as tmp:
            pq.write_table(pa.Table.from_pylist(stdlib_docstrings()), tmp, row_group_size=1024)
    return path
