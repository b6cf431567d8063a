"""MCP (docs/mcp.md) through the SDK's own client: `rayindex mcp` over stdio and the Serve app's /mcp over
streamable HTTP list the tools, search with the same hits as PublishedIndex.search (ids, order, scores within
1e-5, texts) and, given a stored vector, as PublishedIndex.search_vector (its own document first), fetch a
document's passages as PublishedIndex.document returns them, and answer bad arguments (a vector's too) and
unknown ids as tool errors carrying the message; /mcp refuses a request without the API key."""

import sys

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from ray import serve

from rayindex.config import ServeConfig
from rayindex.query.launch import start_serving
from rayindex.query.search import open_index

from helpers import client_env, free_port, stored_vectors

QUERY = "open a file and read its lines"
API_KEY = "mcp-test-key"
LIMIT_S = 180  # a whole conversation, the stdio server's model load included, on a loaded 2-core machine


@pytest.fixture(scope="module")
def index(built):
    return open_index(built[0])


@pytest.fixture(scope="module")
def stored(built, index):
    """A passage's vector as the build stored it (a list of floats), and its document's id."""
    ids, vectors = stored_vectors(built[0])
    return vectors[40].tolist(), index.docs.get(int(ids[40]))["id"]


async def converse(client: Client, index, stored) -> None:
    """What every MCP client of rayindex does, checked against the index opened in this process."""
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {"search", "fetch_document"}
    schema = tools["search"].input_schema
    assert "required" not in schema  # a query or a vector
    assert {"query", "vector", "k", "mode", "filter", "per_document", "nprobe"} <= set(schema["properties"])
    assert tools["search"].output_schema["properties"]["hits"]["type"] == "array"

    for arguments in (
        {"query": QUERY, "k": 5},
        {"query": QUERY, "k": 4, "mode": "dense", "per_document": 2},
        {"query": QUERY, "k": 3, "mode": "lexical", "filter": {"kind": "class"}},
    ):
        result = await client.call_tool("search", arguments)
        assert not result.is_error, result.content
        expected = index.search(**arguments)
        hits = result.structured_content["hits"]
        assert [(h["id"], h["passage"], h["text"], h["metadata"]) for h in hits] == [
            (h["id"], h["passage"], h["text"], h["metadata"]) for h in expected
        ]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        assert result.structured_content["version"] == index.run_id
        text = result.content[0].text  # the same hits, readable
        assert all(f"document {h['id']!r}" in text and h["text"] in text for h in expected)

    vector, own_id = stored
    found = {}
    for name, arguments in (
        ("all", {"vector": vector, "k": 3}),
        ("classes", {"vector": vector, "k": 5, "filter": {"kind": "class"}}),
    ):
        result = await client.call_tool("search", arguments)
        assert not result.is_error, result.content
        expected = index.search_vector(**arguments)
        found[name] = result.structured_content["hits"]
        assert [(h["id"], h["passage"], h["text"]) for h in found[name]] == [
            (h["id"], h["passage"], h["text"]) for h in expected
        ]
        assert [h["score"] for h in found[name]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        assert f"for a vector of 384 values (index version {index.run_id})" in result.content[0].text
    assert found["all"][0]["id"] == own_id  # the stored vector finds its own document first
    assert found["classes"] and all(h["metadata"]["kind"] == "class" for h in found["classes"])

    doc_id = index.search(QUERY, k=1)[0]["id"]
    fetched = await client.call_tool("fetch_document", {"id": doc_id})
    assert not fetched.is_error, fetched.content
    assert fetched.structured_content["passages"] == index.document(doc_id)
    assert fetched.structured_content["id"] == doc_id and fetched.content[0].text.startswith(f"Document {doc_id!r}")

    for tool, arguments, message in (
        ("search", {"query": QUERY, "k": 0}, "k"),
        ("search", {"query": QUERY, "k": 101}, "k: Value error, must be at most 100"),
        ("search", {"query": QUERY, "mode": "fuzzy"}, "mode"),
        ("search", {"query": "   "}, "query: Value error, must not be empty or only whitespace"),
        ("search", {"query": QUERY, "filter": {"colour": "red"}}, "no metadata column 'colour'"),
        ("search", {"vector": [1.0, 2.0, 3.0]}, "vector: has 3 values, this index's vectors have 384 values"),
        ("search", {"vector": [0.0] * 384}, "vector: is all zeros, which has no direction to compare (metric cosine)"),
        # JSON has no NaN or infinity: the SDK's client sends them as null, which is not a number
        ("search", {"vector": [float("inf")] + [0.1] * 383}, "vector.0\n  Input should be a valid number"),
        ("search", {"query": QUERY, "vector": vector}, "give exactly one of query (text) and vector"),
        ("search", {"k": 3}, "give exactly one of query (text) and vector"),
        ("search", {"vector": vector, "mode": "lexical"}, "mode lexical needs query text"),
        ("fetch_document", {"id": "no-such-document"}, "no document has the string id 'no-such-document'"),
    ):
        refused = await client.call_tool(tool, arguments)
        assert refused.is_error and message in refused.content[0].text, (arguments, refused.content)


def test_stdio_server_answers_like_the_index(built, index, stored):
    """`rayindex mcp --index` spawned by the SDK's stdio client, in the initialize handshake's protocol (what the
    desktop and IDE clients speak)."""
    server = StdioServerParameters(
        command=sys.executable, args=["-m", "rayindex", "mcp", "--index", str(built[0])], env=client_env()
    )

    async def main():
        with anyio.fail_after(LIMIT_S):
            async with Client(server, mode="legacy") as client:
                await converse(client, index, stored)

    anyio.run(main)


@pytest.fixture(scope="module")
def served(built):
    """The session build served (read only) by one replica that holds no CPU, with an API key: (URL, settings)."""
    settings = ServeConfig(index=str(built[0]), port=free_port(), api_key=API_KEY, replica_cpus=0)
    start_serving(settings)
    yield f"http://127.0.0.1:{settings.port}", settings
    serve.shutdown()


def mcp_client(url: str, mode: str = "legacy") -> Client:
    """The SDK's client of the app's /mcp, with the API key."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    return Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode)


@pytest.mark.slow  # the Serve app (about 15 s to start)
def test_the_serve_app_answers_mcp_at_slash_mcp_behind_its_api_key(served, index, stored):
    url, _ = served

    async def main(mode: str, whole: bool):
        with anyio.fail_after(LIMIT_S):
            async with mcp_client(url, mode) as client:
                if whole:
                    await converse(client, index, stored)
                else:
                    assert {tool.name for tool in (await client.list_tools()).tools} == {"search", "fetch_document"}

    anyio.run(main, "legacy", True)  # the initialize handshake, stateless: each POST answered on its own
    anyio.run(main, "auto", False)  # the SDK's default: server/discover first

    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/mcp", json=tools_list, headers=headers, timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"], (headers, r.text)
    # reached under another name (a load balancer's, an Ingress's): no Host check refuses it (docs/mcp.md)
    r = httpx.post(
        f"{url}/mcp",
        json=tools_list,
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Host": "search.example.com",
            "Accept": "application/json, text/event-stream",
        },
        timeout=30,
    )
    assert r.status_code == 200 and {t["name"] for t in r.json()["result"]["tools"]} == {"search", "fetch_document"}


@pytest.mark.slow  # a redeploy with max_inflight=1 (about 15 s)
def test_tool_searches_are_admitted_like_searches(served):
    """max_inflight=1: of 12 simultaneous tool searches, those that find the replica busy are tool errors saying so
    (the replica's admission, as /search's 503), the others answer."""
    url, settings = served
    start_serving(settings.model_copy(update={"max_inflight": 1}))
    results = []

    async def one(client: Client, i: int) -> None:
        results.append(await client.call_tool("search", {"query": f"parse json {i}", "k": 3}))

    async def main():
        with anyio.fail_after(LIMIT_S):
            async with mcp_client(url) as client, anyio.create_task_group() as calls:
                for i in range(12):
                    calls.start_soon(one, client, i)

    anyio.run(main)
    busy = [r for r in results if r.is_error]
    assert busy and len(busy) < len(results), [r.content[0].text for r in busy]
    assert all(r.content[0].text.startswith("Error executing tool search: busy: ") for r in busy)
