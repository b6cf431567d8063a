"""Deterministic shard plan: contiguous row ranges of the sorted input files.

The plan depends only on the file list (sorted) and their row counts, so re-running the
same command gives the same shards and the same global ids (row numbers).
"""

from __future__ import annotations

import math

from rayindex.manifest import Piece, Shard


def number_of_shards(total_rows: int, shards: int | None, shard_size: int) -> int:
    """--shards when given, else ceil(total / shard_size); never more shards than rows."""
    wanted = shards if shards else math.ceil(total_rows / shard_size)
    return max(1, min(wanted, total_rows))


def plan_shards(file_rows: list[tuple[str, int]], num_shards: int) -> list[Shard]:
    """Split the concatenation of the files (in the order given) into num_shards near-equal row ranges."""
    total = sum(rows for _, rows in file_rows)
    bounds = [total * i // num_shards for i in range(num_shards + 1)]
    file_starts = []
    offset = 0
    for path, rows in file_rows:
        file_starts.append((path, offset, rows))
        offset += rows
    plan = []
    for shard_id in range(num_shards):
        lo, hi = bounds[shard_id], bounds[shard_id + 1]
        pieces = []
        for path, start, rows in file_starts:
            a, b = max(lo, start), min(hi, start + rows)
            if a < b:
                pieces.append(Piece(path=path, row_start=a - start, num_rows=b - a, global_start=a))
        plan.append(Shard(shard_id=shard_id, pieces=pieces, global_start=lo, global_end=hi))
    return plan


def locate_row(shards: list[Shard], row_id: int) -> str:
    """'file row N' for a global row id, for error messages."""
    for shard in shards:
        for piece in shard.pieces:
            if piece.global_start <= row_id < piece.global_start + piece.num_rows:
                return f"{piece.path} row {row_id - piece.global_start + piece.row_start}"
    return f"row {row_id}"
