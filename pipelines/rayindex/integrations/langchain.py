"""A LangChain retriever over a rayindex index (opened in this process) or a running `rayindex serve`:

    from rayindex.integrations.langchain import RayIndexRetriever
    retriever = RayIndexRetriever(index="rayindex-data", k=5)      # or url="http://127.0.0.1:8000", api_key=...
    retriever.invoke("parse a JSON document")                    # [Document(page_content=passage, metadata=...)]

Each hit becomes a Document: the passage's text, the id `<document id>#<passage>`, and as metadata the
document's own, then id, score, passage, start, end (the passage's span in the document) and page where
known (searcher.hit_metadata), in rank order. Needs langchain-core: pip install 'rayindex[langchain]'."""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr

from rayindex.integrations.searcher import Searcher, hit_metadata, missing_extra, passage_key
from rayindex.query.client import DEFAULT_TIMEOUT_S

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:
    missing_extra(exc)


def document(hit: dict) -> Document:
    """A hit as LangChain's Document."""
    return Document(page_content=hit["text"], metadata=hit_metadata(hit), id=passage_key(hit))


class RayIndexRetriever(BaseRetriever):
    """Documents from a rayindex index: `index` (a build's output folder or s3:// prefix, opened once, on the
    first search; or an index opened with rayindex.open_index) or `url` (a running `rayindex serve`, with its
    `api_key`), exactly one. k, mode, filter, per_document and nprobe are `index.search`'s (None: the index's
    defaults), checked when the retriever is made."""

    index: Any = None  # str, Path or a PublishedIndex (whose module imports FAISS: not named here)
    url: str | None = None
    api_key: str | None = Field(None, repr=False)
    k: int | None = None
    mode: str | None = None
    filter: dict | None = None
    per_document: int | None = None
    nprobe: int | None = None
    s3_endpoint: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    _searcher: Searcher = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self._searcher = Searcher(
            self.index,
            self.url,
            self.api_key,
            self.s3_endpoint,
            self.timeout,
            k=self.k,
            mode=self.mode,
            filter=self.filter,
            per_document=self.per_document,
            nprobe=self.nprobe,
        )

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [document(hit) for hit in self._searcher.search(query)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [document(hit) for hit in await self._searcher.asearch(query)]
