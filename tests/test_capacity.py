"""Capacity plan: byte arithmetic on round numbers, hours scaling, labels on every figure, and the lexical
index's files, serving memory and query cost (lexical/capacity.py) from the measured per-passage figures."""

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from rayindex.ivf.capacity import ESTIMATED_GPU, HNSW_ADD_SECONDS, MEASURED_CPU, format_plan, plan_capacity
from rayindex.lexical import capacity as lexical

PQ48 = "IVF65536,PQ48np"
# a wide terminal, and no more of this environment than the code under test (PYTHONPATH: a worktree's checkout)
PLAN_ENV = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}


def value(plan, group, name):
    return plan[group][name]["value"]


def test_bytes_on_round_numbers():
    plan = plan_capacity(1e9, 384, index_string=PQ48)
    assert value(plan, "bytes", "codes") == 48e9
    assert value(plan, "bytes", "ids") == 8e9
    assert value(plan, "bytes", "inverted_lists_disk") == 56e9
    assert value(plan, "bytes", "embeddings_fp16") == 768e9
    assert value(plan, "bytes", "embeddings_fp32") == 1536e9
    centroids = 65536 * 384 * 4
    mmap = value(plan, "bytes", "index_ram_mmap")
    assert centroids < mmap < centroids + 4e6  # + PQ codebooks (393 KB) and list headers (3 MB)
    assert value(plan, "bytes", "index_ram_loaded") == 56e9 + mmap
    assert value(plan, "bytes", "doc_store") == 1e9 * (1000 + 8)
    assert plan_capacity(1e9, index_string=PQ48, avg_doc_bytes=2000)["bytes"]["doc_store"]["value"] == 1e9 * 2008
    assert (plan["nlist"], plan["train_sample"]) == (65536, 4_194_304)  # 64 per centroid


def test_index_choice_follows_index_params():
    assert plan_capacity(1e9)["index_string"] == "IVF65536_HNSW32,PQ48np"  # the build's default
    assert plan_capacity(1e9, gpus=8)["index_string"] == "IVF65536_HNSW32,PQ48np"  # the add runs on CPUs anyway
    budgeted = plan_capacity(1e9, max_index_bytes=64 << 30)
    assert budgeted["index_string"] == "OPQ48_192,IVF131072_HNSW32,PQ48np"
    assert value(budgeted, "bytes", "index_ram_loaded") <= 64 << 30
    assert plan_capacity(1e6, max_index_bytes=8 << 30)["index_string"] == "IVF4096,Flat"
    with pytest.raises(ValueError, match="smallest"):
        plan_capacity(1e9, max_index_bytes=1 << 30)


def test_hours_scale_with_docs_cores_and_gpus():
    base = plan_capacity(1e8, index_string=PQ48)
    ten_x = plan_capacity(1e9, index_string=PQ48)
    for stage in ("encode", "add", "merge"):
        assert value(ten_x, "hours", stage) == pytest.approx(10 * value(base, "hours", stage))
    assert value(ten_x, "hours", "train") == value(base, "hours", "train")  # sample capped at 4,194,304

    more_cores = plan_capacity(1e9, index_string=PQ48, cores=8)
    for stage in ("encode", "add", "train"):
        assert value(more_cores, "hours", stage) == pytest.approx(value(ten_x, "hours", stage) / 4)
    assert value(plan_capacity(1e9, index_string=PQ48, cores=8, train_cores=2), "hours", "train") == value(
        ten_x, "hours", "train"
    )

    one_gpu = plan_capacity(1e9, index_string=PQ48, gpus=1)
    four_gpus = plan_capacity(1e9, index_string=PQ48, gpus=4)
    assert value(four_gpus, "hours", "encode") == pytest.approx(value(one_gpu, "hours", "encode") / 4)
    assert value(four_gpus, "hours", "train") == value(one_gpu, "hours", "train")  # the train task takes one GPU

    # 1e9 docs at the measured 19.4 docs/s per core on 2 cores: 1e9 / 38.7 / 3600 = 7,176 hours
    assert value(ten_x, "hours", "encode") == pytest.approx(1e9 / (1600 / 41.317) / 3600)
    # add was measured at nlist 1024; a flat quantizer with 65,536 lists costs 64x per vector
    measured_add = plan_capacity(1e6, index_string="IVF1024,PQ48np")
    assert value(measured_add, "hours", "add") * 3600 == pytest.approx(1e6 / (200_000 / 2.575))
    assert value(ten_x, "hours", "add") * 3600 == pytest.approx(64 * 1e9 / (200_000 / 2.575))
    total = sum(value(ten_x, "hours", s) for s in ("encode", "train", "add", "merge"))
    assert value(ten_x, "hours", "total") == pytest.approx(total)


