"""BM25 postings: for each term, the passages containing it and each one's BM25 impact, computed with the
corpus-wide statistics (counts.CorpusTerms), so that a query's score is a sum of impacts and equals what
one BM25 over the whole corpus gives (Lucene's formula, as bm25s's `lucene` method and Elasticsearch:
idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part = tf / (tf + k1 (1 - b + b len / avg_len))).

On disk a `Postings` is five .npy files in a folder (`terms`, `starts`, `ids`, `impacts`, `maxima`), opened
memory-mapped: a search touches the dictionary (a binary search in a sorted uint64 array), reads whole only
the posting lists that can still change the top k (MaxScore, search_postings) and looks the other terms'
impacts up by id, so a serving node's memory and a query's work do not grow with the corpus' common terms.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rayindex.infra.files import atomic_file, save_npy
from rayindex.layout import LEXICAL_ARRAYS
from rayindex.lexical.counts import CorpusTerms, TermCounts

# Impacts are stored rounded to multiples of this: as integer multiples of 2^-18 below 64 (idf < 22 at a
# billion passages), any sum of a query's impacts is exact in float64 in any order, so pruned and exhaustive
# searches, and each serving shard, give the same float32 scores. The rounding is at most 1.9e-6 an impact.
IMPACT_STEP = 2.0**-18

# Passages of a query's shortest list scored first for MaxScore's threshold: at 10M synthetic passages a
# whole 500,000-passage list took 3x the exhaustive search's time; the first 8,192 give a threshold that
# prunes as well on those queries.
THETA_SAMPLE = 8_192
# Fewer postings than this are summed whole: on the 1,000 man pages' quotes (a few thousand postings a query)
# MaxScore's first pass cost 0.2 ms more than it saved.
PRUNE_FROM = 65_536
# Postings summed at once (impact_sums), so that a search's working memory stays the same however long the
# lists: at most 13 MB at 1M synthetic passages, 22 MB at 10M (tracemalloc; summing every posting at once
# took 59.5 bytes a posting, 150 MB for 2.5M); at 10M chunks of this size were faster than one sum (23 vs 26 ms).
CHUNK_POSTINGS = 1 << 18


class BM25Params(NamedTuple):
    k1: float = 1.2  # Lucene's and Elasticsearch's defaults
    b: float = 0.75


class Postings(NamedTuple):
    """terms: sorted uint64 term hashes; the postings of terms[i] are ids/impacts[starts[i]:starts[i+1]],
    ids ascending; maxima[i] is the largest of those impacts (None in versions written before it: their
    searches read every list whole)."""

    terms: np.ndarray
    starts: np.ndarray  # int64, len(terms) + 1
    ids: np.ndarray  # int64, vector ids
    impacts: np.ndarray  # float32
    maxima: np.ndarray | None = None  # float32, len(terms)


def idf(doc_freqs: np.ndarray, passages: int) -> np.ndarray:
    return np.log1p((passages - doc_freqs + 0.5) / (doc_freqs + 0.5))


def bm25_ceiling(doc_freqs: np.ndarray, passages: int) -> float:
    """The most a passage can score for a query whose terms have these document frequencies (0: a term no
    passage holds): the sum of their idf, as a term's tf part tends to 1 with its frequency. Hybrid search
    scales BM25 scores by it (query/fusion.py by_score)."""
    return float(idf(np.asarray(doc_freqs, np.float64), passages).sum())


def term_doc_freqs(postings: Postings, query_terms: np.ndarray) -> np.ndarray:
    """Each query term's document frequency in these postings (the length of its posting list; 0 when absent).
    Summed over the postings of a split (serving shards own disjoint passages), the corpus' frequencies."""
    where, found = term_rows(postings, query_terms)
    freqs = np.zeros(len(query_terms), np.int64)
    freqs[found] = postings.starts[where[found] + 1] - postings.starts[where[found]]
    return freqs


