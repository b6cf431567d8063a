"""Plan stage: list the input files, check the columns of the tables among them (text columns of text), cut
the rows into a deterministic shard plan sized by cost for the encoders the cluster can run at once
(text/shard_plan.py: the same inputs, options and encoder slots give the same shards; global ids are row
numbers whatever the plan; a document file (PDF, HTML, Markdown, text) is one row, named by its path under its
input), and refuse duplicate ids of a corpus small enough to read before anything is encoded."""

from __future__ import annotations

import time
from typing import NamedTuple

import ray

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.ray_session import connect
from rayindex.infra.resources import autoscaler_node_groups, encoder_slots, encoders_use_gpus
from rayindex.infra.storage import is_remote
from rayindex.manifest import InputFile, Manifest, ModelInfo, Shard, ShardState
from rayindex.text import corpus, vectors
from rayindex.text.documents import find_duplicate_ids
from rayindex.text.model import resolve_model
from rayindex.text.shard_plan import (
    FileCost,
    cumulative_cost,
    finer_marks,
    groups_to_read,
    number_of_shards,
    plan_shards,
)

# Duplicate ids are looked for before encoding when the whole corpus is local and at most this big: reading
# it (ids and text columns, JSONL parsed) costs about a second (docs/build.md), encoding it an hour or more on
# CPU (64 MB of text is ~15M tokens). Past it, or on s3://, the encode stage finds them from its hashes.
EARLY_ID_CHECK_BYTES = 64 << 20


class Plan(NamedTuple):
    files: list[InputFile]
    shards: list[Shard]


def plan(config: BuildConfig, slots: int) -> Plan:
    """Files (columns of tables checked, rows counted from metadata or one pass over JSONL; a document file is
    a row) and the shard plan for `slots` encoders running at once."""
    return cut(config, *inspected(config), slots)


def cut(
    config: BuildConfig, names: dict[str, str], infos: list[corpus.FileInfo], files: list[InputFile], slots: int
) -> Plan:
    """The shard plan of inspected files for `slots` encoders (no I/O but the text columns of the Parquet row
    groups where a cut falls: finer_costs)."""
    total = sum(i.num_rows for i in infos)
    costs = [
        FileCost(
            i.path,
            i.num_rows,
            i.cost_marks if i.cost_marks is not None else [(0, 0), (1, f.size)],
            row_groups=i.format == "parquet",
        )
        for i, f in zip(infos, files)
    ]
    num_shards = number_of_shards(total, cumulative_cost(costs)[1][-1], slots, config.shards, config.shard_size)
    shards = plan_shards(finer_costs(config, costs, num_shards), num_shards)
    by_path = {i.path: i for i in infos}
    for shard in shards:
        shard.pieces = [
            p.model_copy(update={"doc_id": names[p.path]})
            if corpus.is_document_file(p.path)
            else corpus.attach_byte_offsets(p, by_path[p.path])
            for p in shard.pieces
        ]
    return Plan(files, shards)


def finer_costs(config: BuildConfig, costs: list[FileCost], num_shards: int) -> list[FileCost]:
    """The files' costs with each row group a cut falls in (shard_plan.groups_to_read) marked by its rows' text
    bytes, reading that group's text columns only; unchanged when nothing is encoded (--vector-column)."""
    if config.vector_column:
        return costs
    costs = list(costs)
    for i, m in reversed(groups_to_read(costs, num_shards)):  # a file's later groups first: m stays its mark
        lengths = corpus.row_group_text_bytes(costs[i].path, m - 1, config.text_fields())
        costs[i] = costs[i]._replace(marks=finer_marks(costs[i].marks, m, lengths))
    return costs


def inspected(config: BuildConfig) -> tuple[dict[str, str], list[corpus.FileInfo], list[InputFile]]:
    """The input files (path -> name under its input), each inspected (columns checked), and as the manifest
    records them; refused when there are no rows."""
    names = corpus.input_files(config.inputs)
    duplicates = corpus.duplicate_names(names)
    if duplicates:
        raise RayIndexError(duplicates)
    infos = [corpus.inspect_file(p) for p in sorted(names)]
    tables = [i for i in infos if i.format in corpus.TABLE_FORMATS]
    fields = config.text_fields()
    if config.vector_column:
        check_given_vectors(infos, config.vector_column)
        if without_text(config, tables):
            fields = []
    corpus.check_columns(tables, ([config.id_column] if config.id_column else []) + fields)
    if not config.template:
        corpus.check_text_columns(tables, fields)
    if sum(i.num_rows for i in infos) == 0:
        raise RayIndexError(f"the input ({', '.join(config.inputs)}) has no rows; nothing to index")
    files = [InputFile(path=i.path, format=i.format, rows=i.num_rows, **corpus.file_signature(i.path)) for i in infos]
    return names, infos, files


