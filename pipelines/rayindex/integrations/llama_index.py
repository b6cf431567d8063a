"""A LlamaIndex retriever over a rayindex index (opened in this process) or a running `rayindex serve`:

    from rayindex.integrations.llama_index import RayIndexRetriever
    retriever = RayIndexRetriever(index="rayindex-data", k=5)      # or url="http://127.0.0.1:8000", api_key=...
    retriever.retrieve("parse a JSON document")                  # [NodeWithScore(node=TextNode(...), score=...)]

Each hit becomes a NodeWithScore with the hit's score around a TextNode: the passage's text, the id
`<document id>#<passage>`, its span in the document (start_char_idx, end_char_idx), the document as its
source (ref_doc_id), and as metadata the document's own, then id, score, passage, start, end and page
where known (searcher.hit_metadata); the ones that only locate the passage are not shown to a model nor
embedded. Rank order. Needs llama-index-core: pip install 'rayindex[llama-index]'."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rayindex.integrations.searcher import LOCATING_METADATA, Searcher, hit_metadata, missing_extra, passage_key
from rayindex.query.client import DEFAULT_TIMEOUT_S

try:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
except ImportError as exc:
    missing_extra(exc)

if TYPE_CHECKING:
    from rayindex.query.search import PublishedIndex


def node(hit: dict) -> NodeWithScore:
    """A hit as LlamaIndex's NodeWithScore."""
    text_node = TextNode(
        id_=passage_key(hit),
        text=hit["text"],
        metadata=hit_metadata(hit),
        start_char_idx=hit["start"],
        end_char_idx=hit["end"],
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=str(hit["id"]))},
        excluded_embed_metadata_keys=list(LOCATING_METADATA),
        excluded_llm_metadata_keys=list(LOCATING_METADATA),
    )
    return NodeWithScore(node=text_node, score=hit["score"])


class RayIndexRetriever(BaseRetriever):
    """Nodes from a rayindex index: `index` (a build's output folder or s3:// prefix, opened once, on the
    first search; or an index opened with rayindex.open_index) or `url` (a running `rayindex serve`, with its
    `api_key`), exactly one. k, mode, filter, per_document and nprobe are `index.search`'s (None: the index's
    defaults), checked when the retriever is made."""

    def __init__(
        self,
        index: str | Path | PublishedIndex | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        k: int | None = None,
        mode: str | None = None,
        filter: dict | None = None,
        per_document: int | None = None,
        nprobe: int | None = None,
        s3_endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ):
        self.searcher = Searcher(
            index,
            url,
            api_key,
            s3_endpoint,
            timeout,
            k=k,
            mode=mode,
            filter=filter,
            per_document=per_document,
            nprobe=nprobe,
        )
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [node(hit) for hit in self.searcher.search(query_bundle.query_str)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [node(hit) for hit in await self.searcher.asearch(query_bundle.query_str)]
