"""Capacity plan: bytes and hours of a build from the corpus size, as a pure function of numbers.

Sizes are arithmetic on FAISS's layout (rayindex.ivf.index_params.index_memory_parts, checked against
faiss.serialize_index in tests). Hours divide the work by throughputs: the CPU figures were
measured on the 2-core development machine (docs/benchmarks.md); every GPU figure, and the merge
rate, is an estimate and is labelled so. Each number in a plan carries a "basis":
"computed" (layout arithmetic), "measured" (from measured throughputs), "estimate", or "given".
"""

from __future__ import annotations

from rich.table import Table

from rayindex.ivf.index_params import (
    MIN_POINTS_PER_CENTROID,
    choose_index_string,
    default_nprobe,
    index_memory_parts,
    max_nlist_for,
    parse_index_string,
    training_sample_size,
)
from rayindex.lexical.capacity import (
    LEXICAL_BENCH,
    MAXSCORE_SPEEDUP,
    NS_PER_POSTING,
    POSTINGS_PER_KIB,
    QUERY_POSTINGS_SHARE,
    SEARCH_BYTES_PER_POSTING,
    SEARCH_PEAK_BYTES,
    TERM_BYTES,
    TERMS_GROWTH,
    lexical_query_cost,
    lexical_size,
    lexical_terms,
)

BENCH = "benchmarks/build_benchmark.py --json docs/benchmark-build.json, 2026-11-27, 2 cores, no GPU"
SHARDED_BENCH = "benchmarks/sharded_benchmark.py --json docs/benchmark-sharded.json, 2026-11-29, 2 cores"
SCAN_MEASURED_CODE_BYTES = 16  # PQ16: the code size the scan rate was measured at
# one thread scanning one serving part of the 100M-vector benchmark index (IVF2048,PQ16, nprobe 16, warm
# page cache): 160 queries probing 278,866,161 codes in 4.57 s; 4 parts one after the other took 4.93 s
SCAN_CODES_PER_S_PER_CORE = 278_866_161 / 4.57
SCAN_SOURCE = (
    f"{SHARDED_BENCH}'s index: search_preassigned of 160 queries over 278.9M PQ16 codes in 4.57 s, one thread, "
    "in process (serving adds Serve's fan-out)"
)
COARSE_BENCH = (
    "benchmarks/coarse_assign_benchmark.py --batch 50000 --json docs/benchmark-coarse-assign.json, 2026-12-04, "
    "2 cores, no GPU"
)
# docs/benchmark-coarse-assign.json's "assign": batches of 50,000 vectors, 2 threads
COARSE_ASSIGN = {"flat_vectors_per_s": 2702.43, "hnsw_vectors_per_s": 14281.81}
COARSE_NLIST, COARSE_DIM = 65_536, 384
HNSW_ADD_SECONDS = 109.85  # 1,000,000 vectors added to IVF65536_HNSW32,PQ48np with 2 threads
HNSW_MEASURED_NLIST = 65_536
ENCODE_BENCH = "benchmarks/encode_benchmark.py --json docs/benchmark-encode.json, 2026-11-29, 2 cores, no GPU"
DATA_PATH_DOCS = 126_240
DATA_PATH_PER_CORE = (
    DATA_PATH_DOCS / 20.6045 / 2
)  # the encoders' steady time, 2 actors on 2 cores: 3,063 docs/s per core

