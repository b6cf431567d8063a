"""Versions of an output: run ids, each version's manifest, CURRENT (publish, read, open the version
it names), and pruning old versions.

A build writes everything into versions/<run-id>/ and replaces CURRENT last, atomically, only after
the manifest says "published": a failed run never becomes the current version.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rayindex.errors import RayIndexError
from rayindex.infra.files import fsync_tree, remove_temp_files, write_text_atomic
from rayindex.infra.storage import Store, written_sha256
from rayindex.layout import (
    CURRENT,
    DOCS_FILE,
    EMBEDDINGS_FILE,
    FP16_FILE,
    INDEX_INFOS_FILE,
    IVFDATA_FILE,
    MANIFEST,
    MERGED_FILE,
    PASSAGE_BITS,
    RUN_ID,
    VECTOR_IDS_FILE,
    VERSIONS,
    check_run_id,
    is_serving_file,
    version_rel,
)
from rayindex.manifest import Manifest


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def version_store(root: Store, run_id: str) -> Store:
    """The store of one version folder: its node-local mirror is that version's cache."""
    return Store(root.url(version_rel(run_id)), root.retry_s)


def check_output_writable(root: Store) -> None:
    probe = f"{VERSIONS}/.write-test-{os.getpid()}"
    try:
        if not root.remote:
            root.local(VERSIONS).mkdir(parents=True, exist_ok=True)
        root.write_text(probe, "ok")
        root.delete(probe)
    except OSError as exc:
        raise RayIndexError(
            f"output {root.output} is not writable ({exc.strerror or exc}); choose another --output"
        ) from exc


def current_run_id(root: Store) -> str:
    """The run id CURRENT names; "" when nothing is published. Anything but a run id is refused, naming
    CURRENT: it is used to build paths."""
    text = (root.read_text(CURRENT) or "").strip()
    if text:
        try:
            check_run_id(text, root.url(CURRENT))
        except ValueError as exc:
            raise RayIndexError(
                f"{exc}; CURRENT must name a version under {root.url(VERSIONS)}: fix or delete it"
            ) from None
    return text


def version_ids(root: Store) -> list[str]:
    """The output's version folders, oldest first (run ids start with their UTC time); other names are ignored."""
    return [r for r in root.list_dirs(VERSIONS) if RUN_ID.fullmatch(r)]


def read_manifest(root: Store, run_id: str) -> Manifest | None:
    """The manifest of a version of the output, or None when it has none."""
    rel = f"{version_rel(run_id)}/{MANIFEST}"
    text = root.read_text(rel)
    return None if text is None else Manifest.from_json(text, root.url(rel))


def save_manifest(version: Store, manifest: Manifest) -> None:
    """Write the manifest into the version's store: atomically, after every change."""
    version.write_text(MANIFEST, manifest.to_json())


def done_shards(manifest: Manifest, version: Store, field: str, names: tuple[str, ...]) -> set[int]:
    """Shards whose recorded outputs (state.<field> set, files verified by sha256) need no recomputing."""
    done = set()
    for state in manifest.shard_states:
        files = manifest.shard_files(names, [state.shard_id])
        if getattr(state, field) and len(files) == len(names) and version.verified(files):
            done.add(state.shard_id)
    return done


def previous_version(root: Store, manifest: Manifest) -> tuple[Manifest, Store]:
    """The manifest and store of the version a reindex starts from."""
    run_id = manifest.reindex.previous
    before = read_manifest(root, run_id)
    if before is None:
        raise RayIndexError(
            f"{root.url(version_rel(run_id))} has no manifest: the version this reindex starts from is gone"
        )
    return before, version_store(root, run_id)


