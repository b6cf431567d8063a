"""Hybrid retrieval (issue #21): quality of dense, lexical (BM25) and hybrid search, the lexical stage's share
of a build and the query cost of hybrid vs dense (lexical serving at 1M and 10M passages:
lexical_serving_benchmark.py).

Two query sets built from real text, each searched with `index.search(query, k=10, mode=...)` on an index
built with default options (real model, CPU); document hit@10 and MRR@10 per mode:

(a) quotes: man pages (English, /usr/share/man/man*/, roff markup stripped), drawn at random; a query is a
    sentence quoted from past the first 2,000 characters of one page (so never from its first passage) and found in
    no other page;
    the answer is that page.
(b) other words: the Jargon File (Debian dict-jargon), one document per entry; a query is the first sense
    of the same headword's GCIDE definition (Debian dict-gcide), the headword itself removed; the answer is
    that Jargon entry.
(c) what is: the same Jargon File index; a query is "What is WORD?" for a headword of one entry only (a
    third kind, short questions naming the thing: a check that the fusion chosen on (a) and (b) holds).

Per set also the hybrid figures by fusion (by score, what search does on a cosine index, and by reciprocal
rank, the fusion before it) and by the documents each side brings (query/fusion.py), from the same two
searches per query. Target per set: hybrid hit@10 >= max(dense, lexical) - 0.01. Build cost: the manifest's
`lexical` timing over the sum of its stage timings, for the man page build (target <= 15%). Query cost: p50
of one query searched alone in process and over HTTP (`rayindex serve`, --no-http to skip), hybrid / dense
(target <= 1.3); with --serving-shards N also over HTTP against `rayindex serve --shards N` (the version split
for N first when it is not).

    apt-get install dict-gcide dict-jargon
    python benchmarks/hybrid_benchmark.py [--man-pages 1000] [--queries 300] [--work /tmp/rayindex-hybrid] \
        [--json docs/benchmark-hybrid.json] [--png docs/benchmark-hybrid.png]
    # a part only (merged into the JSON): --sets quotes|other_words|what_is
    # the query cost over HTTP with 3 serving shards only: --sets '' --serving-shards 3

Builds are kept in --work and reused by a rerun (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from encode_benchmark import GCIDE, dictd_number, gcide_entries
from rich.console import Console
from rich.table import Table

from rayindex.builder import build
from rayindex.config import BuildConfig
from rayindex.layout import document_row
from rayindex.lexical.postings import (
    bm25_ceiling,
)
from rayindex.query.fusion import by_rank, by_score, fuse_documents
from rayindex.query.search import best_per_document, open_index

K = 10
MODES = ("dense", "lexical", "hybrid")
MAN = Path("/usr/share/man")
QUOTE_FROM = 2_000  # characters: past a passage of 256 tokens (about 1,000 characters), the first one


def strip_roff(source: str) -> str:
    """The text of a man page's roff source: request lines dropped but for their arguments (.SH, .B, .TP...),
    font and character escapes removed."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request not in {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP", "IP", "Nm", "Nd"}:
                continue
            line = rest.replace('"', "")
        line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)
        line = re.sub(r"\\\((..)", " ", line).replace("\\-", "-").replace("\\e", "\\")
        line = re.sub(r"\\s[-+]?\d|\\[&/,|^%:]", "", line)
        line = re.sub(r"\\(.)", r"\1", line)
        lines.append(line)
    return re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()


def man_pages(n: int) -> list[dict]:
    """n English man pages (one per name, longer than QUOTE_FROM + 500 characters) drawn at random, as text."""
    pages = {}
    for path in sorted(MAN.glob("man[1-8]/*.gz")):
        try:
            text = strip_roff(gzip.open(path).read().decode("utf-8", "replace"))
        except (OSError, EOFError):
            continue
        if not text.startswith(".so") and len(text) > QUOTE_FROM + 500:
            pages[path.name.removesuffix(".gz")] = text
    return [{"id": name, "text": pages[name]} for name in sorted(random.Random(21).sample(sorted(pages), n))]