def test_every_figure_is_labelled():
    cpu = plan_capacity(1e9, index_string=PQ48)
    gpu = plan_capacity(1e9, index_string=PQ48, gpus=2)
    for plan in (cpu, gpu):
        for group in ("bytes", "hours", "lexical"):
            for item in plan[group].values():
                assert item["basis"] in ("computed", "measured", "estimate", "given") and item["how"]
        for rate in plan["throughputs"].values():
            assert rate["basis"] in ("measured", "estimate") and rate["source"]
            assert rate["basis"] == "measured" or rate["source"].startswith("estimate")
    assert cpu["hours"]["encode"]["basis"] == "measured" and cpu["hours"]["merge"]["basis"] == "estimate"
    assert cpu["hours"]["total"]["basis"] == "estimate"  # the merge rate is an estimate
    # 4 CPUs per GPU feed 12,254 docs/s, under the GPU's estimated 20,000: the measured data path bounds it
    assert gpu["encode_bound"] == "CPU data path" and gpu["hours"]["encode"]["basis"] == "measured"
    assert gpu["hours"]["train"]["basis"] == "estimate"
    assert all(r["basis"] == "estimate" for r in ESTIMATED_GPU.values())
    assert all(
        any(day in r["source"] for day in ("2026-11-27", "2026-11-29", "2026-12-04"))
        for r in MEASURED_CPU.values()
        if r["basis"] == "measured"
    )
    assert "gpu_forward_docs_per_s" not in cpu["throughputs"]
    hnsw = plan_capacity(1e9, index_string="OPQ48_192,IVF131072_HNSW32,PQ48np")
    assert hnsw["hours"]["add"]["basis"] == "measured"  # coarse_assign_benchmark.py


def test_a_gpu_encodes_at_the_smaller_of_its_forward_pass_and_its_cpus_data_path():
    feed = MEASURED_CPU["encode_data_path_docs_per_s_per_core"]["value"]
    forward = ESTIMATED_GPU["gpu_forward_docs_per_s"]["value"]
    starved = plan_capacity(1e9, index_string=PQ48, gpus=1, cpus_per_gpu=1)
    fed = plan_capacity(1e9, index_string=PQ48, gpus=1, cpus_per_gpu=64)
    assert starved["encode_bound"] == "CPU data path" and fed["encode_bound"] == "GPU forward pass"
    assert value(starved, "hours", "encode") == pytest.approx(1e9 / min(feed, forward) / 3600)
    assert value(fed, "hours", "encode") == pytest.approx(1e9 / forward / 3600)
    assert starved["hours"]["encode"]["basis"] == "measured" and fed["hours"]["encode"]["basis"] == "estimate"
    assert "bound by the CPU data path" in starved["hours"]["encode"]["how"]
    assert plan_capacity(1e9, index_string=PQ48)["encode_bound"] == "CPU forward pass (no GPU)"


def test_given_throughputs_override_and_are_labelled():
    plan = plan_capacity(1e9, index_string=PQ48, throughputs={"encode_docs_per_s_per_core": 100})
    assert plan["throughputs"]["encode_docs_per_s_per_core"]["basis"] == "given"
    assert plan["hours"]["encode"]["basis"] == "given"
    assert value(plan, "hours", "encode") == pytest.approx(1e9 / 200 / 3600)
    # a rate the query does not use leaves its basis alone: a flat quantizer walks no HNSW graph
    given = {"hnsw_assign_per_s_per_core": 1e4}
    flat, hnsw = (plan_capacity(1e9, index_string=spec, throughputs=given) for spec in (PQ48, "IVF65536_HNSW32,PQ48np"))
    assert (
        flat["serving"]["queries_per_s"]["basis"] == "measured" and hnsw["serving"]["queries_per_s"]["basis"] == "given"
    )


