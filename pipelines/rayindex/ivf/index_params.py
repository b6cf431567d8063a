"""Index parameter choice as pure functions of corpus size and dimension (unit-tested on numbers).

Rules follow the FAISS wiki "Guidelines to choose an index": nlist between 4*sqrt(n) and
16*sqrt(n), at least 39 training points per centroid (k-means warns below that), and 256
points per PQ sub-quantizer centroid table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this
GOOD_POINTS_PER_CENTROID = 64
PQ_TRAIN_POINTS = 256 * GOOD_POINTS_PER_CENTROID  # 8-bit PQ: 256 centroids per sub-quantizer
DEFAULT_MAX_NLIST = 65_536  # nlist_for's cap without a memory budget: from 67,108,865 vectors (4*sqrt(n) > 32,768)
# The sample gives the default's largest nlist its full 64 points per centroid: 4,194,304 vectors, 6.4 GB of
# 384-d float32 on the train node. At 1e9 vectors the default nlist is 65,536, whose k-means needs 39 x 65,536 =
# 2,555,904 points; the old 1,000,000 cap tripped that warning. Lowering nlist to what 1,000,000 points train
# (16,384) instead would put 61,035 vectors in a list instead of 15,259, so every query at the default nprobe
# (128) would scan 7.8M codes instead of 1.95M: 4x the serving cost of every search (or lower recall at the
# same cost; the FAISS wiki's range at 1e9 is 126k-506k lists, 65,536 is already under it), to save a one-off
# k-means of 4,194,304 x 65,536 vector x centroid products: 9.6 h on 2 CPU cores (3.98e6 per s per core,
# measured, docs/scale.md), 36 min on one 32-core node, ~2 min on one GPU (estimated 2e9 per s), beside the
# 7,173 h that 2 CPU cores take to encode the same 1e9 documents.
MAX_TRAIN_SAMPLE = GOOD_POINTS_PER_CENTROID * DEFAULT_MAX_NLIST
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


def choose_index_string(n_docs: int, dim: int, max_index_bytes: int | None = None) -> str:
    """The index_factory string used when --index is not given.

    Without a budget:
      n < 1,000        IVF1,Flat
      n < 20,000       IVF{nlist},Flat
      otherwise        IVF{nlist},PQ{d/8}np           nlist = nlist_for(n), at most 65,536,
                       as IVF65536_HNSW32 from 65,536 lists (n > 67,108,864; see HNSW_COARSE_FROM)
    With max_index_bytes (index fully loaded in RAM, index_memory_bytes): the first that fits of
      IVF..,Flat (4d bytes) > SQfp16 (2d) > SQ8 (d) > PQ{~d/4} > PQ{~d/8} > PQ{~d/16} > ... > 8 bytes,
      where PQ m divides d (pq_ladder), and m <= d/8 gets OPQ{m}_{4m} in front (OPQ helps low-rate
      PQ; only with n >= d, which OPQ training needs); no PQ under 256 docs (8-bit codebooks);
      nlist = nlist_for(n) up to 262,144, and IVF{nlist}_HNSW32 once nlist >= 65,536 (sources above
      MAX_NLIST_BUDGET).
      ValueError, with the smallest size and a budget to use, when none fits.
    """
    if max_index_bytes is not None:
        candidates = budget_candidates(n_docs, dim)
        for index_string in candidates:
            if index_memory_bytes(index_string, n_docs, dim) <= max_index_bytes:
                return index_string
        smallest = index_memory_bytes(candidates[-1], n_docs, dim)
        suggest = math.ceil(smallest / (1 << 30))
        raise ValueError(
            f"no index for {n_docs} vectors of dimension {dim} fits in {max_index_bytes} bytes: the smallest, "
            f"{candidates[-1]!r}, needs {smallest} bytes ({smallest / (1 << 30):.2f} GiB); "
            f"use a budget of at least {suggest}G"
        )
    if n_docs < 1_000:
        return "IVF1,Flat"  # one list: exact search, but still mergeable like every IVF index
    ivf = ivf_part(nlist_for(n_docs))
    if n_docs < FLAT_LIMIT:
        return f"{ivf},Flat"
    # "np": skip polysemous training (seconds to minutes); its codes only help Hamming filtering, which search does not
    # use
    return f"{ivf},PQ{pq_subquantizers(dim)}np"


def training_sample_size(n_docs: int, nlist: int, uses_pq: bool, cap: int = MAX_TRAIN_SAMPLE) -> int:
    """Vectors to sample for training: 64 per coarse centroid and enough for the PQ codebooks, at most cap but
    never under the 39 per centroid FAISS's k-means needs (a budgeted nlist of 131,072 gets 5,111,808), and
    never more than the corpus (nlist_for leaves a corpus 39 points per list)."""
    wanted = GOOD_POINTS_PER_CENTROID * nlist
    if uses_pq:
        wanted = max(wanted, PQ_TRAIN_POINTS)
    return int(min(n_docs, max(min(wanted, cap), MIN_POINTS_PER_CENTROID * nlist)))


def default_nprobe(nlist: int) -> int:
    """nprobe that search uses when none is given: 1/8 of the lists, between 1 and 128."""
    return int(min(nlist, max(1, min(128, nlist // 8))))


def suggest_for_too_few_points(n_train: int, index_string: str, nlist: int) -> str:
    """A replacement index string when the corpus cannot train nlist centroids."""
    rest = index_string.split(",", 1)[1] if "," in index_string else "Flat"
    if "PQ" in rest.upper() and n_train < 256:
        rest = "Flat"  # 8-bit PQ codebooks need 256 points as well
    return f"IVF{max_nlist_for(n_train)},{rest}"


# --- Index choice under a memory budget -------------------------------------------------------
# Sources: FAISS wiki "Guidelines to choose an index" (section "Is memory a concern?": ...,Flat
# when memory is no issue, SQ8 when storing whole vectors is too expensive, OPQx_y,...,PQx when
# memory is very important, with y a multiple of x, y <= d and about 4*x; section "How big is the
# dataset?": an HNSW coarse quantizer, IVF{K}_HNSW32, from 65,536 centroids up) and "Indexing 1G
# vectors" (IVF262144 with OPQ+PQ codes for a billion vectors).

MAX_NLIST_BUDGET = 1 << 18  # 262,144 lists: what the 1G-vector experiments use
# From here a flat coarse quantizer is too slow to assign to (wiki). Measured at 65,536 lists, d=384, 2 threads
# (benchmarks/coarse_assign_benchmark.py, docs/benchmarks.md): HNSW32 assigns 5.3x faster than flat (14,282 vs 2,702
# vectors/s) and the add to ...,PQ48np runs 4.1-7.9x faster (two runs on a shared machine), while 98.5% of vectors
# land in the exact list (coarse MSE x1.08). At 4,096 lists flat is still faster (BLAS: 77,220 vs 44,592 vectors/s),
# so the default keeps a flat quantizer below 65,536.
HNSW_COARSE_FROM = 65_536
HNSW_COARSE_M = 32
MIN_PQ_BYTES = 8  # ids cost 8 bytes a vector: smaller codes save little and lose much recall
ID_BYTES = 8  # FAISS idx_t (int64) per vector in the inverted lists
LIST_OVERHEAD_BYTES = 48  # ArrayInvertedLists: two std::vector headers (codes, ids) per list

_PRE = [(re.compile(r"OPQ(\d+)(?:_(\d+))?"), "OPQ"), (re.compile(r"PCAR?(\d+)"), "PCA")]
_IVF = re.compile(r"IVF(\d+)(?:_HNSW(\d+))?")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?(np)?")


@dataclass(frozen=True)
class IndexSpec:
    """The parts of an IVF factory string that decide its memory."""

    transforms: tuple[tuple[str, int, int], ...]  # (kind "OPQ"/"PCA", d_in, d_out)
    d: int  # dimension the IVF index sees (after transforms)
    nlist: int
    hnsw_m: int  # 0: flat coarse quantizer
    encoding: str  # "Flat", "SQ8", "SQfp16" or "PQ"
    pq_m: int = 0
    pq_bits: int = 8

    @property
    def code_bytes(self) -> int:
        """Bytes of one stored code in the inverted lists."""
        per_vector = {"Flat": 4 * self.d, "SQ8": self.d, "SQfp16": 2 * self.d}
        if self.encoding == "PQ":
            return (self.pq_m * self.pq_bits + 7) // 8
        return per_vector[self.encoding]


def parse_index_string(index_string: str, dim: int) -> IndexSpec:
    """Parse the factory strings this module sizes: [OPQm[_d] | PCA[R]d ,]* IVFn[_HNSWm] ,
    Flat | SQ8 | SQfp16 | PQm[xbits][np]. Anything else raises ValueError naming the part."""
    parts = [p.strip() for p in index_string.split(",")]
    transforms, d = [], dim
    while parts and not _IVF.fullmatch(parts[0]):
        part = parts.pop(0)
        for pattern, kind in _PRE:
            match = pattern.fullmatch(part)
            if match:
                d_out = int(match.group(2) or d) if kind == "OPQ" else int(match.group(1))
                transforms.append((kind, d, d_out))
                d = d_out
                break
        else:
            raise ValueError(f"{index_string!r}: unsupported part {part!r} (sized: OPQm[_d], PCARd, IVFn[_HNSWm])")
    if len(parts) != 2:
        raise ValueError(f"{index_string!r}: expected one IVFn[_HNSWm] part followed by one encoding")
    ivf, code = _IVF.fullmatch(parts[0]), parts[1]
    spec = {"transforms": tuple(transforms), "d": d, "nlist": int(ivf.group(1)), "hnsw_m": int(ivf.group(2) or 0)}
    if code in ("Flat", "SQ8", "SQfp16"):
        return IndexSpec(encoding=code, **spec)
    pq = _PQ.fullmatch(code)
    if not pq:
        raise ValueError(f"{index_string!r}: unsupported encoding {code!r} (sized: Flat, SQ8, SQfp16, PQm[xbits][np])")
    m = int(pq.group(1))
    if d % m:
        raise ValueError(f"{index_string!r}: PQ{m} does not divide the dimension {d}")
    return IndexSpec(encoding="PQ", pq_m=m, pq_bits=int(pq.group(2) or 8), **spec)


def ivf_part(nlist: int) -> str:
    """The IVF part of a chosen index string: an HNSW32 coarse quantizer from HNSW_COARSE_FROM lists.
    The add stage assigns on CPU cores whether or not the cluster has GPUs, so the choice does not depend on them."""
    return f"IVF{nlist}_HNSW{HNSW_COARSE_M}" if nlist >= HNSW_COARSE_FROM else f"IVF{nlist}"


def fit_index_to_corpus(index_string: str, n_docs: int, dim: int) -> tuple[str, str | None]:
    """(index string, None) when n_docs vectors can train it; else (a smaller string, why) to warn with.

    FAISS trains k-means on at least nlist points, 8-bit PQ codebooks on 256 (2**bits), OPQ on as
    many points as its input dimensions (FAISS 1.15 crashes below that) and PCA on as many as it
    outputs. What the corpus cannot train is shrunk: such a pre-transform is dropped, PQ codes become
    Flat (under 256 documents memory is no concern), and nlist becomes max_nlist_for(n_docs).
    Strings parse_index_string does not size are returned as given: train.check_trainable refuses
    them with a suggestion when they cannot be trained."""
    try:
        spec = parse_index_string(index_string, dim)
    except ValueError:
        return index_string, None
    parts = [p.strip() for p in index_string.split(",")]
    kept, notes = [], []
    for part, (kind, d_in, d_out) in zip(parts, spec.transforms):
        need = d_in if kind == "OPQ" else d_out
        if n_docs < need:
            notes.append(f"{part} trains on at least {need} vectors: dropped")
        else:
            kept.append(part)
    ivf, code = parts[-2:]
    if n_docs < spec.nlist:
        ivf = f"IVF{max_nlist_for(n_docs)}"  # without any _HNSW: a graph over a few centroids buys nothing
        notes.append(
            f"{parts[-2]} needs at least {spec.nlist} vectors ({MIN_POINTS_PER_CENTROID} per list to train well): {ivf}"
        )
    if spec.encoding == "PQ" and n_docs < (1 << spec.pq_bits):
        notes.append(f"{code}'s codebooks need at least {1 << spec.pq_bits} vectors: Flat")
        code = "Flat"
    if not notes:
        return index_string, None
    fitted = ",".join([*kept, ivf, code])
    try:
        parse_index_string(fitted, dim)
    except ValueError:  # PQm divided the dimension of a dropped transform, not the model's
        notes.append(f"{code} does not divide the dimension {dim}: Flat")
        fitted = ",".join([*kept, ivf, "Flat"])
    return fitted, (
        f"--index {index_string!r} needs more vectors to train than the {n_docs} there are, so the build "
        f"uses {fitted!r} ({'; '.join(notes)}); index more documents to get the index asked for"
    )


def index_memory_parts(index_string: str, n: int, dim: int) -> dict[str, int]:
    """Bytes of each in-memory part of the index holding n vectors (see index_memory_bytes)."""
    s = parse_index_string(index_string, dim)
    if s.hnsw_m:
        # IndexHNSWFlat graph: 2*M int32 links on level 0, M per upper level; a node reaches level
        # l with probability M^-l (HNSW::set_default_probas), so 1/(M-1) upper levels on average;
        # plus one int32 level and one size_t offset per node
        links = 2 * s.hnsw_m + s.hnsw_m / (s.hnsw_m - 1)
        hnsw = int(s.nlist * (4 * links + 4 + 8))
    else:
        hnsw = 0
    codebooks = {"PQ": (1 << s.pq_bits) * s.d * 4, "SQ8": 2 * s.d * 4}.get(s.encoding, 0)  # PQ centroids; SQ8 min/range
    # OPQ keeps its d_out x d_in rotation; PCA also keeps mean, eigenvalues and the full d_in x d_in PCAMat
    transforms = sum(
        4 * (d_in * d_out + (d_in * d_in + 2 * d_in + d_out if kind == "PCA" else 0))
        for kind, d_in, d_out in s.transforms
    )
    return {
        "codes": int(n) * s.code_bytes,
        "ids": int(n) * ID_BYTES,
        "list_overhead": s.nlist * LIST_OVERHEAD_BYTES,
        "coarse_centroids": s.nlist * s.d * 4,
        "hnsw_graph": hnsw,
        "codebooks": codebooks,
        "transforms": transforms,
    }


def index_memory_bytes(index_string: str, n: int, dim: int) -> int:
    """RAM of the index fully loaded with n vectors: codes + 8-byte ids in the inverted lists,
    coarse centroids (nlist*d*4), the HNSW graph of an IVFn_HNSWm quantizer, PQ/SQ codebooks and
    OPQ/PCA matrices. Matches faiss.serialize_index sizes to a few percent (tested). Not counted:
    the up-to-2x std::vector growth while adding, and, for L2 IVFPQ only, the nlist*m*256*4 byte
    precomputed table FAISS builds when it is under 2 GiB (rayindex's default metric is ip)."""
    return sum(index_memory_parts(index_string, n, dim).values())


def nlist_for(n_docs: int, cap: int = DEFAULT_MAX_NLIST) -> int:
    """Power of two at or above 4*sqrt(n) (wiki: 4..16*sqrt(n)), at most n/39 and cap; 1 under 1,000 docs."""
    if n_docs < 1_000:
        return 1
    at_least_4_sqrt_n = 1 << math.ceil(math.log2(4 * math.sqrt(n_docs)))
    return min(cap, at_least_4_sqrt_n, max_nlist_for(n_docs))


def pq_ladder(dim: int) -> list[int]:
    """PQ code sizes to try, biggest first: divisors of dim near dim/4, dim/8, dim/16, ..., down to 8 bytes."""
    sizes: list[int] = []
    divisor = 4
    while True:
        m = next(m for m in range(max(1, dim // divisor), 0, -1) if dim % m == 0)
        if sizes and m < MIN_PQ_BYTES:
            return sizes
        if m not in sizes:
            sizes.append(m)
        if m == 1:
            return sizes
        divisor *= 2


def budget_candidates(n_docs: int, dim: int) -> list[str]:
    """Index strings from the biggest code to the smallest, for choose_index_string's budget path."""
    ivf = ivf_part(nlist_for(n_docs, cap=MAX_NLIST_BUDGET))
    out = [f"{ivf},{code}" for code in ("Flat", "SQfp16", "SQ8")]
    if n_docs < 256:
        return out  # 8-bit PQ codebooks need 256 training points
    for m in pq_ladder(dim):
        if m <= dim // 8 and n_docs >= dim:
            # OPQ helps low-rate PQ; rotate into 4*m dimensions (4 per sub-quantizer, as the wiki's
            # OPQ16_64 / OPQ32_128); FAISS's OPQ training needs at least dim points
            out.append(f"OPQ{m}_{4 * m},{ivf},PQ{m}np")
        else:
            out.append(f"{ivf},PQ{m}np")
    return out