def quote_queries(pages: list[dict], n: int, seed: int = 21) -> list[dict]:
    """One sentence per page (n pages at random): 8 to 30 words, starting past QUOTE_FROM characters, found in
    no other page (boilerplate such as gcloud's "This command is currently in beta" names no page)."""
    rng = random.Random(seed)
    everything = "\n".join(" ".join(page["text"].split()) for page in pages)
    asked = []
    for page in rng.sample(pages, len(pages)):
        deep = page["text"][QUOTE_FROM:]
        sentences = [
            s.strip()
            for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", deep)[1:]  # the first may be cut
            if 8 <= len(s.split()) <= 30 and re.search(r"[a-z]{3}", s)
        ]
        sentences = [s for s in sentences if everything.count(" ".join(s.split())) == 1]
        if sentences:
            asked.append({"query": " ".join(rng.choice(sentences).split()), "id": page["id"]})
        if len(asked) == n:
            break
    return asked


def dictd_entries(name: str) -> list[tuple[str, str]]:
    """(headword, entry) of a Debian dictd dictionary, one per distinct entry."""
    data = gzip.open(GCIDE / f"{name}.dict.dz").read()
    seen, entries = set(), []
    for line in (GCIDE / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")
        span = (dictd_number(offset), dictd_number(length))
        if word.startswith("00-database") or span in seen:
            continue
        seen.add(span)
        entries.append((word, data[span[0] : span[0] + span[1]].decode("utf-8", "replace").strip()))
    return entries


def first_sense(word: str, definition: str) -> str:
    """A GCIDE definition's first sense, without its headword, pronunciation, etymology and sources."""
    text = " ".join(definition.split())
    text = re.sub(r"^.*?\\[^\\]*\\.*?(\.\]|\)\]) ", " ", text)  # headword, pronunciation, forms
    text = re.sub(r"\[[^\]]*\]|\\[^\\]*\\|\([^)]{0,40}\)", " ", text)  # etymology and sources, pronunciation
    numbered = re.search(r"\b1\. (.*?)(?= 2\. |$)", text)
    if numbered:
        text = numbered.group(1)
    else:  # after the part of speech
        pos = re.search(r"\b(?:n|v\. [ti]|v|a|adv|prep|interj|pl)\. ", text)
        text = text[pos.end() :] if pos else text
    text = re.split(r"(?<=[.;]) (?=[A-Z])| -- ", text)[0]  # the definition, not its quotations
    text = re.sub(re.escape(word), " ", text.replace("{", "").replace("}", ""), flags=re.I)
    return " ".join(text.split())[:300]


def jargon_corpus_and_queries(n: int, seed: int = 21) -> tuple[list[dict], list[dict]]:
    """The Jargon File as documents; for n headwords also in GCIDE (one Jargon entry each), the GCIDE
    definition's first sense as the query, the Jargon entry as the answer."""
    entries = dictd_entries("jargon")
    jargon = [{"id": f"{word}#{i}", "word": word, "entry": entry} for i, (word, entry) in enumerate(entries)]
    ids_of: dict[str, list[str]] = {}
    for doc in jargon:
        ids_of.setdefault(doc["word"].lower(), []).append(doc["id"])
    gcide: dict[str, str] = {}
    for row in gcide_entries():
        gcide.setdefault(row["word"].lower(), row["definition"])
    asked = []
    for word in sorted(ids_of):
        if len(ids_of[word]) == 1 and word in gcide and len(word) > 1:
            query = first_sense(word, gcide[word])
            if len(query.split()) >= 4:
                asked.append({"query": query, "id": ids_of[word][0]})
    random.Random(seed).shuffle(asked)
    return jargon, asked[:n]


def what_is_queries(jargon: list[dict], n: int, seed: int = 5) -> list[dict]:
    """ "What is WORD?" for n Jargon headwords (longer than two characters) that head one entry only; the answer:
    that entry."""
    entries_of: dict[str, int] = {}
    for doc in jargon:
        entries_of[doc["word"].lower()] = entries_of.get(doc["word"].lower(), 0) + 1
    words = [doc for doc in jargon if entries_of[doc["word"].lower()] == 1 and len(doc["word"]) > 2]
    return [{"query": f"What is {doc['word']}?", "id": doc["id"]} for doc in random.Random(seed).sample(words, n)]


def built(rows: list[dict], folder: Path, template: str) -> tuple[Path, float]:
    """An index of rows built with default options (once: a rerun measures the same build); its wall time."""
    output = folder / "out"
    if (output / "CURRENT").exists():
        return output, float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "corpus.parquet")
    started = time.monotonic()
    build(BuildConfig(inputs=[str(folder / "corpus.parquet")], output=str(output), id_column="id", template=template))
    took = time.monotonic() - started
    print(f"built {len(rows):,} documents in {took:.0f} s", file=sys.stderr)
    return output, took


