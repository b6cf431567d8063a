"""The add stage (stages/add.py): a shard's index holds exactly the shard's vectors under their global
ids, built only from the trained index the manifest names; a re-run keeps verified shard indexes."""

import shutil

import faiss
import numpy as np
import pytest

from rayindex.infra.files import load_embeddings
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store, file_sha256
from rayindex.ivf.index import index_ids
from rayindex.layout import (
    EMBEDDINGS_FILE,
    PASSAGE_BITS,
    SHARD_INDEX_FILE,
    TRAINED_FILE,
    VECTOR_IDS_FILE,
    shard_dir,
    shard_rel,
)
from rayindex.manifest import Manifest
from rayindex.stages import add


@pytest.fixture
def version_copy(built, tmp_path):
    output, manifest = built
    shutil.copytree(output / "versions" / manifest.run_id, tmp_path / "version")
    return tmp_path / "version", Manifest.load(tmp_path / "version")


def test_add_shard_holds_the_shards_vectors_under_their_global_ids(version_copy):
    version_dir, manifest = version_copy
    shard, state = manifest.shards[1], manifest.shard_states[1]
    (shard_dir(version_dir, 1) / SHARD_INDEX_FILE).unlink()
    inputs = manifest.shard_files((EMBEDDINGS_FILE, VECTOR_IDS_FILE), [1])
    sha = add.add_shard(Store(str(version_dir)), manifest.training.trained_sha256, 1, state.passages, inputs, 384)
    assert sha == file_sha256(shard_dir(version_dir, 1) / SHARD_INDEX_FILE) == state.index_sha256  # deterministic
    index = faiss.read_index(str(shard_dir(version_dir, 1) / SHARD_INDEX_FILE))
    ids = np.load(shard_dir(version_dir, 1) / VECTOR_IDS_FILE)
    assert np.array_equal(np.sort(index_ids(index)), ids) and ids[0] == shard.global_start << PASSAGE_BITS
    vectors = np.asarray(load_embeddings(shard_dir(version_dir, 1), state.passages, 384))
    _, found = index.search(vectors[:5], 1, params=faiss.SearchParametersIVF(nprobe=8))
    assert found[:, 0].tolist() == ids[:5].tolist()  # IVF8,PQ16: each vector finds itself at full nprobe


def test_add_shard_refuses_a_trained_index_that_is_not_the_manifests(version_copy):
    version_dir, manifest = version_copy
    trained = version_dir / TRAINED_FILE
    data = bytearray(trained.read_bytes())
    data[-1] ^= 0xFF
    trained.write_bytes(bytes(data))
    with pytest.raises(FileNotFoundError, match="does not match its checksum"):
        add.add_shard(
            Store(str(version_dir)), manifest.training.trained_sha256, 0, manifest.shard_states[0].passages, {}, 384
        )


def test_a_rerun_keeps_verified_shard_indexes(version_copy):
    version_dir, manifest = version_copy
    add.run(manifest.config, manifest, Store(str(version_dir)), StageProgress(quiet=True))
    assert manifest.reused.add == [0, 1, 2]
    assert all(
        manifest.files_sha256[shard_rel(s.shard_id, SHARD_INDEX_FILE)] == s.index_sha256 for s in manifest.shard_states
    )
