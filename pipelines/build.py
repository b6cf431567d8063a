"""The build job: plan -> encode -> train -> per-shard add -> merge -> publish.

Each stage reads what the manifest names and records its outputs there, so the manifest of
a version folder is the complete state of a run. CURRENT is replaced last, atomically, and
only after the manifest says "published": a failed run never becomes the current version.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import ray

from pipelines import corpus, index_params
from pipelines.config import BuildConfig
from pipelines.docstore import ROW_IDS_FILE, DocStore
from pipelines.encode import DOC_HASHES_FILE, encode_shards, shard_dir
from pipelines.errors import RayIndexError, user_message
from pipelines.lock import OutputLock
from pipelines.manifest import Manifest, ShardState, library_versions, now_iso
from pipelines.merge import MERGED_FILE, check_shard, merge_shards
from pipelines.model import resolve_model
from pipelines.progress import StageProgress
from pipelines.resources import max_node_cpus
from pipelines.shard_index import SHARD_INDEX_FILE, build_shard_indexes
from pipelines.shard_plan import Shard, number_of_shards, plan_shards
from pipelines.train import TRAINED_FILE, check_trainable, make_index, train_quantizer

CURRENT = "CURRENT"
VERSIONS = "versions"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_output_writable(output: Path) -> None:
    try:
        (output / VERSIONS).mkdir(parents=True, exist_ok=True)
        probe = output / VERSIONS / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RayIndexError(f"output {output} is not writable ({exc.strerror or exc}); choose another --output") from exc


def publish(output: Path, run_id: str) -> None:
    """Point CURRENT at the version: write a temp file, fsync, rename over CURRENT (atomic on POSIX)."""
    tmp = output / f".{CURRENT}.{run_id}.tmp"
    with open(tmp, "w") as fh:
        fh.write(run_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, output / CURRENT)


def current_version(output: str | Path) -> Path:
    """The published version folder that CURRENT names, or a clear error."""
    output = Path(output)
    try:
        run_id = (output / CURRENT).read_text().strip()
    except FileNotFoundError:
        raise RayIndexError(f"{output} has no published index ({output / CURRENT} is missing); run `rayindex build` first") from None
    version = output / VERSIONS / run_id
    if not (version / MERGED_FILE).exists():
        raise RayIndexError(f"{output / CURRENT} names {run_id}, but {version / MERGED_FILE} is missing")
    return version


def ensure_ray(address: str | None) -> None:
    """Connect to the given cluster, the one in RAY_ADDRESS, or start a local one."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None and "RAY_ADDRESS" not in os.environ else None,
             ignore_reinit_error=True)


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


def check_unique_ids(manifest: Manifest, version_dir: Path, id_column: str) -> None:
    """Refuse duplicate document ids, naming one and where it occurs."""
    per_shard = [np.load(shard_dir(version_dir, s.shard_id) / DOC_HASHES_FILE) for s in manifest.shards]
    hashes = np.concatenate(per_shard)
    ordered = np.sort(hashes)
    dups = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(dups):
        return
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


def choose_on_disk(config: BuildConfig, shard_bytes: int) -> bool:
    if config.on_disk is not None:
        return config.on_disk
    budget = config.memory_budget_bytes or psutil.virtual_memory().total // 2
    return shard_bytes > budget


def build_index(config: BuildConfig, quiet: bool = True) -> Manifest:
    """Run a whole build and publish it; returns the manifest of the published version.

    The output is locked for the whole run (lock.py): a second build on it refuses at once."""
    output = Path(config.output)
    check_output_writable(output)
    run_id = new_run_id()
    with OutputLock(output, run_id):
        version_dir = output / VERSIONS / run_id
        version_dir.mkdir(parents=True)
        manifest = Manifest(run_id=run_id, created_at=now_iso(), config=config, config_fingerprint=config.fingerprint(),
                            metric=config.metric, versions=library_versions())
        manifest.save(version_dir)
        try:
            with StageProgress(quiet=quiet) as progress:
                run_stages(config, manifest, version_dir, progress)
                if config.target_recall:
                    tune_stage(config, manifest, version_dir, progress)
        except BaseException as exc:
            manifest.status = "failed"
            manifest.error = user_message(exc)
            manifest.save(version_dir)
            raise
        manifest.status = "published"
        manifest.save(version_dir)
        publish(output, run_id)
    return manifest