def index_infos(manifest: Manifest) -> dict:
    """What index.faiss is, for whoever opens it with FAISS alone (autofaiss writes the same file):
    the factory string, the nprobe stored in it, metric, normalization, model, counts, and how a
    FAISS id maps to a document."""
    merge, model = manifest.merge, manifest.model
    return {
        "index_key": manifest.index_string,
        "index_param": f"nprobe={manifest.nprobe}",
        "nprobe": manifest.nprobe,
        "nlist": manifest.nlist,
        "refine_factor": manifest.refine_factor,
        "recall@10": manifest.tuning.recall if manifest.tuning and manifest.tuning.k == 10 else None,
        "metric_type": "METRIC_L2" if manifest.metric == "l2" else "METRIC_INNER_PRODUCT",
        "metric": manifest.metric,
        "normalized": model.normalized,
        "model": model.name,
        "query_prompt": model.query_prompt,
        "document_prompt": model.document_prompt,
        "vectors dimension": manifest.dimension,
        "nb vectors": merge.ntotal,
        "documents": manifest.counts.docs_encoded,
        "passages": manifest.passages.model_dump() if manifest.passages else None,
        "on_disk": merge.on_disk,
        "read_with": (
            f"faiss.read_index('{MERGED_FILE}', faiss.IO_FLAG_ONDISK_SAME_DIR): the inverted lists are in "
            f"{IVFDATA_FILE}"
            if merge.on_disk
            else f"faiss.read_index('{MERGED_FILE}') (faiss.IO_FLAG_MMAP to map it instead of loading it)"
        ),
        "ids": (
            f"FAISS id = (document row << {PASSAGE_BITS}) | passage number (int64): id >> {PASSAGE_BITS} is the "
            f"document's "
            "global row number in the shard plan. Shard s holds rows [shards[s].global_start, global_end) of "
            "manifest.json; "
            f"shards/NNNNN/{VECTOR_IDS_FILE} lists its ids in the order of shards/NNNNN/{DOCS_FILE}, a row per "
            f"passage: "
            "doc_id (the corpus id), passage, start/end (the passage's character span in the document), text, "
            "metadata (JSON)"
        ),
        "run_id": manifest.run_id,
        "rayindex": manifest.versions.get("rayindex"),
    }


def describe(version: Store, manifest: Manifest) -> None:
    """Write index_infos.json beside the index (checksummed in the manifest, pushed to the store)."""
    path = version.local(INDEX_INFOS_FILE)
    write_text_atomic(path, json.dumps(index_infos(manifest), indent=2))
    manifest.files_sha256[INDEX_INFOS_FILE] = written_sha256(path)
    version.push([INDEX_INFOS_FILE])


def check_publishable(version: Store, manifest: Manifest) -> None:
    """Refuse, naming the file, a version whose files are not what its manifest says: each one present with
    its recorded sha256 (a stat for a file whose hash this node recorded when it was written and that has not
    changed since, storage.written_sha256; read back whole otherwise: written on another node, reused, or
    changed after it was written); on an s3:// output each object also of the size of its checked copy (one
    listing). Re-running the build redoes the refused file: the stages check what they reuse the same way."""
    try:
        version.pull(manifest.files_sha256, verify=True)
    except (FileNotFoundError, RayIndexError) as exc:
        raise RayIndexError(
            f"not publishing {manifest.run_id}: {exc}; CURRENT was not changed, re-run the build"
        ) from None
    if version.remote:
        sizes = version.file_sizes()
        for rel in manifest.files_sha256:
            if sizes.get(rel) != version.local(rel).stat().st_size:
                raise RayIndexError(
                    f"not publishing {manifest.run_id}: {version.url(rel)} is {sizes.get(rel)} bytes, its checked "
                    f"copy {version.local(rel).stat().st_size}; CURRENT was not changed, re-run the build"
                )


def publish(root: Store, version: Store, manifest: Manifest, fence: Callable[[], None] = lambda: None) -> None:
    """Remove the temp files a killed writer left (locally), make the version durable (every file and folder
    fsynced, locally), describe it, check every file against the manifest (check_publishable), mark the
    manifest published, then point CURRENT at it: an atomic rename locally, a single PUT on S3, always last.
    fence() (the output lock's check) runs right before each of the two writes that matter."""
    if not version.remote:
        remove_temp_files(version.local_root)
        fsync_tree(version.local_root)
    describe(version, manifest)
    check_publishable(version, manifest)
    fence()
    manifest.status = "published"
    save_manifest(version, manifest)
    fence()
    root.write_text(CURRENT, manifest.run_id + "\n")


