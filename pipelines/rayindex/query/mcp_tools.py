"""An index's MCP tools (Model Context Protocol, the official SDK `mcp` 2.x, extra [mcp]): `search` and
`fetch_document`, as an MCPServer made from two async functions, so that `rayindex mcp` (integrations/mcp.py:
stdio, over an index opened in that process) and the Serve app (query/serve.py: streamable HTTP at /mcp,
through a replica's admission) answer the same tools with the same validation and the same results.

A search's arguments are a /search body (requests.SearchRequest: the same limits and messages), a text `query` or
a `vector` of the index's dimension (checked against the index as /search checks it); a bad argument,
an unknown id or a refusal (busy, too slow) is a tool error whose text is the message (`isError`, which the model
reads), never a protocol error or a crash. Results come back twice, as MCP asks of tools with an output schema:
as structured content (the hits as /search returns them) and as readable text.

(No `from __future__ import annotations`: the SDK reads the tools' annotations to make their schemas.)
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from rayindex.errors import RayIndexError, user_message
from rayindex.query.gate import MCP_PATH
from rayindex.query.requests import SearchRequest, field_problems

SERVER_NAME = "rayindex"
INSTRUCTIONS = (
    "Search a rayindex index of documents: `search` returns the documents that best match a query, each by its "
    "best passage(s) (text, character span, the document's metadata); `fetch_document` returns all the passages "
    "of one document by the id a search returned."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

# What the tools call: a search of a validated /search body, returning the /search response's body
# ({version, hits, and when sharded partial, missing_shards}); a document's passages by id ({version, id,
# passages}). Both raise RayIndexError with the message to show.
Search = Callable[[SearchRequest], Awaitable[dict]]
Fetch = Callable[[str | int], Awaitable[dict]]


class Hit(BaseModel):
    id: str | int = Field(description="The document's id (its type kept: 1 and '1' are different ids).")
    score: float = Field(description="Higher is better: similarity (dense), BM25 (lexical) or the fused score.")
    passage: int = Field(description="The passage's number in the document.")
    start: int = Field(description="Where the passage starts in the document's text (characters).")
    end: int = Field(description="Where it ends (exclusive).")
    text: str = Field(description="The passage's text.")
    metadata: dict = Field(description="The document's metadata.")


class SearchResult(BaseModel):
    version: str = Field(description="The index version searched.")
    hits: list[Hit] = Field(description="Best first; at most per_document passages per document.")
    partial: bool | None = Field(None, description="Sharded serving: some shards did not answer.")
    missing_shards: list[int] | None = Field(None, description="Sharded serving: the shards that did not answer.")


class Passage(BaseModel):
    id: str | int
    passage: int
    start: int
    end: int
    text: str
    metadata: dict


class Document(BaseModel):
    version: str = Field(description="The index version read.")
    id: str | int = Field(description="The document's id.")
    passages: list[Passage] = Field(description="All its passages, in order (neighbours overlap a little).")


def described(name: str):
    """A search argument as the tool's schema shows it: the /search field's type, bounds and description (one
    source)."""
    field = SearchRequest.model_fields[name]
    return Annotated[(field.annotation, *field.metadata, Field(description=field.description))]


DEFAULTS = {name: field.default for name, field in SearchRequest.model_fields.items()}  # /search's


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def hits_text(asked: str, result: SearchResult) -> str:
    """The hits as a model reads them: rank, id, score, span, metadata and the passage's text; asked: what was
    searched for (the query quoted, or the vector's size)."""
    documents = len({json.dumps(h.id) for h in result.hits})
    head = (
        f"{counted(len(result.hits), 'passage')} from {counted(documents, 'document')} for {asked} "
        f"(index version {result.version})"
    )
    if result.partial:
        head += f"; partial: shards {result.missing_shards} did not answer"
    lines = [head + ("." if result.hits else ": nothing found.")]
    for rank, hit in enumerate(result.hits, 1):
        lines += [
            "",
            f"[{rank}] document {hit.id!r}, score {hit.score:.4f}, passage {hit.passage} "
            f"(characters {hit.start}-{hit.end}), metadata {json.dumps(hit.metadata, ensure_ascii=False)}",
            hit.text,
        ]
    return "\n".join(lines)


def document_text(document: Document) -> str:
    """A document's passages as a model reads them."""
    lines = [
        f"Document {document.id!r} (index version {document.version}): {counted(len(document.passages), 'passage')}."
    ]
    if document.passages:
        lines.append(f"metadata {json.dumps(document.passages[0].metadata, ensure_ascii=False)}")
    for passage in document.passages:
        lines += ["", f"[passage {passage.passage}, characters {passage.start}-{passage.end}]", passage.text]
    return "\n".join(lines)


def answer(result: BaseModel, text: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(text=text)], structured_content=result.model_dump(mode="json", exclude_none=True)
    )