def stage(name: str):
    """Decorator for a stage function (config, manifest, version_dir, progress): records its wall time
    in the manifest and saves the manifest after it, so each stage can be re-run or resumed alone."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress | None = None):
            start = time.monotonic()
            result = fn(config, manifest, Path(version_dir), progress or StageProgress(quiet=True))
            manifest.timings_s[name] = round(time.monotonic() - start, 3)
            manifest.save(version_dir)
            return result

        return run

    return wrap


def run_stages(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    for run in (plan_files_stage, encode_stage, train_stage, add_stage, merge_stage):
        run(config, manifest, version_dir, progress)


@stage("plan")
def plan_files_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    infos, shards = plan_stage(config)
    manifest.files = [{"path": i.path, "format": i.format, "rows": i.num_rows} for i in infos]
    manifest.shards = shards
    manifest.shard_states = [ShardState(shard_id=s.shard_id) for s in shards]
    manifest.model = {"name": config.model, "path": resolve_model(config.model), "normalized": config.metric == "ip"}


@stage("encode")
def encode_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    """Embeddings, ids and doc store for every shard; then the counts, and the checks on them."""
    ensure_ray(config.ray_address)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    total_rows = sum(s.num_rows for s in manifest.shards)

    def check_index_early(dim: int) -> None:
        if config.index:  # a typo in --index should fail before the encode, not after it
            check_trainable(make_index(config.index, dim, config.metric), config.index, min(total_rows, config.train_sample or total_rows))

    with progress.stage("encode", total_rows, "docs") as update:
        dim, states = encode_shards(config, manifest.shards, str(version_dir), use_gpu, on_progress=update,
                                    check_dimension=check_index_early)
    for state in states:
        manifest.shard_states[state["shard_id"]] = ShardState(**state)
    manifest.dimension = dim
    manifest.model.update(dimension=dim, device="cuda" if use_gpu else "cpu")
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
        check_unique_ids(manifest, version_dir, config.id_column)


@stage("train")
def train_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    """Choose (or take) the index string, sample across all shards, train on one node (or GPU)."""
    ensure_ray(config.ray_address)
    n_docs, dim = manifest.counts["docs_encoded"], manifest.dimension
    use_gpu = manifest.model.get("device") == "cuda"
    with progress.stage("train", 1, "indexes"):
        try:
            manifest.index_string = config.index or index_params.choose_index_string(n_docs, dim, config.max_index_bytes)
        except ValueError as exc:
            raise RayIndexError(f"--max-index-memory: {exc}") from exc
        manifest.index_string_chosen_automatically = config.index is None
        probe = make_index(manifest.index_string, dim, config.metric)  # keep it alive: ivf points into it
        ivf = faiss.downcast_index(faiss.extract_index_ivf(probe))
        sample_size = config.train_sample or index_params.training_sample_size(n_docs, ivf.nlist, uses_pq=hasattr(ivf, "pq"))
        # CPU k-means uses every core of one node; on GPU clusters one GPU does the work
        train_task = ray.remote(num_cpus=1 if use_gpu else max_node_cpus(), num_gpus=1 if use_gpu else 0)(train_quantizer)
        shard_dirs = [shard_dir(version_dir, s.shard_id) for s in manifest.shards]
        counts = [s.docs_encoded for s in manifest.shard_states]
        manifest.training = ray.get(train_task.remote(manifest.index_string, config.metric, shard_dirs, counts, dim,
                                                      sample_size, config.seed, use_gpu, version_dir))
    manifest.nlist = manifest.training["nlist"]
    manifest.nprobe = index_params.default_nprobe(manifest.nlist)
    manifest.warnings.extend(manifest.training["warnings"])


@stage("add")
def add_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    """One Ray task per shard adds its vectors to a copy of the trained index."""
    ensure_ray(config.ray_address)
    jobs = [(s.shard_id, str(shard_dir(version_dir, s.shard_id)), st.docs_encoded)
            for s, st in zip(manifest.shards, manifest.shard_states)]
    with progress.stage("add", manifest.counts["docs_encoded"], "vectors") as update:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            update(done[0])

        results = build_shard_indexes(str(version_dir / TRAINED_FILE), manifest.training["trained_sha256"], jobs,
                                      manifest.dimension, on_done=advance)
    for sid, result in results.items():
        manifest.shard_states[sid].index_sha256 = result["index_sha256"]
        manifest.shard_states[sid].trained_sha256 = result["trained_sha256"]


@stage("merge")
def merge_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    """Check every shard belongs (trained fingerprint, global ids), then merge in RAM or on disk."""
    shard_dirs = [shard_dir(version_dir, s.shard_id) for s in manifest.shards]
    shard_paths = [str(d / SHARD_INDEX_FILE) for d in shard_dirs]
    with progress.stage("merge", manifest.counts["docs_encoded"], "vectors"):
        for d, path in zip(shard_dirs, shard_paths):
            check_shard(path, manifest.training["trained_fingerprint"], np.load(d / ROW_IDS_FILE))
        on_disk = choose_on_disk(config, sum(os.path.getsize(p) for p in shard_paths))
        manifest.merge = merge_shards(str(version_dir / TRAINED_FILE), shard_paths, str(version_dir), on_disk)


@stage("tune")
def tune_stage(config: BuildConfig, manifest: Manifest, version_dir: Path, progress: StageProgress) -> None:
    """The smallest nprobe reaching --target-recall (recall@10 vs exact, held-out corpus queries)."""
    from pipelines.evaluate import tune_nprobe
    from pipelines.search import open_version

    with progress.stage("tune", 1, "sweeps"):
        tuning = tune_nprobe(open_version(version_dir, manifest), config.target_recall)
    if not tuning["reached"]:
        manifest.warnings.append(f"--target-recall {config.target_recall}: {tuning['note']}")
