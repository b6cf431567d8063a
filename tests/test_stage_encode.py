"""The encode stage (stages/encode.py): per shard, the model's embeddings of the composed texts, the ids,
the doc store and the hashes, each file checksummed in the manifest; a re-run keeps verified shards."""

import json

import numpy as np
import pyarrow as pa
import pytest

from rayindex.builder import start_or_resume
from rayindex.config import BuildConfig
from rayindex.docstore.format import footer_sha256
from rayindex.docstore.reader import DocStore
from rayindex.errors import RayIndexError
from rayindex.infra.files import load_embeddings
from rayindex.infra.prefetch import prefetched
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.layout import DOCS_FILE, SHARD_ENCODE_FILES, VECTOR_IDS_FILE, shard_dir, shard_rel
from rayindex.stages import encode, plan
from rayindex.text.corpus import RowBatch
from rayindex.text.documents import CUT, cut_text, prepare
from rayindex.text.model import load_model, tokenize

from helpers import build_config, write_parquet


def test_encoder_resources_split_cpus_and_give_each_gpu_its_nodes_cpus():
    assert encode.encoder_resources(False, 8, 0, None, 3) == (3, {"num_cpus": 2})  # never more actors than shards
    assert encode.encoder_resources(False, 2, 0, None, 10) == (2, {"num_cpus": 1})
    assert encode.encoder_resources(False, 8, 0, 1, 10) == (1, {"num_cpus": 8})  # one actor gets every core
    # a GPU encoder reserves its node's CPUs per GPU (reading and tokenizing feed the GPU), or --encoder-cpus
    assert encode.encoder_resources(True, 64, 4, None, 10, gpu_node_cpus_per_gpu=12) == (
        4,
        {"num_gpus": 1, "num_cpus": 12.0},
    )
    assert encode.encoder_resources(True, 64, 4, None, 10, encoder_cpus=6, gpu_node_cpus_per_gpu=12) == (
        4,
        {"num_gpus": 1, "num_cpus": 6},
    )
    assert encode.encoder_resources(True, 2, 0, None, 10) == (1, {"num_gpus": 1, "num_cpus": 1.0})  # no GPU node up yet
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 2}},
        {"Alive": True, "Resources": {"CPU": 48, "GPU": 4}},
        {"Alive": True, "Resources": {"CPU": 2}},
        {"Alive": False, "Resources": {"CPU": 1, "GPU": 1}},
    ]
    assert encode.cpus_per_gpu(nodes) == 8 and encode.cpus_per_gpu(nodes[2:3]) is None


def test_tokenize_once_gives_the_models_own_inputs_and_counts_truncation(docs):
    """The Rust tokenizer called directly produces exactly what sentence-transformers' preprocess feeds the
    model; truncated texts are counted from the same pass (a 10 MB text cut before tokenizing)."""
    model = load_model("all-MiniLM-L6-v2")
    texts = [f"{d['title']}: {d['body']}" for d in docs[:200]] + ["word " * 2_000_000]
    tokenized = tokenize(model, texts)
    features = model.preprocess(texts[:200])
    mask = features["attention_mask"].numpy().astype(bool)
    for name in ("input_ids", "token_type_ids"):
        assert np.array_equal(tokenized.ids[name][: int(tokenized.lengths[:200].sum())], features[name].numpy()[mask])
    longer = sum(len(model.tokenizer(t, verbose=False)["input_ids"]) > 256 for t in texts[:200])
    assert tokenized.truncated == longer + 1 and tokenized.lengths[-1] == 256


def test_documents_are_assembled_column_by_column(tmp_path):
    """Texts as --text-column and --template always made them (blank values left out, nulls as ""), rows
    without text skipped and counted, ids typed (1 and "1" differ), metadata as JSON."""
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "title": ["T", None, "  ", "x\ny"],
            "body": ["b", "only body", None, "café"],
            "n": [1, None, 3, 4],
            "tags": [["x"], [], None, ["y", "z"]],
        }
    )
    batch = RowBatch(np.arange(10, 14), table)
    joined = prepare(batch, ["title", "body"], None, "id", lambda i: f"row {i}")
    assert joined.texts.to_pylist() == ["T: b", "only body", "x\ny: café"] and joined.skipped == {
        "empty_or_null_text": 1
    }
    assert joined.row_ids.tolist() == [10, 11, 13] and joined.doc_ids.to_pylist() == ["a", "b", "d"]
    assert [json.loads(m) for m in joined.metadata.to_pylist()] == [
        {"n": 1, "tags": ["x"]},
        {"n": None, "tags": []},
        {"n": 4, "tags": ["y", "z"]},
    ]
    templated = prepare(batch, ["title", "body"], "{title} / {body}!", "id", lambda i: f"row {i}")
    assert templated.texts.to_pylist() == ["T / b!", " / only body!", "x\ny / café!"]
    ints = prepare(RowBatch(np.arange(2), pa.table({"id": [1, 2], "text": ["one", "two"]})), ["text"], None, "id", str)
    strings = prepare(
        RowBatch(np.arange(2), pa.table({"id": ["1", "2"], "text": ["one", "two"]})), ["text"], None, "id", str
    )
    assert ints.doc_id_is_int.to_pylist() == [True, True] and strings.doc_id_is_int.to_pylist() == [False, False]
    assert not set(ints.id_hashes.tolist()) & set(strings.id_hashes.tolist())  # 1 and "1" are different ids
    with pytest.raises(RayIndexError, match=r"row 0: id column 'id' holds a float \(1\.5\)"):
        prepare(
            RowBatch(np.arange(1), pa.table({"id": [1.5], "text": ["x"]})), ["text"], None, "id", lambda i: f"row {i}"
        )


