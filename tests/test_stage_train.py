"""The train stage (stages/train.py): the index choice, refusal of what a sample cannot train, a
deterministic training for a seed, and a re-run that keeps a trained index whose inputs are unchanged."""

import shutil

import faiss
import numpy as np
import pytest

from rayindex.errors import RayIndexError
from rayindex.infra.files import load_embeddings
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.ivf.index import make_index, trained_fingerprint
from rayindex.layout import shard_dir
from rayindex.manifest import Manifest
from rayindex.stages import train

from helpers import build_config


def test_choose_index_takes_the_size_rule_or_shrinks_a_given_string():
    assert train.choose_index(build_config(["x"], "o", index=None), 500, 384) == ("IVF1,Flat", [])
    assert (
        train.choose_index(build_config(["x"], "o", index=None), 5_000, 384)[0] == "IVF128,Flat"
    )  # 4*sqrt(n) rounded up, at most n/39
    shrunk, warnings = train.choose_index(build_config(["x"], "o", index="IVF256,PQ16"), 100, 384)
    assert shrunk == "IVF2,Flat" and "needs at least 256 vectors" in warnings[0]
    with pytest.raises(RayIndexError, match="--max-index-memory"):
        train.choose_index(build_config(["x"], "o", index=None, max_index_memory=1000), 5_000, 384)


def test_check_trainable_refuses_with_a_suggestion():
    """FAISS 1.15's OPQ training crashes the process under d points: refused instead."""
    with pytest.raises(
        RayIndexError, match=r"OPQ needs at least 384 training vectors .* the sample has 300; .*--train-sample"
    ):
        train.check_trainable(make_index("OPQ16,IVF4,PQ16np", 384, "cosine"), "OPQ16,IVF4,PQ16np", 300)
    with pytest.raises(
        RayIndexError, match=r"has 64 centroids but only 50 vectors to train them; use --index 'IVF1,Flat'"
    ):
        train.check_trainable(make_index("IVF64,Flat", 384, "cosine"), "IVF64,Flat", 50)
    assert "recall may suffer" in train.check_trainable(make_index("IVF8,Flat", 384, "cosine"), "IVF8,Flat", 100)[0]


@pytest.fixture(scope="module")
def sample(built):
    output, manifest = built
    version = output / "versions" / manifest.run_id
    return np.concatenate(
        [
            np.asarray(load_embeddings(shard_dir(version, s.shard_id), st.passages, 384))
            for s, st in zip(manifest.shards, manifest.shard_states)
        ]
    )


def test_training_is_deterministic_for_a_seed(sample):
    a = train.train_index("IVF4,PQ16np", 384, "cosine", sample, seed=5, use_gpu=False)
    b = train.train_index("IVF4,PQ16np", 384, "cosine", sample, seed=5, use_gpu=False)
    c = train.train_index("IVF4,PQ16np", 384, "cosine", sample, seed=6, use_gpu=False)
    assert trained_fingerprint(a) == trained_fingerprint(b) != trained_fingerprint(c)
    assert faiss.extract_index_ivf(a).nprobe == 1 and a.ntotal == 0


def test_a_rerun_keeps_the_trained_index_of_unchanged_inputs(built, tmp_path):
    output, manifest = built
    version = tmp_path / "version"
    shutil.copytree(output / "versions" / manifest.run_id, version)
    copy = Manifest.load(version)
    trained = train.run(copy.config, copy, Store(str(version)), StageProgress(quiet=True))
    assert copy.reused.train and trained == manifest.training and copy.nprobe == manifest.training.nprobe
