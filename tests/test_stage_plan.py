"""The plan stage (stages/plan.py) and the shard plan under it (text/shard_plan.py): deterministic,
disjoint, complete; row ranges read back exactly."""

import rayindex.text.corpus as corpus
from rayindex.config import BuildConfig
from rayindex.stages.plan import plan
from rayindex.text.shard_plan import number_of_shards, plan_shards

from helpers import write_jsonl, write_parquet


def test_plan_covers_every_row_once_in_order():
    files = [("a", 10), ("b", 0), ("c", 7), ("d", 5)]
    plan = plan_shards(files, 4)
    assert [s.global_start for s in plan] == [0, 5, 11, 16]
    assert plan[-1].global_end == 22
    pieces = [p for s in plan for p in s.pieces]
    assert sum(p.num_rows for p in pieces) == 22
    starts = [p.global_start for p in pieces]
    assert starts == sorted(starts)
    assert all(a.global_start + a.num_rows == b.global_start for a, b in zip(pieces, pieces[1:]))
    assert plan_shards(files, 4) == plan


def test_number_of_shards():
    assert number_of_shards(100, None, 30) == 4
    assert number_of_shards(100, 7, 30) == 7
    assert number_of_shards(3, 10, 30) == 3  # never more shards than rows


def test_plan_is_deterministic_and_reads_exact_rows(tmp_path, docs, monkeypatch):
    monkeypatch.setattr(corpus, "JSONL_CHECKPOINT_ROWS", 16)  # so shards start between JSONL checkpoints
    write_parquet(tmp_path / "in" / "p1.parquet", docs[:90], row_group_size=17)
    write_jsonl(tmp_path / "in" / "p2.jsonl", docs[90:200])
    config = BuildConfig(inputs=[str(tmp_path / "in")], id_column="id", text_columns=["body"], shards=6)
    files, shards = plan(config)
    assert plan(config) == (files, shards)
    assert [f.rows for f in files] == [90, 110] and [f.format for f in files] == ["parquet", "jsonl"]
    seen = []
    for shard in shards:
        for piece in shard.pieces:
            for batch in corpus.read_piece(piece, batch_rows=13):
                for row_id, record in zip(batch.row_ids.tolist(), batch.table.to_pylist()):
                    seen.append(row_id)
                    assert record["id"] == docs[row_id]["id"]
    assert seen == list(range(200))
