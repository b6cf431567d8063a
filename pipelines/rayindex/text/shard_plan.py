"""Deterministic shard plan: contiguous row ranges of the sorted input files, cut where their estimated cost
is equal, as many as keep every encoder busy without making a small corpus pay for shards it does not need.

A shard (a work unit of the encode stage) costs what its text costs to encode, not what its rows count: 2,000
man pages (9.4 MB) and 2,000 dictionary entries (0.8 MB) are the same number of rows. The cost of a row range
is estimated from what the plan reads anyway (`cost_marks`): a document file's size, a Parquet row group's
uncompressed bytes, a JSONL file's byte offsets; plus one byte per row, so that rows without text still cost
something and a corpus of empty rows is cut by rows. Inside a Parquet row group the marks are linear (equal rows,
equal cost); where a cut falls in a row group big enough for that to matter (`groups_to_read`), the plan reads
that group's text columns and shares its cost among its rows by their text bytes (`finer_marks`).

The plan depends only on the file list (sorted), their rows, cost marks and texts, the options and the encoder slots
it is cut for (recorded in the manifest, kept by a resumed run), so re-running the same command on the same
cluster gives the same shards. Global ids are row numbers whatever the plan.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import NamedTuple

from rayindex.manifest import Piece, Shard

# The floor under a unit: each shard costs a build a fixed part besides its text (its add and BM25 count tasks,
# its files and their checksums, its merge entry, an encoder's start and end of a unit; benchmarks/units_benchmark.py
# --shard-cost measures it, not yet run quietly: docs/benchmarks.md). The CPU encoder reads ~2.4 KB of man page
# text a second per core (benchmarks/passages_benchmark.py: 1,086 tokens/s on 2 cores, ~4.4 characters a token), so
# a unit of MIN_UNIT_BYTES encodes for ~27 s on one core, against a fixed part estimated at about a second (<= 4%).
# A corpus under two of them is one shard.
MIN_UNIT_BYTES = 64 << 10
ROW_BYTES = 1  # the cost of a row besides its bytes (see above)
COST_MARKS = 4096  # at most about this many (row, bytes) marks per JSONL file, or per row group read by finer_marks
# A cut in a row group costing at most 1/FINE_SHARE of a unit is left where equal rows put it: off by less than
# that share of a unit at worst. Past it, the group's text columns are read, the groups a cut falls in only and at
# most FINE_READ_BYTES of them (their uncompressed size in the footer) for a whole plan: the two text columns of a
# 44 MB row group (126,240 GCIDE entries, 40.8 MB of text) were read and measured in 0.16-0.6 s on 2 busy cores
# (docs/build.md "Shard plan"), where encoding that text takes hours on CPU.
FINE_SHARE = 16
FINE_READ_BYTES = 64 << 20


class FileCost(NamedTuple):
    """A file's rows and where its cost accumulates: (row, bytes before that row) marks from (0, 0) to
    (rows, total bytes), interpolated linearly between marks; None: every row costs the same. row_groups: the
    marks are a Parquet file's row groups' ends (mark m ends group m - 1), whose rows' texts can be read."""

    path: str
    rows: int
    marks: list[tuple[int, int]] | None = None
    row_groups: bool = False


