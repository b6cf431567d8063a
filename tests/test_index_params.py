"""Index parameter choice: pure functions, checked on numbers."""

import faiss
import numpy as np
import pytest

from rayindex.config import parse_bytes
from rayindex.ivf.index_params import (
    MAX_TRAIN_SAMPLE,
    budget_candidates,
    choose_index_string,
    default_nprobe,
    fit_index_to_corpus,
    index_memory_bytes,
    index_memory_parts,
    max_nlist_for,
    parse_index_string,
    pq_ladder,
    pq_subquantizers,
    suggest_for_too_few_points,
    training_sample_size,
)


@pytest.mark.parametrize(
    "n, dim, expected",
    [
        (10, 384, "IVF1,Flat"),
        (999, 384, "IVF1,Flat"),
        (3_301, 384, "IVF64,Flat"),  # 4*sqrt(n)=229 -> 256, but 3301/39=84 points allow only 64
        (19_999, 384, "IVF512,Flat"),
        (100_000, 384, "IVF2048,PQ48np"),
        (1_000_000, 384, "IVF4096,PQ48np"),
        (1_000_000, 96, "IVF4096,PQ12np"),
        (67_108_864, 384, "IVF32768,PQ48np"),  # 4*sqrt(n) = 32,768 exactly
        (67_108_865, 384, "IVF65536_HNSW32,PQ48np"),  # 65,536 lists: HNSW coarse quantizer (HNSW_COARSE_FROM)
        (1_000_000_000, 384, "IVF65536_HNSW32,PQ48np"),
    ],
)
def test_choose_index_string(n, dim, expected):
    assert choose_index_string(n, dim) == expected


def test_pq_subquantizers_divide_dimension():
    assert pq_subquantizers(384) == 48
    assert pq_subquantizers(768) == 96
    assert pq_subquantizers(100) == 10  # 100 // 8 = 12 does not divide 100; 10 does
    assert pq_subquantizers(7) == 1


def test_training_sample_size():
    assert training_sample_size(10_000_000, 4096, uses_pq=True) == 64 * 4096
    assert training_sample_size(10_000_000, 16, uses_pq=True) == 256 * 64  # the PQ codebooks need more than 16 lists
    assert training_sample_size(10_000_000, 16, uses_pq=False) == 64 * 16
    assert training_sample_size(500, 4096, uses_pq=True) == 500  # never more than the corpus
    assert training_sample_size(10**9, 65_536, uses_pq=True) == 64 * 65_536 == MAX_TRAIN_SAMPLE == 4_194_304
    assert training_sample_size(3_000_000, 65_536, uses_pq=True) == 3_000_000  # the corpus: over 39 x 65,536
    # a budgeted nlist over 65,536: the cap gives way to FAISS's 39 points per centroid
    assert training_sample_size(10**9, 131_072, uses_pq=True) == 39 * 131_072 == 5_111_808
    assert training_sample_size(10**9, 262_144, uses_pq=True) == 39 * 262_144


def test_nlist_limits_and_suggestions():
    assert max_nlist_for(39) == 1
    assert max_nlist_for(39 * 300) == 256
    assert suggest_for_too_few_points(1000, "IVF4096,PQ32", 4096) == "IVF16,PQ32"
    assert suggest_for_too_few_points(100, "IVF4096,PQ32", 4096) == "IVF2,Flat"
    assert default_nprobe(1) == 1
    assert default_nprobe(64) == 8
    assert default_nprobe(65_536) == 128


