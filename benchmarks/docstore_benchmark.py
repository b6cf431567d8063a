"""The doc store read on demand: what opening a version costs, and a lookup, for doc stores of two sizes,
read in place (a local output) and by byte ranges from S3 (--s3: the tests' SeaweedFS on 127.0.0.1).
The doc store is never copied to a serving node, so startup should not grow with it.

    python benchmarks/docstore_benchmark.py [--small 20000] [--large 2000000] [--shards 8] [--s3] [--json
    docs/benchmark-docstore.json]

For each size: synthetic passages (~300 characters, a row per passage) written with DocWriter across
--shards shards into a published version with a small merged index (the same for both sizes: only the
doc store differs). Measured, each with an empty node-local cache:
- startup as serving does it: open_current (CURRENT, the manifest, the serving files pulled and checked)
  and open_version (the memory-mapped index, DocStore construction);
- what the layout before on-demand reads added to it: every docs.parquet and vector_ids.npy pulled and
  checked by sha256 (Store.pull, as open_current did);
- the first lookup in each shard (the file opened, its footer read and checked, one row group read);
- lookups of ids spread over the store, each in a row group not read before (one row group read each),
  then the same ids again (served from the cache of decoded row groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from rayindex.config import BuildConfig
from rayindex.docstore.format import ROW_GROUP_ROWS, footer_sha256
from rayindex.docstore.writer import DocWriter
from rayindex.infra.storage import Store, file_sha256
from rayindex.ivf.index import write_index
from rayindex.layout import (
    CURRENT,
    DOCS_FILE,
    INDEX_INFOS_FILE,
    MANIFEST,
    MERGED_FILE,
    PASSAGE_BITS,
    VECTOR_IDS_FILE,
    shard_dir,
    shard_rel,
)
from rayindex.manifest import Manifest, MergedIndex, Shard, ShardState, now_iso
from rayindex.query.search import open_version
from rayindex.versions import new_run_id, open_current, version_rel

BATCH = 2_048  # rows per DocWriter.write, as the encoder writes a corpus batch
INDEX_VECTORS, DIM = 4_096, 16  # the merged index: small, and the same for every size
LOOKUPS = 300  # at most: one per row group
STARTUPS = 5  # startups timed (the median is reported), each with an empty cache


def synthetic_texts(rng: np.random.Generator, n: int) -> list[str]:
    """n passages of ~300 characters of random words (compressible like prose, no two alike)."""
    words = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 10)))) for _ in range(5_000)
    ]
    return [" ".join(rng.choice(words, size=50)) for _ in range(n)]


def write_version(output: Path, rows: int, shards: int, seed: int) -> None:
    """A published version of `rows` passages in `shards` doc-store shards and a small merged index."""
    rng = np.random.default_rng(seed)
    pool = synthetic_texts(rng, 4_096)
    run_id = new_run_id()
    version = output / version_rel(run_id)
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    files, records, states = {}, [], []
    for s, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        folder = shard_dir(version, s)
        with DocWriter(folder) as writer:
            for start in range(lo, hi, BATCH):
                rows_here = np.arange(start, min(hi, start + BATCH))
                texts = [
                    f"{r} {pool[k]}"
                    for r, k in zip(rows_here.tolist(), rng.integers(len(pool), size=len(rows_here)).tolist())
                ]
                writer.write(
                    rows_here << PASSAGE_BITS,
                    pa.array([f"doc-{r}" for r in rows_here.tolist()]),
                    pa.array(np.zeros(len(rows_here), bool)),
                    np.zeros(len(rows_here)),
                    np.zeros(len(rows_here)),
                    np.fromiter(map(len, texts), np.int64, len(texts)),
                    pa.array(texts),
                    pa.array([json.dumps({"section": str(r % 9)}) for r in rows_here.tolist()]),
                )
        for name in (DOCS_FILE, VECTOR_IDS_FILE):
            files[shard_rel(s, name)] = file_sha256(folder / name)
        records.append(Shard(shard_id=s, pieces=[], global_start=lo, global_end=hi))
        states.append(
            ShardState(
                shard_id=s, docs_encoded=hi - lo, passages=hi - lo, docs_footer_sha256=footer_sha256(folder / DOCS_FILE)
            )
        )
    vectors = rng.standard_normal((INDEX_VECTORS, DIM)).astype(np.float32)
    index = faiss.index_factory(DIM, "IVF16,Flat")
    index.train(vectors)
    index.add(vectors)
    write_index(index, version / MERGED_FILE)
    (version / INDEX_INFOS_FILE).write_text(json.dumps({"benchmark": "docstore"}))
    files |= {name: file_sha256(version / name) for name in (MERGED_FILE, INDEX_INFOS_FILE)}
    manifest = Manifest(
        run_id=run_id,
        created_at=now_iso(),
        status="published",
        config=BuildConfig(inputs=["synthetic"], output=str(output)),
        config_fingerprint="docstore-benchmark",
        shards=records,
        shard_states=states,
        dimension=DIM,
        nprobe=4,
        merge=MergedIndex(on_disk=False, ntotal=INDEX_VECTORS, files=[MERGED_FILE]),
        files_sha256=files,
    )
    (version / MANIFEST).write_text(manifest.to_json())
    (output / CURRENT).write_text(run_id + "\n")


def with_empty_cache(fn):
    """fn() with a new, empty node-local cache (RAYINDEX_CACHE): nothing pulled or verified before."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["RAYINDEX_CACHE"] = cache
        try:
            return fn()
        finally:
            del os.environ["RAYINDEX_CACHE"]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(output: str) -> dict:
    """Startup, the earlier layout's extra startup, and lookup latencies of the version at output."""

    def serving():
        index = open_version(*open_current(output))
        manifest, docs = index.manifest, index.docs
        firsts = [timed(lambda s=s: docs.get(s.global_start << PASSAGE_BITS))[0] for s in manifest.shards]
        total = manifest.shards[-1].global_end
        spread = np.linspace(ROW_GROUP_ROWS // 2, total - 1, min(LOOKUPS, total // (2 * ROW_GROUP_ROWS))).astype(
            np.int64
        )
        ids = (
            np.random.default_rng(0).permutation(spread) << PASSAGE_BITS
        )  # more than a row group apart: none read before
        uncached = [timed(lambda v=v: docs.get(int(v)))[0] for v in ids]
        cached = [timed(lambda v=v: docs.get(int(v)))[0] for v in ids]
        return {
            "first_lookup_ms": 1000 * float(np.median(firsts)),
            "uncached_lookup_ms": 1000 * float(np.median(uncached)),
            "uncached_lookup_p99_ms": 1000 * float(np.percentile(uncached, 99)),
            "cached_lookup_ms": 1000 * float(np.median(cached)),
            "manifest": manifest,
        }

    startups = [
        with_empty_cache(lambda: timed(lambda: open_version(*open_current(output)))[0]) for _ in range(STARTUPS)
    ]
    figures = with_empty_cache(serving) | {"startup_s": float(np.median(startups))}
    manifest = figures.pop("manifest")
    version = Store(Store(output).url(version_rel(manifest.run_id)))
    doc_files = manifest.shard_files((DOCS_FILE, VECTOR_IDS_FILE))
    figures["earlier_extra_startup_s"] = with_empty_cache(
        lambda: timed(lambda: version.pull(doc_files, verify=True))[0]
    )
    return figures


