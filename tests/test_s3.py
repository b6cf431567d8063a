"""Reading the corpus from s3:// (a real S3-compatible server, SeaweedFS, on 127.0.0.1)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build import build_index
from pipelines.errors import RayIndexError
from pipelines.search import open_published

from conftest import build_config


@pytest.fixture(scope="module")
def s3_corpus(s3_server, docs):
    fs, bucket = s3_server
    with fs.open(f"{bucket}/corpus/part-0.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(docs[:60]), fh, row_group_size=25)
    with fs.open(f"{bucket}/corpus/part-1.jsonl", "wb") as fh:
        fh.write("".join(json.dumps(d) + "\n" for d in docs[60:100]).encode())
    return f"s3://{bucket}/corpus"


def test_build_from_s3_folder_and_search(s3_corpus, ray_address, tmp_path, docs):
    manifest = build_index(build_config([s3_corpus], tmp_path, shards=2, index="IVF2,Flat"))
    assert [f["path"] for f in manifest.files] == [f"{s3_corpus}/part-0.parquet", f"{s3_corpus}/part-1.jsonl"]
    assert manifest.counts["docs_encoded"] == 100
    target = docs[77]  # from the JSONL part, read by a worker straight from S3
    hits = open_published(tmp_path).search(f"{target['title']}: {target['body']}", k=3, nprobe=2)
    assert hits[0]["id"] == target["id"]


def test_s3_glob_and_missing_key(s3_corpus, ray_address, tmp_path):
    from pipelines.corpus import list_input_files

    assert list_input_files([f"{s3_corpus}/*.jsonl"]) == [f"{s3_corpus}/part-1.jsonl"]
    with pytest.raises(RayIndexError, match=r"input path s3://.*/nope\.parquet does not exist"):
        build_index(build_config([f"{s3_corpus}/nope.parquet"], tmp_path))
