"""End-to-end build on real Ray with the real model over real files; search finds what it should."""

import json
from pathlib import Path

import numpy as np
import pytest

from rayindex.infra.files import load_embeddings
from rayindex.layout import CURRENT, MANIFEST, VECTOR_IDS_FILE, shard_dir
from rayindex.manifest import Manifest
from rayindex.query.search import open_index
from rayindex.versions import open_current


def test_build_publishes_a_complete_version(built, docs):
    output, manifest = built
    version, _ = open_current(output)
    assert (Path(output) / CURRENT).read_text().strip() == manifest.run_id
    on_disk = Manifest.from_json((version / MANIFEST).read_text(), "manifest")
    assert on_disk.status == "published"
    assert on_disk.counts.rows_read == len(docs) + 2
    assert on_disk.counts.docs_encoded == len(docs)
    assert on_disk.counts.skipped == {
        "empty_or_null_text": 2
    }  # nothing truncated: long docstrings are split into passages
    assert on_disk.counts.passages > len(docs) + 40  # 40 docstrings exceed the model's window of 256 tokens
    assert (
        on_disk.passages.tokens == 254 and on_disk.passages.overlap == 31
    )  # the window less [CLS] and [SEP]; an eighth
    assert [s.docs_encoded for s in on_disk.shard_states] and sum(s.docs_encoded for s in on_disk.shard_states) == len(
        docs
    )
    assert sum(s.passages for s in on_disk.shard_states) == on_disk.counts.passages == on_disk.merge.ntotal
    assert all(s.embeddings_sha256 and s.index_sha256 for s in on_disk.shard_states)
    assert {s.trained_sha256 for s in on_disk.shard_states} == {on_disk.training.trained_sha256}
    assert list(on_disk.timings_s) == ["ray", "plan", "encode", "lexical", "train", "add", "merge"]
    assert on_disk.index_string == "IVF8,PQ16np" and on_disk.nlist == 8 and on_disk.dimension == 384
    assert {"ray", "torch", "sentence-transformers", "pyarrow"} <= set(on_disk.versions)
    assert on_disk.metric == "cosine" and on_disk.model.normalized  # all-MiniLM-L6-v2's similarity function
    assert on_disk.model.path.endswith("model")  # the packaged all-MiniLM-L6-v2, not a hub download


def test_search_finds_the_document_it_describes(built, docs):
    output, _ = built
    index = open_index(output)
    found = 0
    for doc in docs[::40]:
        hits = index.search(f"{doc['title']}: {doc['body']}", k=5, nprobe=8)
        found += doc["id"] in [h["id"] for h in hits]
    assert found == len(docs[::40])  # a document's own text brings it back in the top 5


def test_search_hits_carry_text_and_metadata(built, docs):
    output, _ = built
    by_id = {d["id"]: d for d in docs}
    hits = open_index(output).search("encode and decode base64 data", k=3)
    assert len(hits) == 3 and len({h["id"] for h in hits}) == 3  # one hit per document
    for hit in hits:
        doc = by_id[hit["id"]]
        assert hit["text"] == f"{doc['title']}: {doc['body']}"[hit["start"] : hit["end"]]  # the passage, by its span
        assert hit["metadata"] == {"module": doc["module"], "kind": doc["kind"]}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_search_recall_against_exact_search(built):
    """The IVF-PQ index vs brute force over the same stored embeddings: recall@10 at full nprobe."""
    output, manifest = built
    index = open_index(output)
    vectors = np.concatenate(
        [
            np.asarray(load_embeddings(shard_dir(index.version_dir, s.shard_id), st.passages, 384))
            for s, st in zip(manifest.shards, manifest.shard_states)
        ]
    )
    ids = np.concatenate([np.load(shard_dir(index.version_dir, s.shard_id) / VECTOR_IDS_FILE) for s in manifest.shards])
    queries = vectors[::9]
    exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    _, approx = index.search_vectors(queries, 10, nprobe=8)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.6, recall  # PQ16 on 384-d vectors trained on 360 points


def test_manifest_is_json_with_the_plan(built):
    output, manifest = built
    data = json.loads((open_current(output)[0] / MANIFEST).read_text())
    assert data["config"]["shards"] == 3
    assert [s["shard_id"] for s in data["shards"]] == [0, 1, 2]
    assert data["files"][0]["path"].endswith("a.parquet")


def has_cuda() -> bool:
    import faiss
    import torch

    return torch.cuda.is_available() and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU and faiss-gpu")
def test_gpu_build_matches_cpu_search_results(ray_address, corpus_dir, tmp_path, built):
    """Encode in fp16 on the GPU and train the coarse quantizer there; the hits must agree with the CPU build."""
    from rayindex.builder import build

    from helpers import build_config

    manifest = build(build_config([corpus_dir], tmp_path, gpu=True))
    assert manifest.model.device == "cuda" and manifest.training.gpu
    assert manifest.model.dtype == "fp16" and {s.encoded_with for s in manifest.shard_states} == {"cuda/fp16"}
    gpu, cpu = open_index(tmp_path), open_index(built[0])
    for query in ("parse a JSON document", "compress data", "open a network socket"):
        assert gpu.search(query, k=1, nprobe=8)[0]["id"] == cpu.search(query, k=1, nprobe=8)[0]["id"]