def quality(index, asked: list[dict]) -> tuple[dict, list[dict]]:
    """hit@10 and MRR@10 per mode; and per query the answer's rank per mode (0: not in the 10)."""
    ranks = {mode: [] for mode in MODES}
    for n, q in enumerate(asked):
        for mode in MODES:
            ids = [hit["id"] for hit in index.search(q["query"], k=K, mode=mode)]
            ranks[mode].append(ids.index(q["id"]) + 1 if q["id"] in ids else 0)
        if (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(asked)} queries", file=sys.stderr)
    scores = {
        mode: {
            "hit_at_10": float(np.mean([r > 0 for r in ranks[mode]])),
            "mrr_at_10": float(np.mean([1 / r if r else 0.0 for r in ranks[mode]])),
        }
        for mode in MODES
    }
    per_query = [{**q, **{mode: ranks[mode][i] for mode in MODES}} for i, q in enumerate(asked)]
    return scores, per_query


FUSION_VARIANTS = {  # name -> (fusion, depth: documents each side brings)
    **{f"score, depth {d}": ("score", d) for d in (10, 20, 30, 50)},
    **{f"rank (RRF 60), depth {d}": ("rank", d) for d in (30, 50)},
}


def fusion_variants(index, asked: list[dict]) -> dict:
    """hit@10 and MRR@10 of hybrid search fused by score (query/fusion.py by_score: what search does on a
    cosine index) and by reciprocal rank (by_rank), each side bringing `depth` documents, from one dense and
    one lexical search of 50 documents per query: how the choice of fusion and depth moves the figures."""
    deepest = max(depth for _, depth in FUSION_VARIANTS.values())
    ranks: dict[str, list[int]] = {name: [] for name in FUSION_VARIANTS}
    for q in asked:
        dense = index.rank([q["query"]], deepest, mode="dense")[0]
        terms = index.query_terms(q["query"])
        found = index.lexical_passages(terms, index.lexical_fetch(deepest, 1), None)
        lexical = best_per_document(found.scores, found.ids, 1, deepest)[0]
        ceiling = bm25_ceiling(found.doc_freqs, index.manifest.lexical.passages)
        for name, (fusion, depth) in FUSION_VARIANTS.items():
            if fusion == "score":
                sides = [
                    by_score(dense[:depth], document_row, 1.0, depth),
                    by_score(lexical[:depth], document_row, ceiling, depth),
                ]
            else:
                sides = [by_rank(dense[:depth], document_row), by_rank(lexical[:depth], document_row)]
            ids = [hit["id"] for hit in index.hits(fuse_documents(sides, document_row, 1, K))]
            ranks[name].append(ids.index(q["id"]) + 1 if q["id"] in ids else 0)
    return {
        name: {
            "hit_at_10": float(np.mean([r > 0 for r in found])),
            "mrr_at_10": float(np.mean([1 / r if r else 0.0 for r in found])),
        }
        for name, found in ranks.items()
    }


def query_cost(search: Callable[[str, str], object], queries: list[str]) -> dict:
    """p50 ms of one query searched alone, search(query, mode), per mode, modes interleaved."""
    times = {mode: [] for mode in MODES}
    for query in queries:
        for mode in MODES:
            started = time.perf_counter()
            search(query, mode)
            times[mode].append(time.perf_counter() - started)
    return {mode: 1000 * float(np.median(times[mode])) for mode in MODES}


def http_query_cost(output: Path, queries: list[str], shards: int | None = None) -> dict:
    """query_cost over HTTP: /search of `rayindex serve` (its default ingress, in a local Ray of its own;
    unsharded, or with `shards` serving shards: `rayindex serve --shards N`), one request at a time."""
    import httpx
    import ray
    from ray import serve

    from rayindex.config import ServeConfig
    from rayindex.query.launch import free_port, start_serving

    port = free_port()
    config = ServeConfig(index=str(output), port=port, replica_cpus=0, shards=shards, shard_cpus=0, ingress="python")
    start_serving(config)  # the ingress of the figures in docs/benchmarks.md
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:

            def search(query: str, mode: str) -> None:
                client.post("/search", json={"query": query, "k": K, "mode": mode}).raise_for_status()

            for query in queries[:10]:  # warm up
                search(query, "hybrid")
            return query_cost(search, queries)
    finally:
        serve.shutdown()
        ray.shutdown()


