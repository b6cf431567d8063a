"""The Python API as the README shows it (every command of the CLI a function), and an index that describes
itself to plain FAISS."""

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

import rayindex
from rayindex.layout import INDEX_INFOS_FILE, MERGED_FILE
from rayindex.versions import open_current

from helpers import build_args, client_env, write_parquet


@pytest.fixture(scope="module")
def api_build(ray_address, docs, tmp_path_factory):
    """The README's example: build with keyword options, open, search, ask (on-disk merge)."""
    root = tmp_path_factory.mktemp("api")
    corpus = write_parquet(root / "docs.parquet", docs[:120])
    manifest = rayindex.build(
        corpus,
        output=str(root / "out"),
        id_column="id",
        template="{title}: {body}",
        shards=2,
        index="IVF4,Flat",
        on_disk=True,
        target_recall=0.99,
    )
    return root / "out", manifest


@pytest.mark.slow  # a build with on-disk merge and tuning (about 40 s)
def test_build_open_search_ask(api_build, docs):
    output, manifest = api_build
    assert manifest.status == "published" and manifest.counts.docs_encoded == 120 and manifest.merge.on_disk
    index = rayindex.open_index(output)
    target = docs[30]
    assert index.search(f"{target['title']}: {target['body']}", k=3)[0]["id"] == target["id"]
    answer = index.ask("How do I decode base64 data?", k=3)
    assert [s["n"] for s in answer["sources"]] == [1, 2, 3] and any(f"[{n}]" in answer["answer"] for n in (1, 2, 3))


def test_api_refuses_unknown_options_naming_them(tmp_path):
    with pytest.raises(
        rayindex.UsageError, match=r"shard_sise: not a setting of BuildConfig \(did you mean shard_size\?\)"
    ):
        rayindex.build(tmp_path, output=str(tmp_path / "o"), shard_sise=3)


@pytest.mark.parametrize("which", ["built", pytest.param("api_build", marks=pytest.mark.slow)])
def test_plain_faiss_gets_the_manifests_nprobe_and_the_same_top10(which, request):
    """faiss.read_index + search with no parameters = `rayindex search` at the manifest's nprobe (no re-ranking)."""
    output, _ = request.getfixturevalue(which)
    published = rayindex.open_index(output)
    manifest = published.manifest
    assert manifest.refine_factor is None
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.merge.on_disk else 0  # the flag index_infos.json names
    plain = faiss.read_index(str(published.version_dir / MERGED_FILE), flags)
    assert faiss.extract_index_ivf(plain).nprobe == manifest.nprobe
    assert manifest.nprobe > 1 or which == "built"  # tuned for 0.99 recall (built: IVF8 at its default, 1)
    queries = published.encode(["parse a JSON document", "compress data with zlib", "open a network socket", "base64"])
    distances, ids = plain.search(queries, 10)
    ours, our_ids = published.search_vectors(queries, 10)
    assert np.array_equal(ids, our_ids) and np.allclose(distances, ours, atol=1e-6)
    infos = json.loads((published.version_dir / INDEX_INFOS_FILE).read_text())
    assert infos["index_key"] == manifest.index_string and infos["nprobe"] == manifest.nprobe
    assert infos["metric_type"] == "METRIC_INNER_PRODUCT" and infos["normalized"] is True
    assert infos["vectors dimension"] == 384 and infos["nb vectors"] == manifest.merge.ntotal
    assert infos["model"] == manifest.model.name and "vector_ids.npy" in infos["ids"]
    assert ("IO_FLAG_ONDISK_SAME_DIR" in infos["read_with"]) == manifest.merge.on_disk
    assert manifest.files_sha256[INDEX_INFOS_FILE]


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    assert rayindex.__version__ == version("rayindex")


@pytest.mark.slow  # a CLI build in a subprocess (about 20 s)
def test_a_pipelines_package_in_the_working_directory_breaks_nothing(ray_address, docs, tmp_path):
    """`python -m rayindex build` run where a user's own `pipelines` package is importable first."""
    shadow = tmp_path / "pipelines"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('this is the user project pipelines package')\n")
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:30])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayindex",
            *build_args(corpus, tmp_path / "out"),
            "--index",
            "IVF1,Flat",
            "--ray-address",
            ray_address,
            "--quiet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=client_env(),
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert open_current(tmp_path / "out")[1].counts.docs_encoded == 30


def test_tune_evaluate_partition_and_plan_are_functions(built, tmp_path):
    """What `rayindex tune`, `eval`, `partition` and `plan` print, as the records the CLI prints them from
    (`rayindex serve` is rayindex.serve: tests/test_serve.py serves through it)."""
    from rayindex.ivf.capacity import plan_capacity
    from rayindex.layout import EVAL_FILE

    index = tmp_path / "index"
    shutil.copytree(built[0], index)
    tuning = rayindex.tune(index, target_recall=0.9, n_queries=60)
    published = rayindex.open_index(index)
    assert published.manifest.tuning == tuning and published.manifest.nprobe == tuning.nprobe
    assert tuning.target == 0.9 and tuning.queries == 60 and tuning.sweep
    result = rayindex.evaluate(index, ks="1,10", n_queries=40)
    assert result["version"] == published.run_id and result["ks"] == [1, 10] and result["queries"] == 40
    assert result["default_nprobe"] == tuning.nprobe
    stored = json.loads((published.version_dir / EVAL_FILE).read_text())
    assert stored["sweep"] == json.loads(json.dumps(result["sweep"]))  # eval.json: what evaluate returned
    manifest, parts = rayindex.partition(index, shards=2)
    assert len(parts) == 2 and manifest.serving[2] == parts
    assert sum(part.vectors for part in parts) == manifest.merge.ntotal
    assert rayindex.open_index(index).manifest.serving[2] == parts  # recorded in the published manifest
    assert rayindex.plan(1e9, gpus=8) == plan_capacity(
        1e9, 384, None, gpus=8, cores=2, cpus_per_gpu=4, passages_per_doc=1
    )
    with pytest.raises(rayindex.UsageError, match="--shards: Field required"):
        rayindex.partition(index)
    with pytest.raises(
        rayindex.UsageError, match=r"n_querys: not a setting of EvalOptions \(did you mean n_queries\?\)"
    ):
        rayindex.evaluate(index, n_querys=3)


def test_queries_are_encoded_in_one_thread_whoever_asks(built):
    """A server asks from whichever thread of its pools is free; the model runs in text/model.py's MODEL_THREAD
    (torch keeps an OpenMP team per calling thread, and a second one slowed every search: why there), with the
    vectors the caller's own thread would get."""
    index = rayindex.open_index(built[0])
    texts = ["parse a JSON document", "read a file line by line"]
    alone = index.encode(texts)
    ran_in = set()
    index.model.register_forward_pre_hook(lambda *_: ran_in.add(threading.current_thread().name))
    with ThreadPoolExecutor(4) as pool:
        from_threads = list(pool.map(lambda _: index.encode(texts), range(8)))
    assert all(np.array_equal(vectors, alone) for vectors in from_threads)
    assert index.encode(texts).tobytes() == alone.tobytes()
    assert len(ran_in) == 1 and ran_in.pop().startswith("rayindex-model")
