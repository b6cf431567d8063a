"""`rayindex`: a thin command line over the pipelines library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from pipelines.config import PACKAGED_MODEL, BuildConfig, parse_bytes
from pipelines.errors import RayIndexError, user_message
from pipelines.storage import use_s3_endpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build one FAISS index from a text corpus on Ray, and search it.")
console = Console()
err_console = Console(stderr=True)

STDLIB_CORPUS = "corpus/python-stdlib-docstrings.parquet"


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay copyable
    raise typer.Exit(2)


def config_from_options(**options) -> BuildConfig:
    try:
        return BuildConfig(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        fail(f"invalid options: {problems}")


@app.command()
def build(
    inputs: Optional[List[str]] = typer.Argument(None, help="Parquet/JSONL files or folders, local or fsspec URIs (s3://...). "
                                                  "None: the Python standard library's docstrings (the embedded default)."),
    output: str = typer.Option("rayindex-data", "--output", "-o", help="Output folder: versions/<run-id>/ and CURRENT."),
    id_column: Optional[str] = typer.Option(None, help="Column with unique document ids (default: row numbers)."),
    text_column: Optional[List[str]] = typer.Option(None, "--text-column", help="Text column; repeat to join several with ': ' (default: text)."),
    template: Optional[str] = typer.Option(None, help='Text template, e.g. "{title}: {body}" (overrides --text-column).'),
    shards: Optional[int] = typer.Option(None, help="Number of shards (default: from --shard-size)."),
    shard_size: int = typer.Option(50_000, help="Target documents per shard when --shards is not given."),
    model: str = typer.Option(PACKAGED_MODEL, help="sentence-transformers model name or local path (default: the packaged all-MiniLM-L6-v2, offline)."),
    batch_size: int = typer.Option(64, help="Encoding batch size."),
    encoders: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, or one per CPU)."),
    index: Optional[str] = typer.Option(None, help='FAISS index_factory string, e.g. "IVF4096,PQ32" or "OPQ32,IVF4096,PQ32" (default: chosen from corpus size).'),
    metric: str = typer.Option("ip", help="ip (inner product of normalized embeddings) or l2."),
    max_index_memory: Optional[str] = typer.Option(None, help="RAM budget of the index when --index is not given, e.g. 8G: picks code size, OPQ, HNSW coarse quantizer."),
    train_sample: Optional[int] = typer.Option(None, help="Training sample size (default: from the index's nlist and PQ)."),
    on_disk: Optional[bool] = typer.Option(None, "--on-disk/--in-ram", help="Merge into on-disk inverted lists (default: automatic past --memory-budget)."),
    memory_budget: Optional[str] = typer.Option(None, help="Merge on disk when the shard indexes exceed this, e.g. 8G (default: half the RAM)."),
    target_recall: Optional[float] = typer.Option(None, help="Tune nprobe to the smallest reaching this recall@10 vs exact search (stored in the manifest; search/serve use it)."),
    seed: int = typer.Option(1234, help="Seed of the training sample and k-means."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Encode and train on GPUs (default: when the cluster has GPUs)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)."),
    s3_endpoint: Optional[str] = typer.Option(None, help="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."),
    storage_retry: float = typer.Option(300.0, help="Seconds to keep retrying an unavailable output store (with backoff) before failing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build and publish an index: shard -> encode -> train -> per-shard add -> merge -> publish."""
    from pipelines.build import build_index

    id_col, text_cols, tmpl = id_column, text_column, template
    if not inputs:
        from pipelines.stdlib_corpus import write_stdlib_corpus

        from pipelines.storage import Store

        inputs = [str(write_stdlib_corpus(Store(output).local(STDLIB_CORPUS)))]  # for an s3:// output: its local mirror
        id_col, tmpl = id_col or "id", tmpl or "{title}: {body}"
        err_console.print(f"No input given: indexing the Python standard library's docstrings ({inputs[0]}).")
    try:
        budget = parse_bytes(memory_budget) if memory_budget else None
        index_budget = parse_bytes(max_index_memory) if max_index_memory else None
    except ValueError as exc:
        fail(f"--memory-budget/--max-index-memory: {exc}")
    config = config_from_options(
        inputs=inputs, output=output, id_column=id_col, text_columns=text_cols, template=tmpl, shards=shards,
        shard_size=shard_size, model=model, batch_size=batch_size, encoders=encoders, index=index, metric=metric,
        train_sample=train_sample, on_disk=on_disk, memory_budget_bytes=budget, seed=seed, use_gpu=gpu, ray_address=ray_address,
        target_recall=target_recall, max_index_bytes=index_budget, s3_endpoint=s3_endpoint, storage_retry_s=storage_retry,
    )
    try:
        manifest = build_index(config, quiet=quiet)
    except (RayIndexError, Exception) as exc:  # noqa: B014 - every failure becomes one message, not a traceback
        fail(f"{user_message(exc)}\n(run folder kept for inspection; CURRENT was not changed)")
    print_published(manifest, output)