def quotes_set(args) -> tuple[Path, float, list[dict], str]:
    """The man page build (built or reused), its wall time, the quote queries and what the corpus is."""
    print("man pages: reading", file=sys.stderr)
    pages = man_pages(args.man_pages)
    output, build_s = built(pages, args.work / "man", "{text}")
    return output, build_s, quote_queries(pages, args.queries), f"{len(pages):,} man pages (English, at random)"


def measure_sharded(args, result: dict) -> None:
    """The query cost over HTTP with args.serving_shards serving shards, on the man page build (split for them
    first when it is not: `rayindex partition`): each shard scores the BM25 postings of its passages, so a
    hybrid search fans out twice, by vector and by BM25 (query/sharded.py)."""
    from rayindex import api

    output, _, asked, corpus = quotes_set(args)
    shards = args.serving_shards
    if shards not in open_index(output).manifest.serving:
        api.partition(str(output), shards)
    texts = [q["query"] for q in asked[: args.latency_queries]]
    print(f"query cost over HTTP: rayindex serve --shards {shards}", file=sys.stderr)
    p50 = http_query_cost(output, texts, shards)
    result["sharded_query_cost"] = {
        "corpus": corpus,
        "serving_shards": shards,
        "queries": len(texts),
        "http_p50_ms": p50,
        "http_ratio": p50["hybrid"] / p50["dense"],
    }


def measure_sets(args, result: dict) -> None:
    """Builds (or reuses) each query set's index and measures it; the man page set also gives the build's
    lexical share and the query cost."""
    for name in args.sets.split(","):
        if name == "quotes":
            output, build_s, asked, corpus = quotes_set(args)
        else:
            jargon, asked = jargon_corpus_and_queries(args.queries)
            output, build_s = built(jargon, args.work / "jargon", "{word}: {entry}")
            corpus = f"{len(jargon):,} Jargon File entries"
            if name == "what_is":
                asked = what_is_queries(jargon, args.queries)
        index = open_index(output)
        print(f"{name}: {len(asked)} queries on {corpus}", file=sys.stderr)
        scores, per_query = quality(index, asked)
        print(f"{name}: fusion variants", file=sys.stderr)
        variants = fusion_variants(index, asked)
        best_single = max(scores["dense"]["hit_at_10"], scores["lexical"]["hit_at_10"])
        result["sets"][name] = {
            "corpus": corpus,
            "passages": index.manifest.merge.ntotal,
            "queries": len(asked),
            "scores": scores,
            "target_hit_at_10": best_single - 0.01,
            "holds": scores["hybrid"]["hit_at_10"] >= best_single - 0.01 - 1e-9,  # hit rates are n / queries
            "fusion_variants": variants,
            "examples": per_query[:5],
            "hybrid_lost": [q for q in per_query if q["hybrid"] == 0 and (q["dense"] or q["lexical"])][:10],
        }
        if name == "quotes":
            manifest = index.manifest
            result["build"] = {
                "corpus": corpus,
                "passages": manifest.merge.ntotal,
                "wall_s": build_s,
                "timings_s": manifest.timings_s,
                "lexical_share": manifest.timings_s["lexical"] / sum(manifest.timings_s.values()),
            }
            print("query cost: modes interleaved, one query at a time", file=sys.stderr)
            texts = [q["query"] for q in asked[: args.latency_queries]]
            p50 = query_cost(lambda query, mode, index=index: index.search(query, k=K, mode=mode), texts)
            result["query_cost"] = {"queries": len(texts), "p50_ms": p50, "ratio": p50["hybrid"] / p50["dense"]}
            if args.http:
                print("query cost over HTTP: rayindex serve", file=sys.stderr)
                http = http_query_cost(output, texts)
                result["query_cost"] |= {"http_p50_ms": http, "http_ratio": http["hybrid"] / http["dense"]}


