"""The serving app over real HTTP on 127.0.0.1: search, ask, health, metrics, bad input, auth, hot swap."""

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

import rayindex
from rayindex.builder import build
from rayindex.config import ServeConfig
from rayindex.errors import RayIndexError
from rayindex.infra.files import write_text_atomic
from rayindex.layout import CURRENT
from rayindex.query.launch import start_serving
from rayindex.query.metrics import LATENCY_BUCKETS

from helpers import build_config, free_port, searches_meanwhile, wait_for_version, write_parquet
from test_generate import base_url, chat_server  # noqa: F401 - the OpenAI-compatible stand-in server fixture

pytestmark = pytest.mark.slow  # the Serve app over real HTTP, a hot swap under load (about 60 s)


@pytest.fixture(scope="module")
def served(built, tmp_path_factory):
    """The session build, copied (a hot swap will publish into it), served by one replica through the
    Python API (rayindex.serve, what `rayindex serve` calls)."""
    output = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(built[0], output)
    # replica_cpus=0: the replica must not hold a CPU that the hot-swap build's encoders need
    settings = rayindex.serve(output, poll_interval=0.3, port=free_port(), replica_cpus=0)
    assert settings == ServeConfig(index=str(output), poll_interval=0.3, port=settings.port, replica_cpus=0)
    yield output, f"http://127.0.0.1:{settings.port}", settings
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[1], timeout=60) as c:
        yield c


