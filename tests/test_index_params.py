"""Index parameter choice: pure functions, checked on numbers."""

import pytest

from pipelines.config import parse_bytes
from pipelines.index_params import (
    choose_index_string,
    default_nprobe,
    max_nlist_for,
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
        (1_000_000_000, 384, "IVF65536,PQ48np"),
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
    assert training_sample_size(10**9, 65_536, uses_pq=True) == 1_000_000  # capped


def test_nlist_limits_and_suggestions():
    assert max_nlist_for(39) == 1
    assert max_nlist_for(39 * 300) == 256
    assert suggest_for_too_few_points(1000, "IVF4096,PQ32", 4096) == "IVF16,PQ32"
    assert suggest_for_too_few_points(100, "IVF4096,PQ32", 4096) == "IVF2,Flat"
    assert default_nprobe(1) == 1
    assert default_nprobe(64) == 8
    assert default_nprobe(65_536) == 128


def test_parse_bytes():
    assert parse_bytes("8G") == 8 << 30
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
