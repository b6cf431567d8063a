"""Index parameter choice as pure functions of corpus size and dimension (unit-tested on numbers).

Rules follow the FAISS wiki "Guidelines to choose an index": nlist between 4*sqrt(n) and
16*sqrt(n), at least 39 training points per centroid (k-means warns below that), and 256
points per PQ sub-quantizer centroid table.
"""

from __future__ import annotations

import math

MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this
GOOD_POINTS_PER_CENTROID = 64
PQ_TRAIN_POINTS = 256 * GOOD_POINTS_PER_CENTROID  # 8-bit PQ: 256 centroids per sub-quantizer
MAX_TRAIN_SAMPLE = 1_000_000
FLAT_LIMIT = 20_000  # below this an uncompressed IVF is small and exact enough


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, value)))))


def max_nlist_for(n_train: int) -> int:
    """Largest power-of-two nlist that n_train points can train without FAISS's k-means warning."""
    return _power_of_two_at_most(n_train / MIN_POINTS_PER_CENTROID)


def pq_subquantizers(dim: int) -> int:
    """PQ code size in bytes: about 8 dimensions per sub-quantizer, a divisor of dim."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_index_string(n_docs: int, dim: int) -> str:
    """The index_factory string used when --index is not given."""
    if n_docs < 1_000:
        return "IVF1,Flat"  # one list: exact search, but still mergeable like every IVF index
    at_least_4_sqrt_n = 1 << math.ceil(math.log2(4 * math.sqrt(n_docs)))
    nlist = min(65_536, at_least_4_sqrt_n, max_nlist_for(n_docs))
    if n_docs < FLAT_LIMIT:
        return f"IVF{nlist},Flat"
    # "np": skip polysemous training (seconds to minutes); its codes only help Hamming filtering, which search does not use
    return f"IVF{nlist},PQ{pq_subquantizers(dim)}np"


def training_sample_size(n_docs: int, nlist: int, uses_pq: bool, cap: int = MAX_TRAIN_SAMPLE) -> int:
    """Vectors to sample for training: enough per coarse centroid and for the PQ codebooks, capped."""
    wanted = GOOD_POINTS_PER_CENTROID * nlist
    if uses_pq:
        wanted = max(wanted, PQ_TRAIN_POINTS)
    return int(min(n_docs, wanted, cap))


def default_nprobe(nlist: int) -> int:
    """nprobe that search uses when none is given: 1/8 of the lists, between 1 and 128."""
    return int(min(nlist, max(1, min(128, nlist // 8))))


def suggest_for_too_few_points(n_train: int, index_string: str, nlist: int) -> str:
    """A replacement index string when the corpus cannot train nlist centroids."""
    rest = index_string.split(",", 1)[1] if "," in index_string else "Flat"
    if "PQ" in rest.upper() and n_train < 256:
        rest = "Flat"  # 8-bit PQ codebooks need 256 points as well
    return f"IVF{max_nlist_for(n_train)},{rest}"
