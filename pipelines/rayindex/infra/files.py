"""Local file I/O that the stages, the query side and the store share: memory-mapping a shard's stored
vectors, reading a uniform sample of them, writing a file atomically (temp file, fsync, rename, fsync of
the folder), a full disk reported as one line naming the file, and making a whole version durable (and
free of temp files) before it is published."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rayindex.errors import RayIndexError
from rayindex.layout import EMBEDDINGS_FILE, FP16_FILE

# a disk, a quota or the file size limit full: the write failed for want of space, not for its content
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# the temporary names of a file being written (atomic_file), downloaded (Store.pull) or created
# (Store.create_exclusive): ".<name>.<pid>[.<random>].<suffix>"
TEMP_SUFFIXES = (".tmp", ".download", ".new")


class DiskFull(RayIndexError, OSError):
    """A write failed for want of space; the message names the file (one line, also from a Ray worker). Still
    an OSError, for whoever catches write failures as such."""


def no_space(exc: BaseException) -> str | None:
    """The system's message when exc says there is no space left to write (ENOSPC, EDQUOT, EFBIG), else
    None. Looks through a Ray task's error (its cause) and the exceptions it wraps, and into the text of a
    library's error: FAISS raises RuntimeError("... write error in x.faiss: 4051 != 512000 (No space left on
    device)"), pyarrow an OSError without errno whose text carries the system's message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return os.strerror(exc.errno)
        for code in NO_SPACE:
            if os.strerror(code) in str(exc):
                return os.strerror(code)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def disk_full(path: str | Path, reason: str) -> DiskFull:
    return DiskFull(
        f"no space left to write {path} ({reason}): free space on that file system (or raise the file size "
        "limit), or choose another --output; nothing was published, and re-running the same command resumes"
    )


def load_embeddings(directory: str | Path, count: int, dim: int, name: str = EMBEDDINGS_FILE) -> np.ndarray:
    """Memory-map one shard's stored vectors (float32, or float16 for FP16_FILE)."""
    dtype = "<f2" if name == FP16_FILE else "<f4"
    if count == 0:
        return np.zeros((0, dim), dtype)
    return np.memmap(Path(directory) / name, dtype=dtype, mode="r", shape=(count, dim))


def sample_rows(counts: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Uniform sample of `size` of all rows without replacement, as sorted local row numbers per shard."""
    total = int(sum(counts))
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [picks[(picks >= lo) & (picks < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def read_sample(shard_dirs: list[Path], counts: list[int], dim: int, size: int, seed: int) -> np.ndarray:
    """A uniform sample of the stored vectors across shards (sample_rows), read from their memory maps."""
    parts = [
        np.asarray(load_embeddings(d, n, dim)[rows])
        for d, n, rows in zip(shard_dirs, counts, sample_rows(counts, size, seed))
        if len(rows)
    ]
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in the folder durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block succeeds the file is fsynced and renamed
    over `path` (so readers see the old file or the new one, whole), else the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as exc:
        reason = no_space(exc)
        if reason is None or isinstance(exc, DiskFull):
            raise
        raise disk_full(path, reason) from exc
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIXES)


def remove_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files and folders under directory (a writer killed mid-write leaves its .<name>.<pid>.tmp behind:
    atomic_file's cleanup never ran); returns them. Only for a folder no one is writing into any more: a
    version about to be published, under the output lock, its encoders and tasks finished."""
    removed = []
    for root, dirs, files in os.walk(directory, topdown=False):  # a temp folder's files before the folder
        for name in files:
            if is_temp_file(name):
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(path)
        for name in dirs:  # a temp folder (the BM25 merge's buckets, tempfile's): empty once its files are gone
            path = Path(root) / name
            if is_temp_file(name) and not any(path.iterdir()):
                path.rmdir()
                removed.append(path)
    return removed


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and folder under directory (and the folder itself): what a version needs on disk
    before CURRENT may point at it (a power loss must not publish files that were still in the page cache)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save to exactly this path (np.save given a name adds ".npy" to one that lacks it)."""
    with open(path, "wb") as fh:
        np.save(fh, array)