async def refused_as_tool_error(call: Awaitable[dict]) -> dict:
    """The call's result; its RayIndexError as a ToolError with the message (the model reads it and may retry)."""
    try:
        return await call
    except RayIndexError as exc:
        raise ToolError(user_message(exc)) from None


def mcp_server(search: Search, fetch: Fetch) -> MCPServer:
    """The MCP server with the tools `search` and `fetch_document`, answered by these functions."""
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(name="search", annotations=READ_ONLY)
    async def search_tool(
        query: described("query") = DEFAULTS["query"],
        vector: described("vector") = DEFAULTS["vector"],
        k: described("k") = DEFAULTS["k"],
        mode: described("mode") = DEFAULTS["mode"],
        filter: described("filter") = DEFAULTS["filter"],
        per_document: described("per_document") = DEFAULTS["per_document"],
        nprobe: described("nprobe") = DEFAULTS["nprobe"],
    ) -> Annotated[CallToolResult, SearchResult]:
        """Search the index: the k documents that best match the query (a text, or a vector of the index's
        dimension), each by its best passage(s) (text, character span in the document, the document's metadata),
        best first."""
        try:
            request = SearchRequest(
                query=query, vector=vector, k=k, mode=mode, filter=filter, per_document=per_document, nprobe=nprobe
            )
        except ValidationError as exc:
            raise ToolError(field_problems(exc.errors())) from None
        result = SearchResult.model_validate(await refused_as_tool_error(search(request)))
        asked = repr(query) if vector is None else f"a vector of {len(vector)} values"
        return answer(result, hits_text(asked, result))

    @server.tool(name="fetch_document", annotations=READ_ONLY)
    async def fetch_document(
        id: Annotated[
            str | int,
            Field(
                description="The document's id as a search returned it (an integer and its digits as a string "
                "are different ids)."
            ),
        ],
    ) -> Annotated[CallToolResult, Document]:
        """All the passages of one document, in order, by its id."""
        result = Document.model_validate(await refused_as_tool_error(fetch(id)))
        return answer(result, document_text(result))

    return server


# Host and Origin are not checked (the SDK's DNS-rebinding protection is off): the app is reached under whatever
# name the cluster gives it (a load balancer, an Ingress, a node's address), which no list made here would know;
# what guards /mcp is what guards /search, the bearer token (RAYINDEX_API_KEY), which a page rebound to the
# server's address cannot send, and `rayindex serve` refuses a non-loopback host without one (docs/mcp.md).
NO_HOST_CHECKS = TransportSecuritySettings(enable_dns_rebinding_protection=False)


class StatelessHttp:
    """The tools over streamable HTTP, as an ASGI app for a route of an app already running (the Serve replica's).

    Stateless (the SDK's stateless_http): each POST is answered on its own, no session kept between requests,
    so that any replica may answer any request of a client; with sessions, a client's second request reaching
    another replica would get 404 (unknown session) and Serve routes each request to any replica. JSON
    responses (json_response), not an SSE stream: one body per POST, which Serve's proxy and the gate handle like
    a /search response. The session manager (the task group each request's server runs in) is started by the
    first request, in a task of the running event loop, and runs for the process's life: Serve does run the
    ingress app's lifespan (ray/serve/_private/http_util.py: uvicorn's LifespanOn, after the replica's
    constructor), but that lifespan is the module's FastAPI app's, declared before any replica exists and handed
    only the app, and Starlette runs no lifespan of a routed sub-app."""

    def __init__(self, server: MCPServer, max_body: int):
        self.app = server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            stateless_http=True,
            json_response=True,
            transport_security=NO_HOST_CHECKS,
            max_request_body_size=max_body,
        )
        self.manager = server.session_manager
        self._running: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self._running is None:
            self._running = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(self._running), name="rayindex-mcp-session-manager")
        await asyncio.shield(self._running)
        await self.app(scope, receive, send)

    async def _run(self, running: asyncio.Future) -> None:
        try:
            async with self.manager.run():
                running.set_result(None)
                await asyncio.Event().wait()  # until the process ends
        except BaseException as exc:
            if not running.done():
                running.set_exception(exc)
            raise
