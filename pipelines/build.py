"""The build job: plan -> encode -> train -> per-shard add -> merge -> publish.

Each stage reads what the manifest names and records its outputs there, so the manifest of
a version folder is the complete state of a run. CURRENT is replaced last, atomically, and
only after the manifest says "published": a failed run never becomes the current version.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import ray

from pipelines import corpus, index_params
from pipelines.config import BuildConfig
from pipelines.docstore import DOCS_FILE, ROW_IDS_FILE, DocStore
from pipelines.encode import DOC_HASHES_FILE, EMBEDDINGS_FILE, SHARD_ENCODE_FILES, encode_shards, shard_dir, shard_rel
from pipelines.errors import RayIndexError, user_message
from pipelines.faults import checkpoint
from pipelines.lock import OutputLock
from pipelines.manifest import MANIFEST, Manifest, ShardState, library_versions, now_iso
from pipelines.merge import IVFDATA_FILE, MERGED_FILE, check_shard, merge_shards
from pipelines.model import resolve_model
from pipelines.progress import StageProgress
from pipelines.resources import cluster_can_have_gpus, max_node_cpus
from pipelines.shard_index import SHARD_INDEX_FILE, build_shard_indexes
from pipelines.refine import FP16_FILE
from pipelines.reuse import CONTENT_HASHES_FILE, PreviousVectors
from pipelines.shard_plan import Shard, number_of_shards, plan_shards
from pipelines.storage import Store, file_sha256, use_s3_endpoint
from pipelines.train import TRAINED_FILE, coarse_mse, make_index, train_quantizer, training_sample

CURRENT = "CURRENT"
VERSIONS = "versions"
DRIFT_SAMPLE = 20_000  # vectors of the new corpus on which a reindex measures drift


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def output_store(config: BuildConfig) -> Store:
    return Store(config.output, config.storage_retry_s)


def version_store(root: Store, run_id: str) -> Store:
    """The store of one version folder: its node-local mirror is that version's cache."""
    return Store(root.url(f"{VERSIONS}/{run_id}"), root.retry_s)


def as_store(version: Store | str | Path) -> Store:
    return version if isinstance(version, Store) else Store(str(version))


def check_output_writable(root: Store) -> None:
    probe = f"{VERSIONS}/.write-test-{os.getpid()}"
    try:
        if not root.remote:
            root.local(VERSIONS).mkdir(parents=True, exist_ok=True)
        root.write_text(probe, "ok")
        root.delete(probe)
    except OSError as exc:
        raise RayIndexError(f"output {root.output} is not writable ({exc.strerror or exc}); choose another --output") from exc


def publish(root: Store, run_id: str) -> None:
    """Point CURRENT at the version: an atomic rename locally, a single PUT on S3, always last."""
    root.write_text(CURRENT, run_id + "\n")


def current_run_id(root: Store) -> str:
    """The run id CURRENT names; "" when nothing is published."""
    return (root.read_text(CURRENT) or "").strip()


def version_ids(root: Store) -> list[str]:
    """The output's version folders, oldest first (run ids start with their UTC time)."""
    return [r for r in root.list_dirs(VERSIONS) if not r.startswith(".")]


def read_version_manifest(root: Store, run_id: str) -> Manifest | None:
    text = root.read_text(f"{VERSIONS}/{run_id}/{MANIFEST}")
    return None if text is None else Manifest.model_validate_json(text)


