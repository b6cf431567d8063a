"""The plan stage (stages/plan.py) and the shard plan under it (text/shard_plan.py): deterministic,
disjoint, complete; row ranges read back exactly; units cut by cost, as many as the encoders that can run at
once where each is worth its fixed cost; cuts inside a Parquet row group at equal text bytes; a resumed run keeps
its plan."""

import pyarrow as pa
import pyarrow.parquet as pq

import rayindex.text.corpus as corpus
from rayindex.config import BuildConfig
from rayindex.infra.resources import NodeGroup, encoder_slots
from rayindex.manifest import Manifest
from rayindex.stages import plan as plan_stage
from rayindex.stages.plan import plan
from rayindex.text import shard_plan
from rayindex.text.shard_plan import (
    MIN_UNIT_BYTES,
    FileCost,
    cumulative_cost,
    finer_marks,
    groups_to_read,
    number_of_shards,
    plan_shards,
    unit_bounds,
)

from helpers import write_jsonl, write_parquet


def test_plan_covers_every_row_once_in_order():
    files = [FileCost("a", 10), FileCost("b", 0), FileCost("c", 7), FileCost("d", 5)]
    plan = plan_shards(files, 4)
    assert [s.global_start for s in plan] == [0, 5, 11, 16]  # no cost marks: every row costs the same
    assert plan[-1].global_end == 22
    pieces = [p for s in plan for p in s.pieces]
    assert sum(p.num_rows for p in pieces) == 22
    starts = [p.global_start for p in pieces]
    assert starts == sorted(starts)
    assert all(a.global_start + a.num_rows == b.global_start for a, b in zip(pieces, pieces[1:]))
    assert plan_shards(files, 4) == plan


def test_units_are_cut_at_equal_cost_not_equal_rows():
    # 4 long documents (100,000 bytes each) then 96 short ones (1,000 bytes each): 496,100 with a byte per row
    long_then_short = [FileCost(f"long{i}.txt", 1, [(0, 0), (1, 100_000)]) for i in range(4)]
    table = FileCost("short.jsonl", 96, [(0, 0), *((r, 1_000 * r) for r in range(1, 97))])
    shards = plan_shards([*long_then_short, table], 2)
    # half the cost (248,050) is reached 2.48 documents in: row 2 (nearest), so 2 long documents a unit ...
    assert [(s.global_start, s.global_end) for s in shards] == [(0, 2), (2, 100)]
    assert [s.cost for s in shards] == [200_002, 296_098]
    assert sum(s.cost for s in shards) == 4 * 100_001 + 96 * 1_001
    # ... and a row-count cut would have given the first unit the 4 long documents and 46 short ones
    assert [(s.global_start, s.global_end) for s in plan_shards([FileCost("x", 100)], 2)] == [(0, 50), (50, 100)]
    # between marks the cost is linear: a Parquet file's row groups of 10 rows, the second ten times heavier
    groups = FileCost("p.parquet", 20, [(0, 0), (10, 1_000), (20, 11_000)])
    # half the cost, 5,510 of 11,020, is 4.495 of the second group's 10 rows in: row 14 (the nearest)
    assert unit_bounds(*cumulative_cost([groups]), 2) == [0, 14, 20]


def test_bounds_stay_increasing_when_one_row_holds_most_of_the_cost():
    files = [FileCost("huge.pdf", 1, [(0, 0), (1, 10_000_000)]), FileCost("rest.jsonl", 3, [(0, 0), (3, 30)])]
    assert unit_bounds(*cumulative_cost(files), 4) == [0, 1, 2, 3, 4]  # every unit at least one row, ids unchanged


def test_finer_marks_share_a_row_group_by_its_rows_text(monkeypatch):
    groups = [(0, 0), (4, 1_000), (8, 1_100)]
    # the first group's rows hold 10, 0, 30 and 60 text bytes: its 1,000 shared 10:0:30:60, rounded down
    assert finer_marks(groups, 1, [10, 0, 30, 60]) == [(0, 0), (1, 100), (2, 100), (3, 400), (4, 1_000), (8, 1_100)]
    assert finer_marks(groups, 2, [1, 1, 1, 7]) == [(0, 0), (4, 1_000), (5, 1_010), (6, 1_020), (7, 1_030), (8, 1_100)]
    assert finer_marks(groups, 1, [0, 0, 0, 0]) == groups  # no text: equal rows, as before
    monkeypatch.setattr(shard_plan, "COST_MARKS", 2)  # every ceil(4 / 2) = 2nd row
    assert finer_marks(groups, 1, [10, 0, 30, 60]) == [(0, 0), (2, 100), (4, 1_000), (8, 1_100)]


