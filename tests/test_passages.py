"""Passages: long documents split by the model's own tokens at sentence boundaries, every character in a
passage, the model's inputs exactly those of the passage's text; a default build over long documents
(Python's language reference topics) finds documents by sentences deep inside them, returns one hit per
document with the passage's span, tunes itself to recall@10 >= 0.95, and filters on metadata with the
recall of exact filtered search."""

import pydoc_data.topics
import random
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from rayindex.builder import build
from rayindex.cli import app
from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.files import load_embeddings
from rayindex.layout import VECTOR_IDS_FILE, passage_ids, shard_dir
from rayindex.query.evaluate import labelled_metrics
from rayindex.query.search import open_index
from rayindex.text.model import embed, load_model, split_passages, vector_settings
from rayindex.text.passages import windows

from helpers import write_jsonl

TOPICS = sorted((name, text) for name, text in pydoc_data.topics.topics.items() if len(text) > 2_500)[:24]


def word_tokens(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whitespace-separated words as tokens, each long word cut in 3-character pieces (word pieces)."""
    starts, ends, word_start = [], [], []
    for m in re.finditer(r"\S+", text):
        for i, a in enumerate(range(m.start(), m.end(), 3)):
            starts.append(a)
            ends.append(min(a + 3, m.end()))
            word_start.append(i == 0)
    return np.array(starts, np.int64), np.array(ends, np.int64), np.array(word_start, bool)


def covered(text: str, spans) -> bool:
    mask = np.zeros(len(text), bool)
    for span in spans:
        mask[span.char_start : span.char_end] = True
    return bool(mask.all())


def test_windows_cover_every_character_within_the_size():
    rng = random.Random(3)
    words = ["alpha", "be", "gamma.", "delta,", "x" * 40, "end!\n\n", "(quote.)", "  ", "\n"]
    for trial in range(300):
        text = (
            " " * rng.randint(0, 3)
            + " ".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
            + " " * rng.randint(0, 3)
        )
        starts, ends, word_start = word_tokens(text)
        size = rng.randint(8, 64)
        overlap = rng.randint(0, size - 1)
        spans = windows(text, starts, ends, word_start, size, overlap)
        assert covered(text, spans), (trial, size, overlap)
        assert all(0 < s.token_end - s.token_start <= size for s in spans) or len(starts) == 0
        assert spans[0].token_start == 0 and spans[-1].token_end == len(starts)
        for a, b in zip(spans, spans[1:]):
            assert a.token_start < b.token_start <= a.token_end  # moves on, never skips a token
            assert b.token_start >= a.token_end - overlap


def test_windows_end_at_sentence_boundaries_and_overlap():
    sentences = [f"Sentence number {i} says something about topic {i % 7}." for i in range(60)]
    text = " ".join(sentences)
    starts, ends, word_start = word_tokens(text)
    spans = windows(text, starts, ends, word_start, 48, 6)
    assert len(spans) > 5
    for span in spans[:-1]:
        assert text[span.char_start : span.char_end].rstrip().endswith("."), text[span.char_start : span.char_end][-30:]
    for a, b in zip(spans, spans[1:]):
        assert a.token_end - b.token_start == 6 or a.token_end - b.token_start < 6 and word_start[b.token_start]
    assert windows("short text", *word_tokens("short text"), 48, 6) == [(0, 4, 0, 10)]


@pytest.fixture(scope="module")
def model():
    return load_model("all-MiniLM-L6-v2")


def test_split_passages_gives_the_tokens_and_vectors_of_each_passage_text(model):
    settings = vector_settings(model, BuildConfig(inputs=["x"]))
    assert (settings.passage_tokens, settings.passage_overlap, settings.metric) == (254, 31, "cosine")
    texts = [text for _, text in TOPICS[:6]] + ["one short document", "\u200b"]
    split = split_passages(model, texts, settings.passage_tokens, settings.passage_overlap)
    assert split.counts[-2:].tolist() == [1, 1] and split.counts[:6].min() > 1
    assert split.tokenized.lengths.max() <= model.max_seq_length
    offsets = np.concatenate([[0], np.cumsum(split.counts)])
    tokenized = split.tokenized
    for doc, text in enumerate(texts):
        mask = np.zeros(len(text), bool)
        for p in range(offsets[doc], offsets[doc + 1]):
            mask[split.char_starts[p] : split.char_ends[p]] = True
            ids = tokenized.ids["input_ids"][tokenized.starts[p] : tokenized.starts[p] + tokenized.lengths[p]]
            passage_text = text[split.char_starts[p] : split.char_ends[p]]
            assert ids.tolist() == model.tokenizer(passage_text)["input_ids"], (doc, p)
        assert mask.all(), doc  # every character of the document is in a passage
    rows = np.array([0, 3, int(offsets[6])])
    ours = embed(model, tokenized, 8, True, rows)
    texts_of_rows = [
        texts[int(np.searchsorted(offsets, r, side="right") - 1)][split.char_starts[r] : split.char_ends[r]]
        for r in rows
    ]
    reference = model.encode(texts_of_rows, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_settings_follow_the_model_and_refuse_what_cannot_work(model):
    with pytest.raises(RayIndexError, match=r"--passage-tokens 300 is larger than the model's window: at most 254"):
        vector_settings(model, BuildConfig(inputs=["x"], passage_tokens=300))
    with pytest.raises(ValueError, match="--passage-overlap 64 must be smaller than --passage-tokens 64"):
        BuildConfig(inputs=["x"], passage_tokens=64, passage_overlap=64)
    with pytest.raises(RayIndexError, match="--passage-overlap 254 must be smaller than the passage size 254"):
        vector_settings(model, BuildConfig(inputs=["x"], passage_overlap=254))
    assert BuildConfig(inputs=["x"], metric="ip").metric == "cosine"  # the name before metrics followed the model
    prompts, similarity = model.prompts, model.similarity_fn_name
    try:
        model.prompts = {"query": "query: ", "passage": "passage: "}
        model.similarity_fn_name = "dot"
        settings = vector_settings(model, BuildConfig(inputs=["x"]))
        assert (settings.query_prompt, settings.document_prompt, settings.metric) == ("query: ", "passage: ", "dot")
        assert settings.passage_tokens == 254 - len(model.tokenizer("passage: ", add_special_tokens=False)["input_ids"])
        given = vector_settings(model, BuildConfig(inputs=["x"], query_prompt="", metric="l2", passages=False))
        assert (given.query_prompt, given.metric, given.passage_tokens) == (None, "l2", None)
    finally:
        model.prompts, model.similarity_fn_name = prompts, similarity


def deep_sentences(text: str, n: int) -> list[str]:
    """Sentences of 40+ characters from the last half of a document."""
    tail = text[len(text) // 2 :]
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", tail) if 40 <= len(s.strip()) <= 300]
    return found[:n]


@pytest.fixture(scope="module")
def long_docs(ray_address, tmp_path_factory):
    """A build with default options (passages, index, tuning) over long documents with a metadata column."""
    root = tmp_path_factory.mktemp("long")
    rows = [
        {"id": name, "text": text, "group": "even" if i % 2 == 0 else "odd", "size": len(text)}
        for i, (name, text) in enumerate(TOPICS)
    ]
    write_jsonl(root / "topics.jsonl", rows)
    manifest = build(
        BuildConfig(inputs=[str(root / "topics.jsonl")], output=str(root / "out"), id_column="id", shards=2)
    )
    return rows, manifest, open_index(root / "out", with_vectors=True)


@pytest.mark.slow  # a build over long documents (about 40 s)
def test_every_passage_is_stored_with_its_document_span_and_text(long_docs):
    rows, manifest, index = long_docs
    by_id = {r["id"]: r["text"] for r in rows}
    assert manifest.counts.docs_encoded == len(rows) and manifest.counts.passages > 4 * len(rows)
    for shard, state in zip(manifest.shards, manifest.shard_states):
        ids = np.load(shard_dir(index.version_dir, shard.shard_id) / VECTOR_IDS_FILE)
        assert len(ids) == state.passages and np.all(np.diff(ids) > 0)
        rows_of = ids >> 20
        counts = np.unique(rows_of, return_counts=True)[1]
        assert np.array_equal(ids, passage_ids(np.unique(rows_of), counts))
        for vector_id in ids.tolist():
            passage = index.docs.get(vector_id)
            assert passage["text"] == by_id[passage["id"]][passage["start"] : passage["end"]]
            assert passage["passage"] == vector_id & ((1 << 20) - 1)


def test_a_default_build_tunes_itself_to_recall_095(long_docs):
    _, manifest, _ = long_docs
    assert manifest.tuning is not None and manifest.tuning.reached and manifest.tuning.recall >= 0.95
    assert manifest.timings_s.get("tune") is not None


def test_sentences_deep_inside_find_their_document_with_one_hit_per_document(long_docs):
    rows, _, index = long_docs
    labelled = [{"query": s, "id": r["id"]} for r in rows for s in deep_sentences(r["text"], 2)]
    assert len(labelled) >= 30
    metrics = labelled_metrics(index, labelled, [1, 10], None)
    assert metrics["hit@10"] >= 0.9, metrics
    hits = index.search(labelled[0]["query"], k=5)
    assert len(hits) == 5 and len({h["id"] for h in hits}) == 5
    more = index.search(labelled[0]["query"], k=5, per_document=3)
    per_doc = {}
    for hit in more:
        per_doc[hit["id"]] = per_doc.get(hit["id"], 0) + 1
    assert len(per_doc) == 5 and max(per_doc.values()) <= 3 and len(more) > 5
    assert [h["score"] for h in more] == sorted((h["score"] for h in more), reverse=True)


def exact_filtered(index, manifest, queries: np.ndarray, allowed: set[int], k: int) -> list[list[int]]:
    """The k best documents among the allowed vector ids, by brute force over the stored vectors."""
    vectors, ids = [], []
    for shard, state in zip(manifest.shards, manifest.shard_states):
        d = shard_dir(index.version_dir, shard.shard_id)
        vectors.append(np.asarray(load_embeddings(d, state.passages, manifest.dimension)))
        ids.append(np.load(d / VECTOR_IDS_FILE))
    vectors, ids = np.concatenate(vectors), np.concatenate(ids)
    keep = np.isin(ids, list(allowed))
    vectors, ids = vectors[keep], ids[keep]
    out = []
    for scores in queries @ vectors.T:
        docs = []
        for i in np.argsort(-scores):
            if ids[i] >> 20 not in docs:
                docs.append(ids[i] >> 20)
            if len(docs) == k:
                break
        out.append(docs)
    return out


def test_filters_return_k_matching_documents_with_the_recall_of_exact_filtered_search(long_docs):
    rows, manifest, index = long_docs
    group = {r["id"]: r["group"] for r in rows}
    queries = [s for r in rows for s in deep_sentences(r["text"], 1)]
    vectors = index.encode(queries)
    allowed = set(index.matching_ids({"group": "odd"}).tolist())
    truth = exact_filtered(index, manifest, vectors, allowed, 5)
    found = index.search_documents(vectors, 5, filter={"group": "odd"})
    recall = []
    for hits, exact in zip(found, truth):
        docs = [vector_id >> 20 for _, vector_id in hits]
        assert len(docs) == 5 and all(index.docs.get(v)["metadata"]["group"] == "odd" for _, v in hits)
        recall.append(len(set(docs) & set(exact)) / 5)
    assert np.mean(recall) >= 0.95, np.mean(recall)
    hits = index.search(queries[0], k=3, filter={"group": {"in": ["even", "odd"]}})
    assert len(hits) == 3
    one = index.search(queries[0], k=5, filter={"size": rows[2]["size"]})  # numbers match as numbers or their JSON text
    assert [h["id"] for h in one] == [rows[2]["id"]] and group[rows[2]["id"]] == "even"
    assert index.search(queries[0], filter={"group": "none of them"}) == []
    with pytest.raises(RayIndexError, match="no metadata column 'colour'"):
        index.search(queries[0], filter={"colour": "red"})
    with pytest.raises(RayIndexError, match=r'filter.group: for several values write \{"in"'):
        index.search(queries[0], filter={"group": ["odd", "even"]})


def test_the_cli_refuses_an_overlap_not_smaller_than_the_passage():
    result = CliRunner().invoke(app, ["build", "x.jsonl", "--passage-tokens", "64", "--passage-overlap", "64"])
    assert result.exit_code == 2 and "--passage-overlap 64 must be smaller than --passage-tokens 64" in " ".join(
        result.output.split()
    )