# Throughputs per core (per GPU below), each with where it comes from.
MEASURED_CPU: dict[str, dict] = {
    "encode_docs_per_s_per_core": {
        # all-MiniLM-L6-v2, ~110-token stdlib docstrings, model load included; rayindex's 2 actors: 36.0 docs/s
        "value": 1600 / 41.317 / 2,
        "basis": "measured",
        "source": f"{BENCH}: 1,600 docs in 41.3 s in one process with 2 torch threads (38.7 docs/s)",
    },
    "add_vectors_per_s_per_core": {
        # add cost is mostly the coarse assignment: scaled by nlist/1024 for a flat quantizer (see add_hours); at
        # 65,536 lists that predicts 1,214 vectors/s on 2 cores: coarse_assign_benchmark.py measured 1,149 and 1,380
        "value": 200_000 / 2.575 / 2,
        "basis": "measured",
        "source": f"{BENCH}: add of 200,000 x 384 vectors to IVF1024,PQ48np in 2.58 s, 2 tasks",
    },
    "add_hnsw_vectors_per_s_per_core": {
        # an HNSW32 quantizer walks a graph (efSearch 16) instead of computing nlist distances per vector: 5.3x the
        # flat assignment rate at 65,536 lists; its cost grows about with log(nlist), so it is used as is for any
        # nlist. A repeat on 262,144 vectors under heavier load from other work gave 5,699 vectors/s (flat: 1,380)
        "value": 1_000_000 / HNSW_ADD_SECONDS / 2,
        "basis": "measured",
        "source": f"{COARSE_BENCH}: add of 1,000,000 x 384 vectors to IVF65536_HNSW32,PQ48np in "
        f"{HNSW_ADD_SECONDS} s, 2 threads (9,104 vectors/s; a flat IVF65536 quantizer: 1,149)",
    },
    "train_vectors_x_centroids_per_s_per_core": {
        # includes PQ48 codebook training (about half: IVF1024,Flat alone trained in 3.85 s the same day),
        # so large-nlist training, where k-means dominates, may take up to ~2x less than planned
        "value": 65_536 * 1024 / 8.428 / 2,
        "basis": "measured",
        "source": f"{BENCH}: train of IVF1024,PQ48np on 65,536 x 384 vectors in 8.43 s, 2 threads",
    },
    "encode_data_path_docs_per_s_per_core": {
        # reading, text assembly, hashing, tokenizing and writing, the forward pass made free: what a CPU
        # core feeds a GPU with (the model's forward pass is what the GPU does)
        "value": DATA_PATH_PER_CORE,
        "basis": "measured",
        "source": f"{ENCODE_BENCH}: {DATA_PATH_DOCS:,} GCIDE entries in 20.6 s of encoder time, forward pass stubbed",
    },
    "scan_codes_per_s_per_core": {
        # a PQ scan costs one table lookup per code byte: slower in proportion for larger codes, not faster for
        # smaller ones (query_core_seconds)
        "value": SCAN_CODES_PER_S_PER_CORE,
        "basis": "measured",
        "source": SCAN_SOURCE,
    },
    "coarse_distances_per_s_per_core": {
        # a flat quantizer's assignment is one d-dimensional distance per centroid (a matrix product), and so is
        # a residual PQ's distance table per probed list (d x 2^bits): both priced at this rate
        "value": COARSE_ASSIGN["flat_vectors_per_s"] * COARSE_NLIST * COARSE_DIM / 2,
        "basis": "measured",
        "source": f"{COARSE_BENCH}: {COARSE_ASSIGN['flat_vectors_per_s']:,.0f} vectors/s assigned to {COARSE_NLIST:,} "
        f"lists of {COARSE_DIM} dimensions (flat), 2 threads",
    },
    "hnsw_assign_per_s_per_core": {
        "value": COARSE_ASSIGN["hnsw_vectors_per_s"] / 2,
        "basis": "measured",
        "source": f"{COARSE_BENCH}: {COARSE_ASSIGN['hnsw_vectors_per_s']:,.0f} vectors/s assigned to "
        f"{COARSE_NLIST:,} lists by an HNSW32 quantizer (efSearch 16), 2 threads",
    },
    "merge_bytes_per_s": {
        # the benchmark merged 11.2 MB in RAM in 0.05 s (checks included): too small to extrapolate;
        # at scale the on-disk merge reads and writes the inverted lists once, bound by the disk
        "value": 500e6,
        "basis": "estimate",
        "source": "estimate, not measured: sequential SSD write, on-disk merge",
    },
}