def term_rows(postings: Postings, query_terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query term's row in the dictionary, and whether the dictionary holds it."""
    where = np.searchsorted(postings.terms, query_terms)
    found = where < len(postings.terms)
    found[found] = postings.terms[where[found]] == query_terms[found]
    return where, found


def shard_postings(counts: TermCounts, corpus: CorpusTerms, params: BM25Params | None = None) -> Postings:
    """A shard's postings, its impacts computed with the whole corpus' statistics."""
    params = params or BM25Params()
    rows_per_passage = np.diff(counts.starts)
    ids = np.repeat(counts.ids, rows_per_passage)
    lengths = np.repeat(counts.lengths, rows_per_passage).astype(np.float64)
    where = np.searchsorted(corpus.terms, counts.terms)
    if len(counts.terms) and (
        where.max(initial=0) >= len(corpus.terms) or not np.array_equal(corpus.terms[where], counts.terms)
    ):
        raise ValueError("the corpus statistics do not cover this shard's terms: recompute them with every shard")
    tf = counts.counts.astype(np.float64)
    norm = params.k1 * (1 - params.b + params.b * lengths / corpus.avg_length) if corpus.avg_length else params.k1
    impacts = stepped(idf(corpus.doc_freqs[where].astype(np.float64), corpus.passages) * tf / (tf + norm))
    order = np.lexsort((ids, counts.terms))
    return from_rows(counts.terms[order], ids[order], impacts[order])


def from_rows(terms: np.ndarray, ids: np.ndarray, impacts: np.ndarray) -> Postings:
    """Postings of rows already sorted by (term, id)."""
    distinct, first = np.unique(terms, return_index=True)
    starts = np.append(first, len(terms)).astype(np.int64)
    impacts = impacts.astype(np.float32)
    return Postings(distinct.astype(np.uint64), starts, ids.astype(np.int64), impacts, term_maxima(impacts, starts))


def stepped(impacts: np.ndarray) -> np.ndarray:
    """Impacts rounded to multiples of IMPACT_STEP, as float32 (exactly)."""
    return (np.round(np.asarray(impacts, np.float64) / IMPACT_STEP) * IMPACT_STEP).astype(np.float32)


def term_maxima(impacts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each term's largest impact (every term has at least one posting)."""
    if len(starts) < 2:
        return np.zeros(0, np.float32)
    return np.maximum.reduceat(impacts, starts[:-1]).astype(np.float32)


# Postings a merge holds at a time in its second pass: the shards' postings go first to buckets of consecutive
# terms holding about this many (whole terms, a longer list alone), and each bucket is then sorted in memory
# (about 40 bytes a posting with its records and order: 170 MB) and appended to the .npy files. A split reads
# SPLIT_CHUNK postings at a time (whole terms; about 60 bytes a posting with its owners and order: 250 MB).
MERGE_WINDOW = 1 << 22
SPLIT_CHUNK = 1 << 22
# A posting on its way through a bucket: its term's dictionary row within the bucket, its id and impact.
BUCKET_RECORD = np.dtype([("row", "<u4"), ("id", "<i8"), ("impact", "<f4")])


def write_merged_postings(
    shards: Iterable[TermCounts], corpus: CorpusTerms, folder: Path, params: BM25Params | None = None
) -> int:
    """Every shard's postings (shard_postings) merged into folder's five .npy files, each whole or not at all,
    with one shard's postings, then one bucket's, in memory at a time (a billion passages' postings do not fit
    a driver), the disk read and written in order only. Each term's document frequency in the corpus
    statistics is its number of postings (a term appears once per passage in the counts), so the dictionary's
    offsets are known before any posting is read, and the terms are cut into buckets of about MERGE_WINDOW
    postings (term_chunks). First each shard's postings are appended to their terms' buckets (files in a
    temporary folder in `folder`, removed after, also on error); then each bucket in term order is read whole,
    stably sorted by term and appended to ids.npy and impacts.npy. Shards must come in ascending order of their
    vector ids, each above the last (the shard plan's row ranges in order): a shard's postings are sorted by
    (term, id), so within a bucket each term's ids then arrive ascending, and a stable sort by term alone
    orders the bucket by (term, id). ValueError when they do not, or when the statistics do not count exactly
    the shards' postings. Returns the postings written."""
    params = params or BM25Params()
    starts = np.zeros(len(corpus.terms) + 1, np.int64)
    np.cumsum(corpus.doc_freqs, out=starts[1:])
    buckets = np.array([t0 for t0, _ in term_chunks(starts, MERGE_WINDOW)] + [len(corpus.terms)], np.int64)
    with contextlib.ExitStack() as stack:
        temps = {name: stack.enter_context(atomic_file(folder / f"{name}.npy")) for name in LEXICAL_ARRAYS}
        spill = stack.enter_context(tempfile.TemporaryDirectory(prefix=".buckets.", suffix=".tmp", dir=folder))
        paths = [Path(spill) / f".bucket{i:06d}.tmp" for i in range(len(buckets) - 1)]
        fill_buckets(shards, corpus, params, starts, buckets, paths)
        maxima = np.zeros(len(corpus.terms), np.float32)
        with open(temps["ids"], "wb") as ids_file, open(temps["impacts"], "wb") as impacts_file:
            write_npy_header(ids_file, np.int64, int(starts[-1]))
            write_npy_header(impacts_file, np.float32, int(starts[-1]))
            for path, t0, t1 in zip(paths, buckets[:-1], buckets[1:]):
                records = np.fromfile(path, BUCKET_RECORD)
                path.unlink()  # the disk holds the buckets once: the output grows as they go
                order = np.argsort(records["row"], kind="stable")  # a merge of the shards' sorted runs
                ids_file.write(records["id"][order].tobytes())
                impacts = records["impact"][order]
                impacts_file.write(impacts.tobytes())
                maxima[t0:t1] = term_maxima(impacts, starts[t0 : t1 + 1] - starts[t0])
        for name, array in (("terms", corpus.terms.astype(np.uint64)), ("starts", starts), ("maxima", maxima)):
            save_npy(temps[name], array)
    return int(starts[-1])


def fill_buckets(
    shards: Iterable[TermCounts],
    corpus: CorpusTerms,
    params: BM25Params,
    starts: np.ndarray,
    buckets: np.ndarray,
    paths: list[Path],
) -> None:
    """write_merged_postings' first pass: each shard's postings appended to the bucket files of their terms
    (bucket i holds dictionary rows buckets[i] to buckets[i + 1]), after checking the shards' order and that
    no term gets more postings than its document frequency; then that every term got all of them."""
    free = starts[:-1].copy()  # each term's next place
    last_id = -1
    for counts in shards:
        if not len(counts.ids):
            continue
        if int(counts.ids.min()) <= last_id:
            raise ValueError(
                "shards must be merged in ascending order of their vector ids, each above the last: "
                f"a shard's id {int(counts.ids.min())} is not above {last_id}"
            )
        last_id = int(counts.ids.max())
        shard = shard_postings(counts, corpus, params)
        rows = np.searchsorted(corpus.terms, shard.terms)  # shard_postings checked that the corpus holds them
        lengths = np.diff(shard.starts)
        if np.any(free[rows] + lengths > starts[rows + 1]):
            raise ValueError("the corpus statistics count fewer postings than the shards hold: recompute them")
        free[rows] += lengths
        bucket = np.searchsorted(buckets, rows, side="right") - 1
        records = np.empty(len(shard.ids), BUCKET_RECORD)
        records["row"] = np.repeat(rows - buckets[bucket], lengths)
        records["id"] = shard.ids
        records["impact"] = shard.impacts
        cuts = shard.starts[np.searchsorted(rows, buckets)]  # the shard's terms ascend: a bucket's are a range
        for i in np.unique(bucket):
            with open(paths[i], "ab") as fh:
                fh.write(records[cuts[i] : cuts[i + 1]].tobytes())
    if not np.array_equal(free, starts[1:]):
        raise ValueError("the corpus statistics count more postings than the shards hold: recompute them")


def write_npy_header(fh, dtype, length: int) -> None:
    """The header np.save writes for a 1-d array of `length` values of dtype."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(fh, header)


def read_postings_slice(array: np.ndarray, a: int, b: int) -> np.ndarray:
    """array[a:b] of a memory-mapped .npy array read from its file: the pages read do not stay mapped."""
    if not isinstance(array, np.memmap):
        return np.asarray(array[a:b])
    return np.fromfile(array.filename, array.dtype, b - a, offset=array.offset + a * array.dtype.itemsize)


def term_chunks(starts: np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """Dictionary rows [t0, t1) of consecutive terms holding at most `chunk` postings (one term alone when
    its list is longer)."""
    t0, terms = 0, len(starts) - 1
    while t0 < terms:
        t1 = max(int(np.searchsorted(starts, starts[t0] + chunk, side="right")) - 1, t0 + 1)
        yield t0, min(t1, terms)
        t0 = t1


def write_split_postings(
    postings: Postings, parts: list[np.ndarray], folders: list[Path], chunk: int = SPLIT_CHUNK
) -> list[int]:
    """The postings of each part's passages (parts[i]: the ids serving shard i owns, disjoint) written into
    folders[i] as five .npy files, each whole or not at all, for sharded serving; returns each part's postings.
    postings memory-mapped (open_postings) are read `chunk` postings at a time (whole terms), twice: to count
    each part's terms and postings, then to fill its files in order. Every posting's passage must belong to a
    part (ValueError otherwise: the split does not cover the index). Within a term, ids keep their ascending
    order, which a part's search looks passages up by (term_impacts)."""
    owned = np.concatenate([np.asarray(ids, np.int64) for ids in parts]) if parts else np.zeros(0, np.int64)
    part_of = np.repeat(np.arange(len(parts), dtype=np.int64), [len(ids) for ids in parts])
    order = np.argsort(owned, kind="stable")
    owned, part_of = owned[order], part_of[order]
    starts = np.asarray(postings.starts)
    chunks = list(term_chunks(starts, chunk))

    def owners(t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The chunk's ids, their parts, and each part's postings per term of the chunk (parts x terms)."""
        ids = read_postings_slice(postings.ids, int(starts[t0]), int(starts[t1]))
        where = np.minimum(np.searchsorted(owned, ids), max(len(owned) - 1, 0))
        if len(ids) and (not len(owned) or not np.array_equal(owned[where], ids)):
            missing = ids[owned[where] != ids][0] if len(owned) else ids[0]
            raise ValueError(f"passage {int(missing)} has postings but no part owns it")
        owner = part_of[where]
        term = np.repeat(np.arange(t1 - t0), np.diff(starts[t0 : t1 + 1]))
        counts = np.bincount(owner * (t1 - t0) + term, minlength=len(parts) * (t1 - t0)).reshape(len(parts), -1)
        return ids, owner, counts

    sizes = np.zeros((len(parts), 2), np.int64)  # each part's terms and postings
    for t0, t1 in chunks:
        counts = owners(t0, t1)[2]
        sizes += np.stack([np.count_nonzero(counts, axis=1), counts.sum(axis=1)], axis=1)
    dtypes = dict(zip(LEXICAL_ARRAYS, (np.uint64, np.int64, np.int64, np.float32, np.float32)))
    with contextlib.ExitStack() as stack:
        files = []
        for folder, (terms, total) in zip(folders, sizes.tolist()):
            lengths = dict(zip(LEXICAL_ARRAYS, (terms, terms + 1, total, total, terms)))
            handles = {}
            for name in LEXICAL_ARRAYS:
                fh = stack.enter_context(open(stack.enter_context(atomic_file(folder / f"{name}.npy")), "wb"))
                write_npy_header(fh, dtypes[name], lengths[name])
                handles[name] = fh
            handles["starts"].write(np.zeros(1, np.int64).tobytes())
            files.append(handles)
        written = np.zeros(len(parts), np.int64)
        for t0, t1 in chunks:
            ids, owner, counts = owners(t0, t1)
            impacts = read_postings_slice(postings.impacts, int(starts[t0]), int(starts[t1]))
            by_part = np.argsort(owner, kind="stable")  # each part's postings in their order
            bounds = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
            for part, handles in enumerate(files):
                mine = by_part[bounds[part] : bounds[part + 1]]
                if not len(mine):
                    continue
                held = np.flatnonzero(counts[part])
                local_starts = np.concatenate([[0], np.cumsum(counts[part, held])])
                part_impacts = impacts[mine]
                handles["terms"].write(np.asarray(postings.terms[t0:t1])[held].astype(np.uint64).tobytes())
                handles["starts"].write((written[part] + local_starts[1:]).astype(np.int64).tobytes())
                handles["ids"].write(ids[mine].astype(np.int64).tobytes())
                handles["impacts"].write(part_impacts.astype(np.float32).tobytes())
                handles["maxima"].write(term_maxima(part_impacts, local_starts).astype(np.float32).tobytes())
                written[part] += len(mine)
    return sizes[:, 1].tolist()


def merge_top(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores) of several parts' search_postings results, best first, ties to the lower id:
    what search_postings over the parts' union gives, since each part returns every one of its passages that
    can be among the k best (its own k best, ties kept to the lower id)."""
    if not results:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in results])
    scores = np.concatenate([np.asarray(s, np.float32) for _, s in results])
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def write_postings(postings: Postings, folder: Path) -> list[Path]:
    """One .npy file per array, each whole or not at all."""
    paths = []
    for name, array in zip(LEXICAL_ARRAYS, postings):
        if array is None:
            array = term_maxima(np.asarray(postings.impacts), np.asarray(postings.starts))
        with atomic_file(folder / f"{name}.npy") as tmp:
            save_npy(tmp, array)
        paths.append(folder / f"{name}.npy")
    return paths


def open_postings(folder: Path) -> Postings:
    """Memory-mapped: nothing is read until a search slices it. ValueError naming the folder when the arrays
    do not fit together. A folder written before the terms' maxima has none (searches read whole lists)."""
    names = [name for name in LEXICAL_ARRAYS if name != "maxima" or (folder / f"{name}.npy").exists()]
    postings = Postings(*(np.load(folder / f"{name}.npy", mmap_mode="r") for name in names))
    if (
        len(postings.starts) != len(postings.terms) + 1
        or len(postings.ids) != len(postings.impacts)
        or (postings.maxima is not None and len(postings.maxima) != len(postings.terms))
    ):
        raise ValueError(f"{folder}: the lexical postings' arrays disagree in length")
    if len(postings.starts) and (postings.starts[0] != 0 or postings.starts[-1] != len(postings.ids)):
        raise ValueError(f"{folder}: the lexical postings' offsets do not cover its postings")
    return postings


def search_postings(
    postings: Postings, query_terms: np.ndarray, k: int, allowed=None, prune_from: int = PRUNE_FROM
) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores) for a query given as term hashes (a term repeated counts again, as in
    bm25s and Lucene's boolean query), best first, ties by id. allowed(ids) -> bool mask: filtered
    inside the scoring, so k passing passages come back whenever that many match. A query with fewer than
    prune_from postings is summed whole (exhaustive_search).

    MaxScore (Turtle and Flood, 1995), exact, in two passes of numpy. First up to THETA_SAMPLE passages of the
    shortest list are scored (each looked up by id in every term's list): their k-th best score, theta, is a
    floor of the answer's. The terms whose maxima, summed from the weakest up, stay below theta are
    non-essential: a passage holding only those cannot reach the k best. Only the essential lists are read
    whole; a passage's sum over them plus the non-essential maxima bounds its score, and only the passages
    whose bound reaches theta are looked up in the non-essential lists. Impacts are multiples of IMPACT_STEP,
    so every sum is exact in float64 whatever its order, and every path gives the same float32 scores."""
    where, found = term_rows(postings, query_terms)
    rows = where[found]
    if not len(rows) or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    terms, repeats = np.unique(rows, return_counts=True)
    lengths = postings.starts[terms + 1] - postings.starts[terms]
    if postings.maxima is None or lengths.sum() < prune_from:
        return exhaustive_search(postings, rows, k, allowed)
    ceilings = repeats * postings.maxima[terms].astype(np.float64)
    shortest = terms[np.argmin(lengths)]
    a = postings.starts[shortest]
    ids = np.asarray(postings.ids[a : min(a + THETA_SAMPLE, postings.starts[shortest + 1])])
    if allowed is not None:
        ids = ids[allowed(ids)]
    sums = np.zeros(len(ids), np.float64)
    for term, repeat in zip(terms, repeats):
        sums += repeat * term_impacts(postings, term, ids)
    best_ids, best_scores = top_with_ties(ids, sums.astype(np.float32), k)
    theta = best_scores.min() if len(best_ids) >= k else -np.inf
    by_ceiling = np.argsort(ceilings, kind="stable")
    weak = np.cumsum(ceilings[by_ceiling]).astype(np.float32) < theta  # exact sums: below theta, out of the k best
    if not weak.any():
        return exhaustive_search(postings, rows, k, allowed)
    essential = np.ones(len(terms), bool)
    essential[by_ceiling[weak]] = False
    sampled = np.sort(best_ids)  # scored already: kept out of the chunks' candidates
    slack = ceilings[~essential].sum()
    for ids, sums in impact_sums(postings, terms[essential], repeats[essential], allowed):
        keep = ((sums + slack).astype(np.float32) >= theta) & ~contains(sampled, ids)
        ids, sums = ids[keep], sums[keep]
        for term, repeat in zip(terms[~essential], repeats[~essential]):
            sums += repeat * term_impacts(postings, term, ids)
        best_ids, best_scores = top_with_ties(
            np.concatenate([best_ids, ids]), np.concatenate([best_scores, sums.astype(np.float32)]), k
        )
        if len(best_ids) >= k:  # the chunks so far lift the floor for the next ones (top_with_ties: min = k-th)
            theta = max(theta, best_scores.min())
    order = np.lexsort((best_ids, -best_scores))[:k]
    return best_ids[order], best_scores[order]


def contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of ids is in sorted_ids (ascending)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    where = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[where] == ids


def impact_sums(postings: Postings, rows, repeats, allowed=None):
    """Every passage in these dictionary rows' lists that allowed lets through, with the sum of its impacts in
    them (each row's times its repeats) in float64: (ids ascending, sums) by chunks of consecutive ids of about
    CHUNK_POSTINGS postings, the lists cut at the same ids (the longest list's, evenly spaced), so a search's
    working memory stays the same however long the lists grow."""
    spans = [(int(postings.starts[r]), int(postings.starts[r + 1])) for r in rows]
    total = sum(b - a for a, b in spans)
    a, b = max(spans, key=lambda span: span[1] - span[0])
    pieces = -(-total // CHUNK_POSTINGS)
    cuts = np.unique(np.asarray(postings.ids[a + np.arange(1, pieces) * (b - a) // pieces]))
    ends = [a + np.append(np.searchsorted(postings.ids[a:b], cuts), b - a) for a, b in spans]
    begins = [np.insert(e[:-1], 0, a) for (a, _), e in zip(spans, ends)]
    for chunk in range(len(cuts) + 1):
        ids = np.concatenate([postings.ids[s[chunk] : e[chunk]] for s, e in zip(begins, ends)])
        impacts = np.concatenate(
            [postings.impacts[s[chunk] : e[chunk]] * np.float32(n) for s, e, n in zip(begins, ends, repeats)]
        )
        if allowed is not None:
            mask = allowed(ids)
            ids, impacts = ids[mask], impacts[mask]
        distinct, inverse = np.unique(ids, return_inverse=True)
        yield distinct, np.bincount(inverse, weights=impacts, minlength=len(distinct))


def term_impacts(postings: Postings, row: int, ids: np.ndarray) -> np.ndarray:
    """The impact of the term at this dictionary row in each of these passages (ascending ids; 0 where its
    list does not hold them): the passages looked up in its list, or the list scanned when it is shorter."""
    a, b = postings.starts[row], postings.starts[row + 1]
    impacts = np.zeros(len(ids), np.float32)
    if not len(ids):
        return impacts
    if b - a <= len(ids):
        listed = np.asarray(postings.ids[a:b])
        where = np.minimum(np.searchsorted(ids, listed), len(ids) - 1)
        held = ids[where] == listed
        impacts[where[held]] = np.asarray(postings.impacts[a:b])[held]
    else:
        where = np.minimum(np.searchsorted(postings.ids[a:b], ids), b - a - 1)
        held = np.asarray(postings.ids[a:b][where]) == ids
        impacts[held] = postings.impacts[a:b][where[held]]
    return impacts


def top_with_ties(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The passages scoring at least the k-th best score (all of them when k or fewer): every one that can
    be among the k best once ties go to the lower id."""
    if k >= len(scores):
        return ids, scores
    kth_best = np.partition(scores, len(scores) - k)[len(scores) - k]
    keep = scores >= kth_best
    return ids[keep], scores[keep]


def exhaustive_search(postings: Postings, rows: np.ndarray, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """search_postings reading every posting of the query's terms (dictionary rows, repeats kept)."""
    terms, repeats = np.unique(rows, return_counts=True)
    best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for ids, sums in impact_sums(postings, terms, repeats, allowed):
        ids, scores = top_with_ties(ids, sums.astype(np.float32), k)
        best_ids, best_scores = top_with_ties(np.concatenate([best_ids, ids]), np.concatenate([best_scores, scores]), k)
    order = np.lexsort((best_ids, -best_scores))[:k]
    return best_ids[order], best_scores[order]