def test_cut_text_keeps_whole_words_within_the_limit():
    assert cut_text("short", 10) == "short"
    assert cut_text("one two three four", 10) == "one two"  # the last whitespace within 10 characters
    assert cut_text("abcdefghijklmnop", 10) == "abcdefghij"  # no whitespace: cut at the limit
    assert cut_text("a " + "b" * 30, 10) == "a " + "b" * 8  # a whitespace only in the first half: cut at the limit


def test_a_document_longer_than_max_chars_is_cut_before_anything_reads_it_and_listed():
    """prepare cuts it (so hashing, tokenizing and the doc store see only its head) and lists it: id, where,
    its length and what was kept; the others pass untouched."""
    big = " ".join(f"word{i}" for i in range(400_000))  # 3.3 MB
    table = pa.table({"id": ["small", "big"], "text": ["a short one", big]})
    docs = prepare(RowBatch(np.arange(5, 7), table), ["text"], None, "id", lambda i: f"c.jsonl line {i + 1}", 2_000)
    kept = docs.texts.to_pylist()
    assert kept[0] == "a short one" and big.startswith(kept[1]) and 1_990 <= len(kept[1]) <= 2_000
    assert docs.skipped == {CUT: 1}
    assert [d.model_dump() for d in docs.cut] == [
        {"id": "big", "where": "c.jsonl line 2", "chars": len(big), "kept_chars": len(kept[1])}
    ]


@pytest.mark.parametrize("kind", ["int64", "double", "bool"])
def test_a_text_column_that_is_not_text_is_refused_naming_it_and_its_type(kind):
    values = {"int64": [1, 2], "double": [1.5, 2.0], "bool": [True, False]}[kind]
    batch = RowBatch(np.arange(2), pa.table({"id": ["a", "b"], "body": values}))
    with pytest.raises(RayIndexError, match=rf"x\.jsonl line 1: text column 'body' holds {kind} values, not text"):
        prepare(batch, ["body"], None, "id", lambda i: f"x.jsonl line {i + 1}")
    templated = prepare(batch, ["body"], "{body}", "id", str)  # a template formats any value, on purpose
    assert len(templated) == 2 and all(templated.texts.to_pylist())


def test_prefetch_overlaps_bounds_and_hands_errors_over():
    made = []

    def producer():
        for i in range(10):
            made.append(i)
            yield i
        raise ValueError("the producer failed")

    got = []
    with pytest.raises(ValueError, match="the producer failed"):
        for item in prefetched(producer(), depth=2):
            got.append(item)
            assert len(made) - len(got) <= 3  # at most depth waiting, one being made
    assert got == list(range(10))


@pytest.fixture(scope="module")
def encoded(ray_address, docs, tmp_path_factory):
    """plan + encode of 50 documents in 2 shards into a fresh version: (config, manifest, version)."""
    root = tmp_path_factory.mktemp("encode")
    corpus = write_parquet(root / "docs.parquet", docs[:50])
    config = build_config([corpus], root / "out", shards=2)
    progress = StageProgress(quiet=True)
    manifest, version = start_or_resume(config, Store(config.output), progress)
    plan.run(config, manifest)
    encode.run(config, manifest, version, progress)
    return config, manifest, version


def test_embeddings_are_the_models_vectors_of_the_composed_texts(encoded, docs):
    config, manifest, version = encoded
    assert manifest.counts.docs_encoded == 50 and manifest.dimension == 384 and manifest.model.device == "cpu"
    dirs = [shard_dir(version.local_root, s.shard_id) for s in manifest.shards]
    store = DocStore.of_version(version, manifest)
    passages = [store.get(int(i)) for d in dirs for i in np.load(d / VECTOR_IDS_FILE)]
    texts = {d["id"]: f"{d['title']}: {d['body']}" for d in docs[:50]}
    assert [p["text"] for p in passages] == [texts[p["id"]][p["start"] : p["end"]] for p in passages]
    assert len(passages) > 50 and {p["id"] for p in passages} == set(texts)  # the long docstrings are split
    expected = load_model(config.model).encode(
        [p["text"] for p in passages], normalize_embeddings=True, convert_to_numpy=True
    )
    stored = np.concatenate(
        [np.asarray(load_embeddings(d, st.passages, 384)) for d, st in zip(dirs, manifest.shard_states)]
    )
    np.testing.assert_allclose(stored, expected, atol=1e-5)  # each passage's vector is the model's vector of its text


def test_each_shard_has_its_files_checksummed_and_its_doc_store(encoded, docs):
    _, manifest, version = encoded
    for shard in manifest.shards:
        for name in SHARD_ENCODE_FILES:
            assert version.verified(
                {shard_rel(shard.shard_id, name): manifest.files_sha256[shard_rel(shard.shard_id, name)]}
            )
        state = manifest.shard_states[shard.shard_id]
        assert state.docs_footer_sha256 == footer_sha256(shard_dir(version.local_root, shard.shard_id) / DOCS_FILE)
    store = DocStore.of_version(version, manifest)
    first = store.get(37 << 20)  # document row 37's first passage
    assert first["id"] == docs[37]["id"] and first["metadata"] == {
        "module": docs[37]["module"],
        "kind": docs[37]["kind"],
    }


def test_a_rerun_keeps_the_verified_shards(encoded):
    config, manifest, version = encoded
    before = [s.embeddings_sha256 for s in manifest.shard_states]
    encode.run(config, manifest, version, StageProgress(quiet=True))
    assert manifest.reused.encode == [0, 1] and [s.embeddings_sha256 for s in manifest.shard_states] == before


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="text-column or a --template"):
        BuildConfig(inputs=["x"], text_columns=[])
