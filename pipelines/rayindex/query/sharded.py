"""Sharded serving (`rayindex serve --shards N`): N shard deployments, each memory-mapping one part of
the merged inverted lists (split at publish time by list number, balanced by size, recorded in the
manifest: stages/partition.py), and a router, the RagService ingress, that holds only the coarse
quantizer and the pre-transforms of the version (trained.faiss). A query is encoded once; the router
finds its nprobe lists, sends it only to the shards that own one of them, and merges their top-k
(ivf/serving_split.py): the merged index's ids and distances. Each shard also memory-maps the BM25
postings of its passages (those whose vectors its lists hold); the router analyzes a lexical query once,
asks every shard (any may hold matching passages) for its top passages and merges them by score, ties to
the lower id: the unsplit postings' top passages, scores exactly (lexical/postings.py merge_top). A hybrid
query's lexical calls are sent before its dense ones and gathered after them: the two fan-outs overlap.

Versions: every call names the router's version, and a shard answers from that version's part or not
at all, so no response mixes versions. Each shard replica watches CURRENT and loads a new version
beside the one it serves (the router also asks each shard to prepare it before swapping), keeping the
newest KEEP_VERSIONS. A shard that fails or does not answer within shard_timeout fails the request (503)
or, with on_shard_failure=partial, is left out and the response says partial: true.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import faiss
import numpy as np
import ray
from ray import serve

from rayindex.config import AppConfig
from rayindex.errors import DamagedIndex, RayIndexError, Unavailable, user_message
from rayindex.infra.storage import Store, use_s3_endpoint
from rayindex.ivf.index import read_index
from rayindex.ivf.serving_split import (
    coarse_assign,
    empty_results,
    larger_is_better,
    merge_part_results,
    parts_needed,
    search_part,
)
from rayindex.layout import CURRENT, MANIFEST, TRAINED_FILE
from rayindex.lexical.postings import Postings, merge_top, open_postings, search_postings, term_doc_freqs
from rayindex.manifest import Manifest, ServingPart
from rayindex.query.filters import id_selector
from rayindex.query.search import LexicalPassages, PublishedIndex, allowed_ids, open_version
from rayindex.versions import current_published_id, current_run_id, published_version, pull_version_files

log = logging.getLogger("rayindex.sharded")

# Search batches the router has in flight at once (query/batching.py QueueBatcher's in_flight). One: two
# batches each running FAISS's OpenMP teams oversubscribe the unsharded replica's cores, and at 100M
# vectors on 2 cores two in flight moved sharded QPS by noise only (4 shards 14.5 vs 11.7, 1 shard 19.7
# vs 16.6: both up, their ratio 0.74 vs 0.70; benchmarks/sharded_benchmark.py)
BATCHES_IN_FLIGHT = 1
KEEP_VERSIONS = (
    2  # the version served and the one being swapped in: a request started before a swap still finds its part
)


def serving_split(manifest: Manifest, shards: int, where: str) -> list[ServingPart]:
    """The version's split for `shards` serving shards, checked: every list owned by exactly one part."""
    split = manifest.serving.get(shards)
    if not split:
        have = ", ".join(str(n) for n in sorted(manifest.serving)) or "none"
        raise RayIndexError(
            f"{where} is not split for {shards} serving shards (splits: {have}); run `rayindex partition --index "
            f"<output> --shards {shards}`, or build with --serving-shards {shards}"
        )
    owned = np.concatenate([np.asarray(part.lists, dtype=np.int64) for part in split])
    if (
        len(split) != shards
        or len(owned) != manifest.nlist
        or not np.array_equal(np.sort(owned), np.arange(manifest.nlist))
    ):
        raise DamagedIndex(
            f"{where}: the split for {shards} serving shards does not give each of the {manifest.nlist} lists to "
            f"exactly "
            "one part; the version is damaged: run `rayindex partition` again or rebuild it"
        )
    return split


def list_owner(split: list[ServingPart], nlist: int) -> np.ndarray:
    owner = np.zeros(nlist, dtype=np.int32)
    for number, part in enumerate(split):
        owner[part.lists] = number
    return owner


@dataclass
class LoadedPart:
    """One version's part, open on a shard: the part index (memory-mapped lists), the lists it owns and the
    BM25 postings of their passages (memory-mapped; None when the version has none in its parts)."""

    run_id: str
    index: faiss.Index
    owned: np.ndarray
    postings: Postings | None
    load_s: float


