"""The `rayindex` CLI and jobs/build_index.py as a user runs them: real processes on the session's Ray."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import client_env, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
SHORT_BODY = 120  # characters kept of each document's body (see cli_docs)


def run(args, **kwargs):
    return subprocess.run(
        args, capture_output=True, text=True, timeout=600, env=client_env(), cwd=kwargs.get("cwd", ROOT)
    )


@pytest.fixture(scope="module")
def cli_docs(docs) -> list[dict]:
    """The documents of small_corpus: the first 80, each body cut to its first SHORT_BODY characters (what the
    model costs grows with the text; nothing here depends on its length)."""
    return [dict(d, body=d["body"][:SHORT_BODY]) for d in docs[:80]]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, cli_docs):
    root = tmp_path_factory.mktemp("cli")
    return write_parquet(root / "docs.parquet", cli_docs)


BUILD_OPTIONS = [
    "--id-column",
    "id",
    "--template",
    "{title}: {body}",
    "--shards",
    "2",
    "--index",
    "IVF2,Flat",
    "--quiet",
]


@pytest.mark.slow  # a CLI build and search in subprocesses (about 25 s)
def test_cli_build_then_search_json(small_corpus, ray_address, tmp_path, cli_docs):
    out = tmp_path / "out"
    built = run(
        [
            RAYINDEX,
            "build",
            str(small_corpus),
            "-o",
            str(out),
            *BUILD_OPTIONS,
            "--ray-address",
            ray_address,
            "--memory-budget",
            "1K",
        ]
    )
    assert built.returncode == 0, built.stderr
    assert "rayindex build" in built.stdout and "encode" in built.stdout  # the summary table
    assert "Published" in built.stdout and "80 docs" in built.stdout
    assert "on-disk merge" in built.stdout  # the shard indexes exceed the 1 KiB budget
    assert len(list(out.glob("versions/*/index.ivfdata"))) == 1
    target = cli_docs[17]
    with ThreadPoolExecutor(3) as pool:  # three readers of the published index at once: each process loads the model
        found, table, asked = pool.map(
            run,
            [
                [RAYINDEX, "search", "--index", str(out), f"{target['title']}: {target['body']}", "-k", "3", "--json"],
                [RAYINDEX, "search", "--index", str(out), "compress data with zlib", "-k", "2", "--nprobe", "2"],
                [RAYINDEX, "ask", "--index", str(out), f"What does {target['title']} do?", "-k", "3", "--json"],
            ],
        )
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["id"] == target["id"]
    assert set(hits[0]) == {"id", "score", "passage", "start", "end", "text", "metadata"}
    assert hits[0]["metadata"] == {"module": target["module"], "kind": target["kind"]}
    assert table.returncode == 0 and "2 hits" in table.stdout
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert [s["n"] for s in answer["sources"]] == [1, 2, 3] and any(f"[{n}]" in answer["answer"] for n in (1, 2, 3))


@pytest.mark.slow  # the job entrypoint's build in a subprocess (about 15 s)
def test_ray_job_entrypoint(small_corpus, ray_address, tmp_path):
    out = tmp_path / "job-out"
    result = run(
        [
            sys.executable,
            "jobs/build_index.py",
            str(small_corpus),
            "-o",
            str(out),
            *BUILD_OPTIONS,
            "--ray-address",
            ray_address,
        ]
    )
    assert result.returncode == 0, result.stderr
    assert (out / "CURRENT").read_text().strip() in os.listdir(out / "versions")


def test_cli_errors_are_messages_not_tracebacks_with_exit_codes(tmp_path):
    """1: the command ran and failed; 2: a usage error, refused before anything ran."""
    missing = run([RAYINDEX, "build", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"), "--quiet"])
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "missing.jsonl does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr + missing.stdout
    no_index = run([RAYINDEX, "search", "--index", str(tmp_path / "nothing"), "hello"])
    assert no_index.returncode == 1 and "has no published index" in no_index.stderr
    for args, named in (
        (["build", "x.jsonl", "--metric", "hamming"], "metric"),
        (["build", "x.jsonl", "--memory-budget", "lots"], "--memory-budget"),
        (["build", "x.jsonl", "--shards", "0"], "--shards"),
        (["search", "hello", "-k", "0"], "-k"),
        (["eval", "--k", "1,x"], "--k"),
        (["reindex", "--every", "soon"], "soon"),
        (["ask", "hi", "--generator", "openai"], "base URL"),
    ):
        bad = run([RAYINDEX, *args, "--quiet"] if args[0] in ("build", "reindex") else [RAYINDEX, *args])
        assert bad.returncode == 2, (args, bad.returncode, bad.stderr)
        assert named in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


def test_docs_give_the_exit_codes_the_cli_uses():
    """1 for a run that failed (as test_cli_errors_are_messages_not_tracebacks_with_exit_codes sees), 2 for a
    usage error: what docs/build.md and docs/operations.md promise an operator's scripts."""
    build_md = " ".join((ROOT / "docs" / "build.md").read_text().split())
    operations_md = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "the CLI exits with code 1 (2 for a usage error: an option that cannot work)" in build_md
    assert "exits 0 when it published, 1 (with an `error:` line) when it did not" in operations_md
    assert "exits with code 2, no" not in build_md and "published and 2" not in operations_md


def test_a_failure_names_the_run_folder_only_when_one_was_made(tmp_path, corpus_dir):
    """A build refused before it made a version folder (the output is locked by a live run: here pid 1)
    does not say a run folder was kept (test_a_parquet_text_column_of_numbers_is_refused_before_ray_starts
    shows one that made it)."""
    from typer.testing import CliRunner

    from rayindex.cli import app
    from rayindex.infra.lock import generation_rel
    from rayindex.infra.storage import Store

    out = tmp_path / "out"
    holder = {"run_id": "other", "host": socket.gethostname(), "pid": 1, "expires_at": time.time() + 600}
    Store(str(out)).write_text(generation_rel(1), json.dumps(holder))
    result = CliRunner().invoke(app, ["build", str(corpus_dir), "-o", str(out), "--quiet"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "the output is locked by run other" in message
    assert message.endswith("(CURRENT was not changed)") and "run folder" not in message
    assert [p.name for p in (out / "versions").iterdir()] == []


def test_build_help_documents_every_option():
    result = run([RAYINDEX, "build", "--help"], cwd=ROOT)
    assert result.returncode == 0
    for option in (
        "--output",
        "--id-column",
        "--text-column",
        "--template",
        "--shards",
        "--shard-size",
        "--model",
        "--index",
        "--on-disk",
        "--memory-budget",
        "--train-sample",
        "--gpu",
        "--ray-address",
        "--encoders",
        "--encode-dtype",
        "--batch-size",
        "--max-index-memory",
        "--target-recall",
        "--s3-endpoint",
        "--storage-retry",
        "--seed",
        "--metric",
        "--passages",
        "--no-passages",
        "--passage-tokens",
        "--passage-overlap",
        "--document-prompt",
        "--query-prompt",
        "--tune",
        "--max-doc-chars",
        "--max-file-bytes",
    ):
        assert option in result.stdout, option
    assert "50000" in result.stdout and "[default: (text)]" in result.stdout  # defaults shown, from BuildConfig