def current_version(output: str | Path) -> Path:
    """The local folder of the published version that CURRENT names (for an S3 output: the version's
    serving files pulled into the local cache and checked against the manifest's checksums)."""
    root = Store(str(output))
    run_id = current_run_id(root)
    if not run_id:
        raise RayIndexError(f"{output} has no published index ({root.url(CURRENT)} is missing); run `rayindex build` first")
    manifest = read_version_manifest(root, run_id)
    version = version_store(root, run_id)
    if manifest is None:
        raise RayIndexError(f"{root.url(CURRENT)} names {run_id}, but {version.url(MANIFEST)} is missing")
    if not version.remote:
        if not version.local(MERGED_FILE).exists():
            raise RayIndexError(f"{root.url(CURRENT)} names {run_id}, but {version.local(MERGED_FILE)} is missing")
        return version.local_root
    manifest.save(version.local_root)
    try:
        version.pull({rel: sha for rel, sha in manifest.files_sha256.items() if is_serving_file(rel)})
    except FileNotFoundError as exc:
        raise RayIndexError(f"{root.url(CURRENT)} names {run_id}, but a file of it is missing in the store ({exc})") from None
    return version.local_root


def is_serving_file(rel: str) -> bool:
    """What search and serving read: the merged index, the doc store, the fp16 vectors for re-ranking."""
    name = rel.rsplit("/", 1)[-1]
    if "/" not in rel:
        return name in (MERGED_FILE, IVFDATA_FILE)
    return name in (DOCS_FILE, ROW_IDS_FILE, FP16_FILE)


