"""`rayindex eval`: recall@k against exact search (over the stored passage vectors) and latency per
query for a sweep of nprobe (ivf/recall.py), and document-level hit@k / MRR of the whole pipeline on
labelled queries in each search mode the version serves (dense, lexical, hybrid: `PublishedIndex.rank`, so
exactly what search serves is measured), the modes that probe lists also with every list probed (so a loss
from tuning shows), written to eval.json and PNG plots in the version folder."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from rayindex.config import EvalOptions
from rayindex.ivf.recall import exact_truth, measure_sweep, nprobe_sweep, sample_queries
from rayindex.layout import EVAL_FILE
from rayindex.manifest import SweepPoint
from rayindex.query.search import PublishedIndex
from rayindex.text.queries import read_query_file

EVAL_SEED = 7
MODES = ("dense", "lexical", "hybrid")
PROBING_MODES = ("dense", "hybrid")  # the modes that search inverted lists: measured with every list probed too


def labelled_metrics(
    published: PublishedIndex, labelled: list[dict], ks: list[int], nprobe: int | None, mode: str = "dense"
) -> dict:
    """Document-level hit@k and MRR of the whole pipeline (encode, search, one hit per document, doc store)
    in one search mode on {query, id} pairs: a query hits at rank r when its document is the r-th document
    returned, by any of its passages."""
    found = published.rank([item["query"] for item in labelled], max(ks), nprobe, mode=mode)
    ranks = []
    for item, hits in zip(labelled, found):
        corpus_ids = [published.docs.get(vector_id)["id"] for _, vector_id in hits]
        ranks.append(corpus_ids.index(item["id"]) + 1 if item["id"] in corpus_ids else None)
    result = {f"hit@{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
    result["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
    return result


def labelled_by_mode(published: PublishedIndex, labelled: list[dict], ks: list[int]) -> dict:
    """eval.json's `labelled`: hit@k and MRR per mode the version serves (`modes`; lexical and hybrid only with
    a lexical index, else a `note` says why), dense and hybrid also with all lists probed (`all_lists`). Its
    top-level hit@k, mrr, nprobe and all_lists are dense's, as before there were modes."""
    nprobe, nlist = published.manifest.nprobe, published.manifest.nlist
    served = MODES if published.lexical is not None else ("dense",)
    modes = {}
    for mode in served:
        modes[mode] = labelled_metrics(published, labelled, ks, nprobe, mode)
        if mode in PROBING_MODES:
            # at the default nprobe, and with every list probed: what tuning costs the queries, next to each other
            modes[mode] |= {"nprobe": nprobe, "all_lists": labelled_metrics(published, labelled, ks, nlist, mode)}
            modes[mode]["all_lists"]["nprobe"] = nlist
    result = {"queries": len(labelled), **modes["dense"], "default_mode": published.check_mode(None), "modes": modes}
    if published.lexical is None:
        result["note"] = f"dense only: version {published.run_id} was built with --no-lexical"
    return result


def evaluate(published: PublishedIndex, options: EvalOptions | None = None) -> dict:
    """The sweep, optional labelled metrics, written to eval.json and PNG plots in the version folder."""
    options = options or EvalOptions()
    ntotal = int(published.index.ntotal)
    n_queries = min(options.n_queries, ntotal)
    ks = sorted(k for k in options.k_values() if k < ntotal) or [1]
    queries, self_ids = sample_queries(published.version_dir, published.manifest, n_queries, EVAL_SEED)
    truth = exact_truth(published.version_dir, published.manifest, queries, self_ids, max(ks))
    refine = published.manifest.refine_factor or 1
    points = measure_sweep(
        lambda q, k, nprobe, r: published.search_vectors(q, k, nprobe, r),
        queries,
        self_ids,
        truth,
        ks,
        nprobe_sweep(published.manifest.nlist),
        refine,
    )
    result = {
        "version": published.run_id,
        "index_string": published.manifest.index_string,
        "vectors": ntotal,
        "documents": published.manifest.counts.docs_encoded,
        "queries": len(queries),
        "held_out": "own document removed",
        "ks": ks,
        "threads": faiss.omp_get_max_threads(),
        "sweep": [p.model_dump() for p in points],
        "default_nprobe": published.manifest.nprobe,
    }
    if options.queries:
        labelled = read_query_file(options.queries, labelled=True)
        result["labelled"] = labelled_by_mode(published, labelled, ks)
    (published.version_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
    result["plots"] = plot_sweep(points, ks, published.version_dir, published.manifest.index_string)
    if "labelled" in result:
        result["plots"].append(
            plot_modes(result["labelled"], ks, published.version_dir, published.manifest.index_string)
        )
    return result


def plot_sweep(points: list[SweepPoint], ks: list[int], out_dir: Path, title: str) -> list[str]:
    """recall@k vs nprobe, and latency vs recall@10 (or the largest k under 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nprobes = [p.nprobe for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ks:
        ax.plot(nprobes, [p.recall[k] for p in points], "o-", label=f"recall@{k}")
    ax.set(xscale="log", xlabel="nprobe", ylabel="recall vs exact", ylim=(0, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    recall_png = out_dir / "recall_vs_nprobe.png"
    fig.savefig(recall_png, dpi=110)
    plt.close(fig)
    k = max([k for k in ks if k <= 10] or ks)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.recall[k] for p in points], [p.ms_per_query for p in points], "o-")
    for p in points:
        ax.annotate(str(p.nprobe), (p.recall[k], p.ms_per_query), fontsize=7)
    ax.set(xlabel=f"recall@{k}", ylabel="ms / query (batched)", title=f"{title}: latency vs recall (labels: nprobe)")
    fig.tight_layout()
    latency_png = out_dir / "latency_vs_recall.png"
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)
    return [str(recall_png), str(latency_png)]


def plot_modes(labelled: dict, ks: list[int], out_dir: Path, title: str) -> str:
    """Labelled queries' document hit@k (a bar group per k, then MRR), a bar per search mode at the default
    nprobe, and beside dense's and hybrid's a hatched bar of the same colour: every list probed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*(f"hit@{k}" for k in ks), "mrr"]
    bars = []  # (label, figures, colour, hatch)
    for n, (mode, figures) in enumerate(labelled["modes"].items()):
        bars.append((f"{mode}, nprobe {figures['nprobe']}" if "nprobe" in figures else mode, figures, f"C{n}", None))
        if "all_lists" in figures:
            bars.append((f"{mode}, all {figures['all_lists']['nprobe']} lists", figures["all_lists"], f"C{n}", "//"))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(3 + 0.25 * len(keys) * len(bars), 3.5))
    for n, (label, figures, colour, hatch) in enumerate(bars):
        xs = [i + (n - (len(bars) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [figures[key] for key in keys], width, label=label, color=colour, hatch=hatch, edgecolor="white")
    ax.set_xticks(range(len(keys)), keys)
    ax.set(ylabel="documents found", ylim=(0, 1.02), title=f"{title}: {labelled['queries']} labelled queries")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    png = out_dir / "labelled_by_mode.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return str(png)
