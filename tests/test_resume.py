"""Resume and faults: a driver SIGKILLed while encoding, adding or merging, re-run with the same
command, resumes (finished shards verified by checksum, not recomputed) and publishes an index
identical to an uninterrupted run's; an encoder actor killed mid-shard is restarted and the
result is identical too."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayindex.builder import build
from rayindex.layout import CURRENT, EMBEDDINGS_FILE, VERSIONS, shard_dir
from rayindex.manifest import Manifest
from rayindex.query.search import open_index

from helpers import DASHBOARD_PORT, build_args, build_config, client_env, write_jsonl, write_parquet

pytestmark = pytest.mark.slow  # killed and resumed builds (about 100 s)

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
# one encoder everywhere: the same torch thread count as the reference, so embeddings are bit-identical
OPTIONS = dict(shards=3, index="IVF8,PQ16np", on_disk=False, encoders=1)
SHORT_BODY = 120  # characters kept of each document's body (see corpus)
LONG_KEPT = {
    "argparse",
    "_pyio.open",
    "aifc",
}  # kept whole: a few documents of several passages each resume like the rest


@pytest.fixture(scope="module")
def corpus(corpus_dir, tmp_path_factory) -> Path:
    """The session's corpus, file for file (the same rows, row groups and rows without text), each body but
    LONG_KEPT's cut to its first SHORT_BODY characters. What this module proves does not depend on the texts' length,
    and the
    model, which encodes these shards about twenty times here, costs in proportion to it (a whole docstring
    runs up to the model's 256 tokens)."""
    root = tmp_path_factory.mktemp("resume-corpus")

    def cut(row: dict) -> dict:
        if not isinstance(row.get("body"), str) or row["id"] in LONG_KEPT:
            return row
        return dict(row, body=row["body"][:SHORT_BODY])

    for path in sorted(p for p in corpus_dir.iterdir() if p.is_file()):
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            write_parquet(
                root / path.name, [cut(r) for r in parquet.read().to_pylist()], parquet.metadata.row_group(0).num_rows
            )
        else:
            write_jsonl(
                root / path.name, [cut(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
            )
    return root


def cli_build(corpus_dir, out: Path, ray_address: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    """`rayindex build` exactly as a user would re-run it (the kill_after run SIGKILLs itself)."""
    env = client_env()
    if kill_after:
        env["RAYINDEX_KILL_AFTER"] = kill_after
    args = [
        RAYINDEX,
        *build_args(corpus_dir, out),
        "--shards",
        "3",
        "--index",
        "IVF8,PQ16np",
        "--in-ram",
        "--encoders",
        "1",
        "--seed",
        "7",
        "--no-tune",
        "--quiet",
        "--ray-address",
        ray_address,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def only_version(out: Path) -> Path:
    versions = [p for p in (out / VERSIONS).iterdir() if not p.name.startswith(".")]
    assert len(versions) == 1, versions
    return versions[0]


@pytest.fixture(scope="module")
def reference(ray_address, corpus, tmp_path_factory):
    """An uninterrupted build with the same settings: (output, query vectors, its ids and distances)."""
    out = tmp_path_factory.mktemp("reference")
    build(build_config([corpus], out, **OPTIONS))
    index = open_index(out)
    queries = index.encode(
        [
            "read a file line by line",
            "compress data",
            "parse command line options",
            "thread pool executor",
            "format a date",
        ]
    )
    distances, ids = index.search_vectors(queries, 10, nprobe=8)
    return out, queries, ids, distances


@pytest.fixture(scope="module")
def killed_at_add(corpus, ray_address, tmp_path_factory):
    """A run killed after adding its first shard, done once for the two tests that start from it: returns
    restore(), which puts its output folder back exactly as the kill left it (a copy taken at once, with its
    files' mtimes) and returns it. Always the same folder: the output is part of the run's fingerprint, so a
    copy elsewhere would not resume."""
    root = tmp_path_factory.mktemp("killed-at-add")
    out, as_killed = root / "out", root / "as-killed"
    killed = cli_build(corpus, out, ray_address, "add:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    shutil.copytree(out, as_killed)

    def restore() -> Path:
        shutil.rmtree(out)
        shutil.copytree(as_killed, out)
        return out

    return restore


def assert_identical(out: Path, reference) -> None:
    _, queries, ids, distances = reference
    distances2, ids2 = open_index(out).search_vectors(queries, 10, nprobe=8)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(distances2, distances)
    ref = Manifest.load(only_version(reference[0]))
    got = Manifest.load(only_version(out))
    assert [s.embeddings_sha256 for s in got.shard_states] == [s.embeddings_sha256 for s in ref.shard_states]
    assert got.training.trained_fingerprint == ref.training.trained_fingerprint


@pytest.mark.parametrize(
    "kill_after, reused",
    [
        ("encode:1", {"encode": [0]}),
        ("add:1", {"encode": [0, 1, 2], "train": True}),
        ("merge:2", {"encode": [0, 1, 2], "train": True, "add": [0, 1, 2]}),
    ],
)
def test_killed_driver_resumes_and_matches_uninterrupted_run(
    kill_after, reused, corpus, ray_address, reference, tmp_path, request
):
    if kill_after == "add:1":  # the same killed run as test_a_damaged_finished_shard_is_recomputed's, run once
        out = request.getfixturevalue("killed_at_add")()
    else:
        out = tmp_path / "out"
        killed = cli_build(corpus, out, ray_address, kill_after)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / CURRENT).exists()  # nothing published
    version = only_version(out)
    stopped = Manifest.load(version)
    assert stopped.status == "running"
    finished = {
        s.shard_id: os.stat(shard_dir(version, s.shard_id) / EMBEDDINGS_FILE).st_mtime_ns
        for s in stopped.shard_states
        if s.embeddings_sha256
    }

    resumed = cli_build(corpus, out, ray_address)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {version.name}" in resumed.stderr
    manifest = Manifest.load(only_version(out))  # the same version folder, now published
    assert manifest.status == "published" and len(manifest.resumed) == 1
    for stage, expected in reused.items():
        assert getattr(manifest.reused, stage) == expected, stage
    for sid, mtime in finished.items():  # finished shards were verified, not rewritten
        assert os.stat(shard_dir(version, sid) / EMBEDDINGS_FILE).st_mtime_ns == mtime
    assert_identical(out, reference)


def test_a_damaged_finished_shard_is_recomputed(corpus, ray_address, reference, killed_at_add):
    """Verification is by content: a finished shard whose file no longer matches its checksum is redone."""
    out = killed_at_add()  # a run killed after adding its first shard
    version = only_version(out)
    damaged = shard_dir(version, 1) / EMBEDDINGS_FILE
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    build(build_config([corpus], out, **OPTIONS))
    manifest = Manifest.load(version)
    assert manifest.reused.encode == [0, 2]
    assert manifest.reused.train is True  # shard 1 re-encoded to the same bytes: the training sample is unchanged
    assert_identical(out, reference)


def test_killed_encoder_actor_is_restarted_and_result_identical(corpus, ray_address, reference, tmp_path):
    from ray.util.state import list_actors

    out = tmp_path / "out"
    errors = []
    build = threading.Thread(target=lambda: errors.append(run_or_error(build_config([corpus], out, **OPTIONS))))
    build.start()
    deadline = time.monotonic() + 120
    encoders = dict(
        address=f"http://127.0.0.1:{DASHBOARD_PORT}",
        filters=[("class_name", "=", "ShardEncoder"), ("state", "=", "ALIVE")],
        detail=True,
    )
    while not (alive := list_actors(**encoders)):
        assert time.monotonic() < deadline, "no encoder actor started"
        time.sleep(0.2)
    # alive: the model is loaded; the first shard's folder: it is being encoded (its files appear only when complete)
    while not any(shard_dir(version, 0).is_dir() for version in out.glob(f"{VERSIONS}/*")):
        assert time.monotonic() < deadline, "the first shard was not started"
        time.sleep(0.05)
    os.kill(alive[0]["pid"], signal.SIGKILL)
    build.join(timeout=300)
    assert errors == [None]
    manifest = Manifest.load(only_version(out))
    assert manifest.status == "published"
    assert_identical(out, reference)


def run_or_error(config):
    try:
        build(config)
    except Exception as exc:  # reported by the test's assertion
        return exc
    return None
