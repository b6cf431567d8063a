"""The build: lock the output -> resume or start a version -> plan (Ray connected, or a local one started: timed
on its own after the input is checked) -> encode, lexical (BM25, unless --no-lexical), train, add, merge, tune (by
default only where it is cheap), partition (for sharded serving, when asked) -> publish. Each stage records its
outputs and their checksums in the manifest, so a run killed at
any point resumes where it stopped when the same command runs again. Any failure (a full disk
included, as one line naming the file) marks the manifest failed and leaves CURRENT as it was; files are
written through infra.files.atomic_file, so none is left half-written, and publish checks the version
against its manifest and removes what killed writers left. The lock and the version folder share a run id.
"""

from __future__ import annotations

import contextlib
import time

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError, user_message
from rayindex.infra.files import DiskFull, disk_full, no_space
from rayindex.infra.lock import OutputLock
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store, use_s3_endpoint
from rayindex.manifest import Manifest, Reindex, Resumption, library_versions, now_iso
from rayindex.stages import add, encode, lexical, merge, partition, plan, train, tune
from rayindex.versions import (
    check_output_writable,
    current_run_id,
    new_run_id,
    prune_versions,
    publish,
    read_manifest,
    save_manifest,
    version_ids,
    version_store,
)

STAGES = (
    ("encode", encode.run),
    ("lexical", lexical.run),
    ("train", train.run),
    ("add", add.run),
    ("merge", merge.run),
    ("tune", tune.run),
    ("partition", partition.run),
)


def build(config: BuildConfig, quiet: bool = True, reindex: Reindex | None = None, keep: int | None = None) -> Manifest:
    """Run a whole build under the output lock and publish it; returns the published version's manifest.

    reindex: an incremental run from a published version (reindex.py). keep: after publishing, delete
    all but the newest `keep` published versions (still under the lock)."""
    use_s3_endpoint(config.s3_endpoint)  # this driver's S3 client; workers get it from ray_session.connect
    root = Store(config.output, config.storage_retry)
    check_output_writable(root)
    with OutputLock(root, new_run_id()) as lock, StageProgress(quiet=quiet) as progress:
        manifest, version = start_or_resume(config, root, progress, reindex, lock.run_id)
        if manifest.run_id != lock.run_id:  # resumed: the lock names the version folder it writes
            lock.adopt(manifest.run_id)
        manifest.lock_generation = lock.generation
        try:
            with timed("plan", manifest, version):  # Ray's start in it is timed on its own (plan.py: `ray`)
                plan.run(config, manifest)
            for name, run in STAGES:
                if (
                    name == "tune"
                    and not tune.wanted(config, manifest.counts.passages)
                    or name == "partition"
                    and not config.serving_shards
                    or name == "lexical"
                    and not config.lexical
                ):
                    continue
                with timed(name, manifest, version):
                    run(config, manifest, version, progress)
            publish(root, version, manifest, fence=lock.check_held)
        except BaseException as exc:
            failure = one_line(exc, version)
            manifest.status, manifest.error = "failed", user_message(failure)
            with contextlib.suppress(Exception):  # the store may be the thing that failed
                save_manifest(version, manifest)
            failure.run_folder = version.url("")  # the CLI says it is kept (cli.kept_for_inspection)
            if failure is exc:
                raise
            raise failure from exc
        if keep:
            manifest.pruned = prune_versions(root, keep)
            save_manifest(version, manifest)
    return manifest


def one_line(exc: BaseException, version: Store) -> BaseException:
    """The failure as the user sees it: a full disk as one line naming the file (files.DiskFull: atomic_file
    names it; else the version folder), not a Ray worker's remote traceback or a library's message; any other
    failure as it is."""
    reason = no_space(exc) if isinstance(exc, Exception) else None
    if reason is None or isinstance(getattr(exc, "cause", None) or exc, DiskFull):
        return exc
    return disk_full(version.url(""), reason)


@contextlib.contextmanager
def timed(name: str, manifest: Manifest, version: Store):
    """Add the stage's wall time to the manifest's timings and save the manifest after it; what the stage timed
    on its own meanwhile (the plan: Ray's start, `ray`) is not counted twice."""
    start, own = time.monotonic(), sum(manifest.timings_s.values())
    version.local_root.mkdir(parents=True, exist_ok=True)
    yield
    timed_inside = sum(manifest.timings_s.values()) - own
    manifest.timings_s[name] = round(manifest.timings_s.get(name, 0) + time.monotonic() - start - timed_inside, 3)
    save_manifest(version, manifest)


def start_or_resume(
    config: BuildConfig, root: Store, progress: StageProgress, reindex: Reindex | None = None, run_id: str | None = None
) -> tuple[Manifest, Store]:
    """The newest version when it is an unpublished run of this config over the same inputs; else a new one,
    named run_id (the output lock's: default a new id)."""
    runs = version_ids(root)
    try:
        previous = read_manifest(root, runs[-1]) if runs else None
    except RayIndexError as exc:  # a damaged run is not resumed; a new one starts beside it
        progress.note(f"not resuming: {exc}")
        previous = None
    if (
        previous
        and previous.config_fingerprint == config.fingerprint()
        and (previous.status != "published" or current_run_id(root) != previous.run_id)
        and bool(previous.reindex) == bool(reindex)
    ):
        if not previous.files or plan.inspected(config)[2] == previous.files:
            progress.note(
                f"resuming run {previous.run_id} (stopped while {previous.status}: {previous.error or 'killed'})"
            )
            previous.resumed.append(
                Resumption(at=now_iso(), previous_status=previous.status, previous_error=previous.error)
            )
            previous.status, previous.error = "running", None
            version = version_store(root, previous.run_id)
            save_manifest(version, previous)
            return previous, version
        progress.note(f"not resuming run {previous.run_id}: the input files changed since it started")
    run_id = run_id or new_run_id()
    version = version_store(root, run_id)
    version.local_root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        run_id=run_id,
        created_at=now_iso(),
        config=config,
        config_fingerprint=config.fingerprint(),
        versions=library_versions(),
        reindex=reindex,
    )
    save_manifest(version, manifest)
    return manifest, version
