"""`rayindex mcp`: an index's MCP tools (query/mcp_tools.py: search, fetch_document) over stdio, for an MCP client
that starts the server itself (Claude Desktop, an IDE, an agent framework; docs/mcp.md).

The index is opened, its doc store's footers checked and the model loaded before serving: an index that cannot
be served or a model that cannot load ends the command with its message on stderr (exit 1), which the client
shows, instead of failing every tool call; the client's initialize is answered once they are (10.6 s after the
spawn on 2 busy cores, measured: docs/mcp.md). Then nothing but MCP is written to stdout: what is printed while
opening goes to stderr, and while serving the SDK points the process's fd 1 at stderr and writes the protocol to a
duplicate of it.
"""

import contextlib
import sys
import threading

from anyio import to_thread

from rayindex.query.mcp_tools import Fetch, Search, mcp_server
from rayindex.query.requests import SearchRequest
from rayindex.query.search import PublishedIndex, open_index
from rayindex.text.vectors import ModelUnavailable


def index_tools(index: PublishedIndex) -> tuple[Search, Fetch]:
    """The tools' functions over an index opened in this process, each in a worker thread (the event loop keeps
    reading the client's messages); searches one at a time, as the CLI and the Python API run them (the model and
    the lazily opened parts of a PublishedIndex are not shared between threads), fetches as they come (the doc
    store is read from several threads safely)."""
    one_search = threading.Lock()

    def search_now(request: SearchRequest) -> list[dict]:
        with one_search:
            if request.vector is not None:
                return index.search_vector(
                    request.vector, request.k, request.nprobe, request.per_document, request.filter
                )
            return index.search(
                request.query, request.k, request.nprobe, request.per_document, request.filter, request.mode
            )

    async def search(request: SearchRequest) -> dict:
        hits = await to_thread.run_sync(search_now, request)
        return {"version": index.run_id, "hits": hits}

    async def fetch(doc_id: str | int) -> dict:
        passages = await to_thread.run_sync(index.document, doc_id)
        return {"version": index.run_id, "id": doc_id, "passages": passages}

    return search, fetch


def opened(index: str, s3_endpoint: str | None = None) -> PublishedIndex:
    """The index CURRENT names, its doc store's footers checked and its model loaded (an index of vectors made
    elsewhere whose model is not here is served all the same: searched by vector, a text query refused saying so);
    anything printed meanwhile goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        published = open_index(index, s3_endpoint)
        published.docs.open_all()
        with contextlib.suppress(ModelUnavailable):
            published.encode(["warm-up"])
    return published


def serve_stdio(index: PublishedIndex) -> None:
    """Answer MCP on stdin/stdout until the client closes stdin."""
    mcp_server(*index_tools(index)).run("stdio")
