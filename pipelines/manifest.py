"""The run manifest: config, plan, per-shard state, counts, timings and library versions.

Written atomically (temp file + rename) after every change, so a killed driver leaves the
last consistent state and any stage can be resumed from it.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from pipelines.config import BuildConfig
from pipelines.shard_plan import Shard

MANIFEST = "manifest.json"


class ShardState(BaseModel):
    shard_id: int
    rows_read: int = 0
    docs_encoded: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    vectors_reused: int = 0  # reindex: unchanged documents whose vectors were copied from the previous version
    ids_changed: int = 0  # reindex: documents encoded again because their content changed
    embeddings_sha256: Optional[str] = None
    index_sha256: Optional[str] = None
    trained_sha256: Optional[str] = None  # the trained index this shard's index was built from


class Manifest(BaseModel):
    run_id: str
    created_at: str
    status: str = "running"  # running | failed | published
    error: Optional[str] = None
    config: BuildConfig
    config_fingerprint: str
    model: dict = Field(default_factory=dict)
    files: list[dict] = Field(default_factory=list)
    shards: list[Shard] = Field(default_factory=list)
    shard_states: list[ShardState] = Field(default_factory=list)
    index_string: Optional[str] = None
    index_string_chosen_automatically: bool = False
    metric: str = "ip"
    dimension: Optional[int] = None
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    training: dict = Field(default_factory=dict)
    refine_factor: Optional[int] = None  # re-rank k x factor PQ candidates with exact fp16 distances (refine.py)
    tuning: dict = Field(default_factory=dict)  # the nprobe chosen for a recall target, and the sweep behind it
    merge: dict = Field(default_factory=dict)
    counts: dict = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    files_sha256: dict[str, str] = Field(default_factory=dict)  # every output file (path in the version) -> sha256
    resumed: list[dict] = Field(default_factory=list)  # one entry per resumption of this run
    reused: dict = Field(default_factory=dict)  # what the latest attempt found done and verified: shards per stage
    reindex: dict = Field(default_factory=dict)  # reindex runs: the previous version, what changed, drift, the path taken
    pruned: list[str] = Field(default_factory=list)  # versions deleted after this one was published (--keep)

    def save(self, version) -> None:
        """Write to the version's store (a Store, or a local version folder): atomically, after every change."""
        from pipelines.storage import Store

        store = version if isinstance(version, Store) else Store(str(version))
        store.write_text(MANIFEST, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, version_dir: str | Path) -> "Manifest":
        return cls.model_validate_json((Path(version_dir) / MANIFEST).read_text())


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("rayindex", "ray", "faiss-cpu", "faiss-gpu", "torch", "sentence-transformers", "transformers", "pyarrow", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def dump_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)
