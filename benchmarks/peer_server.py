"""The peer a user would otherwise pick on one machine: a plain FastAPI app around the same index, run by one
uvicorn worker (serve_benchmark.py starts it beside `rayindex serve`). POST /search {query, k, nprobe} answers
what `index.search` answers, with no gate, batching, versions or metrics: the cost of serving without Serve.

    RAYINDEX_PEER_INDEX=rayindex-data python -m uvicorn benchmarks.peer_server:app --port 8100 --workers 1
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from pydantic import BaseModel

from rayindex.query.search import open_index

index = open_index(os.environ["RAYINDEX_PEER_INDEX"])
index.encode(["warm-up"])  # the model loaded before the first request, as a replica does
app = FastAPI()


class Query(BaseModel):
    query: str
    k: int = 10
    nprobe: int | None = None


@app.post("/search")
def search(body: Query) -> dict:
    # a sync endpoint: FastAPI runs it in its thread pool, as a plain service around FAISS would
    start = time.perf_counter()
    hits = index.search(body.query, body.k, body.nprobe)
    return {"hits": hits, "timings_ms": {"total": round(1000 * (time.perf_counter() - start), 2)}}  # as rayindex's
