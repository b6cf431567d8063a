"""`rayindex`: a thin command line over the Python API. Every option comes from a settings model
(config.py, through options.py). Exit codes: 0 done, 1 failed (one `error:` line, never a
traceback), 2 a usage error (an option that cannot work)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayindex.config import (
    AskParams,
    BuildConfig,
    EvalOptions,
    GeneratorConfig,
    IndexLocation,
    PartitionOptions,
    PlanOptions,
    ReindexOptions,
    SearchParams,
    ServeConfig,
    ServerLocation,
    TuneOptions,
)
from rayindex.errors import UsageError, user_message
from rayindex.options import From, settings, with_options

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Build one FAISS index from a text corpus on Ray, and search it."
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int) -> None:
    # escaped: a message's own brackets ('rayindex[cpu]', a file name) are text, not rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # paths stay copyable
    raise typer.Exit(code)


def command(after_failure: str | Callable[[Exception], str] = ""):
    """A command: options from the models, and every failure one `error:` line with the right exit code
    (after_failure: what follows a failure's message, or a function of the failure giving it)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except (
                UsageError,
                ValueError,
            ) as exc:  # ValueError: an option value our code refused (an interval, a generator)
                fail(user_message(exc), 2)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes one message, not a traceback
                fail(user_message(exc) + (after_failure(exc) if callable(after_failure) else after_failure), 1)

        return app.command(fn.__name__.removesuffix("_command"))(with_options(run))

    return wrap


def where_is(location: dict) -> str:
    """The --index location, with --s3-endpoint put in effect."""
    from rayindex.api import located

    return located(**location)


def kept_for_inspection(exc: Exception) -> str:
    """What a failed build leaves: its version folder when it made one (builder.build records it)."""
    folder = getattr(exc, "run_folder", None)
    return (
        f"\n(run folder {folder} kept for inspection; CURRENT was not changed)"
        if folder
        else "\n(CURRENT was not changed)"
    )