def test_search_returns_the_document(client, docs, built):
    target = docs[40]
    r = client.post("/search", json={"query": f"{target['title']}: {target['body']}", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == built[1].run_id
    assert body["hits"][0]["id"] == target["id"]
    assert set(body["hits"][0]) == {"id", "score", "passage", "start", "end", "text", "metadata"}
    assert len({h["id"] for h in body["hits"]}) == 3  # one hit per document
    assert client.post("/search", json={"query": "base64", "k": 2, "nprobe": 8}).json()["hits"]
    for mode in ("dense", "lexical", "hybrid"):  # the build has a lexical index: every mode answers
        r = client.post("/search", json={"query": target["title"], "k": 3, "mode": mode})
        assert r.status_code == 200 and r.json()["hits"], (mode, r.text)
    assert client.post("/ask", json={"question": target["title"], "mode": "lexical"}).json()["sources"]


def test_search_filters_on_metadata_and_returns_passages_per_document(client, docs):
    r = client.post("/search", json={"query": "open a file and read its lines", "k": 5, "filter": {"kind": "class"}})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and all(h["metadata"]["kind"] == "class" for h in hits)
    modules = sorted({d["module"] for d in docs})[:3]
    hits = client.post("/search", json={"query": "module", "k": 10, "filter": {"module": {"in": modules}}}).json()[
        "hits"
    ]
    assert hits and all(h["metadata"]["module"] in modules for h in hits)
    several = client.post("/search", json={"query": "format a string", "k": 4, "per_document": 3}).json()["hits"]
    assert len({h["id"] for h in several}) == 4 and len(several) >= 4
    r = client.post("/search", json={"query": "x", "filter": {"colour": "red"}})
    assert r.status_code == 422 and "no metadata column 'colour'" in r.json()["detail"]
    r = client.post("/search", json={"query": "x", "filter": "kind=class"})
    assert r.status_code == 422 and "filter" in r.json()["detail"]


def test_ask_answers_with_citations_and_sources(client):
    r = client.post("/ask", json={"question": "How do I decode base64 data?", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generator"] == "extractive"
    assert [s["n"] for s in body["sources"]] == [1, 2, 3]
    assert all(0 <= s["start"] < s["end"] for s in body["sources"])  # each cites a span of its document
    assert any(f"[{n}]" in body["answer"] for n in (1, 2, 3))
    assert set(body["timings_ms"]) == {"retrieve", "generate", "total"}


def metrics_text(client, *wanted: str, limit_s: float = 120) -> str:
    """/metrics once it shows every wanted line (Ray's metrics agents export what the replicas record
    every few seconds, each metric on its own schedule)."""
    deadline = time.monotonic() + limit_s
    while not all(w in (text := client.get("/metrics").text) for w in wanted) and time.monotonic() < deadline:
        time.sleep(1)
    return text


def metric_value(client, series: str) -> float:
    """The value of one series in /metrics ('rayindex_requests_total{endpoint="/search",status="411"}'), 0 when
    absent."""
    found = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def swaps_counted(client) -> float:
    """rayindex_index_swaps_total in /metrics (0 before the first swap)."""
    return metric_value(client, "rayindex_index_swaps_total")


def test_health_metrics_and_openapi(client, built):
    health = client.get("/healthz").json()
    assert (
        health["status"] == "ok"
        and health["version"] == built[1].run_id
        and health["documents"] == built[1].counts.docs_encoded
    )
    assert health["vectors"] == built[1].merge.ntotal
    wanted = (
        'rayindex_requests_total{endpoint="/search",status="200"}',
        "rayindex_request_latency_seconds_bucket",
        f'rayindex_replicas_serving{{version="{built[1].run_id}"}} 1.0',
    )
    metrics = metrics_text(client, *wanted)
    for line in wanted:
        assert line in metrics, line
    # series nobody has made yet are there, at 0 (a scrape right after start has them all)
    assert 'rayindex_requests_total{endpoint="/metrics",status="413"} 0.0' in metrics
    bounds = re.findall(r'^rayindex_request_latency_seconds_bucket\{endpoint="/search",le="([^"]+)"\}', metrics, re.M)
    assert bounds == [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]  # in numeric order: 2.5 before 10.0
    assert client.get("/docs").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "path, payload, field",
    [
        ("/search", {"query": ""}, "query"),
        ("/search", {"query": "   \n"}, "query"),
        ("/search", {"query": "x" * 2001}, "query"),
        ("/search", {"query": "ok", "k": 0}, "k"),
        ("/search", {"query": "ok", "k": 101}, "k"),
        ("/search", {"query": "ok", "k": "ten"}, "k"),
        ("/search", {"query": "ok", "nprobe": 0}, "nprobe"),
        ("/search", {"query": "ok", "nprobe": 9}, "nprobe"),  # the index has 8 lists
        ("/search", {"k": 3}, "query"),
        ("/search", {"query": "ok", "mode": "fuzzy"}, "mode"),
        ("/ask", {"question": 42}, "question"),
        ("/ask", {"question": " "}, "question"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client, path, payload, field):
    r = client.post(path, json=payload)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["detail"]


def test_malformed_json_is_a_4xx(client):
    r = client.post("/search", content=b'{"query": "unterminated', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]


def test_a_huge_filter_column_name_is_a_quick_422_and_the_replica_stays_healthy(client):
    """The ReDoS of #20: a 100,000-character filter column name froze a one-replica server for ~114 s (its
    message went through a quadratic redaction on the event loop). Now: a 422 quoting 80 characters of it,
    and /healthz answers right after."""
    import time

    start = time.monotonic()
    r = client.post("/search", json={"query": "read a file", "filter": {"password" * 12_500: "x"}})
    assert r.status_code == 422 and "a column name of at most 256 characters" in r.json()["detail"]
    assert len(r.json()["detail"]) < 300
    assert client.get("/healthz", timeout=5).status_code == 200
    assert time.monotonic() - start < 30  # the refusal itself takes milliseconds; the bound allows a loaded machine


def test_hot_swap_under_concurrent_requests(served, client, docs, tmp_path, built):
    """Publish a new version while 4 clients search: no failed request, every response from one whole version."""
    output, url, _ = served
    old_ids = {d["id"] for d in docs}
    new_docs = [dict(d, id=f"v2-{d['id']}") for d in docs[:40]]
    write_parquet(tmp_path / "v2" / "docs.parquet", new_docs)
    swaps_before = swaps_counted(client)  # replicas of earlier "rayindex" apps in this session may still be counted
    with searches_meanwhile(url, {"query": "read a file", "k": 5}, clients=4) as (results, failures):
        new = build(build_config([tmp_path / "v2"], output, shards=1, index="IVF1,Flat"))
        wait_for_version(client, new.run_id)
    assert (Path(output) / CURRENT).read_text().strip() == new.run_id
    assert failures == []
    versions = {r["version"] for r in results}
    assert versions == {built[1].run_id, new.run_id}
    for r in results:
        ids = {h["id"] for h in r["hits"]}
        if r["version"] == new.run_id:
            assert all(i.startswith("v2-") for i in ids), ids
        else:
            assert ids <= old_ids, ids
    deadline = time.monotonic() + 120  # Ray's metrics agents export what the replicas record every 2 s (conftest)
    while swaps_counted(client) != swaps_before + 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert swaps_counted(client) == swaps_before + 1


def test_bearer_token_auth(served):
    """Redeploy with RAYINDEX_API_KEY set: everything but /healthz needs the token."""
    output, url, settings = served
    start_serving(settings.model_copy(update={"api_key": "s3cret"}))
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in (
            ("post", "/search"),
            ("post", "/ask"),
            ("get", "/metrics"),
            ("get", "/docs"),
            ("get", "/openapi.json"),
        ):
            r = c.request(method.upper(), path, json={"query": "x", "question": "x"})
            assert r.status_code == 401, (path, r.status_code)
            assert "bearer token" in json.loads(r.text)["detail"]
        wrong = c.post("/search", json={"query": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = c.post("/search", json={"query": "open a file"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["hits"]


def test_ask_with_openai_generator_and_its_failures(served, chat_server):  # noqa: F811
    """/ask through a (stand-in) OpenAI-compatible endpoint; its timeout is a 504 and its error a 502,
    both still carrying the retrieved sources."""
    output, url, settings = served
    start_serving(
        settings.model_copy(
            update={
                "generator": "openai",
                "generator_url": base_url(chat_server),
                "generator_model": "tiny-llm",
                "generator_timeout": 0.5,
            }
        )
    )
    with httpx.Client(base_url=url, timeout=60) as c:
        ok = c.post("/ask", json={"question": "How do I decode base64 data?", "k": 3})
        assert ok.status_code == 200, ok.text
        assert ok.json()["answer"].startswith("Guido") and ok.json()["generator"] == "openai"
        prompt = json.loads(chat_server.requests[-1]["body"])["messages"][1]["content"]
        assert "[1] " in prompt and "How do I decode base64 data?" in prompt
        for mode, status in (("slow", 504), ("error", 502)):
            chat_server.mode = mode
            r = c.post("/ask", json={"question": "How do I decode base64 data?", "k": 3})
            assert r.status_code == status, r.text
            body = r.json()
            assert body["answer"] is None and len(body["sources"]) == 3 and body["detail"]


def test_serve_refuses_missing_or_half_written_index(tmp_path, built):
    with pytest.raises(RayIndexError, match="has no published index"):
        start_serving(ServeConfig(index=str(tmp_path / "nothing")))
    half = tmp_path / "half"
    shutil.copytree(built[0], half)
    run_id = (half / CURRENT).read_text().strip()
    (half / "versions" / run_id / "index.faiss").unlink()  # as if the merge never finished
    with pytest.raises(RayIndexError, match=r"names .* but .*index\.faiss is missing"):
        start_serving(ServeConfig(index=str(half)))


def test_a_damaged_new_version_is_refused_and_the_old_one_served(served, client):
    """CURRENT moved to a version whose index.faiss has a flipped byte: the replica keeps its version,
    /healthz says degraded (once CURRENT is back, ok)."""
    output, _, _ = served
    serving = client.get("/healthz").json()["version"]
    damaged = "20991231-235959-abcdef"
    shutil.copytree(output / "versions" / serving, output / "versions" / damaged)
    manifest = output / "versions" / damaged / "manifest.json"
    manifest.write_text(manifest.read_text().replace(serving, damaged))
    index = output / "versions" / damaged / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))
    # atomically, as a publish moves it: a replica polling CURRENT between a plain write's truncate and its
    # write read it empty, and reported that (version '') instead of the damaged version (a run with a build
    # beside the suite)
    write_text_atomic(output / CURRENT, damaged + "\n")
    try:
        deadline = time.monotonic() + 60
        while (health := client.get("/healthz").json())["status"] != "degraded":
            assert time.monotonic() < deadline, health
            time.sleep(0.3)
        assert health["version"] == serving and health["degraded"]["version"] == damaged
        assert "index.faiss" in health["degraded"]["reason"] and "checksum" in health["degraded"]["reason"]
        r = client.post("/search", json={"query": "read a file", "k": 2})
        assert r.status_code == 200 and r.json()["version"] == serving
    finally:
        write_text_atomic(output / CURRENT, serving + "\n")
        shutil.rmtree(output / "versions" / damaged)
    deadline = time.monotonic() + 30
    while client.get("/healthz").json()["status"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_a_huge_body_is_refused_before_it_is_read(served):
    """413 from Serve's proxy (rayindex.query.gate) on the declared size: the 100 MB are never sent."""
    _, url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        start = time.monotonic()
        conn.sendall(
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
            + b'{"query": "'
            + b"x" * 1000
        )
        reply = b""
        while b"over the limit" not in reply and (chunk := conn.recv(4096)):  # headers and body may come apart
            reply += chunk
        elapsed = time.monotonic() - start
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "over the limit" in reply, reply
    assert elapsed < 5, elapsed


def test_ask_is_bounded(client):
    r = client.post("/ask", json={"question": "How do I decode base64 data?", "k": 21})
    assert r.status_code == 422 and "k: Value error, must be at most 20" in r.json()["detail"]


def test_load_beyond_max_inflight_is_shed_with_retry_after(served):
    """max_inflight=1: of 12 simultaneous searches, those that find the replica busy get 503 at once, with
    Retry-After; /healthz answers meanwhile."""
    _, url, settings = served
    start_serving(settings.model_copy(update={"max_inflight": 1}))
    statuses, lock = [], threading.Lock()

    def one(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/search", json={"query": f"parse json {i}", "k": 3})
            with lock:
                statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    health = httpx.get(url + "/healthz", timeout=30)
    for t in threads:
        t.join()
    assert health.status_code == 200
    codes = [s for s, _ in statuses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, statuses
    assert all(retry == "1" for s, retry in statuses if s == 503)
    start_serving(settings)  # back to the fixture's configuration


def post_head(url: str, head: bytes, until: bytes) -> tuple[str, float]:
    """Send a request's head (and the start of its body) over a raw connection: (the reply up to `until`, seconds
    until then)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        start = time.monotonic()
        conn.sendall(head)
        reply = b""
        while until not in reply and (chunk := conn.recv(4096)):  # headers and body may come apart
            reply += chunk
        return reply.decode(), time.monotonic() - start


def test_a_chunked_body_in_any_case_is_refused_by_the_proxy_and_counted(served, client):
    """`Transfer-Encoding: Chunked` (capital C) used to pass the proxy's gate, which read a 100 MB body whole: now
    411 at once, and the proxy's refusals are counted in /metrics like the replicas' responses."""
    _, url, _ = served
    series = 'rayindex_requests_total{endpoint="/search",status="411"}'
    before = metric_value(client, series)
    for coding in (b"Chunked", b"CHUNKED"):
        reply, elapsed = post_head(
            url,
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: "
            + coding
            + b"\r\n\r\n10000\r\n"
            + b"x" * 0x10000,
            until=b"Content-Length",
        )
        assert reply.startswith("HTTP/1.1 411") and elapsed < 5, (reply, elapsed)
    deadline = time.monotonic() + 120  # Ray's metrics agents export what the proxy records every 2 s (conftest)
    while metric_value(client, series) != before + 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert metric_value(client, series) == before + 2


def replica_pid() -> int:
    """The process of the application's one RagService replica."""
    import ray
    from ray.util.state import list_actors

    (replica,) = list_actors(
        address=ray.get_runtime_context().gcs_address,  # the session's Ray: others may run on this machine
        filters=[("class_name", "=", "ServeReplica:rayindex:RagService"), ("state", "=", "ALIVE")],
    )
    return replica.pid


def timed_search(c) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = c.post("/search", json={"query": "read a file", "k": 2})
    return r, time.monotonic() - start


def test_no_replica_up_means_503_with_retry_after_at_once_then_service_again(served):
    """The only replica frozen (SIGSTOP: Serve's health check allows it 30 s, so it is not replaced meanwhile,
    and nothing races), then killed: searches used to hang 15 s for a 408 (the next 12.7 s). Now the proxy answers
    503 + Retry-After within seconds (the next at once) while no replica answers, and serves again once Serve's
    replacement is up."""
    _, url, _ = served
    pid = replica_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            (first, first_s), (second, second_s) = timed_search(c), timed_search(c)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert first.status_code == 503 and first.headers["retry-after"] == "1" and first_s < 10, (first.text, first_s)
    assert second.status_code == 503 and second.headers["retry-after"] == "1" and second_s < 2, (second.text, second_s)
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=60) as c:
        while (answer := timed_search(c))[0].status_code != 200:
            r, elapsed = answer
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and elapsed < 10, (r.text, elapsed)
            assert time.monotonic() < deadline, "no replica answered within 120 s of the kill"
            time.sleep(0.5)
    assert replica_pid() != pid


def test_a_replica_meeting_a_damaged_doc_store_fails_its_health_checks(served, built, tmp_path):
    """A copy served, then its doc store truncated under the replica: the search answers 503 naming the file
    within its version (never the server's folders), /healthz answers 503 "damaged", and Serve's health
    check fails, so Serve stops routing to it (and a replacement refuses to start over the damaged files)."""
    _, url, settings = served
    copy = tmp_path / "index"
    shutil.copytree(built[0], copy)
    start_serving(settings.model_copy(update={"index": str(copy)}))
    try:
        for docs in (copy / "versions" / built[1].run_id).glob("shards/*/docs.parquet"):
            os.truncate(docs, 4)
        with httpx.Client(base_url=url, timeout=60) as c:
            search = c.post("/search", json={"query": "read a file", "k": 3})
            health = c.get("/healthz")
        assert search.status_code == 503 and f"docs.parquet in version {built[1].run_id}" in search.json()["detail"]
        assert health.status_code == 503 and health.json()["status"] == "damaged", health.text
        assert all(str(tmp_path) not in r.text for r in (search, health)), (search.text, health.text)
        deadline = time.monotonic() + 90
        while serve.status().applications["rayindex"].deployments["RagService"].status == "HEALTHY":
            assert time.monotonic() < deadline, "Serve still calls the damaged replica healthy"
            time.sleep(1)
    finally:
        start_serving(settings)  # back to the fixture's configuration