def start_ray(config: BuildConfig, manifest: Manifest) -> None:
    """Connect to the build's Ray cluster or start a local one, timed on its own in the manifest (`ray`)."""
    started = time.monotonic()
    connect(config.ray_address, config.s3_endpoint)
    manifest.timings_s["ray"] = round(manifest.timings_s.get("ray", 0) + time.monotonic() - started, 3)


def cluster_encoder_slots(config: BuildConfig) -> int:
    """How many encoders the connected Ray cluster can run at once (resources.encoder_slots)."""
    return encoder_slots(
        encoders_use_gpus(config.gpu, bool(config.vector_column)),
        ray.cluster_resources(),
        autoscaler_node_groups(),
        config.encoders,
        config.encoder_cpus,
    )


def check_given_vectors(infos: list[corpus.FileInfo], column: str) -> None:
    """--vector-column: tables only (a document file has no vectors), each with the column, of a list type."""
    files = [i for i in infos if i.format not in corpus.TABLE_FORMATS]
    if files:
        raise RayIndexError(
            f"{files[0].path}: a {files[0].format} file has no vector column; --vector-column {column} reads Parquet "
            "and JSONL tables only: build the document files without it, in an index of their own"
        )
    vectors.check_vector_columns(infos, column)


def without_text(config: BuildConfig, tables: list[corpus.FileInfo]) -> bool:
    """Vectors brought by a table that has no text column at all: --text-column left at its default (text) and no
    table has that column. Its hits carry metadata only, and text queries match no words (the lexical index is
    empty): a warning says so. A text column named otherwise must exist."""
    default = BuildConfig.model_fields["text_columns"].default
    return (
        bool(config.vector_column)
        and not config.template
        and config.text_columns == default
        and not any(default[0] in t.columns for t in tables)
    )


def ids_cheap_to_read(files: list[InputFile]) -> bool:
    """Whether the corpus is local and at most EARLY_ID_CHECK_BYTES: its ids are checked before encoding."""
    return not any(is_remote(f.path) for f in files) and sum(f.size for f in files) <= EARLY_ID_CHECK_BYTES


def run(config: BuildConfig, manifest: Manifest) -> Plan:
    """Record the plan, cut for the encoders the cluster can run at once, in a new run's manifest (a resumed
    run keeps the plan it was checked against, whatever the cluster is now)."""
    if manifest.shards:
        start_ray(config, manifest)
        return Plan(manifest.files, manifest.shards)
    inspection = inspected(config)  # the input refused before Ray starts, when it can be
    if config.id_column and ids_cheap_to_read(inspection[2]):
        one_shard = config.model_copy(update={"shards": 1})  # ids are row numbers whatever the plan: one reads them all
        rows = cut(one_shard, *inspection, 1).shards
        duplicates = find_duplicate_ids(rows, config.text_fields(), config.template, config.id_column)
        if duplicates:
            raise RayIndexError(duplicates)
    if config.vector_column:
        manifest.dimension = vectors.corpus_dimension([(f.path, f.rows) for f in inspection[2]], config.vector_column)
        vectors.check_model_dimension(config.model, manifest.dimension)
        if config.encode_dtype != BuildConfig.model_fields["encode_dtype"].default:
            manifest.warnings.append(
                f"--encode-dtype {config.encode_dtype} does not apply: the corpus brings its vectors (--vector-column "
                f"{config.vector_column}), kept as float32, and nothing is encoded"
            )
        if without_text(config, inspection[1]):  # tables only: check_given_vectors
            manifest.warnings.append(
                f"the input has no text column ({config.text_columns[0]!r}): hits carry the rows' metadata and no "
                "text, and text queries match no words (give --text-column or --template to keep the rows' text)"
            )
    start_ray(config, manifest)
    slots = cluster_encoder_slots(config)
    planned = cut(config, *inspection, slots)
    manifest.files, manifest.shards, manifest.encoder_slots = planned.files, planned.shards, slots
    manifest.shard_states = [ShardState(shard_id=s.shard_id) for s in planned.shards]
    manifest.model = ModelInfo(
        name=config.model, path=resolve_model(config.model), normalized=config.metric in (None, "cosine")
    )
    return planned
