"""jobs/build_index.py and jobs/reindex.py submitted as real Ray jobs (JobSubmissionClient) with
jobs/runtime_env.yaml."""

import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from rayindex.query.search import open_index

from helpers import DASHBOARD_PORT, write_parquet

pytestmark = pytest.mark.slow  # Ray jobs submitted to the job server (about 60 s)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jobs(ray_address):
    return JobSubmissionClient(f"http://127.0.0.1:{DASHBOARD_PORT}")


def runtime_env(working_dir: Path = ROOT) -> dict:
    """jobs/runtime_env.yaml with its paths made absolute (they are relative to where `ray job submit` runs)."""
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    return dict(env, working_dir=str(working_dir), py_modules=[str(ROOT / p) for p in env["py_modules"]])


def submit(jobs, limit_s=120, **job) -> str:
    """submit_job, waiting out the 500 "No available agent to submit job, please try again later" that the
    dashboard answers while the head node's job agent is not registered (seen after serve tests, under load)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(jobs, job_id, limit_s=300):
    deadline = time.monotonic() + limit_s
    while (status := jobs.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    return status


def test_build_then_reindex_jobs_succeed_and_publish(jobs, tmp_path, docs):
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:40])
    out = tmp_path / "out"
    job = submit(
        jobs,
        # sys.executable: on a cluster `python` is the nodes' environment; here it is this venv
        entrypoint=f"{sys.executable} jobs/build_index.py {corpus} -o {out} --id-column id "
        f"--template '{{title}}: {{body}}' --index IVF1,Flat --quiet",
        runtime_env=runtime_env(),
    )
    assert wait(jobs, job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-2000:]
    assert "Published" in jobs.get_job_logs(job)
    target = docs[12]
    assert open_index(out).search(f"{target['title']}: {target['body']}", k=1)[0]["id"] == target["id"]

    write_parquet(corpus, docs[:42])  # two documents more: the scheduled reindex picks them up
    job = submit(jobs, entrypoint=f"{sys.executable} jobs/reindex.py -o {out} --quiet", runtime_env=runtime_env())
    assert wait(jobs, job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-2000:]
    assert "2 added, 0 changed, 0 deleted, 40 unchanged" in jobs.get_job_logs(job)
    added = docs[41]
    assert open_index(out).search(f"{added['title']}: {added['body']}", k=1)[0]["id"] == added["id"]


def test_failing_job_reports_failed_with_our_message(jobs, tmp_path):
    job = submit(
        jobs,
        entrypoint=f"{sys.executable} jobs/build_index.py {tmp_path / 'missing.jsonl'} -o {tmp_path / 'o'} --quiet",
        runtime_env=runtime_env(),
    )
    assert wait(jobs, job) == JobStatus.FAILED
    logs = jobs.get_job_logs(job)
    assert "error:" in logs and "missing.jsonl does not exist" in logs and "Traceback" not in logs


def test_a_pipelines_package_in_the_jobs_working_dir_breaks_nothing(jobs, tmp_path, docs):
    """The job's working_dir is on every worker's sys.path: a user's own `pipelines` package there must
    not shadow anything of rayindex, on the driver or in the encoder actors."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "jobs", work / "jobs")
    (work / "pipelines").mkdir()
    (work / "pipelines" / "__init__.py").write_text("raise ImportError('the user project pipelines package')\n")
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:30])
    out = tmp_path / "out"
    job = submit(
        jobs,
        entrypoint=f"{sys.executable} jobs/build_index.py {corpus} -o {out} --id-column id "
        f"--template '{{title}}: {{body}}' --index IVF1,Flat --quiet",
        runtime_env=runtime_env(work),
    )
    assert wait(jobs, job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-2000:]
    assert open_index(out).manifest.counts.docs_encoded == 30
