"""The merge stage (stages/merge.py): merging shard indexes gives exactly the ids and distances of one
monolithic index built from the same trained index and vectors (in RAM and on disk), and refusal of shards
that do not belong."""

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from rayindex.errors import RayIndexError
from rayindex.infra.files import load_embeddings
from rayindex.infra.storage import Store, file_sha256
from rayindex.ivf.index import read_merged, trained_fingerprint
from rayindex.layout import EMBEDDINGS_FILE, SHARD_INDEX_FILE, TRAINED_FILE, VECTOR_IDS_FILE, shard_dir
from rayindex.stages.add import add_shard
from rayindex.stages.merge import check_shard, merge_shards
from rayindex.stages.train import train_index


@pytest.fixture(scope="module")
def vectors(built):
    """The real MiniLM embeddings and global ids the build stored, in global order."""
    output, manifest = built
    version = Path(output) / "versions" / manifest.run_id
    dirs = [shard_dir(version, s.shard_id) for s in manifest.shards]
    x = np.concatenate([np.asarray(load_embeddings(d, st.passages, 384)) for d, st in zip(dirs, manifest.shard_states)])
    ids = np.concatenate([np.load(d / VECTOR_IDS_FILE) for d in dirs])
    return version, manifest, x, ids


def monolithic(trained_path, x, ids):
    index = faiss.read_index(str(trained_path))
    index.add_with_ids(x, ids)
    return index


def assert_same_results(a, b, queries, nlist, exact=True):
    for nprobe in sorted({1, max(1, nlist // 2), nlist}):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        da, ia = a.search(queries, 20, params=params)
        db, ib = b.search(queries, 20, params=params)
        if exact:
            assert np.array_equal(ia, ib), f"ids differ at nprobe={nprobe}"
            assert np.array_equal(da, db), f"distances differ at nprobe={nprobe}"
        else:
            # a float pre-transform (OPQ/PCA) is a matrix product whose rounding depends on the batch
            # shape, so shards and one big add may differ in the last bits of a few codes
            assert np.mean(ia == ib) >= 0.99, f"ids differ at nprobe={nprobe}"
            assert np.allclose(da, db, atol=1e-3), f"distances differ at nprobe={nprobe}"


def test_published_in_ram_merge_equals_monolithic(vectors):
    version, manifest, x, ids = vectors
    assert manifest.merge.on_disk is False
    assert_same_results(read_merged(version), monolithic(version / TRAINED_FILE, x, ids), x[::7], manifest.nlist)


def test_on_disk_merge_equals_monolithic_and_survives_a_move(vectors, tmp_path):
    version, manifest, x, ids = vectors
    shard_paths = [str(shard_dir(version, s.shard_id) / SHARD_INDEX_FILE) for s in manifest.shards]
    (tmp_path / "a").mkdir()
    result = merge_shards(str(version / TRAINED_FILE), shard_paths, str(tmp_path / "a"), on_disk=True, nprobe=3)
    assert result.on_disk and result.files == ["index.faiss", "index.ivfdata"] and result.ntotal == len(ids)
    expected = monolithic(version / TRAINED_FILE, x, ids)
    merged = read_merged(tmp_path / "a")
    assert faiss.extract_index_ivf(merged).nprobe == 3  # the run's nprobe, stored in the index
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists), faiss.OnDiskInvertedLists)
    assert_same_results(merged, expected, x[::7], manifest.nlist)
    shutil.move(tmp_path / "a", tmp_path / "moved")  # the .ivfdata is found beside the index, wherever it is
    assert_same_results(read_merged(tmp_path / "moved"), expected, x[::7], manifest.nlist)


def make_shards(root: Path, x: np.ndarray, ids: np.ndarray, n_shards: int) -> list[Path]:
    dirs = []
    for k, (part_x, part_ids) in enumerate(zip(np.array_split(x, n_shards), np.array_split(ids, n_shards))):
        d = root / f"{k:05d}"
        d.mkdir(parents=True)
        part_x.astype("<f4").tofile(d / EMBEDDINGS_FILE)
        np.save(d / VECTOR_IDS_FILE, part_ids)
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("index_string", ["OPQ8_64,IVF4,PQ8np", "PCAR64,IVF4,SQ8", "IVF4,SQ8", "IVF4,Flat"])
@pytest.mark.parametrize("on_disk", [False, True])
def test_merge_equals_monolithic_for_other_index_types(vectors, tmp_path, index_string, on_disk):
    _, _, x, ids = vectors
    trained = train_index(index_string, 384, "cosine", x, seed=3, use_gpu=False)
    version = Store(str(tmp_path))  # a version folder: trained.faiss and shards/NNNNN/
    trained_path = tmp_path / TRAINED_FILE
    faiss.write_index(trained, str(trained_path))
    dirs = make_shards(tmp_path / "shards", x, ids, 4)
    for k, d in enumerate(dirs):
        add_shard(version, file_sha256(trained_path), k, len(np.load(d / VECTOR_IDS_FILE)), {}, 384)
        check_shard(str(d / SHARD_INDEX_FILE), trained_fingerprint(trained), np.sort(np.load(d / VECTOR_IDS_FILE)))
    (tmp_path / "out").mkdir()
    merge_shards(str(trained_path), [str(d / SHARD_INDEX_FILE) for d in dirs], str(tmp_path / "out"), on_disk, nprobe=1)
    exact = "OPQ" not in index_string and "PCA" not in index_string
    assert_same_results(read_merged(tmp_path / "out"), monolithic(trained_path, x, ids), x[::5], 4, exact)


def test_refuses_shard_from_another_trained_index_even_with_same_centroids(vectors, tmp_path):
    _, _, x, ids = vectors
    a = train_index("IVF4,PQ16np", 384, "cosine", x, seed=3, use_gpu=False)
    # same coarse centroids, PQ codebooks trained on other points: FAISS's merge_from would accept it
    b = faiss.IndexIVFPQ(
        faiss.clone_index(faiss.downcast_index(a.quantizer)), 384, 4, 16, 8, faiss.METRIC_INNER_PRODUCT
    )
    b.do_polysemous_training = False
    b.train(x[::-1][:300].copy())
    b.add_with_ids(x[:50], ids[:50])
    faiss.write_index(b, str(tmp_path / "b.faiss"))
    with pytest.raises(RayIndexError, match="not built from this run's trained index"):
        check_shard(str(tmp_path / "b.faiss"), trained_fingerprint(a), ids[:50])


def test_refuses_ids_that_are_not_the_shards_rows(vectors, tmp_path):
    _, _, x, ids = vectors
    a = train_index("IVF4,Flat", 384, "cosine", x, seed=3, use_gpu=False)
    shard = faiss.clone_index(a)
    shard.add_with_ids(x[:10], np.arange(10, dtype=np.int64))  # local ids 0..9, not the global rows 100..109
    faiss.write_index(shard, str(tmp_path / "s.faiss"))
    with pytest.raises(RayIndexError, match="not the shard's vector ids"):
        check_shard(str(tmp_path / "s.faiss"), trained_fingerprint(a), np.arange(100, 110))
    dup = faiss.clone_index(a)
    dup.add_with_ids(x[:3], np.array([100, 101, 101], dtype=np.int64))
    faiss.write_index(dup, str(tmp_path / "d.faiss"))
    with pytest.raises(RayIndexError, match="id 101 appears twice"):
        check_shard(str(tmp_path / "d.faiss"), trained_fingerprint(a), np.array([100, 101, 102]))