def print_published(manifest, output: str) -> None:
    """The summary table and one line on what was published (build and reindex)."""
    from pipelines.progress import summary_table

    console.print(summary_table(manifest))
    console.print(
        f"Published [bold]{manifest.run_id}[/]: {manifest.counts['docs_encoded']:,} docs, index {manifest.index_string!r}"
        f"{' (chosen automatically)' if manifest.index_string_chosen_automatically else ''}, "
        f"{'on-disk' if manifest.merge.get('on_disk') else 'in-RAM'} merge, skipped {manifest.counts['skipped'] or 'none'}."
    )
    r = manifest.reindex
    if r:
        console.print(f"Reindex of {r['previous']}: {r['added']:,} added, {r['changed']:,} changed, {r['deleted']:,} deleted, "
                      f"{r['unchanged']:,} unchanged (vectors reused); encoded {r['encoded']:,}. Quantizer: {r['path']} ({r['reason']}).")
    if manifest.pruned:
        console.print(f"Deleted old versions: {', '.join(manifest.pruned)}")
    for warning in manifest.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"Search it: rayindex search --index {output} \"your question\"")


@app.command()
def reindex(
    inputs: Optional[List[str]] = typer.Argument(None, help="The corpus now (default: the inputs of the published version)."),
    output: str = typer.Option("rayindex-data", "--output", "-o", help="Output of an earlier build; its CURRENT version is the base."),
    drift_threshold: float = typer.Option(1.2, help="Retrain the quantizer when its fit to the new corpus (mean squared distance to the "
                                                     "nearest centroid) is this many times worse than on its training sample."),
    keep: int = typer.Option(3, help="Published versions to keep; older ones are deleted after publishing."),
    every: Optional[str] = typer.Option(None, help="Repeat forever at this interval, e.g. 1h, 15m (a failed run is reported, the next one runs)."),
    encoders: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, or one per CPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Encode and train on GPUs (default: when the cluster can have GPUs)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)."),
    s3_endpoint: Optional[str] = typer.Option(None, help="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Incremental reindex: encode only new and changed documents, drop deleted ones, reuse the quantizer unless drifted, publish."""
    from pipelines.reindex import parse_interval, reindex as run_reindex, run_every

    overrides = dict(inputs=inputs or None, encoders=encoders, use_gpu=gpu, ray_address=ray_address, s3_endpoint=s3_endpoint)

    def once() -> None:
        manifest = run_reindex(output, overrides, drift_threshold, keep, quiet)
        print_published(manifest, output)

    if every is None:
        try:
            once()
        except (RayIndexError, Exception) as exc:  # noqa: B014 - one message, not a traceback
            fail(f"{user_message(exc)}\n(CURRENT was not changed)")
        return
    try:
        interval = parse_interval(every)
    except ValueError as exc:
        fail(f"--every: {exc}")
    err_console.print(f"Reindexing {output} every {every} (Ctrl-C stops).")
    try:
        run_every(interval, once, lambda exc: err_console.print(f"[bold red]error:[/] {user_message(exc)} (CURRENT not changed; next run in {every})"))
    except KeyboardInterrupt:
        pass


@app.command()
def search(
    query: str = typer.Argument(..., help="What to look for."),
    index: str = typer.Option("rayindex-data", "--index", "-i", help="Output folder of a build (its CURRENT version is used)."),
    k: int = typer.Option(10, "-k", help="Number of hits."),
    nprobe: Optional[int] = typer.Option(None, help="Inverted lists to visit (default: the build's)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {id, score, text, metadata}."),
    s3_endpoint: Optional[str] = typer.Option(None, help="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."),
) -> None:
    """Search the published index (an s3:// index is cached locally by version, checked by checksum)."""
    from pipelines.search import open_published

    use_s3_endpoint(s3_endpoint)
    try:
        hits = open_published(index).search(query, k, nprobe)
    except RayIndexError as exc:
        fail(user_message(exc))
    if as_json:
        sys.stdout.write(json.dumps(hits, ensure_ascii=False, default=str) + "\n")
        return
    table = Table(title=f"{len(hits)} hits for {query!r}")
    for col in ("#", "score", "id", "text"):
        table.add_column(col, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        text = " ".join(hit["text"].split())
        table.add_row(str(rank), f"{hit['score']:.3f}", str(hit["id"]), text[:160] + ("…" if len(text) > 160 else ""))
    console.print(table)


def print_sweep(rows: list[dict], ks: list[int], title: str) -> None:
    table = Table(title=title)
    for col in ["nprobe", *[f"recall@{k}" for k in ks], "ms/query"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["nprobe"]), *[f"{r[f'recall@{k}']:.3f}" for k in ks], f"{r['ms_per_query']:.3f}")
    console.print(table)


@app.command("eval")
def eval_command(
    index: str = typer.Option("rayindex-data", "--index", "-i", help="Output folder of a build (its CURRENT version)."),
    queries: Optional[str] = typer.Option(None, help="JSONL of {\"query\", \"id\"} pairs: adds hit@k and MRR of the whole pipeline."),
    k: str = typer.Option("1,10,100", "--k", help="Comma-separated k values for recall@k."),
    n_queries: int = typer.Option(500, help="Queries sampled from the corpus (held out: their own document is not counted)."),
) -> None:
    """Recall@k vs exact search and latency for a sweep of nprobe; writes eval.json and PNG plots into the version."""
    from pipelines.evaluate import evaluate
    from pipelines.search import open_published

    try:
        ks = tuple(int(v) for v in k.split(",") if v.strip())
        result = evaluate(open_published(index), n_queries, ks, queries)
    except ValueError:
        fail(f"--k {k!r}: give comma-separated integers such as 1,10,100")
    except RayIndexError as exc:
        fail(user_message(exc))
    print_sweep(result["sweep"], result["ks"], f"{result['index_string']}: {result['documents']:,} docs, {result['queries']} queries "
                f"(default nprobe {result['default_nprobe']})")
    if "labelled" in result:
        console.print({key: round(v, 4) for key, v in result["labelled"].items()})
    console.print(f"Wrote {Path(result['plots'][0]).parent / 'eval.json'} and {', '.join(Path(p).name for p in result['plots'])}")


@app.command()
def tune(
    index: str = typer.Option("rayindex-data", "--index", "-i", help="Output folder of a build (its CURRENT version)."),
    target_recall: float = typer.Option(0.95, help="recall@k vs exact search to reach."),
    k: int = typer.Option(10, "--k", help="k of recall@k."),
    n_queries: int = typer.Option(500, help="Held-out queries sampled from the corpus."),
) -> None:
    """Store the smallest nprobe that reaches --target-recall in the version's manifest (search/serve default)."""
    from pipelines.evaluate import tune_nprobe
    from pipelines.search import open_published

    try:
        tuning = tune_nprobe(open_published(index), target_recall, k, n_queries)
    except RayIndexError as exc:
        fail(user_message(exc))
    print_sweep(tuning["sweep"], [tuning["k"]], f"tuning for recall@{tuning['k']} >= {target_recall}")
    if tuning["reached"]:
        console.print(f"nprobe {tuning['nprobe']} reaches recall@{tuning['k']} {tuning['recall']:.3f}; stored as the default.")
    else:
        err_console.print(f"[yellow]warning:[/] {tuning['note']}; stored nprobe {tuning['nprobe']}.")


@app.command()
def plan(
    docs: float = typer.Option(..., "--docs", help="Number of documents, e.g. 1e9."),
    dim: int = typer.Option(384, help="Embedding dimension."),
    index: Optional[str] = typer.Option(None, help="index_factory string (default: chosen as the build would)."),
    max_index_memory: Optional[str] = typer.Option(None, help="RAM budget of the index, e.g. 64G (drives the index choice)."),
    gpus: int = typer.Option(0, help="GPUs for encoding and training."),
    cores: int = typer.Option(2, help="CPU cores for encoding (no GPUs) and adding."),
) -> None:
    """Disk, RAM and hours per stage for a corpus of --docs documents, from throughputs measured on this machine (estimates labelled)."""
    from pipelines.capacity import format_plan, plan_capacity

    try:
        budget = parse_bytes(max_index_memory) if max_index_memory else None
        result = plan_capacity(docs, dim, index, gpus=gpus, max_index_bytes=budget, cores=cores)
    except ValueError as exc:
        fail(str(exc))
    console.print(format_plan(result))


GENERATOR_HELP = "extractive (offline, default), openai (an OpenAI-compatible endpoint) or transformers (a local model directory)."


@app.command()
def serve(
    index: str = typer.Option("rayindex-data", "--index", "-i", help="Output folder of a build; its CURRENT version is served and watched."),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds to."),
    port: int = typer.Option(8000, help="HTTP port."),
    replicas: int = typer.Option(1, help="Serve replicas (each loads the index memory-mapped and the model)."),
    replica_cpus: float = typer.Option(1.0, help="CPUs Ray reserves per replica."),
    generator: str = typer.Option("extractive", help=GENERATOR_HELP),
    generator_model: Optional[str] = typer.Option(None, help="openai: model name (or RAYINDEX_OPENAI_MODEL); transformers: model directory."),
    generator_url: Optional[str] = typer.Option(None, help="openai: base URL (or RAYINDEX_OPENAI_BASE_URL / OPENAI_BASE_URL); key from OPENAI_API_KEY."),
    generator_timeout: float = typer.Option(30.0, help="Seconds before a remote generator call becomes a 504."),
    poll_interval: float = typer.Option(2.0, help="Seconds between checks of CURRENT for a new version (hot swap)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)."),
    s3_endpoint: Optional[str] = typer.Option(None, help="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."),
) -> None:
    """Serve /search, /ask, /healthz, /metrics and /docs over HTTP with Ray Serve (RAYINDEX_API_KEY: bearer-token auth)."""
    import time

    from pipelines.serve import ServeSettings, start_serving

    use_s3_endpoint(s3_endpoint)
    settings = ServeSettings(index=index, generator=generator, generator_model=generator_model, generator_url=generator_url,
                             generator_timeout_s=generator_timeout, poll_interval_s=poll_interval)
    try:
        start_serving(settings, host, port, replicas, replica_cpus, ray_address)
    except (RayIndexError, ValueError) as exc:
        fail(user_message(exc))
    err_console.print(f"Serving {index} at http://{host}:{port} (OpenAPI page: /docs). Ctrl-C stops.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question."),
    index: str = typer.Option("rayindex-data", "--index", "-i", help="Output folder of a build (its CURRENT version is used)."),
    k: int = typer.Option(5, "-k", help="Passages to retrieve and cite."),
    nprobe: Optional[int] = typer.Option(None, help="Inverted lists to visit (default: the build's)."),
    generator: str = typer.Option("extractive", help=GENERATOR_HELP),
    generator_model: Optional[str] = typer.Option(None, help="openai: model name; transformers: model directory."),
    generator_url: Optional[str] = typer.Option(None, help="openai: base URL of the endpoint."),
    generator_timeout: float = typer.Option(30.0, help="Seconds to wait for a remote generator."),
    as_json: bool = typer.Option(False, "--json", help="Print {answer, sources} as JSON."),
    s3_endpoint: Optional[str] = typer.Option(None, help="Endpoint URL of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)."),
) -> None:
    """Answer a question from the published index in this process, with numbered sources."""
    from pipelines.generate import GeneratorError, make_generator
    from pipelines.search import open_published

    use_s3_endpoint(s3_endpoint)
    try:
        published = open_published(index)
        hits = published.search(question, k, nprobe)
        answer_with = make_generator(generator, published.encode, model=generator_model, base_url=generator_url,
                                     timeout_s=generator_timeout)
        answer = answer_with.generate(question, hits)
    except (RayIndexError, ValueError, GeneratorError) as exc:
        fail(user_message(exc))
    if as_json:
        sys.stdout.write(json.dumps({"answer": answer, "sources": [{"n": n, **h} for n, h in enumerate(hits, 1)]},
                                    ensure_ascii=False, default=str) + "\n")
        return
    console.print(answer, highlight=False)
    for n, hit in enumerate(hits, 1):
        text = " ".join(hit["text"].split())
        console.print(f"[{n}] {hit['id']} ({hit['score']:.3f}) {text[:100]}{'…' if len(text) > 100 else ''}", highlight=False, markup=False)


def main() -> None:
    app()
