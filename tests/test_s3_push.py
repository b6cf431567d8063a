"""The encoder's push of a shard to an S3 output overlaps the next shard's encode (stages/encode.py store_shard,
run by infra/actor_pool.py as the shard's follow-up), against the real store (the session's SeaweedFS) behind a
proxy that holds or refuses uploads: a held push of shard 0 lasts until shard 1's encode has begun, and a push
that keeps failing fails the build naming the object, after which the same command resumes with the shards
whose push succeeded."""

import http.client
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rayindex.infra.storage import Store
from rayindex.layout import EMBEDDINGS_FILE, SHARD_ENCODE_FILES, shard_rel
from rayindex.manifest import Manifest
from rayindex.versions import version_store

from helpers import build_args, client_env, s3_output, write_parquet

pytestmark = pytest.mark.slow  # two builds against S3: 418 s measured on the 2 shared cores (the refused push retried)

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
HOLD_S = 90.0  # at most how long shard 0's upload is held waiting for shard 1's encode to begin
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}
SHARD_PUT = re.compile(r"/versions/([^/]+)/shards/(\d+)/")


class SlowStore:
    """A proxy to the real S3 server for the build's clients (--s3-endpoint: the driver's and, through the job's
    runtime environment, its workers'): each request forwarded as it came, Host header included (the SigV4
    signature covers it). While `hold_shard_0` is set, the first upload of a shard 0 file waits until the
    encoder's folder of shard 1 exists in its node's mirror (this machine's cache: the encode of shard 1 has
    begun), or HOLD_S; uploads of shards in `refused` are answered 503 SlowDown. What it did: `held`."""

    def __init__(self, output: str, upstream_port: int):
        self.output, self.upstream_port = output, upstream_port
        self.hold_shard_0, self.refused, self.held = False, set(), []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    raw = b""  # forwarded as framed: the header goes on with it
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                                raw += trailer
                            return raw + b"\r\n"
                        raw += self.rfile.read(size + 2)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def forward(self) -> None:
                body = self.body()
                shard = SHARD_PUT.search(self.path) if self.command == "PUT" else None
                if shard and int(shard[2]) in proxy.refused:
                    error = b"<Error><Code>SlowDown</Code><Message>refused by the test's proxy</Message></Error>"
                    self.send_response_only(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                if shard and int(shard[2]) == 0 and proxy.hold_shard_0:
                    proxy.hold_shard_0 = False
                    proxy.held.append(proxy.wait_for_encode_of_shard_1(shard[1]))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    headers["Transfer-Encoding"] = "chunked"
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response_only(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for_encode_of_shard_1(self, run_id: str) -> dict:
        """Hold this upload until the encoder has made shard 1's folder (its first step), or HOLD_S."""
        folder = version_store(Store(self.output), run_id).local(shard_rel(1))
        started = time.monotonic()
        while not folder.exists() and time.monotonic() - started < HOLD_S:
            time.sleep(0.05)
        return {"shard_1_began": folder.exists(), "held_s": round(time.monotonic() - started, 2)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_pushes_overlap_the_next_encode_and_a_failed_push_fails_the_build_which_then_resumes(
    ray_address, s3_server, docs, tmp_path
):
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:60])  # local: an encoder's S3 calls are its pushes
    output = s3_output(s3_server, "push")
    store = SlowStore(output, int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))  # SeaweedFS (conftest)
    command = [
        RAYINDEX,
        *build_args(corpus, output, "--shards", "3", "--encoders", "1", "--index", "IVF2,Flat", "--no-tune"),
        *("--s3-endpoint", store.endpoint, "--storage-retry", "4", "--ray-address", ray_address, "--quiet"),
    ]

    def build() -> subprocess.CompletedProcess:
        return subprocess.run(command, env=client_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)

    try:
        store.hold_shard_0, store.refused = True, {1}
        started = time.monotonic()
        failed = build()
        failed_s = time.monotonic() - started

        # shard 0's upload was under way (held) when shard 1's encode began: the push is off the forward thread
        assert store.held and store.held[0]["shard_1_began"], (store.held, failed.stderr[-3000:])
        held_s = store.held[0]["held_s"]
        print(f"\nshard 0's push held {held_s} s, until shard 1's encode began; the run failed in {failed_s:.0f} s")

        # shard 1's push kept failing: the build failed naming the object, shard 0 (pushed) recorded, no other
        assert failed.returncode == 1, failed.stdout + failed.stderr
        named = rf"storage unavailable: could not write s3://{s3_server.bucket}/push-\w+/versions/[^/]+/shards/00001/"
        assert re.search(named, failed.stderr), failed.stderr
        assert "re-run the same command" in failed.stderr and "Traceback" not in failed.stderr
        run_id = SHARD_PUT.search(failed.stderr)[1]
        version = version_store(Store(output), run_id)
        manifest = Manifest.from_json(s3_server.fs.cat(version.url("manifest.json")), "manifest.json")
        assert [bool(s.embeddings_sha256) for s in manifest.shard_states] == [True, False, False]
        assert not version.local(shard_rel(0, EMBEDDINGS_FILE)).exists()  # pushed, then dropped from the mirror

        store.refused = set()
        resumed = build()
    finally:
        store.close()

    # the same command resumes: shard 0 kept (its files in the store verified), the others encoded and pushed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    published = Manifest.from_json(s3_server.fs.cat(version.url("manifest.json")), "manifest.json")
    assert published.run_id == run_id and published.status == "published" and published.reused.encode == [0]
    assert published.counts.docs_encoded == 60
    assert s3_server.fs.cat(f"{output}/CURRENT").decode().strip() == run_id
    assert {shard_rel(i, name) for i in range(3) for name in SHARD_ENCODE_FILES} <= set(version.file_sizes())
