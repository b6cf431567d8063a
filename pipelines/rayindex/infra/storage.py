"""Where a build's files live: a local folder, or an object store (s3://, or any fsspec URL).

Stages read and write files in a node-local folder: the output itself when it is local, otherwise
a mirror of the output under the cache folder (FAISS, numpy memory maps and Parquet want local
files). A stage running against a remote output pushes what it wrote, and a stage on another node
pulls what it needs into its own mirror, each file verified by its sha256 from the manifest. So
resuming on another machine, and serving from S3, both go through the same checksummed mirror.

A mirror records the URL of the store it mirrors (ORIGIN_FILE), so a reader holding only the
folder finds the store again (Store.of_folder): the doc store is not mirrored but read from the store
on demand, by byte ranges (Store.random_access, docstore/reader.py).

Every remote call is retried with backoff until a deadline (an outage of the store is waited
out); past it the error names the object and says that re-running the same command resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.utils import merge_offset_ranges

from rayindex.errors import RayIndexError, Unavailable
from rayindex.infra.files import fsync_dir, write_text_atomic
from rayindex.layout import safe_rel

T = TypeVar("T")
DEFAULT_RETRY_S = 300.0
# byte ranges closer than this are read as one GET (read_ranges): a request's latency (tens of ms to S3) costs
# more than reading the gap between them (1 MiB: ~10 ms at 100 MB/s), so a dense sample reads whole spans
RANGE_GAP = 1 << 20
ORIGIN_FILE = ".origin"  # in a mirror: the URL of the store it mirrors (Store.of_folder)
ON_DEMAND_ADVICE = "It is read from the store on demand: the request fails until the store answers again"
RESUME_ADVICE = (
    "Nothing was published; re-run the same command when the store is back and the run resumes where it stopped"
)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def use_s3_endpoint(endpoint: str | None) -> None:
    """--s3-endpoint: this process's S3 client (botocore reads AWS_ENDPOINT_URL) uses it; Ray workers get
    it through the runtime environment (ray_session.connect), Serve replicas from their config (serve.py)."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def cache_root() -> Path:
    """Node-local cache: RAYINDEX_CACHE, else ~/.cache/rayindex."""
    return Path(os.environ.get("RAYINDEX_CACHE") or Path.home() / ".cache" / "rayindex")


def inside(rel: str, store: Store) -> str:
    """rel, refused (naming the store) unless it is a relative path of plain names inside the store."""
    try:
        return safe_rel(rel, store.output)
    except ValueError as exc:
        raise RayIndexError(f"{exc}: refused, nothing outside the output or its cache is read or written") from None


