"""On an S3 output (the real SeaweedFS fixture), what a node keeps and what it reads: an encoder deletes its
copies of the shard files once the store holds them (Store.push keep=False), and training reads only the
sampled rows' bytes (Store.read_ranges, train.sampled_vectors), the same sample as from whole files."""

import numpy as np
import pytest

from rayindex.builder import start_or_resume
from rayindex.errors import RayIndexError
from rayindex.infra.files import read_sample
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import RANGE_GAP, Store
from rayindex.layout import EMBEDDINGS_FILE, SHARD_ENCODE_FILES, shard_rel
from rayindex.stages import encode, plan
from rayindex.stages.train import sampled_vectors

from helpers import build_config, s3_output, write_parquet


@pytest.mark.parametrize("where", ["s3", "local"])
def test_read_ranges_gives_exactly_the_bytes_asked_near_or_far_apart(where, s3_server, tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 3 * RANGE_GAP, dtype=np.uint8).tobytes()
    store = Store(s3_output(s3_server, "ranges") if where == "s3" else str(tmp_path / "out"))
    store.local("blob.bin").parent.mkdir(parents=True, exist_ok=True)
    store.local("blob.bin").write_bytes(data)
    store.push(["blob.bin"], keep=False)
    assert store.local("blob.bin").exists() == (where == "local")  # a mirror's copy goes, a local output stays
    starts = [0, 10, 5_000, RANGE_GAP + 7, 3 * RANGE_GAP - 100]  # near ones read as one GET, far ones apart
    ends = [4, 1_546, 6_536, RANGE_GAP + 1_543, 3 * RANGE_GAP]
    assert store.read_ranges("blob.bin", starts, ends) == [data[a:b] for a, b in zip(starts, ends)]
    with pytest.raises(RayIndexError, match=r"blob\.bin ends before byte .*shorter than its manifest says"):
        store.read_ranges("blob.bin", [3 * RANGE_GAP - 10], [3 * RANGE_GAP + 10])


@pytest.mark.slow
def test_encoders_keep_no_pushed_shard_and_training_reads_only_sampled_rows(ray_address, s3_server, docs, tmp_path):
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:30])
    config = build_config([corpus], s3_output(s3_server, "cache-out"), shards=2)
    progress = StageProgress(quiet=True)
    manifest, version = start_or_resume(config, Store(config.output), progress)
    plan.run(config, manifest)
    encode.run(config, manifest, version, progress)
    shards = [s.shard_id for s in manifest.shards]
    # the store holds every shard file; this node's mirror none (check_unique_ids pulled only the hashes)
    stored = {rel for rel in version.file_sizes()}
    assert {shard_rel(i, name) for i in shards for name in SHARD_ENCODE_FILES} <= stored
    assert not any(version.local(shard_rel(i, EMBEDDINGS_FILE)).exists() for i in shards)

    counts, dim = manifest.shard_counts(), manifest.dimension
    embeddings = manifest.shard_files((EMBEDDINGS_FILE,))
    rels = [shard_rel(i) for i in shards]
    ranged = sampled_vectors(version, embeddings, rels, counts, dim, 20, seed=7)
    assert not any(version.local(shard_rel(i, EMBEDDINGS_FILE)).exists() for i in shards)  # nothing pulled whole
    version.pull(embeddings, verify=True)
    whole = read_sample([version.local(rel) for rel in rels], counts, dim, 20, seed=7)
    assert ranged.shape == (20, dim) and sum(counts) > 30
    assert np.array_equal(ranged, whole)  # the same rows, the same bytes