@command(after_failure=kept_for_inspection)
def build(
    inputs: list[str] | None = typer.Argument(
        None,
        help="Parquet/JSONL files, PDF/HTML/Markdown/text files, or folders of them, local or fsspec URIs "
        "(s3://...). "
        "None: the Python standard library's docstrings (the embedded default).",
    ),
    options: Annotated[dict, From(BuildConfig, exclude={"inputs"})] = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build and publish an index: shard -> encode -> train -> per-shard add -> merge -> publish."""
    from rayindex import api

    if not inputs:
        err_console.print("No input given: indexing the Python standard library's docstrings (the embedded default).")
    print_published(
        api.build(inputs, quiet=quiet, **options), options.get("output") or BuildConfig.model_fields["output"].default
    )


def print_published(manifest, output: str) -> None:
    """The summary table and one line on what was published (build and reindex)."""
    from rayindex.infra.progress import summary_table

    console.print(summary_table(manifest))
    console.print(
        f"Published [bold]{manifest.run_id}[/]: {manifest.counts.docs_encoded:,} docs in {manifest.counts.passages:,} "
        f"passages, "
        f"metric {manifest.metric}, index {manifest.index_string!r}"
        f"{' (chosen automatically)' if manifest.training.chosen_automatically else ''}, nprobe {manifest.nprobe}, "
        f"{'on-disk' if manifest.merge.on_disk else 'in-RAM'} merge, skipped {manifest.counts.skipped or 'none'}.",
        soft_wrap=True,
    )
    r = manifest.reindex
    if r:
        console.print(
            f"Reindex of {r.previous}: {r.added:,} added, {r.changed:,} changed, {r.deleted:,} deleted, "
            f"{r.unchanged:,} unchanged (vectors reused); encoded {r.encoded:,}. Quantizer: {r.path} ({r.reason})."
        )
    if manifest.pruned:
        console.print(f"Deleted old versions: {', '.join(manifest.pruned)}")
    for warning in manifest.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f'Search it: rayindex search --index {output} "your question"')


@command(after_failure="\n(CURRENT was not changed)")
def reindex(
    inputs: list[str] | None = typer.Argument(
        None, help="The corpus now (default: the inputs of the published version)."
    ),
    options: Annotated[dict, From(ReindexOptions)] = None,
    overrides: Annotated[dict, From(BuildConfig, include={"encoders", "gpu", "ray_address", "s3_endpoint"})] = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Incremental reindex: encode only new and changed documents, drop deleted ones, reuse the quantizer unless
    drifted, publish."""
    from rayindex.config import parse_interval
    from rayindex.incremental import reindex as run_reindex
    from rayindex.incremental import run_every

    settled = settings(ReindexOptions, options)
    overrides = dict(overrides, inputs=inputs or None)

    def once() -> None:
        print_published(run_reindex(settled, overrides, quiet), settled.output)

    if settled.every is None:
        once()
        return
    interval = parse_interval(settled.every)
    err_console.print(f"Reindexing {settled.output} every {settled.every} (Ctrl-C stops).")
    try:
        run_every(
            interval,
            once,
            lambda exc: err_console.print(
                f"[bold red]error:[/] {user_message(exc)} (CURRENT not changed; next run in {settled.every})"
            ),
        )
    except KeyboardInterrupt:
        pass


@command()
def search(
    query: str = typer.Argument(None, help="What to look for (or --vector-file)."),
    location: Annotated[dict, From(IndexLocation)] = None,
    remote: Annotated[dict, From(ServerLocation)] = None,
    params: Annotated[dict, From(SearchParams)] = None,
    vector_file: Path = typer.Option(
        None,
        "--vector-file",
        metavar="FILE",
        help="Search for a vector instead of a text: a .npy file holding one vector, or a JSON array of numbers.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of {id, score, passage, start, end, text, metadata, page (PDFs)}."
    ),
) -> None:
    """Search the published index (an s3:// index is cached locally by version, checked by checksum), or a running
    server's (--server)."""
    if (query is None) == (vector_file is None):
        raise UsageError("give a query text or --vector-file FILE (exactly one)")
    search_params = settings(SearchParams, params)
    through = settings(ServerLocation, remote)
    if through.server:
        if location:
            raise UsageError("--server searches the server's index: leave out --index and --s3-endpoint")
        from rayindex.query.client import ServerIndex  # httpx only: no model, FAISS or Ray to load

        index = ServerIndex(through.server, through.api_key)
    else:
        from rayindex.query.search import open_index

        index = open_index(where_is(location))
    if vector_file is not None:
        if search_params.mode not in (None, "dense"):
            raise UsageError(f"--mode {search_params.mode} needs a query text; a vector is searched densely")
        hits = index.search_vector(
            read_vector_file(vector_file),
            search_params.k,
            search_params.nprobe,
            search_params.per_document,
            search_params.filter,
        )
    else:
        hits = index.search(
            query,
            search_params.k,
            search_params.nprobe,
            search_params.per_document,
            search_params.filter,
            search_params.mode,
        )
    if as_json:
        sys.stdout.write(json.dumps(hits, ensure_ascii=False, default=str) + "\n")
        return
    table = Table(title=f"{len(hits)} hits for {repr(query) if vector_file is None else vector_file}")
    for col in ("#", "score", "id", "chars", "passage text"):
        table.add_column(col, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        text = " ".join(hit["text"].split())
        table.add_row(
            str(rank),
            f"{hit['score']:.3f}",
            cited(hit),
            f"{hit['start']}-{hit['end']}",
            text[:160] + ("…" if len(text) > 160 else ""),
        )
    console.print(table)


def read_vector_file(path: Path) -> list[float]:
    """--vector-file: one vector, from a .npy file (numpy's format, no pickles) or a JSON array of numbers."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            values = np.load(path, allow_pickle=False)
            if values.ndim != 1:
                raise ValueError(f"it holds an array of shape {values.shape}, not one vector")
            return values.astype(float).tolist()
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--vector-file {path}: cannot read a vector ({exc})") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"--vector-file {path}: give a JSON array of numbers, or a .npy file of one vector")
    return [float(v) for v in values]


def cited(hit: dict) -> str:
    """A hit's document as the tables show it: its id, and its page when it has one ("report.pdf p. 3")."""
    return f"{hit['id']} p. {hit['page']}" if "page" in hit else str(hit["id"])


def print_sweep(points, ks: list[int], title: str) -> None:
    table = Table(title=title)
    timed_alone = any(p.p50_ms is not None for p in points)
    alone = ["p50 ms alone"] if timed_alone else []
    for col in ["nprobe", "re-rank", *[f"recall@{k}" for k in ks], "ms/query", *alone]:
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            str(p.nprobe),
            f"x{p.refine}" if p.refine > 1 else "-",
            *[f"{p.recall[k]:.3f}" for k in ks],
            f"{p.ms_per_query:.3f}",
            *([f"{p.p50_ms:.3f}" if p.p50_ms is not None else "-"] if timed_alone else []),
        )
    console.print(table)


def print_labelled(labelled: dict, ks: list[int]) -> None:
    """hit@k and MRR, a row per search mode; dense and hybrid at the default nprobe, then with every list probed."""
    rows = []  # (label, figures)
    for mode, figures in labelled["modes"].items():
        if "all_lists" in figures:
            rows.append((f"{mode}, nprobe {figures['nprobe']}", figures))
            rows.append((f"{mode}, all {figures['all_lists']['nprobe']} lists", figures["all_lists"]))
        else:
            rows.append((mode, figures))
    keys = [*(f"hit@{k}" for k in ks), "mrr"]
    table = Table(title=f"{labelled['queries']} labelled queries: documents found")
    for heading in ("mode", *keys):
        table.add_column(heading, justify="right")
    for label, figures in rows:
        table.add_row(label, *(f"{figures[key]:.3f}" for key in keys))
    console.print(table)
    console.print(f"Search's default mode: {labelled['default_mode']}", highlight=False)
    if "note" in labelled:
        console.print(f"Measured {labelled['note']}.", highlight=False)


@command()
def eval_command(
    location: Annotated[dict, From(IndexLocation)] = None,
    options: Annotated[dict, From(EvalOptions)] = None,
) -> None:
    """Recall@k vs exact search and latency for a sweep of nprobe; writes eval.json and PNG plots into the version."""
    from rayindex import api
    from rayindex.manifest import SweepPoint

    result = api.evaluate(**location, **options)
    print_sweep(
        [SweepPoint(**p) for p in result["sweep"]],
        result["ks"],
        f"{result['index_string']}: {result['documents']:,} docs, "
        f"{result['queries']} queries (default nprobe {result['default_nprobe']})",
    )
    if "labelled" in result:
        print_labelled(result["labelled"], result["ks"])
    console.print(
        f"Wrote {Path(result['plots'][0]).parent / 'eval.json'} and {', '.join(Path(p).name for p in result['plots'])}"
    )


@command()
def tune(
    location: Annotated[dict, From(IndexLocation)] = None,
    options: Annotated[dict, From(TuneOptions)] = None,
) -> None:
    """Store the nprobe for --target-recall (the largest reaching it within --max-search-ms) in the version's manifest
    and index.faiss (search/serve default); --queries tunes on a query log."""
    from rayindex import api

    tuning = api.tune(**location, **options)
    print_sweep(
        tuning.sweep,
        [tuning.k],
        f"tuning for recall@{tuning.k} >= {tuning.target} ({tuning.recall_of}) on {tuning.queries} queries from "
        f"{tuning.queries_from}",
    )
    console.print(f"Latencies measured on {tuning.measured_on}.", highlight=False)
    if tuning.reached:
        console.print(
            f"nprobe {tuning.nprobe} reaches recall@{tuning.k} {tuning.recall:.3f} in {tuning.p50_ms:.2f} ms a query "
            f"(budget {tuning.max_search_ms:g} ms); stored as the default.",
            highlight=False,
        )
    if tuning.note:
        err_console.print(f"[yellow]warning:[/] {tuning.note}; stored nprobe {tuning.nprobe}.")


@command()
def partition(
    location: Annotated[dict, From(IndexLocation)] = None,
    options: Annotated[dict, From(PartitionOptions)] = None,
) -> None:
    """Split the published version's inverted lists for `rayindex serve --shards N` (parts balanced by size, each with
    the BM25 postings of its passages, recorded in its manifest)."""
    from rayindex import api

    index = where_is(location)
    manifest, parts = api.partition(index, **options)
    shards = len(parts)
    console.print(f"{manifest.run_id}: inverted lists split for {shards} serving shards", soft_wrap=True)
    table = Table()  # the line above, not a title: a title wraps to the table's width
    columns = ("shard", "lists", "vectors", "share") + (("postings",) if manifest.lexical else ())
    for col in columns:
        table.add_column(col, justify="right")
    for number, part in enumerate(parts):
        row = [
            str(number),
            f"{len(part.lists):,}",
            f"{part.vectors:,}",
            f"{part.vectors / max(1, manifest.merge.ntotal):.1%}",
        ]
        table.add_row(*row, *([f"{part.postings:,}"] if manifest.lexical else []))
    console.print(table)
    console.print(f"Serve it: rayindex serve --index {index} --shards {shards}")


@command()
def plan(options: Annotated[dict, From(PlanOptions)] = None) -> None:
    """Disk, RAM and hours per stage, and serving (the dense scan, the lexical index) for a corpus of --docs
    documents, from throughputs measured on this machine (estimates labelled)."""
    from rayindex import api
    from rayindex.ivf.capacity import format_plan

    console.print(format_plan(api.plan(**options)))


@command()
def serve(options: Annotated[dict, From(ServeConfig)] = None) -> None:
    """Serve /search, /ask, /healthz, /metrics and /docs over HTTP with Ray Serve (RAYINDEX_API_KEY: bearer-token
    auth)."""
    import signal
    import time

    from rayindex import api

    config = api.serve(**options)
    # SIGTERM (a container runtime's, a supervisor's stop) ends the server as Ctrl-C does: Serve shut down, the
    # Ray started here stopped with this process, exit 0 (set after ray.init, whose own handler exits 15)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    through = {"haproxy": " through HAProxy", "python": " through Serve's Python proxy"}.get(config.ingress, "")
    err_console.print(
        f"Serving {config.index} at http://{config.host}:{config.port}{through} (OpenAPI page: /docs). Ctrl-C stops."
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@command()
def mcp_command(location: Annotated[dict, From(IndexLocation)] = None) -> None:
    """Answer MCP on stdin/stdout (tools: search, fetch_document) for an MCP client that starts this command
    (docs/mcp.md); the model is loaded before serving, logs go to stderr. Needs the extra [mcp]."""
    from rayindex.integrations.mcp import opened, serve_stdio

    serve_stdio(opened(where_is(location)))


@command()
def ask(
    question: str = typer.Argument(..., help="The question."),
    location: Annotated[dict, From(IndexLocation)] = None,
    params: Annotated[dict, From(AskParams)] = None,
    generation: Annotated[dict, From(GeneratorConfig)] = None,
    as_json: bool = typer.Option(False, "--json", help="Print {answer, sources} as JSON."),
) -> None:
    """Answer a question from the published index in this process, with numbered sources."""
    from rayindex.query.generate import make_generator
    from rayindex.query.search import open_index

    ask_params = settings(AskParams, params)
    opened = []  # the generator is made (and its settings checked) before the index is opened
    generator = make_generator(settings(GeneratorConfig, generation), lambda texts: opened[0].encode(texts))
    opened.append(open_index(where_is(location)))
    result = opened[0].ask(
        question, ask_params.k, ask_params.nprobe, generator, ask_params.per_document, ask_params.filter
    )
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False, default=str) + "\n")
        return
    console.print(result["answer"], highlight=False)
    for source in result["sources"]:
        text = " ".join(source["text"].split())
        console.print(
            f"[{source['n']}] {cited(source)} chars {source['start']}-{source['end']} ({source['score']:.3f}) "
            f"{text[:100]}{'…' if len(text) > 100 else ''}",
            highlight=False,
            markup=False,
        )


def main() -> None:
    app()