def open_part(output: str, run_id: str, shards: int, part: int) -> LoadedPart:
    """Part `part` of the published version run_id's split for `shards` serving shards: its files (index,
    on-disk lists, postings) pulled (S3) or checked in place against the manifest's sha256, the index and the
    postings memory-mapped."""
    start = time.perf_counter()
    root = Store(output)
    version, manifest = published_version(root, run_id)
    split = serving_split(manifest, shards, version.url(MANIFEST))
    files = split[part].files + split[part].lexical
    missing = [rel for rel in files if rel not in manifest.files_sha256]
    if missing:
        raise DamagedIndex(
            f"{version.url(MANIFEST)} records no checksum for {missing[0]}; run `rayindex partition` again"
        )
    version_dir = pull_version_files(root, version, manifest, {rel: manifest.files_sha256[rel] for rel in files})
    index = read_index(version_dir / files[0], faiss.IO_FLAG_ONDISK_SAME_DIR)
    if index.ntotal != split[part].vectors:
        raise DamagedIndex(
            f"{version_dir / files[0]} holds {index.ntotal} vectors, "
            f"the manifest says {split[part].vectors}; rebuild it"
        )
    postings = None
    if split[part].lexical:
        folder = version_dir / PurePosixPath(split[part].lexical[0]).parent
        try:
            postings = open_postings(folder)
        except (OSError, ValueError) as exc:
            raise DamagedIndex(f"{folder}: {exc}; run `rayindex partition` again or rebuild it") from exc
        if len(postings.ids) != split[part].postings:
            raise DamagedIndex(
                f"{folder} holds {len(postings.ids)} postings, the manifest says {split[part].postings}; run "
                "`rayindex partition` again or rebuild it"
            )
    owned = np.zeros(manifest.nlist, dtype=bool)
    owned[split[part].lists] = True
    return LoadedPart(run_id, index, owned, postings, time.perf_counter() - start)