def prune_versions(root: Store, keep: int) -> list[str]:
    """Delete every version folder but CURRENT's and the newest keep-1 other published ones (older
    failed runs too); their node-local cache goes with them. Returns the deleted run ids. Run under
    the output lock, so no version being built is touched."""
    kept, deleted = {current_run_id(root)}, []
    for run_id in reversed(version_ids(root)):
        if run_id in kept:
            continue
        try:
            manifest = read_manifest(root, run_id)
        except RayIndexError:
            manifest = None  # a damaged version is not worth keeping
        if len(kept) < keep and manifest is not None and manifest.status == "published":
            kept.add(run_id)
            continue
        root.delete_tree(version_rel(run_id))
        if root.remote:
            shutil.rmtree(version_store(root, run_id).local_root, ignore_errors=True)
        deleted.append(run_id)
    return deleted


def current_published_id(root: Store) -> str:
    """The run id CURRENT names, refused with a message when nothing is published yet."""
    run_id = current_run_id(root)
    if not run_id:
        raise RayIndexError(
            f"{root.output} has no published index ({root.url(CURRENT)} is missing); run `rayindex build` first"
        )
    return run_id


def published_version(root: Store, run_id: str) -> tuple[Store, Manifest]:
    """The store and manifest of a published version, refused with a message naming the file when the
    manifest is missing, of another run, or not published."""
    manifest = read_manifest(root, run_id)
    version = version_store(root, run_id)
    if manifest is None:
        raise RayIndexError(f"{root.url(CURRENT)} names {run_id}, but {version.url(MANIFEST)} is missing")
    if manifest.run_id != run_id:
        raise RayIndexError(
            f"{version.url(MANIFEST)} is the manifest of run {manifest.run_id}, not of {run_id} that "
            f"{root.url(CURRENT)} names; the output was tampered with or mixed up: rebuild it"
        )
    if manifest.status != "published":
        raise RayIndexError(
            f"{version.url('')} is not a complete version (status {manifest.status!r}); publish a build first"
        )
    return version, manifest


def pull_version_files(root: Store, version: Store, manifest: Manifest, files: dict[str, str]) -> Path:
    """These files of a published version present and verified in the node-local mirror (pulled from an
    S3 output, checked in place for a local one: once per file, file_matches remembers); its folder."""
    if version.remote:
        save_manifest(Store(str(version.local_root)), manifest)
    try:
        version.pull(files, verify=True)
    except FileNotFoundError as exc:
        raise RayIndexError(
            f"{root.url(CURRENT)} names {manifest.run_id}, but {exc}: the version is damaged or incomplete, "
            "rebuild it (or publish another version)"
        ) from None
    return version.local_root


def open_current(output: str | Path, with_vectors: bool = False) -> tuple[Path, Manifest]:
    """The local folder of the published version CURRENT names, and its manifest, with every serving file
    (layout.is_serving_file; the fp16 vectors and ids when the version re-ranks; with_vectors the
    embeddings and ids too) checked against the manifest's sha256: pulled into the local cache for an
    S3 output, verified in place for a local one (once per file: file_matches remembers). The doc store
    is not among them: it is read on demand where the version lives (docstore/reader.py).
    A clear error naming the file when anything is missing, damaged or not what CURRENT says."""
    root = Store(str(output))
    run_id = current_published_id(root)
    version, manifest = published_version(root, run_id)
    if MERGED_FILE not in manifest.files_sha256:
        raise RayIndexError(
            f"{root.url(CURRENT)} names {run_id}, but its manifest records no {MERGED_FILE}; rebuild it"
        )
    files = {rel: sha for rel, sha in manifest.files_sha256.items() if is_serving_file(rel)}
    files |= manifest.shard_files((FP16_FILE, VECTOR_IDS_FILE)) if (manifest.refine_factor or 1) > 1 else {}
    files |= manifest.shard_files((EMBEDDINGS_FILE, VECTOR_IDS_FILE)) if with_vectors else {}
    return pull_version_files(root, version, manifest, files), manifest


def save_published(output: str, version_dir: Path, manifest: Manifest, rewritten: list[str]) -> None:
    """After changing a published version (rayindex tune): record the rewritten files' checksums,
    describe it again and write its manifest, to the store too (an s3:// output is not only the cache)."""
    version = version_store(Store(str(output)), manifest.run_id)
    for rel in rewritten:
        manifest.files_sha256[rel] = written_sha256(version_dir / rel)
    if version.remote:
        version.push(rewritten)
    describe(version, manifest)
    save_manifest(version, manifest)
    if version.remote:
        save_manifest(Store(str(version_dir)), manifest)
