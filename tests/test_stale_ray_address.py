"""A build without --ray-address starts its own Ray beside a stale address file. In a file of its own that
runs last: the second local Ray it starts leaves the session Ray's job agent unavailable for minutes
("No available agent to submit job"), which broke tests/test_jobs.py when this ran first."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayindex.query.search import open_index

from helpers import build_args, client_env, write_parquet

pytestmark = pytest.mark.slow  # a second local Ray (about 45 s)


def test_a_build_without_ray_address_starts_its_own_ray_beside_a_stale_address_file(docs, tmp_path):
    """A head killed without `ray stop` leaves ray_current_cluster behind: the build must not join it. Run
    where a user's own `pipelines` package is importable first, too (`python -m rayindex`, cwd first)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ri-stale-"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
        (tmp_path / "pipelines").mkdir()
        (tmp_path / "pipelines" / "__init__.py").write_text("raise ImportError('the user project pipelines package')\n")
        corpus = write_parquet(tmp_path / "docs.parquet", docs[:30])
        env = {k: v for k, v in client_env().items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "rayindex",
                *build_args(corpus, tmp_path / "out"),
                "--index",
                "IVF1,Flat",
                "--quiet",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            start_new_session=True,
        )
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert "Started a local Ray instance" in run.stderr
        assert open_index(tmp_path / "out").manifest.counts.docs_encoded == 30
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