ESTIMATED_GPU: dict[str, dict] = {
    "gpu_forward_docs_per_s": {
        "value": 20_000.0,
        "basis": "estimate",
        "source": "estimate, not measured: all-MiniLM-L6-v2 fp16 forward pass on one current datacenter GPU, "
        "~100-token "
        "docs (benchmarks/encode_benchmark.py --gpu measures it where a GPU is lent)",
    },
    "train_vectors_x_centroids_per_s_per_gpu": {
        # k-means is matrix products: ~2*d*niter flops per vector x centroid; a few TFLOP/s effective
        "value": 2e9,
        "basis": "estimate",
        "source": "estimate, not measured: FAISS GPU k-means, 384-d, 10 iterations",
    },
}

MEASURED_NLIST = 1024  # the nlist the flat quantizer's add throughput was measured at
DOC_ROW_ID_BYTES = 8  # vector_ids.npy: one int64 per passage
PASSAGE_OVERLAP = 1 / 8  # the default overlap: text stored twice in the doc store


def plan_serving(
    n: int, spec, loaded_bytes: int, inverted_list_bytes: int, shards: int, nprobe: int | None, cores: int, rates: dict
) -> dict:
    """Serving `n` vectors over `shards` serving shards (query/sharded.py): what the router and each shard
    hold, and the searches per second that `cores` cores sustain (query_core_seconds). Sharding spreads a query's
    work, it does not add to it."""
    nprobe = nprobe or default_nprobe(spec.nlist)
    resident = loaded_bytes - inverted_list_bytes
    seconds, how, used = query_core_seconds(n, spec, nprobe, rates)
    basis = _basis(*(rates[rate]["basis"] for rate in used))
    return {
        "router_ram": _item(
            resident, "computed", "trained.faiss: coarse centroids, transforms, codebooks (no inverted list)"
        ),
        "shard_lists": _item(
            inverted_list_bytes / shards,
            "computed",
            f"inverted lists / {shards} shards: each shard's files, memory-mapped (its page cache when hot)",
        ),
        "shard_ram_anon": _item(
            resident, "computed", "a part index holds the trained index too, and its lists' headers"
        ),
        "doc_store_copied": _item(0, "computed", "read by id on demand from the output store (docs/storage.md)"),
        "queries_per_s": _item(cores / seconds, basis, f"{cores} cores / ({how})"),
    }


def query_core_seconds(n: int, spec, nprobe: int, rates: dict) -> tuple[float, str, set[str]]:
    """CPU seconds of one query's search, how they add up, and the rates they used: the coarse assignment (a
    distance to each centroid, or an HNSW walk), a residual PQ's distance table for each probed list (d x 2^bits
    distances), and the scan of nprobe lists of n / nlist codes. A code scans at the rate measured on PQ16
    codes, slower in proportion for larger codes, not faster for smaller ones: at 10M vectors (IVF16384,PQ8np,
    nprobe 128) the old x 16 / code bytes planned 3,124 searches/s where the same parts did 1,082 in process, 2
    cores (docs/benchmarks.md); this prices them at 1,090."""
    distances = rates["coarse_distances_per_s_per_core"]["value"]
    table_distances = nprobe * spec.d * 2**spec.pq_bits if spec.encoding == "PQ" else 0
    if spec.hnsw_m:
        coarse, coarse_how = 1 / rates["hnsw_assign_per_s_per_core"]["value"], "HNSW assignment"
    else:
        coarse, coarse_how = spec.nlist * spec.d / distances, f"{spec.nlist:,} x {spec.d} distances"
    used = {
        "scan_codes_per_s_per_core",
        "hnsw_assign_per_s_per_core" if spec.hnsw_m else "coarse_distances_per_s_per_core",
    }
    if table_distances:
        used.add("coarse_distances_per_s_per_core")
    codes = nprobe * n / spec.nlist
    scan = rates["scan_codes_per_s_per_core"]["value"] / max(1.0, spec.code_bytes / SCAN_MEASURED_CODE_BYTES)
    seconds = coarse + table_distances / distances + codes / scan
    how = (
        f"{1000 * seconds:.3g} ms a query: {coarse_how} {1000 * coarse:.3g} + distance tables "
        f"{1000 * table_distances / distances:.3g} + nprobe {nprobe} x n / nlist = {codes:,.0f} codes at "
        f"{scan:,.3g}/s {1000 * codes / scan:.3g}"
    )
    return seconds, how, used