def number_of_shards(
    total_rows: int,
    total_cost: int,
    encoder_slots: int,
    shards: int | None,
    shard_size: int,
) -> int:
    """--shards when given; else ceil(rows / --shard-size), raised to one per encoder that can run at once as
    far as each still costs at least MIN_UNIT_BYTES, and past one wave to whole waves of encoders (a last unit
    alone on one encoder while the others idle is the tail this avoids); never more shards than rows."""
    if shards:
        return max(1, min(shards, total_rows))
    slots = max(1, encoder_slots)
    worth = max(1, total_cost // MIN_UNIT_BYTES)
    wanted = max(math.ceil(total_rows / shard_size), min(slots, worth))
    if wanted > slots:
        wanted = math.ceil(wanted / slots) * slots
    return max(1, min(wanted, total_rows))


def cumulative_cost(files: list[FileCost]) -> tuple[list[int], list[int]]:
    """The corpus's cost marks as (global rows, cumulative cost) from (0, 0) to (rows, total cost), each row
    counted ROW_BYTES besides its bytes."""
    rows, costs = [0], [0]
    row0 = cost0 = 0
    for f in files:
        marks = f.marks if f.marks is not None else [(0, 0), (f.rows, 0)]
        for row, cost in marks[1:]:
            rows.append(row0 + row)
            costs.append(cost0 + cost + ROW_BYTES * row)
        row0, cost0 = row0 + f.rows, costs[-1]
    return rows, costs


def groups_to_read(files: list[FileCost], num_shards: int) -> list[tuple[int, int]]:
    """(file, mark) of each row group (between the file's marks mark - 1 and mark) that a cut of num_shards equal
    parts falls strictly inside, of more than one row, costing more than 1/FINE_SHARE of a unit, in file order as
    far as their bytes fit FINE_READ_BYTES together (a larger group is passed over, a later smaller one still
    read)."""
    total = cumulative_cost(files)[1][-1]
    targets = [total * k // num_shards for k in range(1, num_shards)]
    found, budget, file_cost = [], FINE_READ_BYTES, 0
    for i, f in enumerate(files):
        marks = f.marks if f.marks is not None else [(0, 0), (f.rows, 0)]
        for m in range(1, len(marks) if f.row_groups else 0):
            (row0, bytes0), (row1, bytes1) = marks[m - 1], marks[m]
            lo, hi = file_cost + bytes0 + ROW_BYTES * row0, file_cost + bytes1 + ROW_BYTES * row1
            t = bisect.bisect_right(targets, lo)  # the first cut past the group's start
            cut_inside = t < len(targets) and targets[t] < hi
            big = row1 - row0 > 1 and (hi - lo) * FINE_SHARE * num_shards > total  # over 1/FINE_SHARE of a unit
            if cut_inside and big and bytes1 - bytes0 <= budget:
                found.append((i, m))
                budget -= bytes1 - bytes0
        file_cost += marks[-1][1] + ROW_BYTES * f.rows
    return found


def finer_marks(marks: list[tuple[int, int]], m: int, text_bytes: list[int]) -> list[tuple[int, int]]:
    """The marks with the row group between marks m - 1 and m marked inside by its rows' text bytes (text_bytes,
    one per row): its cost shared among its rows in proportion to them, at most about COST_MARKS marks (every
    ceil(rows / COST_MARKS)-th row), rounded down; its ends unchanged, so is every other group's cost. A group
    without text keeps its linear marks."""
    (row0, bytes0), (row1, bytes1) = marks[m - 1], marks[m]
    cumulative = list(itertools.accumulate(text_bytes, initial=0))
    text = cumulative[-1]
    if text == 0:
        return marks
    step = math.ceil((row1 - row0) / COST_MARKS)
    inner = [(row0 + r, bytes0 + (bytes1 - bytes0) * cumulative[r] // text) for r in range(step, row1 - row0, step)]
    return [*marks[:m], *inner, *marks[m:]]


def row_at_cost(rows: list[int], costs: list[int], target: int) -> int:
    """The row where the cumulative cost reaches target (the nearest row, linear between marks)."""
    i = bisect.bisect_left(costs, target)  # costs[i - 1] < target <= costs[i]
    if i == 0:
        return 0
    if i == len(costs):
        return rows[-1]
    num, den = (target - costs[i - 1]) * (rows[i] - rows[i - 1]), costs[i] - costs[i - 1]
    return rows[i - 1] + (2 * num + den) // (2 * den)


def unit_bounds(rows: list[int], costs: list[int], num_shards: int) -> list[int]:
    """num_shards + 1 increasing row bounds from 0 to the total rows, cutting the cumulative cost (rows, costs:
    cumulative_cost) in equal parts, each shard at least one row."""
    total_rows, total = rows[-1], costs[-1]
    bounds = [0]
    for k in range(1, num_shards):
        row = row_at_cost(rows, costs, total * k // num_shards)
        bounds.append(min(max(row, bounds[-1] + 1), total_rows - (num_shards - k)))
    return bounds + [total_rows]


def plan_shards(files: list[FileCost], num_shards: int) -> list[Shard]:
    """Split the concatenation of the files (in the order given) into num_shards row ranges of near-equal
    estimated cost (of near-equal rows where no file says more), each with its estimated cost."""
    rows, costs = cumulative_cost(files)
    bounds = unit_bounds(rows, costs, num_shards)
    file_starts = []
    offset = 0
    for f in files:
        file_starts.append((f.path, offset, f.rows))
        offset += f.rows
    plan = []
    for shard_id in range(num_shards):
        lo, hi = bounds[shard_id], bounds[shard_id + 1]
        pieces = []
        for path, start, n in file_starts:
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                pieces.append(Piece(path=path, row_start=a - start, num_rows=b - a, global_start=a))
        cost = cost_at(rows, costs, hi) - cost_at(rows, costs, lo)
        plan.append(Shard(shard_id=shard_id, pieces=pieces, global_start=lo, global_end=hi, cost=cost))
    return plan


def cost_at(rows: list[int], costs: list[int], row: int) -> int:
    """The cumulative cost before a row (linear between marks)."""
    i = bisect.bisect_left(rows, row)  # rows[i - 1] < row <= rows[i]
    if i == 0:
        return 0
    if i == len(rows):
        return costs[-1]
    return costs[i - 1] + (costs[i] - costs[i - 1]) * (row - rows[i - 1]) // (rows[i] - rows[i - 1])


def locate_row(shards: list[Shard], row_id: int) -> str:
    """'file row N' for a global row id, for error messages."""
    for shard in shards:
        for piece in shard.pieces:
            if piece.global_start <= row_id < piece.global_start + piece.num_rows:
                return f"{piece.path} row {row_id - piece.global_start + piece.row_start}"
    return f"row {row_id}"
