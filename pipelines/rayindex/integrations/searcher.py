"""What the framework retrievers (langchain.py, llama_index.py) share: where their hits come from (a
published index opened in this process, once, on first use; or a running server, through
query/client.py), the search options checked once when the retriever is made, and what a hit becomes in
a framework's document (its id and metadata). Knows nothing of either framework."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from rayindex.config import SearchParams
from rayindex.errors import UsageError, install_hint
from rayindex.query.client import DEFAULT_TIMEOUT_S, ServerIndex
from rayindex.query.requests import field_problems

if TYPE_CHECKING:
    from rayindex.query.search import PublishedIndex

# what a document carries of its hit besides the text, after the document's own metadata (they win over a
# metadata column of the same name); page: where the doc store knows it
HIT_METADATA = ("id", "score", "passage", "start", "end", "page")
# of those, what says where a passage was found rather than what it is: left out of what a framework shows
# a model or embeds (LlamaIndex's excluded_*_metadata_keys)
LOCATING_METADATA = ("score", "passage", "start", "end")


def hit_metadata(hit: dict) -> dict:
    """A framework document's metadata for a hit: the document's metadata, then id, score, passage, start,
    end and page (when the hit has one)."""
    return {**(hit.get("metadata") or {}), **{name: hit[name] for name in HIT_METADATA if name in hit}}


def passage_key(hit: dict) -> str:
    """A passage's id among all the index's: its document's id and its number in the document."""
    return f"{hit['id']}#{hit['passage']}"


def missing_extra(exc: ImportError) -> NoReturn:
    """Raise, for a framework's package that is missing, an ImportError saying what to install (errors.INSTALL_HINTS);
    another ImportError (the package there but broken) as it is."""
    hint = install_hint(exc)
    if hint is None:
        raise exc
    raise ImportError(f"{exc}: {hint}") from exc


class Searcher:
    """Hits for a retriever: from index (a build's output folder or s3:// prefix, opened on the first search;
    or an index opened with rayindex.open_index) or from url (a running `rayindex serve`, with its api_key),
    exactly one; with the SearchParams options given (None: the index's defaults), checked now."""

    def __init__(
        self,
        index: str | Path | PublishedIndex | None = None,
        url: str | None = None,
        api_key: str | None = None,
        s3_endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **options,
    ):
        if (index is None) == (url is None):
            raise UsageError(
                "give index= (a build's output folder or s3:// prefix, searched in this process) or url= (a running "
                "`rayindex serve`), exactly one"
            )
        if url is not None and s3_endpoint is not None:
            raise UsageError("s3_endpoint= is for index=: a server reads its index with its own settings")
        if index is not None and api_key is not None:
            raise UsageError("api_key= is a server's: give it with url=")
        self.options = {name: value for name, value in options.items() if value is not None}
        try:
            SearchParams(**self.options)
        except ValidationError as exc:
            raise UsageError(field_problems(exc.errors())) from None
        self.server = ServerIndex(url, api_key, timeout) if url is not None else None
        self.location, self.s3_endpoint = index, s3_endpoint
        self._opened: PublishedIndex | None = None if isinstance(index, (str, Path)) or index is None else index
        self._opening = threading.Lock()

    def published(self) -> PublishedIndex:
        """The local index, opened on first use (once, whichever thread asks first)."""
        with self._opening:
            if self._opened is None:
                from rayindex.query.search import open_index  # FAISS and the model: only for a local index

                self._opened = open_index(str(self.location), self.s3_endpoint)
            return self._opened

    def search(self, query: str) -> list[dict]:
        """PublishedIndex.search's hits for the query, best first."""
        if self.server is not None:
            return self.server.search(query, **self.options)
        return self.published().search(query, **self.options)

    async def asearch(self, query: str) -> list[dict]:
        """search without blocking the event loop: the server's async client, or the local search in a thread."""
        if self.server is not None:
            return await self.server.asearch(query, **self.options)
        return await asyncio.to_thread(self.search, query)