def plan_lexical(n: int, passage_bytes: float, shards: int, cores: int, dense_queries_per_s: float) -> dict:
    """The lexical (BM25) index of n passages of passage_bytes bytes each (lexical/capacity.py): its files, what
    each of `shards` serving shards holds, and a query's cost, alone and with the dense search (hybrid)."""
    size = lexical_size(n, passage_bytes)
    cost = lexical_query_cost(n, shards, cores)
    hybrid = 1 / (1 / dense_queries_per_s + 1 / cost.queries_per_s)  # a hybrid query runs both searches
    return {
        "terms": _item(
            size.terms,
            "measured",
            f"35,864 terms at 7,550 man page passages x (n / 7,550)^{TERMS_GROWTH} (Heaps' law fitted): "
            f"{LEXICAL_BENCH}",
        ),
        "postings": _item(
            size.postings,
            "measured",
            f"n x {passage_bytes / 1024:,.2f} KiB of text per passage x {POSTINGS_PER_KIB:.1f} postings per KiB (man "
            f"pages): {LEXICAL_BENCH}",
        ),
        "dictionary_disk": _item(
            size.dictionary_bytes, "computed", "terms x 20 bytes: terms.npy + starts.npy + maxima.npy"
        ),
        "postings_disk": _item(size.postings_bytes, "computed", "postings x 12 bytes: ids.npy + impacts.npy"),
        "term_counts_disk": _item(
            size.counts_bytes,
            "computed",
            "the shards' lexical_counts.npz (reindex reuses them): postings x 12 + n x 20",
        ),
        "shard_ram_dictionary": _item(
            lexical_terms(n / shards) * TERM_BYTES,
            "computed",
            f"the terms of a shard's n / {shards} passages x 20 bytes: binary-searched for every query term, to keep "
            "in RAM (page cache)",
        ),
        "shard_postings_mmap": _item(
            size.postings_bytes / shards,
            "computed",
            "a shard's postings, memory-mapped, paged in as read (page cache: a search needs none of it in the "
            "process, docs/quality.md); the common terms' lists stay hot",
        ),
        "shard_query_memory": _item(
            cost.working_bytes_per_shard,
            "measured",
            f"per query a shard runs at once: {cost.postings_read:,.3g} postings / {shards} shards x "
            f"{SEARCH_BYTES_PER_POSTING} bytes (a search's peak allocation per posting), at most "
            f"{SEARCH_PEAK_BYTES / 1e6:.1f} MB (the postings are summed in chunks)",
        ),
        "query_ms": _item(
            1000 * cost.latency_s,
            "measured",
            f"grows with n: {QUERY_POSTINGS_SHARE} x n postings of the query's terms (users' query shapes, man "
            f"pages) x {NS_PER_POSTING} ns (synthetic, 10M) / {MAXSCORE_SPEEDUP} (MaxScore pruning, synthetic, "
            f"10M, k = 100) / {shards} shards at once",
        ),
        "queries_per_s": _item(cost.queries_per_s, "measured", f"{cores} cores / {cost.cpu_s:,.3g} CPU s a query"),
        "hybrid_queries_per_s": _item(
            hybrid, "measured", f"1 / (1 / {dense_queries_per_s:,.3g} dense + 1 / {cost.queries_per_s:,.3g} lexical)"
        ),
    }


def _item(value: float, basis: str, how: str) -> dict:
    return {"value": value, "basis": basis, "how": how}


