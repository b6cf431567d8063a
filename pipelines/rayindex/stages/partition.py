"""Partition stage: split the merged index's inverted lists for N serving shards (ivf/serving_split.py),
by list number, balanced by list size; each part's index and on-disk lists written into the version
(parts/<N>/) and checksummed, with the BM25 postings of each part's passages (a passage belongs to the
part holding its vector's list), the split recorded in the manifest (manifest.serving[N]), where the
router and the shards of `rayindex serve --shards N` find it. Runs at the end of a build given
--serving-shards N, and on a published version (`rayindex partition --shards N`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayindex.config import BuildConfig
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf.index import read_index, read_merged
from rayindex.ivf.serving_split import list_ids, list_sizes, plan_parts, write_part
from rayindex.layout import LEXICAL_DIR, TRAINED_FILE, serving_lexical_files, serving_part_files
from rayindex.lexical.postings import open_postings, write_split_postings
from rayindex.manifest import Manifest, ServingPart
from rayindex.versions import open_current, save_published, version_store


def partition(version_dir: Path, manifest: Manifest, shards: int) -> tuple[list[ServingPart], list[str]]:
    """Write the parts of the merged lists for `shards` serving shards, and, when the version has a lexical
    index, each part's postings (those of the passages whose vectors its lists hold); returns the parts and
    their files."""
    merged, trained = read_merged(version_dir), read_index(version_dir / TRAINED_FILE)
    owner = plan_parts(list_sizes(merged), shards)
    parts, written, owned = [], [], []
    for part in range(shards):
        lists = np.flatnonzero(owner == part)
        files = serving_part_files(shards, part)
        vectors = write_part(trained, merged, lists, manifest.nprobe, version_dir / files[0], version_dir / files[1])
        parts.append(ServingPart(lists=lists.tolist(), vectors=vectors, files=list(files)))
        written += files
        if manifest.lexical:
            owned.append(list_ids(merged, lists))
    if manifest.lexical:
        lexical = [serving_lexical_files(shards, part) for part in range(shards)]
        folders = [(version_dir / files[0]).parent for files in lexical]
        sizes = write_split_postings(open_postings(version_dir / LEXICAL_DIR), owned, folders)
        for serving_part, files, postings in zip(parts, lexical, sizes):
            serving_part.lexical, serving_part.postings = list(files), postings
            written += files
    return parts, written


def record(manifest: Manifest, version_dir: Path, shards: int, parts: list[ServingPart]) -> None:
    """The split into the manifest, its files' checksums with it."""
    for part in parts:
        for rel in part.files + part.lexical:
            manifest.files_sha256[rel] = written_sha256(version_dir / rel)
    manifest.serving[shards] = parts


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> list[ServingPart]:
    """The split for --serving-shards, kept when its recorded files still verify and its parts hold their
    postings (when the version has a lexical index)."""
    shards = config.serving_shards
    recorded = manifest.serving.get(shards)
    if (
        recorded
        and (not manifest.lexical or manifest.parts_hold_postings(shards))
        and version.verified(
            {rel: manifest.files_sha256.get(rel, "") for part in recorded for rel in part.files + part.lexical}
        )
    ):
        return recorded
    lexical = {rel: manifest.files_sha256[rel] for rel in manifest.lexical.files} if manifest.lexical else {}
    version.pull(
        {TRAINED_FILE: manifest.training.trained_sha256}
        | {rel: manifest.files_sha256[rel] for rel in manifest.merge.files}
        | lexical
    )
    with progress.stage("partition", manifest.counts.passages, "vectors"):
        parts, written = partition(version.local_root, manifest, shards)
        record(manifest, version.local_root, shards, parts)
        version.push(written)
    return parts


def partition_published(output: str, shards: int) -> tuple[Manifest, list[ServingPart]]:
    """`rayindex partition`: split the published version CURRENT names (its merged index and trained.faiss
    pulled and checked), write the parts into it and record them in its manifest (in the store too)."""
    version_dir, manifest = open_current(output)
    version_store(Store(str(output)), manifest.run_id).pull(
        {TRAINED_FILE: manifest.training.trained_sha256}, verify=True
    )
    parts, written = partition(version_dir, manifest, shards)
    manifest.serving[shards] = parts
    save_published(str(output), version_dir, manifest, written)
    return manifest, parts