def test_hnsw_add_hours_come_from_the_measured_rate():
    rate = MEASURED_CPU["add_hnsw_vectors_per_s_per_core"]
    assert rate["basis"] == "measured" and "coarse_assign_benchmark.py" in rate["source"]
    assert rate["value"] == pytest.approx(1e6 / HNSW_ADD_SECONDS / 2)
    plan = plan_capacity(1e9)
    assert value(plan, "hours", "add") * 3600 == pytest.approx(1e9 / (rate["value"] * 2))
    assert value(plan_capacity(1e9, cores=64), "hours", "add") == pytest.approx(value(plan, "hours", "add") / 32)
    # the flat quantizer at the same nlist: 64 x the cost measured at nlist 1024
    flat = plan_capacity(1e9, index_string=PQ48)
    assert value(flat, "hours", "add") / value(plan, "hours", "add") == pytest.approx(
        64 * rate["value"] / MEASURED_CPU["add_vectors_per_s_per_core"]["value"]
    )
    with_gpus = plan_capacity(1e9, gpus=8, cores=64)
    assert value(with_gpus, "hours", "add") == value(plan_capacity(1e9, cores=64), "hours", "add")
    assert "the add stage uses none" in with_gpus["hours"]["add"]["how"]


@pytest.mark.parametrize("n", [1e6, 1e7, 1e8, 1e9, 5e9])
def test_default_training_sample_is_enough_for_the_default_nlist(n):
    for plan in (plan_capacity(n), plan_capacity(n, gpus=4), plan_capacity(n, max_index_bytes=1 << 40)):
        assert plan["train_sample"] >= 39 * plan["nlist"]
        assert plan["warnings"] == []
        console = Console(width=250, record=True)
        console.print(format_plan(plan))
        assert "39 x nlist" not in console.export_text()


def test_warns_when_training_sample_is_thin():
    thin = plan_capacity(2e6, index_string=PQ48)["warnings"]
    assert thin == [
        "training sample 2,000,000 (the whole corpus) is under 39 x nlist (2,555,904): FAISS will warn; "
        "consider an nlist of at most 32,768"
    ]
    assert plan_capacity(1e6)["warnings"] == []
    over = plan_capacity(1e9, index_string=PQ48, max_index_bytes=8 << 30)
    assert any("over max_index_bytes" in w for w in over["warnings"])


def test_format_plan_renders():
    plan = plan_capacity(1e9, max_index_bytes=64 << 30, gpus=4)
    console = Console(width=250, record=True)
    console.print(format_plan(plan))
    text = console.export_text()
    assert "OPQ48_192,IVF131072_HNSW32,PQ48np" in text
    assert "44.7 GiB" in text  # 48e9 bytes of codes
    assert "estimate, not measured" in text and "measured" in text


def test_plan_cli_prints_the_billion_document_plan():
    import subprocess
    import sys
    from pathlib import Path

    rayindex = str(Path(sys.executable).with_name("rayindex"))
    result = subprocess.run(
        [rayindex, "plan", "--docs", "1e9", "--max-index-memory", "64G"],
        capture_output=True,
        text=True,
        timeout=120,
        env=PLAN_ENV,
    )
    assert result.returncode == 0, result.stderr
    assert "OPQ48_192,IVF131072_HNSW32,PQ48np" in result.stdout and "hours: encode" in result.stdout
    assert "lexical: postings_disk" in result.stdout and "serving bound by" in result.stdout
    assert "lexical search:" in result.stdout and "MaxScore pruning" in result.stdout
    dense_only = subprocess.run(
        [rayindex, "plan", "--docs", "1e9", "--max-index-memory", "64G", "--no-lexical"],
        capture_output=True,
        text=True,
        timeout=120,
        env=PLAN_ENV,
    )
    assert dense_only.returncode == 0 and "hours: encode" in dense_only.stdout
    assert "lexical:" not in dense_only.stdout and "dense search (no lexical index)" in dense_only.stdout
    too_small = subprocess.run(
        [rayindex, "plan", "--docs", "1e9", "--max-index-memory", "1G"],
        capture_output=True,
        text=True,
        timeout=120,
        env=PLAN_ENV,
    )
    assert too_small.returncode == 2 and "error:" in too_small.stderr