def ensure_ray(address: str | None, env: dict[str, str] | None = None) -> None:
    """Connect to the given cluster, the one in RAY_ADDRESS, or start a local one. env: variables the
    workers need too (e.g. the S3 endpoint), passed in the job's runtime environment."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None and "RAY_ADDRESS" not in os.environ else None,
             ignore_reinit_error=True, runtime_env={"env_vars": env} if env else None)


def plan_stage(config: BuildConfig) -> tuple[list[corpus.FileInfo], list[Shard]]:
    """Files, their columns checked, and the deterministic shard plan."""
    infos = [corpus.inspect_file(p) for p in corpus.list_input_files(config.inputs)]
    required = ([config.id_column] if config.id_column else []) + config.text_fields()
    corpus.check_columns(infos, required)
    total = sum(i.num_rows for i in infos)
    if total == 0:
        raise RayIndexError(f"the input ({', '.join(config.inputs)}) has no rows; nothing to index")
    shards = plan_shards([(i.path, i.num_rows) for i in infos], number_of_shards(total, config.shards, config.shard_size))
    by_path = {i.path: i for i in infos}
    for shard in shards:
        shard.pieces = [corpus.attach_byte_offsets(p, by_path[p.path]) for p in shard.pieces]
    return infos, shards


def locate_row(shards: list[Shard], row_id: int) -> str:
    """'file row N' for a global row id, for error messages."""
    for shard in shards:
        for piece in shard.pieces:
            if piece.global_start <= row_id < piece.global_start + piece.num_rows:
                return f"{piece.path} row {row_id - piece.global_start + piece.row_start}"
    return f"row {row_id}"


def check_unique_ids(manifest: Manifest, version: Store, id_column: str) -> None:
    """Refuse duplicate document ids, naming one and where it occurs."""
    version.pull(shard_files(manifest, (DOC_HASHES_FILE,)))
    version_dir = version.local_root
    per_shard = [np.load(shard_dir(version_dir, s.shard_id) / DOC_HASHES_FILE) for s in manifest.shards]
    hashes = np.concatenate(per_shard)
    ordered = np.sort(hashes)
    dups = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(dups):
        return
    version.pull(shard_files(manifest, (ROW_IDS_FILE, DOCS_FILE)))  # only now: the doc store names the duplicate
    store = DocStore([shard_dir(version_dir, s.shard_id) for s in manifest.shards], [s.global_start for s in manifest.shards])
    places, doc_id = [], None
    for shard, shard_hashes in zip(manifest.shards, per_shard):
        row_ids = np.load(shard_dir(version_dir, shard.shard_id) / ROW_IDS_FILE)
        for row_id in row_ids[shard_hashes == dups[0]][:2]:
            doc = store.get(int(row_id))
            doc_id = doc["id"]
            places.append(locate_row(manifest.shards, int(row_id)))
    raise RayIndexError(
        f"duplicate id {doc_id!r} in column {id_column!r} ({len(dups)} duplicate(s) in all), at: {'; '.join(places[:2])}. "
        "Ids must be unique: fix the corpus or pick another --id-column"
    )


def shard_files(manifest: Manifest, names: tuple[str, ...], shard_ids: list[int] | None = None) -> dict[str, str]:
    """rel path -> sha256 of these files of these shards (default: all), from the manifest."""
    wanted = {shard_rel(s.shard_id) for s in manifest.shards if shard_ids is None or s.shard_id in shard_ids}
    return {rel: sha for rel, sha in manifest.files_sha256.items()
            if rel.rsplit("/", 1)[0] in wanted and rel.rsplit("/", 1)[1] in names}


def choose_on_disk(config: BuildConfig, shard_bytes: int) -> bool:
    if config.on_disk is not None:
        return config.on_disk
    budget = config.memory_budget_bytes or psutil.virtual_memory().total // 2
    return shard_bytes > budget


def connect(config: BuildConfig) -> None:
    ensure_ray(config.ray_address, {"AWS_ENDPOINT_URL": config.s3_endpoint} if config.s3_endpoint else None)


def build_index(config: BuildConfig, quiet: bool = True, reindex: dict | None = None, keep: int | None = None) -> Manifest:
    """Run a whole build and publish it; returns the manifest of the published version.

    The output is locked for the whole run (lock.py): a second build on it refuses at once. When
    the newest version of the output is an unfinished run of the same command over unchanged
    inputs (its driver was killed, the store went away), that run is resumed: finished work whose
    checksums verify is kept, the rest is recomputed. reindex: {"previous": run id, "drift_threshold": x}
    for an incremental run (reindex.py): vectors and the trained quantizer of that version are reused.
    keep: after publishing, delete all but the newest `keep` published versions (still under the lock)."""
    use_s3_endpoint(config.s3_endpoint)  # this driver's S3 client; workers get it from connect()
    root = output_store(config)
    check_output_writable(root)
    with OutputLock(root, new_run_id()) as lock, StageProgress(quiet=quiet) as progress:
        manifest, version = start_or_resume(config, root, progress, reindex)
        try:
            run_stages(config, manifest, version, progress)
            if config.target_recall:
                tune_stage(config, manifest, version, progress)
            lock.check_held()
            manifest.status = "published"
            manifest.save(version)
            publish(root, manifest.run_id)
        except BaseException as exc:
            manifest.status = "failed"
            manifest.error = user_message(exc)
            with contextlib.suppress(Exception):  # the store may be the thing that failed
                manifest.save(version)
            raise
        if keep:
            manifest.pruned = prune_versions(root, keep)
            manifest.save(version)
    return manifest


def prune_versions(root: Store, keep: int) -> list[str]:
    """Delete every version folder but CURRENT's and the newest keep-1 other published ones (older
    failed runs too); their node-local cache goes with them. Returns the deleted run ids. Run under
    the output lock, so no version being built is touched."""
    kept, deleted = {current_run_id(root)}, []
    for run_id in reversed(version_ids(root)):
        if run_id in kept:
            continue
        manifest = read_version_manifest(root, run_id)
        if len(kept) < keep and manifest is not None and manifest.status == "published":
            kept.add(run_id)
            continue
        root.delete_tree(f"{VERSIONS}/{run_id}")
        if root.remote:
            shutil.rmtree(version_store(root, run_id).local_root, ignore_errors=True)
        deleted.append(run_id)
    return deleted


def start_or_resume(config: BuildConfig, root: Store, progress: StageProgress, reindex: dict | None = None) -> tuple[Manifest, Store]:
    """The newest version when it is an unpublished run of this config over the same inputs; else a new one."""
    runs = version_ids(root)
    previous = read_version_manifest(root, runs[-1]) if runs else None
    if (previous and previous.config_fingerprint == config.fingerprint()
            and (previous.status != "published" or current_run_id(root) != previous.run_id)
            and bool(previous.reindex) == bool(reindex)):
        infos, shards = plan_stage(config)
        if not previous.files or file_list(infos) == previous.files and shards == previous.shards:
            progress.note(f"resuming run {previous.run_id} (stopped while {previous.status}: {previous.error or 'killed'})")
            previous.resumed.append({"at": now_iso(), "previous_status": previous.status, "previous_error": previous.error})
            previous.status, previous.error = "running", None
            version = version_store(root, previous.run_id)
            previous.save(version)
            return previous, version
        progress.note(f"not resuming run {previous.run_id}: the input files changed since it started")
    run_id = new_run_id()
    version = version_store(root, run_id)
    version.local_root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_id=run_id, created_at=now_iso(), config=config, config_fingerprint=config.fingerprint(),
                        metric=config.metric, versions=library_versions(), reindex=reindex or {})
    manifest.save(version)
    return manifest, version


def stage(name: str):
    """Decorator for a stage function (config, manifest, version, progress): skips work the manifest
    records as done (the function checks its outputs' checksums), records its wall time, and saves
    the manifest after it, so each stage can be re-run or resumed alone. version: the version's Store,
    or a local version folder."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(config: BuildConfig, manifest: Manifest, version: Store | str | Path, progress: StageProgress | None = None):
            version = as_store(version)
            version.local_root.mkdir(parents=True, exist_ok=True)
            start = time.monotonic()
            result = fn(config, manifest, version, progress or StageProgress(quiet=True))
            manifest.timings_s[name] = round(manifest.timings_s.get(name, 0) + time.monotonic() - start, 3)
            manifest.save(version)
            return result

        return run

    return wrap


def run_stages(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    for run in (plan_files_stage, encode_stage, train_stage, add_stage, merge_stage):
        run(config, manifest, version, progress)


def file_list(infos: list[corpus.FileInfo]) -> list[dict]:
    """What the manifest records of the inputs: enough to tell that a resumed run reads the same data."""
    return [{"path": i.path, "format": i.format, "rows": i.num_rows, **corpus.file_signature(i.path)} for i in infos]


@stage("plan")
def plan_files_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    if manifest.shards:
        return  # resumed: start_or_resume checked that the plan is unchanged
    infos, shards = plan_stage(config)
    manifest.files = file_list(infos)
    manifest.shards = shards
    manifest.shard_states = [ShardState(shard_id=s.shard_id) for s in shards]
    manifest.model = {"name": config.model, "path": resolve_model(config.model), "normalized": config.metric == "ip"}


def done_shards(manifest: Manifest, version: Store, field: str, names: tuple[str, ...]) -> set[int]:
    """Shards whose recorded outputs (state.<field> set, files verified by sha256) need no recomputing."""
    done = set()
    for state in manifest.shard_states:
        files = shard_files(manifest, names, [state.shard_id])
        if getattr(state, field) and len(files) == len(names) and version.verified(files):
            done.add(state.shard_id)
    return done


@stage("encode")
def encode_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """Embeddings, ids and doc store for every shard not already done; then the counts, and the checks on them."""
    connect(config)
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster_can_have_gpus()
    done = done_shards(manifest, version, "embeddings_sha256", SHARD_ENCODE_FILES)
    manifest.reused["encode"] = sorted(done)
    todo = [s for s in manifest.shards if s.shard_id not in done]
    total_rows = sum(s.num_rows for s in manifest.shards)

    def check_index_early(dim: int) -> None:
        if config.index:  # a typo in --index should fail before the encode; too few documents only shrink it (train_stage)
            make_index(config.index, dim, config.metric)

    def record(state: dict) -> None:  # each finished shard is saved at once: a killed driver loses no finished shard
        manifest.files_sha256.update(state.pop("files"))
        manifest.shard_states[state["shard_id"]] = ShardState(**state)
        manifest.save(version)
        checkpoint("encode", sum(1 for s in manifest.shard_states if s.embeddings_sha256))

    previous = previous_vectors(config, manifest) if manifest.reindex and todo else None
    with progress.stage("encode", sum(s.num_rows for s in todo), "docs") as update:
        dim, device = encode_shards(config, todo, version, use_gpu, on_progress=update, check_dimension=check_index_early,
                                    on_shard_done=record, previous=previous) if todo else (manifest.dimension, manifest.model.get("device", "cpu"))
    manifest.dimension = dim
    manifest.model.update(dimension=dim, device=device)
    skipped: dict[str, int] = {}
    for s in manifest.shard_states:
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    manifest.counts = {
        "rows_read": sum(s.rows_read for s in manifest.shard_states),
        "docs_encoded": sum(s.docs_encoded for s in manifest.shard_states),
        "skipped": skipped,
    }
    if manifest.counts["docs_encoded"] == 0:
        raise RayIndexError(f"no documents to index: all {total_rows} rows were skipped ({skipped}); check --text-column")
    if config.id_column:
        check_unique_ids(manifest, version, config.id_column)
    if manifest.reindex:
        unchanged = sum(s.vectors_reused for s in manifest.shard_states)
        changed = sum(s.ids_changed for s in manifest.shard_states)
        manifest.reindex.update(unchanged=unchanged, changed=changed, added=manifest.counts["docs_encoded"] - unchanged - changed,
                                deleted=manifest.reindex["previous_docs"] - unchanged - changed, encoded=manifest.counts["docs_encoded"] - unchanged)


def reindex_base(config: BuildConfig, manifest: Manifest) -> tuple[Manifest, Store]:
    """The manifest and store of the version a reindex starts from."""
    root = output_store(config)
    run_id = manifest.reindex["previous"]
    return read_version_manifest(root, run_id), version_store(root, run_id)


def previous_vectors(config: BuildConfig, manifest: Manifest) -> PreviousVectors | None:
    """The reindex's previous version as a vector source, when its vectors are comparable (same model,
    metric) and it recorded content hashes; otherwise every document is encoded (and the manifest says why)."""
    before, old = reindex_base(config, manifest)
    have_hashes = any(rel.endswith(CONTENT_HASHES_FILE) for rel in before.files_sha256)
    if before.model.get("name") != config.model or before.metric != config.metric or not have_hashes:
        manifest.reindex["vectors_not_reused"] = "the previous version used another model or metric, or has no content hashes"
        return None
    return PreviousVectors(old, shard_files(before, (EMBEDDINGS_FILE, DOC_HASHES_FILE, CONTENT_HASHES_FILE)),
                           [shard_rel(s.shard_id) for s in before.shards], [s.docs_encoded for s in before.shard_states], before.dimension)


@stage("train")
def train_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """Choose (or take) the index string, sample across all shards, train on one node (or GPU)."""
    inputs = [s.embeddings_sha256 for s in manifest.shard_states]
    if (manifest.training.get("embeddings_sha256") == inputs
            and version.verified({TRAINED_FILE: manifest.training["trained_sha256"]})):
        manifest.reused["train"] = True
        return
    if manifest.reindex and reuse_quantizer(config, manifest, version):
        manifest.training["embeddings_sha256"] = inputs
        return
    connect(config)
    n_docs, dim = manifest.counts["docs_encoded"], manifest.dimension
    use_gpu = manifest.model.get("device") == "cuda"
    with progress.stage("train", 1, "indexes"):
        try:
            manifest.index_string = config.index or index_params.choose_index_string(n_docs, dim, config.max_index_bytes)
        except ValueError as exc:
            raise RayIndexError(f"--max-index-memory: {exc}") from exc
        manifest.index_string, fallback = index_params.fit_index_to_corpus(manifest.index_string, n_docs, dim)
        if fallback:
            manifest.warnings.append(fallback)
        manifest.index_string_chosen_automatically = config.index is None
        probe = make_index(manifest.index_string, dim, config.metric)  # keep it alive: ivf points into it
        ivf = faiss.downcast_index(faiss.extract_index_ivf(probe))
        sample_size = config.train_sample or index_params.training_sample_size(n_docs, ivf.nlist, uses_pq=hasattr(ivf, "pq"))
        # CPU k-means uses every core of one node; on GPU clusters one GPU does the work
        train_task = ray.remote(num_cpus=1 if use_gpu else max_node_cpus(), num_gpus=1 if use_gpu else 0)(train_quantizer)
        embeddings = shard_files(manifest, (EMBEDDINGS_FILE,))
        counts = [s.docs_encoded for s in manifest.shard_states]
        manifest.training = ray.get(train_task.remote(manifest.index_string, config.metric, version, embeddings,
                                                      [shard_rel(s.shard_id) for s in manifest.shards], counts, dim,
                                                      sample_size, config.seed, use_gpu))
    manifest.training["embeddings_sha256"] = inputs  # trained from these: valid while they are unchanged
    manifest.files_sha256[TRAINED_FILE] = manifest.training["trained_sha256"]
    manifest.nlist = manifest.training["nlist"]
    manifest.nprobe = index_params.default_nprobe(manifest.nlist)
    manifest.warnings.extend(manifest.training["warnings"])


def reuse_quantizer(config: BuildConfig, manifest: Manifest, version: Store) -> bool:
    """Reindex: take the previous version's trained index unless the new vectors drifted from it.

    Drift = coarse_mse (mean squared distance to the nearest centroid) of a sample of the new corpus
    under the old quantizer, divided by the same figure on the old training sample. Past
    --drift-threshold, or when the two versions are not comparable, the build trains afresh."""
    before, old = reindex_base(config, manifest)
    reason = None
    if before.index_string != (config.index or before.index_string) or before.dimension != manifest.dimension or before.metric != config.metric:
        reason = "the index string, dimension or metric differs from the previous version's"
    elif "coarse_mse" not in before.training:
        reason = "the previous version recorded no drift baseline (built before drift was measured)"
    if reason is None:
        old.pull({TRAINED_FILE: before.training["trained_sha256"]})
        trained = faiss.read_index(str(old.local(TRAINED_FILE)))
        counts = [s.docs_encoded for s in manifest.shard_states]
        version.pull(shard_files(manifest, (EMBEDDINGS_FILE,)))
        sample = training_sample([version.local(shard_rel(s.shard_id)) for s in manifest.shards], counts, manifest.dimension,
                                 min(sum(counts), DRIFT_SAMPLE), config.seed)
        drift = coarse_mse(trained, sample) / max(before.training["coarse_mse"], 1e-12)
        threshold = manifest.reindex["drift_threshold"]
        manifest.reindex["drift"] = {"ratio": round(drift, 4), "threshold": threshold, "baseline_mse": before.training["coarse_mse"],
                                     "sample": int(len(sample))}
        if drift > threshold:
            reason = f"drift {drift:.3f} > threshold {threshold}: the old centroids no longer fit the corpus"
    if reason:
        manifest.reindex.update(path="full retrain", reason=reason)
        return False
    shutil.copyfile(old.local(TRAINED_FILE), version.local(TRAINED_FILE))
    version.push([TRAINED_FILE])
    manifest.reindex.update(path="incremental", reason=f"drift {drift:.3f} <= threshold {threshold}: reused the trained quantizer of {before.run_id}")
    manifest.index_string, manifest.index_string_chosen_automatically = before.index_string, before.index_string_chosen_automatically
    manifest.training = dict(before.training, reused_from=before.run_id)
    manifest.files_sha256[TRAINED_FILE] = before.training["trained_sha256"]
    manifest.nlist, manifest.nprobe, manifest.refine_factor = before.nlist, before.nprobe, before.refine_factor
    return True


@stage("add")
def add_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """One Ray task per shard not already done adds its vectors to a copy of the trained index."""
    trained_sha = manifest.training["trained_sha256"]
    done = {sid for sid in done_shards(manifest, version, "index_sha256", (SHARD_INDEX_FILE,))
            if manifest.shard_states[sid].trained_sha256 == trained_sha}
    manifest.reused["add"] = sorted(done)
    jobs = [(s.shard_id, st.docs_encoded, shard_files(manifest, (EMBEDDINGS_FILE, ROW_IDS_FILE), [s.shard_id]))
            for s, st in zip(manifest.shards, manifest.shard_states) if s.shard_id not in done]
    if not jobs:
        return
    connect(config)

    with progress.stage("add", sum(n for _, n, _ in jobs), "vectors") as update:
        done_vectors = [0]

        def record(sid: int, n: int, result: dict) -> None:  # saved at once: a killed driver loses no added shard
            manifest.shard_states[sid].index_sha256 = result["index_sha256"]
            manifest.shard_states[sid].trained_sha256 = result["trained_sha256"]
            manifest.files_sha256[f"{shard_rel(sid)}/{SHARD_INDEX_FILE}"] = result["index_sha256"]
            manifest.save(version)
            checkpoint("add", sum(1 for s in manifest.shard_states if s.index_sha256))
            done_vectors[0] += n
            update(done_vectors[0])

        build_shard_indexes(version, trained_sha, jobs, manifest.dimension, on_done=record)


@stage("merge")
def merge_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """Check every shard belongs (trained fingerprint, global ids), then merge in RAM or on disk."""
    if manifest.merge and version.verified({f: manifest.files_sha256.get(f, "") for f in manifest.merge["files"]}):
        manifest.reused["merge"] = True
        return
    version.pull({TRAINED_FILE: manifest.training["trained_sha256"]} | shard_files(manifest, (SHARD_INDEX_FILE, ROW_IDS_FILE)))
    version_dir = version.local_root
    shard_dirs = [shard_dir(version_dir, s.shard_id) for s in manifest.shards]
    shard_paths = [str(d / SHARD_INDEX_FILE) for d in shard_dirs]
    with progress.stage("merge", manifest.counts["docs_encoded"], "vectors"):
        for d, path in zip(shard_dirs, shard_paths):
            check_shard(path, manifest.training["trained_fingerprint"], np.load(d / ROW_IDS_FILE))
        on_disk = choose_on_disk(config, sum(os.path.getsize(p) for p in shard_paths))
        merge = merge_shards(str(version_dir / TRAINED_FILE), shard_paths, str(version_dir), on_disk)
        for name in merge["files"]:
            manifest.files_sha256[name] = file_sha256(version_dir / name)
        version.push(merge["files"])
        manifest.merge = merge


@stage("tune")
def tune_stage(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> None:
    """The smallest nprobe reaching --target-recall (recall@10 vs exact, held-out corpus queries)."""
    from pipelines.evaluate import tune_nprobe
    from pipelines.search import open_version

    version.pull({rel: sha for rel, sha in manifest.files_sha256.items() if is_serving_file(rel)}
                 | shard_files(manifest, (EMBEDDINGS_FILE,)))
    with progress.stage("tune", 1, "sweeps"):
        tuning = tune_nprobe(open_version(version.local_root, manifest), config.target_recall)
    if not tuning["reached"]:
        manifest.warnings.append(f"--target-recall {config.target_recall}: {tuning['note']}")
    fp16 = {f"{shard_rel(s.shard_id)}/{FP16_FILE}" for s in manifest.shards}
    written = [rel for rel in sorted(fp16) if version.local(rel).exists()]
    for rel in written:
        manifest.files_sha256[rel] = file_sha256(version.local(rel))
    version.push(written)