def seaweedfs(folder: Path):
    """The tests' SeaweedFS (tests/conftest.py), started on a free port, with its client settings in the environment."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import SeaweedFS  # sets AWS_ENDPOINT_URL and the test credentials on import

    folder.mkdir(parents=True)
    server = SeaweedFS(folder)
    server.start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--s3", action="store_true", help="also through S3: the tests' SeaweedFS, started here")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results, sizes = {}, {"small": args.small, "large": args.large}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        server = seaweedfs(Path(tmp) / "seaweedfs") if args.s3 else None
        try:
            for label, rows in sizes.items():
                output = Path(tmp) / label
                write_seconds, _ = timed(
                    lambda output=output, rows=rows: write_version(output, rows, args.shards, seed=rows)
                )
                doc_bytes = sum(p.stat().st_size for p in output.rglob(DOCS_FILE))
                print(
                    f"{label}: {rows:,} passages, {doc_bytes / 1e6:,.0f} MB of docs.parquet in {args.shards} shards, "
                    f"written in {write_seconds:.1f} s"
                )
                results[("local", label)] = measure(str(output)) | {"rows": rows, "doc_bytes": doc_bytes}
                if server is not None:
                    url = f"s3://{server.bucket}/docstore-{label}"
                    server.fs.put(str(output) + "/", url, recursive=True)
                    results[("s3", label)] = measure(url) | {"rows": rows, "doc_bytes": doc_bytes}
        finally:
            if server is not None:
                server.stop()
    report(results, args.json)


def report(results: dict, json_path: Path | None) -> None:
    table = Table(title="doc store read on demand: startup and lookups")
    for column in (
        "store",
        "passages",
        "docs.parquet MB",
        "startup s",
        "earlier layout: + s",
        "first lookup ms",
        "row group read ms (p99)",
        "cached ms",
    ):
        table.add_column(column, justify="right")
    for (where, _label), r in results.items():
        table.add_row(
            where,
            f"{r['rows']:,}",
            f"{r['doc_bytes'] / 1e6:,.0f}",
            f"{r['startup_s']:.3f}",
            f"{r['earlier_extra_startup_s']:.2f}",
            f"{r['first_lookup_ms']:.1f}",
            f"{r['uncached_lookup_ms']:.2f} ({r['uncached_lookup_p99_ms']:.2f})",
            f"{r['cached_lookup_ms']:.3f}",
        )
    console = Console(width=150)
    console.print(table)
    for where in sorted({w for w, _ in results}):
        small, large = results[(where, "small")], results[(where, "large")]
        console.print(
            f"{where}: {large['rows'] / small['rows']:,.0f}x the passages: "
            f"startup x{large['startup_s'] / small['startup_s']:.2f}, "
            f"the earlier layout's extra startup "
            f"x{large['earlier_extra_startup_s'] / small['earlier_extra_startup_s']:.0f}, "
            f"first lookup x{large['first_lookup_ms'] / small['first_lookup_ms']:.2f}, "
            f"lookup with a row group read x{large['uncached_lookup_ms'] / small['uncached_lookup_ms']:.2f}"
        )
    if json_path:
        rounded = [
            {"store": w, "size": label, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}
            for (w, label), r in results.items()
        ]
        json_path.write_text(json.dumps(rounded, indent=2))


if __name__ == "__main__":
    main()
