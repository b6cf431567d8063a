"""The encode stage (stages/encode.py): per shard, the model's embeddings of the composed texts, the ids,
the doc store and the hashes, each file checksummed in the manifest; a re-run keeps verified shards."""

import numpy as np
import pytest

from rayindex.builder import start_or_resume
from rayindex.config import BuildConfig
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.layout import SHARD_ENCODE_FILES, load_embeddings, shard_dir, shard_rel
from rayindex.parts.docstore import DocStore
from rayindex.parts.model import load_model
from rayindex.stages import encode, plan

from conftest import build_config, write_parquet


def test_encoder_resources_split_cpus_and_take_one_gpu_each():
    assert encode.encoder_resources(False, 8, 0, None, 3) == (3, {"num_cpus": 2})  # never more actors than shards
    assert encode.encoder_resources(False, 2, 0, None, 10) == (2, {"num_cpus": 1})
    assert encode.encoder_resources(False, 8, 0, 1, 10) == (1, {"num_cpus": 8})  # one actor gets every core
    assert encode.encoder_resources(True, 16, 4, None, 10) == (4, {"num_gpus": 1, "num_cpus": 1})


@pytest.fixture(scope="module")
def encoded(ray_address, docs, tmp_path_factory):
    """plan + encode of 50 documents in 2 shards into a fresh version: (config, manifest, version)."""
    root = tmp_path_factory.mktemp("encode")
    corpus = write_parquet(root / "docs.parquet", docs[:50])
    config = build_config([corpus], root / "out", shards=2)
    progress = StageProgress(quiet=True)
    manifest, version = start_or_resume(config, Store(config.output), progress)
    plan.run(config, manifest)
    encode.run(config, manifest, version, progress)
    return config, manifest, version


def test_embeddings_are_the_models_vectors_of_the_composed_texts(encoded, docs):
    config, manifest, version = encoded
    assert manifest.counts.docs_encoded == 50 and manifest.dimension == 384 and manifest.model.device == "cpu"
    texts = [f"{d['title']}: {d['body']}" for d in docs[:50]]
    expected = load_model(config.model).encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    stored = np.concatenate([np.asarray(load_embeddings(shard_dir(version.local_root, s.shard_id), st.docs_encoded, 384))
                             for s, st in zip(manifest.shards, manifest.shard_states)])
    np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_each_shard_has_its_files_checksummed_and_its_doc_store(encoded, docs):
    _, manifest, version = encoded
    for shard in manifest.shards:
        for name in SHARD_ENCODE_FILES:
            assert version.verified({shard_rel(shard.shard_id, name): manifest.files_sha256[shard_rel(shard.shard_id, name)]})
    store = DocStore([shard_dir(version.local_root, s.shard_id) for s in manifest.shards], [s.global_start for s in manifest.shards])
    assert store.get(37)["id"] == docs[37]["id"] and store.get(37)["metadata"] == {"module": docs[37]["module"], "kind": docs[37]["kind"]}


def test_a_rerun_keeps_the_verified_shards(encoded):
    config, manifest, version = encoded
    before = [s.embeddings_sha256 for s in manifest.shard_states]
    encode.run(config, manifest, version, StageProgress(quiet=True))
    assert manifest.reused.encode == [0, 1] and [s.embeddings_sha256 for s in manifest.shard_states] == before


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="text-column or a --template"):
        BuildConfig(inputs=["x"], text_columns=[])