def add_hours(n: int, spec, rates: dict, cores: int, gpus: int) -> dict:
    """Hours of adding n vectors on `cores` CPU cores (the add stage uses no GPU): at the measured HNSW add rate
    for an HNSW coarse quantizer, else at the rate measured at nlist 1024 scaled by nlist / 1024 (a flat
    quantizer computes one distance per centroid)."""
    if spec.hnsw_m:
        add, scale = rates["add_hnsw_vectors_per_s_per_core"], 1.0
        work = f"n (HNSW quantizer, measured at nlist {HNSW_MEASURED_NLIST:,})"
    else:
        add, scale = rates["add_vectors_per_s_per_core"], max(1.0, spec.nlist / MEASURED_NLIST)
        work = f"n x {scale:g} (nlist {spec.nlist} vs {MEASURED_NLIST} measured)"
    how = f"{work} / ({add['value']:.0f} vectors/s x {cores} cores)"
    if gpus:
        how += "; on CPU cores: the GPUs encode and train, the add stage uses none"
    return _item(n * scale / (add["value"] * cores) / 3600, _basis(add["basis"]), how)


def _rates(gpus: int, throughputs: dict | None) -> dict[str, dict]:
    rates = {**MEASURED_CPU, **(ESTIMATED_GPU if gpus > 0 else {})}
    for key, value in (throughputs or {}).items():
        rates[key] = (
            dict(value) if isinstance(value, dict) else {"value": float(value), "basis": "given", "source": "caller"}
        )
    return rates


def _basis(*bases: str) -> str:
    """The weakest of the inputs: any estimate makes the result an estimate."""
    for basis in ("estimate", "given", "measured"):
        if basis in bases:
            return basis
    return "computed"


