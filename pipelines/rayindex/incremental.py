"""Incremental reindexing: rebuild the published index from the corpus as it is now, encoding only
documents that are new or changed (by id and content hash, text/reuse.py), dropping deleted ones, and
reusing the trained quantizer unless the corpus drifted from it (stages/train.py). The new version is
published atomically under the output lock like any build; old versions past --keep are deleted.
run_every() repeats it on a fixed interval (`rayindex reindex --every 1h`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rayindex.builder import build
from rayindex.config import ReindexOptions
from rayindex.errors import RayIndexError
from rayindex.infra.storage import Store, use_s3_endpoint
from rayindex.manifest import Manifest, Reindex
from rayindex.versions import current_run_id, read_manifest


def reindex(options: ReindexOptions, overrides: dict | None = None, quiet: bool = True) -> Manifest:
    """Reindex the output's CURRENT version with its own build settings (overrides: BuildConfig fields
    such as new inputs or ray_address) and publish the result; returns the new version's manifest."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    use_s3_endpoint(overrides.get("s3_endpoint"))  # CURRENT is read before build sets it
    root = Store(options.output)
    run_id = current_run_id(root)
    before = read_manifest(root, run_id) if run_id else None
    if before is None or before.status != "published":
        raise RayIndexError(f"{options.output} has no published version to reindex; run `rayindex build` first")
    config = before.config.model_copy(update=dict(overrides, output=options.output))
    record = Reindex(previous=run_id, drift_threshold=options.drift_threshold, previous_docs=before.counts.docs_encoded)
    return build(config, quiet, reindex=record, keep=options.keep)


def run_every(
    interval_s: float,
    run: Callable[[], object],
    on_error: Callable[[Exception], None],
    runs: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Call run() every interval_s, measured start to start (a run longer than the interval is followed
    at once by the next); a failed run is reported and the schedule goes on. runs: stop after that many."""
    done = 0
    while runs is None or done < runs:
        started = time.monotonic()
        try:
            run()
        except Exception as exc:  # the next run may succeed (the store is back, the data fixed)
            on_error(exc)
        done += 1
        if runs is None or done < runs:
            sleep(max(0.0, interval_s - (time.monotonic() - started)))