def memory_mb() -> dict:
    """This process's resident memory: anonymous (heap), file-backed (libraries and mapped files), and of
    that the inverted lists' own mappings (.ivfdata pages in the page cache, from /proc/self/smaps)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    lists_kb, in_lists = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper():  # a mapping's header line: address range, ..., path
            in_lists = line.rstrip().endswith(".ivfdata")
        elif in_lists and line.startswith("Rss:"):
            lists_kb += int(line.split()[1])
    return {
        "anon_mb": int(fields["RssAnon"].split()[0]) / 1024,
        "file_mb": int(fields["RssFile"].split()[0]) / 1024,
        "lists_mb": lists_kb / 1024,
    }


@serve.deployment(max_ongoing_requests=8)
class ShardServer:
    """One serving shard: one part of the inverted lists of the versions it serves."""

    def __init__(self, config: dict, shards: int, part: int):
        self.config = AppConfig(**config)
        use_s3_endpoint(self.config.s3_endpoint)  # app_builder puts the endpoint in the config
        self.shards, self.part = shards, part
        # the router keeps BATCHES_IN_FLIGHT batches going, each a call here: FAISS threads per call so that
        # they fill this replica's CPUs without OpenMP teams spinning against each other
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        faiss.omp_set_num_threads(max(1, int(cpus) // BATCHES_IN_FLIGHT))
        self.versions: OrderedDict[str, LoadedPart] = OrderedDict()
        self.searches, self.search_s = 0, 0.0  # dense search calls answered and their seconds in FAISS: stats()
        self._loading = threading.Lock()
        self.prepare(current_published_id(Store(self.config.index)))
        threading.Thread(target=self._watch_current, daemon=True, name="rayindex-shard-watch").start()

    def part_of(self, run_id: str) -> LoadedPart:
        """run_id's part, opened once however many requests ask at once (no lock once it is open)."""
        part = self.versions.get(run_id)
        if part is None:
            with self._loading:
                part = self.versions.get(run_id)
                if part is None:
                    part = self.versions[run_id] = open_part(self.config.index, run_id, self.shards, self.part)
                    while len(self.versions) > KEEP_VERSIONS:
                        self.versions.popitem(last=False)
        return part

    def searched(self, run_id: str) -> LoadedPart:
        """run_id's part, for a search: marked the most recently searched (the least recently searched version is
        the one dropped)."""
        loaded = self.part_of(run_id)
        with contextlib.suppress(KeyError):  # dropped meanwhile: this search still has it
            self.versions.move_to_end(run_id)
        return loaded

    def prepare(self, run_id: str) -> float:
        """Have run_id's part open; its load seconds."""
        return self.part_of(run_id).load_s

    def _watch_current(self) -> None:
        output, refused = Store(self.config.index), None
        while True:
            time.sleep(self.config.poll_interval)
            named = None
            try:
                named = current_run_id(output)
                if named and named not in self.versions and named != refused:
                    self.prepare(named)
            except Exception as exc:  # keep serving what is loaded; the router reports the version it cannot serve
                if named != refused:
                    log.warning(
                        "shard %d: not loading the version %s names (%s): %s",
                        self.part,
                        output.url(CURRENT),
                        named,
                        user_message(exc),
                    )
                refused = named

    async def search(
        self,
        run_id: str,
        x: np.ndarray,
        coarse_distances: np.ndarray,
        coarse_lists: np.ndarray,
        k: int,
        matching: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """This part's k best among the probed lists it owns, of version run_id, among `matching` ids (all when
        None); in a thread, so that the router's batches in flight are searched at once (FAISS releases the GIL)."""
        return await asyncio.to_thread(self._search, run_id, x, coarse_distances, coarse_lists, k, matching)

    def _search(
        self,
        run_id: str,
        x: np.ndarray,
        coarse_distances: np.ndarray,
        coarse_lists: np.ndarray,
        k: int,
        matching: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        loaded = self.searched(run_id)
        selector = id_selector(matching) if matching is not None else None
        found = search_part(loaded.index, loaded.owned, x, coarse_distances, coarse_lists, k, selector)
        self.searches, self.search_s = self.searches + 1, self.search_s + time.perf_counter() - start
        return found

    async def search_lexical(
        self, run_id: str, terms: np.ndarray, k: int, matching: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This part's k best passages by BM25 of version run_id, (ids, scores) best first, ties to the lower
        id, among `matching` ids (all when None), filtered inside the scoring, and the terms' document
        frequencies among its passages (the router sums them: hybrid fusion's BM25 ceiling); in a thread, as
        search."""
        return await asyncio.to_thread(self._search_lexical, run_id, terms, k, matching)

    def _search_lexical(
        self, run_id: str, terms: np.ndarray, k: int, matching: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        loaded = self.searched(run_id)
        if loaded.postings is None:
            raise RayIndexError(
                f"part {self.part} of version {run_id} holds no lexical postings; run `rayindex partition --shards "
                f"{self.shards}` again"
            )
        ids, scores = search_postings(loaded.postings, terms, k, allowed_ids(matching))
        return ids, scores, term_doc_freqs(loaded.postings, terms)

    def stats(self) -> dict:
        """pid, memory, the versions loaded (with their load seconds), and the dense searches answered (calls, and
        their seconds in this shard's search, not counting Serve's call): for benchmarks and operators."""
        import os

        return {
            "part": self.part,
            "pid": os.getpid(),
            **memory_mb(),
            "versions": {run_id: round(part.load_s, 3) for run_id, part in self.versions.items()},
            "searches": self.searches,
            "search_s": self.search_s,
        }


class ShardedSearch:
    """The router's side of one version: its coarse quantizer, which part owns each list, and the shard
    deployments' handles. search() has PublishedIndex.search_vectors's contract."""

    def __init__(
        self,
        run_id: str,
        trained: faiss.Index,
        owner: np.ndarray,
        handles: list,
        timeout_s: float,
        partial_ok: bool,
        lexical: bool = False,
    ):
        self.run_id, self.trained, self.owner, self.handles = run_id, trained, owner, handles
        self.timeout_s, self.partial_ok = timeout_s, partial_ok
        self.lexical = lexical  # the shards hold the postings: send_lexical
        self.larger_is_better = larger_is_better(trained)
        self.failing: dict[int, str] = {}  # shard -> why its last call failed (cleared by its next answer): /healthz

    def prepare(self) -> None:
        """Ask every shard to load this version before the router swaps to it (one replica each; the others
        load it from their own watch of CURRENT, or on the first request)."""
        for shard, handle in enumerate(self.handles):
            try:
                handle.prepare.remote(self.run_id).result(timeout_s=max(60.0, self.timeout_s))
            except Exception as exc:  # it loads on demand then
                log.warning("shard %d did not prepare %s: %s", shard, self.run_id, user_message(exc))

    def search(
        self, vectors: np.ndarray, k: int, nprobe: int, matching: np.ndarray | None = None, missing: set | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best over all shards: each asked only when it owns a probed list, all at once, within one
        deadline. A shard that fails: Unavailable, or (partial_ok) its number added to `missing`."""
        x, coarse_distances, coarse_lists = coarse_assign(self.trained, vectors, nprobe)
        calls = {
            shard: self.handles[shard].search.remote(self.run_id, x, coarse_distances, coarse_lists, k, matching)
            for shard in parts_needed(self.owner, coarse_lists)
        }
        results = self.gather(calls, missing)
        if not results:
            return empty_results(len(vectors), k, self.larger_is_better)
        return merge_part_results(results, k, self.larger_is_better)

    def send_lexical(self, terms: np.ndarray, k: int, matching: np.ndarray | None = None) -> "SentLexical":
        """Ask every shard (any may hold matching passages) for its k best passages by BM25 for a query's term
        hashes, and the terms' document frequencies among its passages; gathered by the result's result(), whose
        deadline counts from now (a hybrid search sends these before its dense search, gathers them after)."""
        calls = {}
        if len(terms):
            calls = {
                shard: handle.search_lexical.remote(self.run_id, terms, k, matching)
                for shard, handle in enumerate(self.handles)
            }
        return SentLexical(self, calls, len(terms), k, time.monotonic() + self.timeout_s)

    def gather(self, calls: dict, missing: set | None, deadline: float | None = None) -> list:
        """The answers of the shards called (shard -> call), by one deadline (time.monotonic(); default: the shard
        timeout from now). A shard that fails: Unavailable, or (partial_ok) its number added to `missing`."""
        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        results = []
        for shard, call in calls.items():
            try:
                results.append(call.result(timeout_s=max(0.0, deadline - time.monotonic())))
                self.failing.pop(shard, None)
            except Exception as exc:  # a dead replica, a timeout, a part that cannot load
                self.failing[shard] = user_message(exc)
                if not self.partial_ok:
                    for other in calls.values():
                        other.cancel()
                    raise Unavailable(
                        f"serving shard {shard} of {len(self.handles)} did not answer within {self.timeout_s:g} s "
                        f"({user_message(exc)}); retry, or serve with on_shard_failure=partial"
                    ) from None
                if missing is not None:
                    missing.add(shard)
        return results


class SentLexical(NamedTuple):
    """A lexical search sent to every serving shard (ShardedSearch.send_lexical), not yet gathered: query/search.py
    PendingLexical."""

    sharded: ShardedSearch
    calls: dict  # shard -> its call
    terms: int  # how many the query has
    k: int
    deadline: float  # time.monotonic() by which every shard answers

    def result(self, missing: set | None = None) -> LexicalPassages:
        """The k best passages, (ids, scores) best first, ties to the lower id: every shard's k best, merged; and
        the terms' document frequencies, the shards' summed (their passages are disjoint). A shard that fails:
        as in ShardedSearch.search."""
        answers = self.sharded.gather(self.calls, missing, self.deadline)
        doc_freqs = np.zeros(self.terms, np.int64)
        for _, _, freqs in answers:
            doc_freqs += freqs
        return LexicalPassages(*merge_top([(ids, scores) for ids, scores, _ in answers], self.k), doc_freqs)

    def cancel(self) -> None:
        for call in self.calls.values():
            call.cancel()


def current_split(output: str, shards: int) -> tuple[Store, Store, Manifest, list[ServingPart]]:
    """The output's store, the store and manifest of the version CURRENT names, and its split for `shards`."""
    root = Store(output)
    version, manifest = published_version(root, current_published_id(root))
    return root, version, manifest, serving_split(manifest, shards, version.url(MANIFEST))


def open_router(config: AppConfig, handles: list) -> PublishedIndex:
    """The version CURRENT names, opened as the router of `rayindex serve --shards N`: trained.faiss (coarse
    quantizer, pre-transforms) pulled and checked, the split checked, the doc store; no inverted list, and no
    postings when the parts hold them (a version split before they did: the whole postings, scored here)."""
    root, version, manifest, split = current_split(config.index, config.shards)
    if manifest.refine_factor and manifest.refine_factor > 1:
        raise RayIndexError(
            f"{version.url(MANIFEST)}: re-ranking (refine factor {manifest.refine_factor}) needs every vector's "
            "fp16 copy where the shards' results meet; serve this version without --shards, or tune it without "
            "re-ranking"
        )
    lexical = {}
    split_lexical = manifest.parts_hold_postings(config.shards)
    if manifest.lexical and not split_lexical:
        log.warning(
            "%s: the parts for %d serving shards hold no lexical postings (split before they did): the router "
            "scores BM25 from the whole postings; run `rayindex partition --shards %d` to give each shard its own",
            version.url(MANIFEST),
            config.shards,
            config.shards,
        )
        lexical = {rel: manifest.files_sha256[rel] for rel in manifest.lexical.files}
    version_dir = pull_version_files(
        root, version, manifest, {TRAINED_FILE: manifest.training.trained_sha256, **lexical}
    )
    sharded = ShardedSearch(
        manifest.run_id,
        read_index(version_dir / TRAINED_FILE),
        list_owner(split, manifest.nlist),
        handles,
        config.shard_timeout,
        config.on_shard_failure == "partial",
        split_lexical,
    )
    return open_version(version_dir, manifest, sharded)
