"""What checking a serving file against its sha256 costs when a version is opened: the first open reads
and hashes the file, a reopen of the unchanged file costs a stat (infra/storage.file_matches remembers
size, mtime, ctime and inode); a changed file is hashed again and refused.

    python benchmarks/verify_benchmark.py [--gib 1] [--dir /tmp] [--json docs/benchmark-verify.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from rayindex.infra.storage import file_matches, file_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, tempfile.TemporaryDirectory() as cache:
        os.environ["RAYINDEX_CACHE"] = cache
        path = Path(tmp) / "index.ivfdata"
        block = os.urandom(1 << 24)
        with open(path, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)
        start = time.perf_counter()
        sha = file_sha256(path)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        assert file_matches(path, sha)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(100):
            assert file_matches(path, sha)
        again = (time.perf_counter() - start) / 100
        with open(path, "r+b") as fh:  # one flipped byte: the stamp changes, the file is hashed again and refused
            fh.seek(size // 2)
            byte = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([byte[0] ^ 1]))
        start = time.perf_counter()
        refused = not file_matches(path, sha)
        changed = time.perf_counter() - start
    figures = {
        "bytes": size,
        "sha256_s": round(plain, 2),
        "first_open_s": round(first, 2),
        "reopen_ms": round(again * 1000, 3),
        "after_a_change_s": round(changed, 2),
        "refused_after_change": refused,
        "hashlib": hashlib.sha256().name,
        "mb_per_s": round(size / plain / 1e6),
    }
    print(json.dumps(figures, indent=2))
    print(
        f"first open {first:.2f} s for {args.gib:g} GiB ({figures['mb_per_s']} MB/s), reopen {again * 1000:.3f} ms "
        f"({first / again:,.0f}x less), a changed file refused after {changed:.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