def test_a_cut_inside_a_row_group_falls_at_equal_text_bytes():
    # one row group of 8 rows: 4 of 100 text bytes, then 4 of 10 (880 bytes in the footer)
    group = FileCost("p.parquet", 8, [(0, 0), (8, 880)], row_groups=True)
    assert unit_bounds(*cumulative_cost([group]), 2) == [0, 4, 8]  # equal rows: 400 text bytes against 40
    assert groups_to_read([group], 2) == [(0, 1)]
    fine = group._replace(marks=finer_marks(group.marks, 1, [100] * 4 + [10] * 4))
    # half of 888 (its bytes and a byte a row) is 444, between row 2 (402) and row 3 (603): row 2, the nearer,
    # 200 text bytes against 240 (row 3: 300 against 140)
    assert unit_bounds(*cumulative_cost([fine]), 2) == [0, 2, 8]
    assert [s.cost for s in plan_shards([fine], 2)] == [402, 486]


def test_only_the_row_groups_where_cuts_fall_are_read(monkeypatch):
    two = FileCost("a.parquet", 20, [(0, 0), (10, 1_000), (20, 2_000)], row_groups=True)
    assert groups_to_read([two], 2) == []  # the cut (1,010 of 2,020) falls on the groups' boundary
    assert groups_to_read([two], 3) == [(0, 1), (0, 2)]  # 673 in the first, 1,346 in the second
    assert groups_to_read([two._replace(row_groups=False)], 3) == []  # JSONL: its marks are its bytes already
    jsonl = FileCost("b.jsonl", 5, [(0, 0), (5, 1_000)])
    assert groups_to_read([jsonl, two], 2) == [(1, 1)]  # the cut at 1,512 of 3,025: a.parquet's first group
    # forty groups of 100 bytes in 2 units of 2,200: a group costs 1/20 of a unit, under 1/FINE_SHARE: none read
    many = FileCost("m.parquet", 400, [(10 * g, 100 * g) for g in range(41)], row_groups=True)
    assert groups_to_read([many], 2) == []
    # in 3 units of 1,466 a group is 1/13 of one: read where the cuts fall (1,466 and 2,933: groups 14 and 27)
    assert groups_to_read([many], 3) == [(0, 14), (0, 27)]
    monkeypatch.setattr(shard_plan, "FINE_READ_BYTES", 150)  # one group's bytes: the plan reads at most that
    assert groups_to_read([many], 3) == [(0, 14)]
    single_row = FileCost("s.parquet", 2, [(0, 0), (1, 1_000), (2, 2_000)], row_groups=True)
    assert groups_to_read([single_row], 3) == []  # a group of one row has no cut inside


def test_number_of_units():
    floor = MIN_UNIT_BYTES
    # --shards wins, never more than rows
    assert number_of_shards(100, 10**9, 8, 7, 30) == 7
    assert number_of_shards(3, 10**9, 8, 10, 30) == 3
    # a tiny corpus stays one unit whatever the encoders: each extra unit would cost more than it saves
    assert number_of_shards(2_000, floor - 1, 16, None, 50_000) == 1
    assert number_of_shards(2_000, 2 * floor, 16, None, 50_000) == 2  # as many as are worth their cost
    # a corpus of long documents: one unit per encoder that can run at once
    assert number_of_shards(2_000, 9_400_000, 2, None, 50_000) == 2
    assert number_of_shards(2_000, 9_400_000, 16, None, 50_000) == 16
    # more rows than --shard-size: whole waves of encoders (3 units on 2 encoders would leave one alone)
    assert number_of_shards(114_890, 60_000_000, 2, None, 50_000) == 4
    assert number_of_shards(114_890, 60_000_000, 1, None, 50_000) == 3
    assert number_of_shards(100, 10**9, 8, None, 30) == 8  # 4 by --shard-size, raised to the 8 encoders


def test_encoder_slots_follow_the_cluster_and_its_autoscaler():
    assert encoder_slots(False, {"CPU": 2.0}, None, None, None) == 2
    assert encoder_slots(False, {"CPU": 16.0}, None, None, 4) == 4  # --encoder-cpus 4 a encoder
    assert encoder_slots(False, {"CPU": 16.0}, None, 3, None) == 3  # --encoders
    gpus = [NodeGroup("head", {"CPU": 8}, 0), NodeGroup("gpu", {"CPU": 8, "GPU": 1}, 6)]
    assert encoder_slots(True, {"CPU": 8.0}, gpus, None, None) == 6  # none up yet, 6 can come
    assert encoder_slots(True, {"CPU": 16.0, "GPU": 2.0}, None, None, None) == 2
    assert encoder_slots(True, {"CPU": 8.0}, None, None, None) == 1  # nothing says how many: one
    unbounded = [NodeGroup("gpu", {"GPU": 1}, -1)]
    assert encoder_slots(True, {"GPU": 3.0}, unbounded, None, None) == 3