@pytest.mark.parametrize(
    "index_string, n, fitted",
    [
        ("IVF8,PQ16np", 360, "IVF8,PQ16np"),  # trainable: kept as asked
        ("IVF64,Flat", 100, "IVF64,Flat"),  # under 39 per list is only a warning (check_trainable)
        ("IVF4096,Flat", 50, "IVF1,Flat"),
        ("IVF4096,PQ48", 1_000, "IVF16,PQ48"),  # enough for the PQ codebooks: only nlist shrinks
        ("IVF256,PQ16", 100, "IVF2,Flat"),
        ("IVF8,PQ16np", 1, "IVF1,Flat"),  # a single document
        ("IVF4,PQ16x4", 15, "IVF4,Flat"),  # 4-bit codebooks need 16
        ("IVF4,PQ16x4", 16, "IVF4,PQ16x4"),
        ("OPQ16,IVF4,PQ16np", 360, "IVF4,PQ16np"),  # OPQ needs 384 (the dimension), PQ only 256
        ("OPQ16_64,IVF4,PQ16np", 384, "OPQ16_64,IVF4,PQ16np"),
        ("PCAR64,IVF4,SQ8", 63, "IVF4,SQ8"),  # PCA needs as many points as it outputs
        ("PCAR64,IVF4,SQ8", 64, "PCAR64,IVF4,SQ8"),
        ("IVF65536_HNSW32,SQ8", 10_000, "IVF256,SQ8"),
        ("OPQ10_80,IVF4,PQ10", 300, "IVF4,Flat"),  # PQ10 divided OPQ's 80 dimensions, not 384
        ("IVF4,RaBitQ", 1, "IVF4,RaBitQ"),  # not sized here: check_trainable refuses it if untrainable
    ],
)
def test_fit_index_to_corpus(index_string, n, fitted):
    got, why = fit_index_to_corpus(index_string, n, 384)
    assert got == fitted
    assert (why is None) == (fitted == index_string)
    if why:
        assert why.startswith(
            f"--index {index_string!r} needs more vectors to train than the {n} there are, so the build uses {fitted!r}"
        )
        faiss.index_factory(384, fitted)  # what it falls back to is a valid index


def test_fit_index_to_corpus_says_what_changed():
    _, why = fit_index_to_corpus("OPQ16,IVF256,PQ16", 100, 384)
    assert "OPQ16 trains on at least 384 vectors: dropped" in why
    assert "IVF256 needs at least 256 vectors (39 per list to train well): IVF2" in why
    assert "PQ16's codebooks need at least 256 vectors: Flat" in why


def test_parse_bytes():
    assert parse_bytes("8G") == 8 << 30
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


# --- memory estimate and budgeted choice ---------------------------------------------------------


def test_parse_index_string():
    spec = parse_index_string("OPQ48_192,IVF131072_HNSW32,PQ48np", 384)
    assert (spec.d, spec.nlist, spec.hnsw_m, spec.encoding, spec.pq_m, spec.code_bytes) == (
        192,
        131072,
        32,
        "PQ",
        48,
        48,
    )
    assert spec.transforms == (("OPQ", 384, 192),)
    assert parse_index_string("OPQ16,IVF64,PQ16", 64).transforms == (("OPQ", 64, 64),)  # no _d: keeps the dimension
    assert parse_index_string("PCAR64,IVF1024,SQ8", 384).code_bytes == 64
    assert parse_index_string("IVF64,PQ16x4", 64).code_bytes == 8
    assert parse_index_string("IVF64,SQfp16", 100).code_bytes == 200
    for bad, part in [
        ("HNSW32", "HNSW32"),
        ("IVF64,PQ16x4fs", "PQ16x4fs"),
        ("IVF64,Flat,RFlat", "one IVF"),
        ("IDMap,Flat", "IDMap"),
        ("IVF64,PQ7", "does not divide"),
    ]:
        with pytest.raises(ValueError, match=part):
            parse_index_string(bad, 64)


def test_memory_arithmetic_on_round_numbers():
    parts = index_memory_parts("IVF65536,PQ48np", 10**9, 384)
    assert parts["codes"] == 48 * 10**9 and parts["ids"] == 8 * 10**9
    assert parts["coarse_centroids"] == 65536 * 384 * 4 and parts["hnsw_graph"] == 0
    assert parts["codebooks"] == 256 * 384 * 4
    hnsw = index_memory_parts("IVF65536_HNSW32,Flat", 0, 384)["hnsw_graph"]
    assert 65536 * 32 * 2 * 4 < hnsw < 65536 * (32 * 2 * 4 + 32)  # ~2*M int32 links per centroid, plus level/offset
    assert index_memory_parts("OPQ48_192,IVF1024,PQ48", 0, 384)["transforms"] == 384 * 192 * 4
    assert index_memory_bytes("IVF1,Flat", 1000, 384) == 1000 * (384 * 4 + 8) + 384 * 4 + 48


