"""The framework retrievers (rayindex.integrations: LangChain, LlamaIndex) with the real packages, the client of a
running server (rayindex.query.client) and `rayindex search --server`: each returns the documents `index.search`
returns, over the session's build searched in this process and through a real Serve app over HTTP."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from llama_index.core.schema import MetadataMode
from ray import serve

import rayindex
from rayindex.errors import RayIndexError, Unavailable, UsageError
from rayindex.integrations import langchain as lc
from rayindex.integrations import llama_index as li
from rayindex.integrations.searcher import HIT_METADATA, LOCATING_METADATA, hit_metadata
from rayindex.query.client import ServerIndex

from helpers import client_env, free_port

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
API_KEY = "integrations-test-key"
QUERIES = ["parse a JSON document", "open a file and read its lines", "compress data with zlib"]
# every mode, a filter and several passages per document
SEARCHES = [{}, {"mode": "dense", "filter": {"kind": "class"}, "k": 4}, {"mode": "lexical", "per_document": 2, "k": 3}]
# what `rayindex search --server` must not import: the model, FAISS, Ray, Arrow
HEAVY = {"torch", "faiss", "ray", "sentence_transformers", "transformers", "pyarrow"}


def run(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env or client_env(), cwd=ROOT)


def same_hits(found: list[dict], expected: list[dict]) -> None:
    """The same documents and passages, texts and metadata, in the same order, scores within 1e-5 (a server
    encodes concurrent queries in one batch)."""
    assert [(h["id"], h["passage"]) for h in found] == [(h["id"], h["passage"]) for h in expected]
    assert [{**h, "score": None} for h in found] == [{**h, "score": None} for h in expected]
    assert [h["score"] for h in found] == pytest.approx([h["score"] for h in expected], abs=1e-5)


def from_documents(documents) -> list[dict]:
    """LangChain Documents back to hits, checking what each carries besides."""
    hits = []
    for d in documents:
        meta = dict(d.metadata)
        assert d.id == f"{meta['id']}#{meta['passage']}"
        hit = {name: meta.pop(name) for name in HIT_METADATA if name in meta}
        hits.append({**hit, "text": d.page_content, "metadata": meta})
    return hits


def from_nodes(nodes) -> list[dict]:
    """LlamaIndex NodeWithScores back to hits, checking what each carries besides."""
    hits = []
    for scored in nodes:
        node, meta = scored.node, dict(scored.node.metadata)
        assert node.id_ == f"{meta['id']}#{meta['passage']}" and node.ref_doc_id == str(meta["id"])
        assert (node.start_char_idx, node.end_char_idx, scored.score) == (meta["start"], meta["end"], meta["score"])
        hit = {name: meta.pop(name) for name in HIT_METADATA if name in meta}
        hits.append({**hit, "text": node.text, "metadata": meta})
    return hits


# --- fast: no index, no server ---


def test_a_hit_becomes_metadata_with_its_document_metadata_first():
    hit = {"id": 7, "score": 0.5, "passage": 2, "start": 10, "end": 90, "text": "t", "metadata": {"kind": "x"}}
    assert hit_metadata(hit) == {"kind": "x", "id": 7, "score": 0.5, "passage": 2, "start": 10, "end": 90}
    # the hit's own fields win over a metadata column of the same name; page when the hit has one
    clash = dict(hit, metadata={"id": "column", "score": "high"}, page=3)
    assert hit_metadata(clash) == {"id": 7, "score": 0.5, "passage": 2, "start": 10, "end": 90, "page": 3}
    assert hit_metadata(dict(hit, metadata=None))["id"] == 7
    document = lc.document(hit)
    assert (document.page_content, document.id, document.metadata) == ("t", "7#2", hit_metadata(hit))
    scored = li.node(hit)
    assert (scored.score, scored.node.text, scored.node.id_, scored.node.ref_doc_id) == (0.5, "t", "7#2", "7")
    shown = scored.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "kind: x" in shown and "id: 7" in shown and not any(f"{name}:" in shown for name in LOCATING_METADATA)


@pytest.mark.parametrize("make", [lc.RayIndexRetriever, li.RayIndexRetriever], ids=["langchain", "llama_index"])
def test_retriever_options_are_checked_when_it_is_made(make):
    with pytest.raises(UsageError, match="give index= .* or url= .*exactly one"):
        make()
    with pytest.raises(UsageError, match="exactly one"):
        make(index="out", url="http://127.0.0.1:8000")
    with pytest.raises(UsageError, match="api_key= is a server's"):
        make(index="out", api_key="k")
    with pytest.raises(UsageError, match="s3_endpoint= is for index="):
        make(url="http://127.0.0.1:8000", s3_endpoint="http://minio:9000")
    with pytest.raises(UsageError, match="^k: Input should be greater than or equal to 1$"):
        make(index="out", k=0)
    with pytest.raises(UsageError, match="^mode: Input should be 'hybrid', 'dense' or 'lexical'$"):
        make(url="http://127.0.0.1:8000", mode="fuzzy")
    with pytest.raises(UsageError, match="server URL 'localhost:8000': give http"):
        make(url="localhost:8000")
    assert "secret" not in repr(make(url="http://127.0.0.1:8000", api_key="secret"))


def test_the_client_refuses_bad_arguments_before_sending_and_names_an_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ServerIndex(url) as server:
        with pytest.raises(UsageError, match="^k: Value error, must be at most 100$"):
            server.search("x", k=101)  # refused here: no connection tried
        with pytest.raises(UsageError, match="^query: Value error, must not be empty or only whitespace$"):
            server.search("  ")
        with pytest.raises(Unavailable, match=f"could not reach {url} .*is `rayindex serve` running there"):
            server.search("x")
        with pytest.raises(Unavailable, match=f"could not reach {url}"):
            asyncio.run(server.asearch("x"))


def test_cli_search_server_errors_are_one_line_with_exit_codes():
    url = f"http://127.0.0.1:{free_port()}"
    down = run([RAYINDEX, "search", "--server", url, "hello"])
    assert down.returncode == 1 and f"could not reach {url}" in down.stderr and "Traceback" not in down.stderr
    both = run([RAYINDEX, "search", "--server", url, "--index", "out", "hello"])
    assert both.returncode == 2 and "leave out --index" in both.stderr
    too_many = run([RAYINDEX, "search", "--server", url, "hello", "-k", "101"])
    assert too_many.returncode == 2 and "k: Value error, must be at most 100" in too_many.stderr
    assert "--api-key" in run([RAYINDEX, "search", "--help"]).stdout


@pytest.mark.parametrize(
    "module,package,extra",
    [("langchain", "langchain_core", "langchain"), ("llama_index", "llama_index", "llama-index")],
)
def test_a_missing_framework_names_the_extra_to_install(module, package, extra):
    blocked = run(
        [sys.executable, "-c", f"import sys; sys.modules[{package!r}] = None; import rayindex.integrations.{module}"]
    )
    assert blocked.returncode == 1 and f"pip install 'rayindex[{extra}]'" in blocked.stderr, blocked.stderr


OFFLINE_PROGRAM = """
import asyncio, socket
tried = []
loopback_connect = socket.socket.connect
def connect(self, address):
    if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")):
        tried.append(address)
        raise OSError("network off in this test")
    return loopback_connect(self, address)