def test_plan_is_deterministic_and_reads_exact_rows(tmp_path, docs, monkeypatch):
    monkeypatch.setattr(corpus, "JSONL_CHECKPOINT_ROWS", 16)  # so shards start between JSONL checkpoints
    write_parquet(tmp_path / "in" / "p1.parquet", docs[:90], row_group_size=17)
    write_jsonl(tmp_path / "in" / "p2.jsonl", docs[90:200])
    config = BuildConfig(inputs=[str(tmp_path / "in")], id_column="id", text_columns=["body"], shards=6)
    files, shards = plan(config, 2)
    assert plan(config, 2) == (files, shards)
    assert [f.rows for f in files] == [90, 110] and [f.format for f in files] == ["parquet", "jsonl"]
    seen = []
    for shard in shards:
        for piece in shard.pieces:
            for batch in corpus.read_piece(piece, batch_rows=13):
                for row_id, record in zip(batch.row_ids.tolist(), batch.table.to_pylist()):
                    seen.append(row_id)
                    assert record["id"] == docs[row_id]["id"]
    assert seen == list(range(200))


def test_cost_marks_are_the_files_own_sizes(tmp_path, docs):
    parquet = write_parquet(tmp_path / "p.parquet", docs[:40], row_group_size=15)
    meta = pq.ParquetFile(parquet).metadata
    sizes = [meta.row_group(g).total_byte_size for g in range(3)]
    assert corpus.inspect_file(str(parquet)).cost_marks == [
        (0, 0),
        (15, sizes[0]),
        (30, sizes[0] + sizes[1]),
        (40, sum(sizes)),
    ]
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs[:40])
    lines = jsonl.read_bytes().splitlines(keepends=True)
    marks = corpus.inspect_file(str(jsonl)).cost_marks
    assert marks[0] == (0, 0) and marks[-1] == (40, len(jsonl.read_bytes()))
    assert all(offset == sum(map(len, lines[:row])) for row, offset in marks)  # each a line's exact start


def test_row_group_text_bytes_reads_each_rows_text_length(tmp_path):
    table = pa.table(
        {
            "title": ["ab", None, "é"],  # UTF-8 bytes: é is 2
            "body": pa.array([b"\xff\xfe", b"", None]),
            "year": [1999, 7, None],  # a template's number: its digits
            "tags": [["x"], [], None],  # no text form: 0
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    assert corpus.row_group_text_bytes(str(path), 0, ["title"]) == [2, 0, 2]
    assert corpus.row_group_text_bytes(str(path), 0, ["title", "body", "year", "tags"]) == [8, 1, 2]


def test_a_row_group_of_unequal_texts_is_cut_at_equal_text_bytes(tmp_path, docs, monkeypatch):
    # one row group: 30 long docstrings, then 60 one-word ones
    long = sorted(docs, key=lambda d: -len(d["body"]))[:30]
    rows = [{"id": d["id"], "body": d["body"]} for d in long] + [{"id": f"w{i}", "body": "word"} for i in range(60)]
    path = write_parquet(tmp_path / "in" / "p.parquet", rows, row_group_size=100)
    monkeypatch.setattr(shard_plan, "MIN_UNIT_BYTES", 1)
    config = BuildConfig(inputs=[str(path)], id_column="id", text_columns=["body"])
    files, shards = plan(config, 2)
    text = [len(r["body"].encode()) for r in rows]
    cut = shards[0].global_end
    assert abs(sum(text[:cut]) - sum(text[cut:])) <= max(text)  # equal text bytes, within one row
    assert cut < 30  # not the 45 rows equal rows would give
    assert plan(config, 2) == (files, shards)  # the same texts, the same plan
    assert [s.global_start for s in shards] == [0, cut] and shards[-1].global_end == 90


def test_a_folder_of_long_files_is_cut_by_their_sizes(tmp_path):
    sizes = [60_000, 4_000, 4_000, 4_000, 40_000, 20_000, 4_000, 4_000]  # 140,000 bytes
    for i, size in enumerate(sizes):
        (tmp_path / "in" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text("word " * (size // 5))
    config = BuildConfig(inputs=[str(tmp_path / "in")])
    _, shards = plan(config, 2)
    assert [(s.global_start, s.global_end) for s in shards] == [(0, 4), (4, 8)]  # 72,000 and 68,000 bytes
    _, alone = plan(config, 1)
    assert len(alone) == 1  # one encoder: one unit
    _, many = plan(config, 8)
    assert len(many) == 2  # 140,000 bytes are worth 2 units of MIN_UNIT_BYTES, not 8


def test_a_resumed_run_keeps_its_plan_whatever_the_cluster(tmp_path, docs, ray_address):
    write_parquet(tmp_path / "in" / "p.parquet", docs[:60], row_group_size=10)
    # the session's Ray (2 CPUs), which a resumed run connects to (timed as `ray`), as every build does
    config = BuildConfig(inputs=[str(tmp_path / "in")], id_column="id", text_columns=["body"], ray_address=ray_address)
    recorded = plan(config, 1)
    manifest = Manifest(run_id="20260101-000000-abcdef", created_at="now", config=config, config_fingerprint="x")
    manifest.files, manifest.shards, manifest.encoder_slots = recorded.files, recorded.shards, 1
    assert plan_stage.run(config, manifest) == recorded  # the recorded plan is the plan, not one cut for 2 slots
    assert manifest.encoder_slots == 1 and "ray" in manifest.timings_s