def plan_capacity(
    n_docs: float,
    dim: int = 384,
    index_string: str | None = None,
    gpus: int = 0,
    max_index_bytes: int | None = None,
    throughputs: dict | None = None,
    cores: int = 2,
    train_cores: int | None = None,
    avg_doc_bytes: int = 1000,
    cpus_per_gpu: float = 4,
    passages_per_doc: float = 1.0,
    serving_shards: int = 1,
    nprobe: int | None = None,
    lexical: bool = True,
) -> dict:
    """Sizes and stage hours of building an index over n_docs documents split into passages_per_doc
    passages each on average: every vector-sized quantity (embeddings, codes, ids, index choice,
    training, encode, add, merge) counts passages, n = n_docs x passages_per_doc; the doc store keeps each
    document's text once plus the passages' overlap (an eighth, the default) and a row id per passage.

    cores: CPU cores of the cluster (encode without GPU, add); train_cores: cores of the biggest node,
    which the train task reserves (default: cores). With gpus > 0, encode runs one actor per GPU, fed by
    cpus_per_gpu CPUs (the encoder's reservation: a GPU node's CPUs divided by its GPUs): a GPU encodes at
    the smaller of its forward pass (estimated) and what those CPUs' data path delivers (measured), and
    the plan says which bounds it; training runs its k-means on one GPU (estimated); the add runs on the CPU cores
    either way (add_hours), and the index is the one the build chooses, GPUs or not. throughputs overrides entries of
    MEASURED_CPU / ESTIMATED_GPU (a number, or a dict with value/basis/source). Serving over serving_shards
    shards at nprobe (default: the build's): plan_serving. lexical: the BM25 index built beside the vectors
    (plan_lexical; None without it), its files counted in build_disk_peak.
    """
    n = int(n_docs * passages_per_doc)
    index_string = index_string or choose_index_string(n, dim, max_index_bytes)
    spec = parse_index_string(index_string, dim)
    n_train = training_sample_size(n, spec.nlist, uses_pq=spec.encoding == "PQ")
    parts = index_memory_parts(index_string, n, dim)
    rates = _rates(gpus, throughputs)
    train_cores = train_cores or cores

    inverted_lists = parts["codes"] + parts["ids"]
    loaded = sum(parts.values())
    overlap = PASSAGE_OVERLAP if passages_per_doc > 1 else 0.0
    docs = int(n_docs) * avg_doc_bytes * (1 + overlap) + n * DOC_ROW_ID_BYTES
    serving = plan_serving(n, spec, loaded, inverted_lists, serving_shards, nprobe, cores, rates)
    passage_bytes = avg_doc_bytes * (1 + overlap) / passages_per_doc
    bm25 = plan_lexical(n, passage_bytes, serving_shards, cores, serving["queries_per_s"]["value"]) if lexical else None
    lexical_disk = (
        sum(bm25[name]["value"] for name in ("dictionary_disk", "postings_disk", "term_counts_disk")) if bm25 else 0
    )
    size = {
        "embeddings_fp32": _item(n * dim * 4, "computed", "n x dim x 4: what encode writes (embeddings.f32)"),
        "embeddings_fp16": _item(n * dim * 2, "computed", "n x dim x 2, if stored as fp16"),
        "codes": _item(parts["codes"], "computed", f"n x {spec.code_bytes} bytes ({spec.encoding} codes)"),
        "ids": _item(parts["ids"], "computed", "n x 8 bytes (int64 ids in the inverted lists)"),
        "inverted_lists_disk": _item(inverted_lists, "computed", "codes + ids: index.ivfdata on disk"),
        "index_ram_mmap": _item(
            loaded - inverted_lists,
            "computed",
            "centroids, HNSW graph, codebooks, transforms, list headers; probed lists come through the page cache",
        ),
        "index_ram_loaded": _item(loaded, "computed", "everything in RAM (faiss.read_index without mmap)"),
        "doc_store": _item(
            docs,
            "estimate",
            f"n_docs x {avg_doc_bytes} bytes avg_doc_bytes x {1 + overlap:g} (passage overlap) + n x 8 byte vector id",
        ),
        "build_disk_peak": _item(
            n * dim * 4 + 2 * inverted_lists + docs + lexical_disk,
            "estimate",
            "fp32 embeddings + shard indexes + merged lists + doc store" + (" + lexical index" if bm25 else ""),
        ),
    }

    bound = None
    if gpus > 0:
        forward, feed = rates["gpu_forward_docs_per_s"], rates["encode_data_path_docs_per_s_per_core"]
        fed = feed["value"] * cpus_per_gpu  # what an encoder's CPUs read, assemble and tokenize per second
        bound = "CPU data path" if fed < forward["value"] else "GPU forward pass"
        per_gpu, limiting = min(fed, forward["value"]), feed if fed < forward["value"] else forward
        encode_rate, encode_basis = per_gpu * gpus, limiting["basis"]
        encode_how = (
            f"n / ({per_gpu:,.0f} docs/s x {gpus} GPU): min(GPU forward {forward['value']:,.0f}, data path "
            f"{feed['value']:,.0f} docs/s/core x {cpus_per_gpu:g} CPUs per GPU = {fed:,.0f}); bound by the {bound}"
        )
        train = rates["train_vectors_x_centroids_per_s_per_gpu"]
        train_rate, train_how = train["value"], f"{n_train:,} x {spec.nlist:,} / {train['value']:.3g} per s on 1 GPU"
    else:
        encode = rates["encode_docs_per_s_per_core"]
        encode_rate, encode_basis = encode["value"] * cores, encode["basis"]
        encode_how = f"n / ({encode['value']:.1f} docs/s x {cores} cores)"
        train = rates["train_vectors_x_centroids_per_s_per_core"]
        train_rate = train["value"] * train_cores
        train_how = f"{n_train:,} x {spec.nlist:,} / ({train['value']:.3g} per s x {train_cores} cores)"
    merge = rates["merge_bytes_per_s"]
    hours = {
        "encode": _item(n / encode_rate / 3600, _basis(encode_basis), encode_how),
        "train": _item(n_train * spec.nlist / train_rate / 3600, _basis(train["basis"]), train_how),
        "add": add_hours(n, spec, rates, cores, gpus),
        "merge": _item(
            inverted_lists / merge["value"] / 3600,
            _basis(merge["basis"]),
            f"inverted lists / {merge['value'] / 1e6:.0f} MB/s",
        ),
    }
    hours["total"] = _item(
        sum(h["value"] for h in hours.values()),
        _basis(*(h["basis"] for h in hours.values())),
        "stages run one after another",
    )

    warnings = []
    if n_train < MIN_POINTS_PER_CENTROID * spec.nlist:  # the default sample has that many unless the corpus has not
        warnings.append(
            f"training sample {n_train:,} (the whole corpus) is under {MIN_POINTS_PER_CENTROID} x nlist "
            f"({MIN_POINTS_PER_CENTROID * spec.nlist:,}): FAISS will warn; consider an nlist of at most "
            f"{max_nlist_for(n_train):,}"
        )
    if max_index_bytes is not None and loaded > max_index_bytes:
        warnings.append(f"{index_string!r} needs {loaded:,} bytes loaded, over max_index_bytes {max_index_bytes:,}")
    return {
        "n_docs": int(n_docs),
        "n_vectors": n,
        "passages_per_doc": passages_per_doc,
        "dim": dim,
        "index_string": index_string,
        "nlist": spec.nlist,
        "train_sample": n_train,
        "cores": cores,
        "gpus": gpus,
        "encode_bound": bound or "CPU forward pass (no GPU)",
        "bytes": size,
        "hours": hours,
        "serving": serving,
        "serving_shards": serving_shards,
        "lexical": bm25,
        "serving_bound": serving_bound(serving, bm25),
        "throughputs": rates,
        "warnings": warnings,
    }