def test_passages_count_as_vectors_and_the_doc_store_keeps_each_text_once_plus_overlap():
    docs = plan_capacity(1e8, index_string=PQ48)
    passages = plan_capacity(1e8, index_string=PQ48, passages_per_doc=4)
    assert passages["n_vectors"] == 4e8 and passages["n_docs"] == 1e8
    assert value(passages, "bytes", "codes") == 4 * value(docs, "bytes", "codes")
    assert value(passages, "hours", "encode") == pytest.approx(4 * value(docs, "hours", "encode"))
    assert value(passages, "bytes", "doc_store") == 1e8 * 1000 * 1.125 + 4e8 * 8
    assert "in 400,000,000 passages" in str(format_plan(passages).title)


def test_serving_plan_splits_the_lists_and_counts_the_scan():
    one = plan_capacity(1e9, index_string=PQ48)
    sixteen = plan_capacity(1e9, index_string=PQ48, serving_shards=16, cores=32, nprobe=64)
    lists = one["bytes"]["inverted_lists_disk"]["value"]
    assert sixteen["serving"]["shard_lists"]["value"] == lists / 16
    assert (
        one["serving"]["router_ram"]["value"] == one["bytes"]["index_ram_mmap"]["value"]
    )  # no inverted list on the router
    assert sixteen["serving"]["doc_store_copied"]["value"] == 0
    # QPS = cores / a query's CPU seconds: x16 cores, x16; half the lists probed, about x2 (the scan dominates)
    two_cores = plan_capacity(1e9, index_string=PQ48, serving_shards=16, cores=2, nprobe=64)
    qps = [plan["serving"]["queries_per_s"]["value"] for plan in (one, two_cores, sixteen)]
    assert abs(qps[2] / qps[1] - 16) < 1e-9 and 1.95 < qps[1] / qps[0] < 2.0
    assert "serving (16 shards): shard_lists" in str(format_plan(sixteen).columns[0]._cells)


def test_lexical_size_and_query_cost_on_round_numbers():
    at_measured = lexical.lexical_size(lexical.MEASURED_PASSAGES, 1024)
    assert at_measured.terms == lexical.MEASURED_TERMS  # the fit is anchored at the measured build
    assert at_measured.postings == lexical.MEASURED_PASSAGES * lexical.POSTINGS_PER_KIB
    assert lexical.lexical_terms(lexical.MEASURED_PASSAGES * 1024) == pytest.approx(
        lexical.MEASURED_TERMS * 1024**lexical.TERMS_GROWTH
    )
    size = lexical.lexical_size(1e9, 2048)
    assert size.postings == pytest.approx(1e9 * 2 * lexical.POSTINGS_PER_KIB)
    assert size.postings_bytes == size.postings * 12 and size.dictionary_bytes == size.terms * 20
    assert size.counts_bytes == size.postings * 12 + 1e9 * 20
    cost = lexical.lexical_query_cost(1e9, serving_shards=64, cores=128)
    assert cost.postings_read == pytest.approx(lexical.QUERY_POSTINGS_SHARE * 1e9)
    assert cost.cpu_s == pytest.approx(cost.postings_read * lexical.NS_PER_POSTING * 1e-9 / lexical.MAXSCORE_SPEEDUP)
    assert cost.latency_s == pytest.approx(cost.cpu_s / 64) and cost.queries_per_s == pytest.approx(128 / cost.cpu_s)
    assert cost.working_bytes_per_shard == lexical.SEARCH_PEAK_BYTES  # the chunks bound it
    small = lexical.lexical_query_cost(1e5, serving_shards=4)
    assert small.working_bytes_per_shard == pytest.approx(small.postings_read / 4 * lexical.SEARCH_BYTES_PER_POSTING)
    # pruning by a measured factor: ten times the passages, still ten times a query's work
    assert lexical.lexical_query_cost(1e10).cpu_s == pytest.approx(10 * lexical.lexical_query_cost(1e9).cpu_s)