@pytest.mark.parametrize(
    "index_string",
    [
        "IVF64,Flat",
        "IVF64,SQ8",
        "IVF32,SQfp16",
        "IVF64,PQ8np",
        "IVF64,PQ8x4np",
        "OPQ4_16,IVF32,PQ4np",
        "PCAR16,IVF32,SQ8",
        "IVF64_HNSW32,Flat",
        "IVF128_HNSW16,PQ8np",
    ],
)
def test_memory_estimate_matches_faiss(index_string):
    rng = np.random.default_rng(0)
    d, n = 32, 10_000
    x = rng.standard_normal((n, d)).astype(np.float32)
    index = faiss.index_factory(d, index_string, faiss.METRIC_INNER_PRODUCT)
    index.train(x[:3_000])
    index.add(x)
    real = faiss.serialize_index(index).size
    assert index_memory_bytes(index_string, n, d) == pytest.approx(real, rel=0.05)


def test_pq_ladder():
    assert pq_ladder(384) == [96, 48, 24, 12]  # stops before 6 < 8 bytes
    assert pq_ladder(768) == [192, 96, 48, 24, 12]
    assert pq_ladder(100) == [25, 10]  # divisors of 100 at most 25, 12 -> 10, 6 -> 5 < 8
    assert pq_ladder(16) == [4]  # always at least one


def test_budget_candidates_order_and_hnsw():
    assert budget_candidates(10**6, 384) == [
        "IVF4096,Flat",
        "IVF4096,SQfp16",
        "IVF4096,SQ8",
        "IVF4096,PQ96np",
        "OPQ48_192,IVF4096,PQ48np",
        "OPQ24_96,IVF4096,PQ24np",
        "OPQ12_48,IVF4096,PQ12np",
    ]
    assert budget_candidates(10**9, 384)[0] == "IVF131072_HNSW32,Flat"  # 4*sqrt(1e9)=126,491 -> 2^17
    assert budget_candidates(5 * 10**9, 384)[0] == "IVF262144_HNSW32,Flat"  # capped at 2^18
    assert budget_candidates(300, 384)[-2:] == ["IVF1,PQ24np", "IVF1,PQ12np"]  # fewer points than dim: no OPQ
    assert budget_candidates(200, 384)[-1] == "IVF1,SQ8"  # under 256 points: no 8-bit PQ


@pytest.mark.parametrize(
    "n, dim, budget, expected",
    [
        (1_000_000, 384, "8G", "IVF4096,Flat"),  # 1e6 * (1536 + 8) = 1.54 GB
        (10_000_000, 384, "8G", "IVF16384,SQfp16"),  # Flat 15.4 GB > 8 GiB; fp16 7.76 GB fits
        (10_000_000, 384, "4G", "IVF16384,SQ8"),  # 3.92 GB
        (1_000_000, 384, "100M", "OPQ48_192,IVF4096,PQ48np"),  # PQ96: 104 MB + 6.3 MB centroids > 100 MiB
        (1_000_000_000, 384, "64G", "OPQ48_192,IVF131072_HNSW32,PQ48np"),  # 56 GB codes + ids
        (1_000_000_000, 384, "128G", "IVF131072_HNSW32,PQ96np"),  # 104 GB
        (1_000_000_000, 384, "24G", "OPQ12_48,IVF131072_HNSW32,PQ12np"),  # 20 GB
        (500, 384, "1M", "IVF1,Flat"),
    ],
)
def test_choose_index_string_with_budget(n, dim, budget, expected):
    chosen = choose_index_string(n, dim, parse_bytes(budget))
    assert chosen == expected
    assert index_memory_bytes(chosen, n, dim) <= parse_bytes(budget)


def test_choose_index_string_budget_too_small():
    with pytest.raises(
        ValueError, match=r"smallest, 'OPQ12_48,IVF131072_HNSW32,PQ12np', needs 20\d{9} bytes .* at least 19G"
    ):
        choose_index_string(10**9, 384, 16 << 30)


def test_budgeted_choice_builds_in_faiss():
    # every candidate string must be one FAISS accepts, with the code size we count
    for index_string in budget_candidates(3_000_000, 64):
        index = faiss.index_factory(64, index_string)
        ivf = faiss.extract_index_ivf(index)
        assert ivf.code_size == parse_index_string(index_string, 64).code_bytes