socket.socket.connect = connect
from llama_index.core.schema import MetadataMode
from rayindex.errors import Unavailable
from rayindex.integrations import langchain as lc, llama_index as li
hit = {"id": 1, "score": 0.5, "passage": 0, "start": 0, "end": 4, "text": "text", "metadata": {"kind": "x"}}
lc.document(hit)
li.node(hit).node.get_content(metadata_mode=MetadataMode.ALL)
chain, llama = lc.RayIndexRetriever(url=URL), li.RayIndexRetriever(url=URL)
for call in (chain.invoke, llama.retrieve, chain.ainvoke, llama.aretrieve):
    try:
        found = call("q")
        asyncio.run(found) if asyncio.iscoroutine(found) else found
    except Unavailable:
        pass
print("connections tried:", tried)
"""


def test_the_frameworks_fetch_nothing_from_the_network():
    """llama-index-core fetches NLTK data and tiktoken files on some uses; the retrievers' path (import, make,
    retrieve, convert) must not: every connection but loopback fails here, and none is tried."""
    program = OFFLINE_PROGRAM.replace("URL", repr(f"http://127.0.0.1:{free_port()}"))
    result = run([sys.executable, "-c", program])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "connections tried: []"


# --- slow: the session's build, searched here and through a real Serve app ---


@pytest.fixture(scope="module")
def served(built):
    """The session's build served by one replica that requires API_KEY (the replica checks the token), through
    the Python API (rayindex.serve, what `rayindex serve` calls)."""
    settings = rayindex.serve(built[0], port=free_port(), replica_cpus=0, api_key=API_KEY)
    yield f"http://127.0.0.1:{settings.port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def published(built):
    return rayindex.open_index(built[0])


async def gathered(calls):
    return await asyncio.gather(*calls)


@pytest.mark.slow  # the Serve app and the model (about 40 s)
@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
def test_retrievers_return_the_documents_index_search_returns(framework, published, served, built):
    """Sync and async, an index opened here (by path, opened once on first use, or already open) and the server
    over HTTP; every mode, a filter, several passages per document."""
    make, back = (
        (lc.RayIndexRetriever, from_documents) if framework == "langchain" else (li.RayIndexRetriever, from_nodes)
    )

    def retrieve(retriever, query):
        return back(retriever.invoke(query) if framework == "langchain" else retriever.retrieve(query))

    async def aretrieve(retriever, query):
        return back(await (retriever.ainvoke(query) if framework == "langchain" else retriever.aretrieve(query)))

    by_path = make(index=str(built[0]))
    for query in QUERIES:
        same_hits(retrieve(by_path, query), published.search(query))
    for options in SEARCHES:
        expected = [published.search(query, **options) for query in QUERIES]
        assert all(expected), options
        for retriever in (make(index=published, **options), make(url=served, api_key=API_KEY, **options)):
            for query, hits in zip(QUERIES, expected):
                same_hits(retrieve(retriever, query), hits)
            for found, hits in zip(asyncio.run(gathered([aretrieve(retriever, q) for q in QUERIES])), expected):
                same_hits(found, hits)
    filtered = make(url=served, api_key=API_KEY, filter={"kind": "class"}, k=5)
    assert all(hit["metadata"]["kind"] == "class" for hit in retrieve(filtered, QUERIES[0]))


@pytest.mark.slow  # the Serve app
def test_the_server_refuses_without_the_key_and_the_client_says_what_to_do(served, published, monkeypatch):
    monkeypatch.delenv("RAYINDEX_API_KEY", raising=False)
    for retriever in (lc.RayIndexRetriever(url=served), li.RayIndexRetriever(url=served)):
        call = retriever.invoke if isinstance(retriever, lc.RayIndexRetriever) else retriever.retrieve
        with pytest.raises(RayIndexError, match=f"{served}/search needs an API key .*RAYINDEX_API_KEY"):
            call(QUERIES[0])
    monkeypatch.setenv("RAYINDEX_API_KEY", API_KEY)  # the key's default, as for `rayindex serve`
    assert lc.RayIndexRetriever(url=served, k=2).invoke(QUERIES[0])
    monkeypatch.delenv("RAYINDEX_API_KEY")
    with pytest.raises(RayIndexError, match="refused the API key given"):
        asyncio.run(ServerIndex(served, api_key="wrong").asearch(QUERIES[0]))
    with ServerIndex(served, api_key=API_KEY) as server:
        same_hits(server.search(QUERIES[1], k=3), published.search(QUERIES[1], k=3))
        # what the client refuses before sending reads as the server's own 422
        refused = httpx.post(
            f"{served}/search", json={"query": "x", "k": 101}, headers={"authorization": f"Bearer {API_KEY}"}
        )
        with pytest.raises(UsageError) as local:
            server.search("x", k=101)
        assert refused.status_code == 422 and str(local.value) == refused.json()["detail"]
        with pytest.raises(UsageError, match="no metadata column 'colour'"):  # the server's 422, passed on
            server.search("x", filter={"colour": "red"})


@pytest.mark.slow  # the Serve app, and the model in this process for the local search
def test_cli_search_through_the_server_prints_what_the_local_search_prints(served, built):
    from typer.testing import CliRunner

    from rayindex.cli import app

    query = ["open a file and read its lines", "-k", "4", "--json"]
    local = CliRunner().invoke(app, ["search", "--index", str(built[0]), *query])
    assert local.exit_code == 0, local.output
    remote = run(
        [sys.executable, "-X", "importtime", "-m", "rayindex", "search", "--server", served, *query],
        env=dict(client_env(), RAYINDEX_API_KEY=API_KEY),
    )
    assert remote.returncode == 0, remote.stderr[-2000:]
    # the same hits; scores within float rounding: hybrid fuses the cosines, and the server's replica encodes
    # the query with its own torch threads
    local_hits, remote_hits = json.loads(local.stdout), json.loads(remote.stdout)
    assert [h | {"score": None} for h in remote_hits] == [h | {"score": None} for h in local_hits]
    assert [h["score"] for h in remote_hits] == pytest.approx([h["score"] for h in local_hits], abs=1e-5)
    assert len(remote_hits) == 4
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)$", remote.stderr, re.M)}
    assert "httpx" in imported and not imported & HEAVY, imported & HEAVY
    table = run([RAYINDEX, "search", "--server", served, "--api-key", API_KEY, "open a file", "-k", "2"])
    assert table.returncode == 0 and "2 hits for 'open a file'" in table.stdout, table.stderr
    without_key = {name: value for name, value in client_env().items() if name != "RAYINDEX_API_KEY"}
    keyless = run([RAYINDEX, "search", "--server", served, "open a file"], env=without_key)
    assert keyless.returncode == 1 and "needs an API key" in keyless.stderr and "set RAYINDEX_API_KEY" in keyless.stderr


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.slow  # the Serve app, and the model in this process
def test_the_integration_docs_examples_run(served, built, monkeypatch, capsys):
    """docs/integrations.md's Python examples, run as written against the session's build (for rayindex-data) and
    the served one (for http://127.0.0.1:8000)."""
    monkeypatch.setenv("RAYINDEX_API_KEY", API_KEY)
    blocks = code_blocks(ROOT / "docs" / "integrations.md")
    assert len(blocks) >= 3
    for block in blocks:
        exec(
            compile(
                block.replace("rayindex-data", str(built[0])).replace("http://127.0.0.1:8000", served), "doc", "exec"
            ),
            {},
        )
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 6, printed