def print_tables(result: dict, console: Console) -> None:
    table = Table(title="Document hit@10 / MRR@10 by mode (target: hybrid >= max(dense, lexical) - 0.01)")
    for col in ("query set", "corpus", "queries", *MODES, "target", "holds"):
        table.add_column(col, justify="right")
    for name, s in result["sets"].items():
        table.add_row(
            name,
            s["corpus"],
            str(s["queries"]),
            *[f"{s['scores'][m]['hit_at_10']:.3f} / {s['scores'][m]['mrr_at_10']:.3f}" for m in MODES],
            f">= {s['target_hit_at_10']:.3f}",
            "yes" if s["holds"] else "NO",
        )
    variants = Table(title="Hybrid hit@10 / MRR@10 by fusion and depth (documents each side brings)")
    variants.add_column("fusion, depth")
    for name in result["sets"]:
        variants.add_column(name, justify="right")
    for variant in FUSION_VARIANTS:
        cells = [result["sets"][n].get("fusion_variants", {}).get(variant) for n in result["sets"]]
        variants.add_row(variant, *[f"{c['hit_at_10']:.3f} / {c['mrr_at_10']:.3f}" if c else "-" for c in cells])
    if result["sets"]:  # a run of --serving-shards alone has none
        console.print(table)
        console.print(variants)
    costs = Table(title="Costs")
    for col in ("measure", "value", "target"):
        costs.add_column(col, justify="right")
    if "build" in result:
        b = result["build"]
        stages_s = sum(b["timings_s"].values())
        share = f"{b['lexical_share']:.1%} ({b['timings_s']['lexical']:.1f} of {stages_s:.1f} s)"
        costs.add_row("lexical share of build stages", share, "<= 15%")
    if "query_cost" in result:
        q = result["query_cost"]
        costs.add_row("p50 ms dense / lexical / hybrid", " / ".join(f"{q['p50_ms'][m]:.1f}" for m in MODES), "")
        costs.add_row("hybrid / dense p50", f"{q['ratio']:.2f}x", "<= 1.3x")
        if "http_p50_ms" in q:
            http = " / ".join(f"{q['http_p50_ms'][m]:.1f}" for m in MODES)
            costs.add_row("over HTTP (rayindex serve): p50 ms dense / lexical / hybrid", http, "")
            costs.add_row("over HTTP: hybrid / dense p50", f"{q['http_ratio']:.2f}x", "<= 1.3x")
    if "sharded_query_cost" in result:
        q = result["sharded_query_cost"]
        http = " / ".join(f"{q['http_p50_ms'][m]:.1f}" for m in MODES)
        costs.add_row(f"over HTTP, {q['serving_shards']} serving shards: p50 ms dense / lexical / hybrid", http, "")
        costs.add_row(
            f"over HTTP, {q['serving_shards']} serving shards: hybrid / dense p50", f"{q['http_ratio']:.2f}x", "<= 1.3x"
        )
    console.print(costs)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.27
    for i, mode in enumerate(MODES):
        values = [s["scores"][mode]["hit_at_10"] for s in result["sets"].values()]
        bars = ax.bar(np.arange(len(values)) + (i - 1) * width, values, width, label=mode)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(result["sets"])), [f"{n} ({s['queries']} q)" for n, s in result["sets"].items()])
    ax.set(ylabel="document hit@10", ylim=(0, 1.22), title="Hybrid retrieval: hit@10 per mode")
    ax.legend(fontsize=8, loc="upper center", ncol=len(MODES))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="quotes,other_words,what_is", help="query sets to measure, comma-separated")
    parser.add_argument("--man-pages", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300, help="per query set")
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument(
        "--http", action=argparse.BooleanOptionalAction, default=True, help="the query cost over HTTP too"
    )
    parser.add_argument(
        "--serving-shards",
        type=int,
        help="the query cost over HTTP with this many serving shards too (on the man page build)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayindex-hybrid"))
    parser.add_argument("--json", type=Path, help="results, merged into the file's (a run may measure a part)")
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    for name in ("gcide", "jargon"):
        if not (GCIDE / f"{name}.index").exists():
            raise SystemExit(f"dict-{name} is not installed: apt-get install dict-{name}")
    result = {"k": K, "cpus": os.cpu_count(), "sets": {}}
    if args.json and args.json.exists():
        result = json.loads(args.json.read_text())
    if args.sets:
        measure_sets(args, result)
    if args.serving_shards:
        measure_sharded(args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print_tables(result, Console(width=140))
    if args.png and result["sets"]:
        plot(result, args.png)


if __name__ == "__main__":
    main()