def serving_bound(serving: dict, lexical: dict | None) -> str:
    """Which search limits queries per second: the dense scan, or the lexical one (no pruning: it reads a share of
    every passage's postings per query, so past some size it is the slower)."""
    dense = serving["queries_per_s"]["value"]
    if lexical is None:
        return "dense search (no lexical index)"
    ratio = dense / lexical["queries_per_s"]["value"]
    if ratio > 1:
        return f"lexical search: {ratio:,.1f}x slower than the dense scan"
    return f"dense search: {1 / ratio:,.1f}x slower than the lexical one"


def _human_bytes(value: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:.0f} B"


def _human_hours(value: float) -> str:
    if value >= 1:
        return f"{value:,.1f} h"
    return f"{value * 60:.1f} min" if value * 60 >= 1 else f"{value * 3600:.1f} s"


def _human_lexical(name: str, value: float) -> str:
    if name.endswith("_per_s"):
        return f"{value:,.3g}"
    if name == "query_ms":
        return f"{value:,.3g} ms" if value < 1000 else f"{value / 1000:,.3g} s"
    return f"{value:,.3g}" if name in ("terms", "postings") else _human_bytes(value)


def format_plan(plan: dict) -> Table:
    """The plan as a rich table: quantity, value, basis, how it was obtained."""
    passages = f" in {plan['n_vectors']:,} passages" if plan["n_vectors"] != plan["n_docs"] else ""
    table = Table(
        title=f"{plan['n_docs']:,} docs{passages} x {plan['dim']} dims: {plan['index_string']} "
        f"(nlist {plan['nlist']:,}, train sample {plan['train_sample']:,})",
        caption="\n".join(plan["warnings"]) or None,
    )
    for column in ("quantity", "value", "basis", "how"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, item in plan["bytes"].items():
        table.add_row(name, _human_bytes(item["value"]), item["basis"], item["how"])
    for name, item in plan["hours"].items():
        table.add_row(f"hours: {name}", _human_hours(item["value"]), item["basis"], item["how"])
    table.add_row("encode bound by", plan["encode_bound"], "", "what limits the encode stage's rate on these nodes")
    for name, item in plan["serving"].items():
        value = f"{item['value']:,.0f}" if name == "queries_per_s" else _human_bytes(item["value"])
        table.add_row(f"serving ({plan['serving_shards']} shards): {name}", value, item["basis"], item["how"])
    for name, item in (plan["lexical"] or {}).items():
        table.add_row(f"lexical: {name}", _human_lexical(name, item["value"]), item["basis"], item["how"])
    table.add_row("serving bound by", plan["serving_bound"], "", "the search with the fewer queries per second")
    for name, rate in plan["throughputs"].items():
        table.add_row(name, f"{rate['value']:,.4g}", rate["basis"], rate["source"])
    return table