def _stamp(path: Path) -> list[int]:
    """What changes whenever the file's bytes do: size, mtime, ctime and inode (ctime changes on every write
    and cannot be set back)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _records_file(path: Path) -> Path:
    return cache_root() / "verified" / (hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:20] + ".json")


def _records(path: Path) -> dict:
    try:
        return json.loads(_records_file(path).read_text())
    except (OSError, ValueError):
        return {}


def _remember(path: Path, stamp: list[int], sha256: str) -> None:
    records = _records(path)
    records[path.name] = [*stamp, sha256]
    try:
        write_text_atomic(_records_file(path), json.dumps(records))
    except OSError:
        pass  # a read-only cache only costs a re-check next time


def file_matches(path: Path, sha256: str) -> bool:
    """Whether the file's content has this sha256. The answer is remembered per node, keyed by the file's
    stamp (_stamp), so checking an unchanged file again costs a stat instead of reading it (measured in
    docs/storage.md)."""
    stamp = _stamp(path)
    if _records(path).get(path.name) == [*stamp, sha256]:
        return True
    if file_sha256(path) != sha256:
        return False
    _remember(path, stamp, sha256)
    return True


def written_sha256(path: Path) -> str:
    """The sha256 of a file this process has just written, remembered like file_matches' answers: checking
    it before publishing then costs a stat, unless its bytes changed since (its stamp did too)."""
    stamp = _stamp(path)
    sha256 = file_sha256(path)
    if _stamp(path) == stamp:  # not written to while it was read
        _remember(path, stamp, sha256)
    return sha256


class StorageUnavailable(Unavailable):
    """The store did not answer within the retry deadline (a server answers 503, not the request's fault)."""


@dataclass(frozen=True)
class Store:
    """The output of a build (a local folder or a URL) and the node-local folder that mirrors it.

    Picklable (plain strings), so Ray tasks receive it and build their own filesystem client."""

    output: str
    retry_s: float = DEFAULT_RETRY_S

    @property
    def remote(self) -> bool:
        return is_remote(self.output)

    @property
    def local_root(self) -> Path:
        if not self.remote:
            return Path(self.output)
        digest = hashlib.sha256(self.output.rstrip("/").encode()).hexdigest()[:12]
        name = self.output.rstrip("/").rsplit("/", 1)[-1] or "root"
        return cache_root() / "stores" / f"{name}-{digest}"

    def local(self, rel: str) -> Path:
        """The mirror's path of rel, which must stay inside (names read from the store are checked)."""
        return self.local_root / inside(rel, self)

    def url(self, rel: str) -> str:
        return f"{self.output.rstrip('/')}/{inside(rel, self)}" if rel else self.output

    @classmethod
    def of_folder(cls, folder: str | Path, retry_s: float = DEFAULT_RETRY_S) -> Store:
        """The store whose node-local folder this is: the remote store a mirror mirrors (the URL that
        pull and push record in it), else the folder itself (a local output)."""
        try:
            return cls((Path(folder) / ORIGIN_FILE).read_text().strip(), retry_s)
        except FileNotFoundError:
            return cls(str(folder), retry_s)

    def _record_origin(self) -> None:
        """Name this store in its mirror (of_folder), once."""
        marker = self.local_root / ORIGIN_FILE
        if not marker.exists():
            write_text_atomic(marker, self.output)

    def _fs(self):
        # no listing cache: other processes (workers, a concurrent run) write to the same prefix
        fs, root = fsspec.core.url_to_fs(self.output, use_listings_cache=False, skip_instance_cache=True)
        return fs, root.rstrip("/")

    def retry(
        self, what: str, fn: Callable[[], T], retry_on: tuple[type[Exception], ...] = (), advice: str = RESUME_ADVICE
    ) -> T:
        """fn() retried with exponential backoff (0.5 s .. 15 s, jittered) until retry_s has passed, then
        StorageUnavailable naming what and ending with advice.

        Missing objects and refused preconditions are answers, not outages: they are raised at once,
        as are RayIndexErrors other than those in retry_on."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.5
        while True:
            try:
                return fn()
            except retry_on as exc:
                if time.monotonic() + delay > deadline:
                    raise self.gave_up(what, exc, advice) from exc
            except (FileNotFoundError, FileExistsError, PermissionError, RayIndexError):
                raise
            except Exception as exc:  # connection refused/reset, timeouts, 5xx: the store is down or overloaded
                if is_precondition_failure(exc):
                    raise FileExistsError(what) from exc
                if time.monotonic() + delay > deadline:
                    raise self.gave_up(what, exc, advice) from exc
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 15.0)

    def gave_up(self, what: str, exc: Exception, advice: str = RESUME_ADVICE) -> StorageUnavailable:
        return StorageUnavailable(
            f"storage unavailable: could not {what} within {self.retry_s:.0f} s ({type(exc).__name__}: {exc}). {advice}"
        )

    # -- whole files between the mirror and the store ------------------------------------------
    def push(self, rels: list[str], keep: bool = True) -> None:
        """Upload these mirror files to the store (no-op for a local output). keep=False: once the store
        holds each file at its local size, the mirror's copies are deleted (drop_local): a node that writes
        shards does not keep every one it pushed; whoever reads them later pulls them, checked."""
        if not self.remote:
            return
        self._record_origin()
        fs, root = self._fs()
        for rel in rels:
            self.retry(f"write {self.url(rel)}", lambda rel=rel: fs.put_file(str(self.local(rel)), f"{root}/{rel}"))
        if keep:
            return
        for rel in rels:
            written = self.local(rel).stat().st_size
            stored = self.retry(f"check {self.url(rel)}", lambda rel=rel: fs.info(f"{root}/{rel}")["size"])
            if stored != written:
                raise RayIndexError(
                    f"{self.url(rel)} holds {stored} bytes after the upload of {written}: the upload was cut "
                    f"short; {RESUME_ADVICE}"
                )
        self.drop_local(rels)

    def drop_local(self, rels: list[str]) -> None:
        """Delete the mirror's copies of these files of a remote store (a local output's are the output)."""
        if not self.remote:
            return
        for rel in rels:
            self.local(rel).unlink(missing_ok=True)

    def read_ranges(self, rel: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """These byte ranges [start, end) of one file, without copying the file whole: read in place for a
        local output; from a remote store as byte-range GETs, ranges less than RANGE_GAP apart read as one
        (fsspec's merge_offset_ranges) and fetched concurrently (cat_ranges), retried until the deadline.
        A range the file does not hold whole is refused, naming the file."""
        if not self.remote:
            with open(self.local(rel), "rb") as fh:
                chunks = [os.pread(fh.fileno(), end - start, start) for start, end in zip(starts, ends)]
        else:
            fs, root = self._fs()
            path = f"{root}/{rel}"
            _, merged_starts, merged_ends = merge_offset_ranges(
                [path] * len(starts), list(starts), list(ends), max_gap=RANGE_GAP, sort=False
            )

            def fetch() -> list[bytes]:
                blocks = fs.cat_ranges([path] * len(merged_starts), merged_starts, merged_ends, on_error="raise")
                return [bytes(b) for b in blocks]

            blocks = self.retry(f"read {self.url(rel)}", fetch)
            chunks, block = [], 0
            for start, end in zip(starts, ends):
                while merged_ends[block] < end:
                    block += 1
                offset = start - merged_starts[block]
                chunks.append(blocks[block][offset : offset + end - start])
        for start, end, chunk in zip(starts, ends, chunks):
            if len(chunk) != end - start:
                raise RayIndexError(
                    f"{self.url(rel)} ends before byte {end}: shorter than its manifest says; the version is "
                    "damaged, rebuild it"
                )
        return chunks

    def pull(self, files: dict[str, str], verify: bool = False) -> None:
        """Make these files (rel path -> sha256) present and intact in the mirror.

        Remote: a file missing or different locally is downloaded and checked. Local output: nothing
        to fetch; with verify=True each file is checked (a resumed run trusts no file unchecked; a file
        checked before and unchanged since costs a stat, file_matches)."""
        fs, root = self._fs() if self.remote else (None, None)
        if self.remote:
            self._record_origin()
        for rel, sha in files.items():
            path = self.local(rel)
            if path.exists() and (not verify or file_matches(path, sha)):
                continue
            if not self.remote:
                state = "is missing" if not path.exists() else "does not match its checksum in the manifest"
                raise FileNotFoundError(f"{path} {state}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.download")
            try:
                self.retry(f"read {self.url(rel)}", lambda rel=rel, tmp=tmp: fs.get_file(f"{root}/{rel}", str(tmp)))
                if not file_matches(tmp, sha):
                    raise RayIndexError(
                        f"{self.url(rel)} does not match its checksum in the manifest; the version is damaged, "
                        "rebuild it"
                    )
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def verified(self, files: dict[str, str]) -> bool:
        """True when every file is in the store with the recorded content (pulled into the mirror)."""
        try:
            self.pull(files, verify=True)
            return True
        except (FileNotFoundError, RayIndexError) as exc:
            if isinstance(exc, StorageUnavailable):
                raise
            return False

    def random_access(self) -> Callable[[str], BinaryIO]:
        """A function opening files of this store (rel paths) for random reads, without copying them: in
        place for a local output; for a remote one as objects whose every read is a byte-range GET
        retried until the deadline (then failing naming the object), all through one client, made on
        first use (making one costs ~0.2-0.5 s, measured). FileNotFoundError for a missing file."""
        if not self.remote:
            return lambda rel: open(self.local(rel), "rb")
        client: list = []
        making = threading.Lock()

        def open_remote(rel: str) -> BinaryIO:
            with making:
                if not client:
                    client.append(self._fs())
            fs, root = client[0]
            url = self.url(rel)
            # no read-ahead cache: readers ask for exactly the bytes they use (a Parquet footer, a row group's
            # column chunks in one coalesced read), and anything read ahead of a random lookup is wasted
            remote = self.retry(f"open {url}", lambda: fs.open(f"{root}/{rel}", "rb", cache_type="none"))
            return RetriedReads(remote, lambda read: self.retry(f"read {url}", read, advice=ON_DEMAND_ADVICE))

        return open_remote

    # -- small objects: manifests, CURRENT, the lock -------------------------------------------
    def read_text(self, rel: str) -> str | None:
        """The object's text, or None when it does not exist."""
        if not self.remote:
            try:
                return self.local(rel).read_text()
            except FileNotFoundError:
                return None
        fs, root = self._fs()
        try:
            return self.retry(f"read {self.url(rel)}", lambda: fs.cat_file(f"{root}/{rel}").decode())
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Replace the object atomically: temp file + fsync + rename locally, one PUT remotely."""
        if not self.remote:
            write_text_atomic(self.local(rel), text)
            return
        fs, root = self._fs()
        self.retry(f"write {self.url(rel)}", lambda: fs.pipe_file(f"{root}/{rel}", text.encode()))

    def create_exclusive(self, rel: str, text: str) -> None:
        """Create the object with this content only if it does not exist, atomically (a complete temp file
        hard-linked into place locally, so no reader sees it half-written; If-None-Match: * on S3);
        FileExistsError when it does."""
        if not self.remote:
            path = self.local(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
            try:
                with open(staged, "w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(staged, path)  # fails if path exists: the create is the link, of a complete file
                fsync_dir(path.parent)
            finally:
                staged.unlink(missing_ok=True)
            return
        fs, root = self._fs()
        self.retry(f"create {self.url(rel)}", lambda: fs.pipe_file(f"{root}/{rel}", text.encode(), mode="create"))

    def list_files(self, rel: str) -> list[str]:
        """Names of the files directly under rel (empty when rel does not exist)."""
        if not self.remote:
            path = self.local(rel)
            return (
                sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
                if path.is_dir()
                else []
            )
        fs, root = self._fs()
        try:
            entries = self.retry(f"list {self.url(rel)}", lambda: fs.ls(f"{root}/{rel}", detail=True, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

    def delete(self, rel: str) -> None:
        if not self.remote:
            self.local(rel).unlink(missing_ok=True)
            return
        fs, root = self._fs()
        try:
            self.retry(f"delete {self.url(rel)}", lambda: fs.rm_file(f"{root}/{rel}"))
        except FileNotFoundError:
            pass

    def file_sizes(self) -> dict[str, int]:
        """Every object of a remote store (rel path -> bytes), in one recursive listing."""
        fs, root = self._fs()
        try:
            found = self.retry(f"list {self.output}", lambda: fs.find(root, detail=True))
        except FileNotFoundError:
            return {}
        return {name[len(root) + 1 :]: int(info.get("size") or 0) for name, info in found.items()}

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders under rel (empty when rel does not exist)."""
        if not self.remote:
            path = self.local(rel)
            return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
        fs, root = self._fs()
        try:
            entries = self.retry(f"list {self.url(rel)}", lambda: fs.ls(f"{root}/{rel}", detail=True))
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def delete_tree(self, rel: str) -> None:
        if not self.remote:
            import shutil

            shutil.rmtree(self.local(rel), ignore_errors=True)
            return
        fs, root = self._fs()
        self.retry(
            f"delete {self.url(rel)}",
            lambda: fs.rm(f"{root}/{rel}", recursive=True) if fs.exists(f"{root}/{rel}") else None,
        )


class RetriedReads(io.RawIOBase):
    """A remote file whose every read is retried (retry: Store.retry with the object's name) from the
    position it started at."""

    def __init__(self, file: BinaryIO, retry: Callable[[Callable[[], bytes]], bytes]):
        super().__init__()
        self._file, self._retry = file, retry

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        start = self._file.tell()

        def attempt() -> bytes:
            self._file.seek(start)
            return self._file.read(size)

        return self._retry(attempt)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def is_precondition_failure(exc: BaseException) -> bool:
    """S3 answers 412 PreconditionFailed to a conditional write that lost (If-None-Match / If-Match)."""
    text = f"{exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text or "412" in text.split()