def test_lexical_constants_are_the_measured_figures():
    """Each constant is what docs/benchmark-lexical-capacity.json measured (benchmarks/lexical_capacity_benchmark.py)
    on the man page build, and the synthetic postings' cost at 10M passages."""
    measured = json.loads((Path(__file__).parents[1] / "docs/benchmark-lexical-capacity.json").read_text())
    man = next(b for b in measured["builds"] if "man-" in b["corpus"][0])
    assert (man["passages"], man["terms"]) == (lexical.MEASURED_PASSAGES, lexical.MEASURED_TERMS)
    assert man["heaps_beta"] == pytest.approx(lexical.TERMS_GROWTH, abs=5e-4)
    assert man["postings_per_kib_text"] == pytest.approx(lexical.POSTINGS_PER_KIB, abs=5e-3)
    assert man["postings_read"]["all shapes"]["share"] == pytest.approx(lexical.QUERY_POSTINGS_SHARE, abs=5e-4)
    assert man["counts_bytes"] == pytest.approx(man["postings"] * 12 + man["passages"] * 20, rel=1e-3)
    largest = max(measured["synthetic"], key=lambda run: run["passages"])
    assert largest["ns_per_posting"] == pytest.approx(lexical.NS_PER_POSTING, abs=0.05)
    assert measured["working_memory"]["bytes_per_posting"] == pytest.approx(lexical.SEARCH_BYTES_PER_POSTING, abs=0.05)
    assert measured["working_memory_large"]["peak_bytes"] == pytest.approx(lexical.SEARCH_PEAK_BYTES, rel=1e-3)
    assert largest["maxscore_speedup"] == pytest.approx(lexical.MAXSCORE_SPEEDUP, abs=5e-3)


def test_the_plan_counts_the_lexical_index_and_no_lexical_removes_it():
    hybrid = plan_capacity(1e9, index_string=PQ48, serving_shards=16, cores=32)
    dense = plan_capacity(1e9, index_string=PQ48, serving_shards=16, cores=32, lexical=False)
    files = [value(hybrid, "lexical", name) for name in ("dictionary_disk", "postings_disk", "term_counts_disk")]
    peak = value(hybrid, "bytes", "build_disk_peak") - value(dense, "bytes", "build_disk_peak")
    assert peak == pytest.approx(sum(files))
    size = lexical.lexical_size(1e9, 1000)  # 1,000 bytes a document, one passage each
    assert files == [size.dictionary_bytes, size.postings_bytes, size.counts_bytes]
    assert value(hybrid, "lexical", "shard_postings_mmap") == size.postings_bytes / 16
    assert value(hybrid, "lexical", "shard_ram_dictionary") == lexical.lexical_terms(1e9 / 16) * 20
    cost = lexical.lexical_query_cost(1e9, 16, 32)
    assert value(hybrid, "lexical", "query_ms") == 1000 * cost.latency_s
    dense_qps = value(hybrid, "serving", "queries_per_s")
    assert value(hybrid, "lexical", "hybrid_queries_per_s") == pytest.approx(
        1 / (1 / dense_qps + 1 / cost.queries_per_s)
    )
    # at a billion passages the lexical search reads 0.7e9 postings a query: the bottleneck, and the plan says so
    assert cost.queries_per_s < dense_qps and hybrid["serving_bound"].startswith("lexical search")
    assert dense["lexical"] is None and dense["serving_bound"] == "dense search (no lexical index)"
    assert dense["bytes"] == {**hybrid["bytes"], "build_disk_peak": dense["bytes"]["build_disk_peak"]}
    # passages of long documents: the doc store's text (with the overlap) spread over them
    passages = plan_capacity(1e8, index_string=PQ48, passages_per_doc=4)
    assert value(passages, "lexical", "postings") == lexical.lexical_size(4e8, 1000 * 1.125 / 4).postings


def test_serving_plan_prices_small_codes_as_measured():
    """The plan's searches per second against what was measured on 2 cores: at 10M vectors (IVF16384,PQ8np,
    nprobe 128) the same parts did 1,082.2 in process (docs/benchmark-sharded-10m.json), where the plan said 3,124
    before (PQ8 codes scan at about PQ16's rate a code, not twice it). For 16-byte codes, whose scan rate was
    measured, the plan stays what it was: 156 at 100M vectors (IVF2048,PQ16, d 64, nprobe 16, docs/scale.md)."""
    ten_million = plan_capacity(10e6, index_string="IVF16384,PQ8np", serving_shards=4, cores=2, nprobe=128)
    assert ten_million["serving"]["queries_per_s"]["value"] == pytest.approx(1082.2, rel=0.05)
    measured_codes = plan_capacity(100e6, 64, "IVF2048,PQ16", serving_shards=4, cores=2, nprobe=16)
    assert measured_codes["serving"]["queries_per_s"]["value"] == pytest.approx(156, rel=0.01)
