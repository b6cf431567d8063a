"""Serving the Ray way, against the session's real Ray: `serve run` with the application builder,
`serve deploy` with jobs/serve_config.yaml (two replicas, /metrics summed over both). The manifests'
schemas and what Serve makes of the config are tests/test_manifests.py's."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from rayindex.query.metrics import agent_metrics

from helpers import DASHBOARD_PORT, client_env, free_port

pytestmark = pytest.mark.slow  # serve run / serve deploy of the sample configs (about 30 s)

ROOT = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).with_name("serve"))


@pytest.fixture(scope="module")
def serve_port(ray_address):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def index_dir(built, tmp_path_factory):
    output = tmp_path_factory.mktemp("deploy") / "index"
    shutil.copytree(built[0], output)
    return output


def wait_for(url: str, path: str, json: dict | None = None, limit_s: float = 180) -> httpx.Response:
    """The first 200 answer of GET (or POST json) url+path, polling while the app starts."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            r = httpx.post(url + path, json=json, timeout=30) if json is not None else httpx.get(url + path, timeout=30)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url}{path} did not answer 200 within {limit_s} s"
        time.sleep(1)


def test_serve_run_with_the_application_builder(ray_address, serve_port, index_dir, docs):
    target = docs[40]
    run = subprocess.run(
        [
            SERVE,
            "run",
            "--non-blocking",
            "--address",
            ray_address,
            "--name",
            "ri-run",
            "--route-prefix",
            "/run",
            "rayindex.query.serve:app_builder",
            f"index={index_dir}",
            "replica_cpus=0",
        ],
        env=client_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    url = f"http://127.0.0.1:{serve_port}/run"
    hits = wait_for(url, "/search", json={"query": f"{target['title']}: {target['body']}", "k": 3}).json()["hits"]
    assert hits[0]["id"] == target["id"]
    serve.delete("ri-run")


def test_serve_run_refuses_unknown_arguments(ray_address, serve_port, index_dir):
    run = subprocess.run(
        [
            SERVE,
            "run",
            "--non-blocking",
            "--address",
            ray_address,
            "--name",
            "ri-bad",
            "rayindex.query.serve:app_builder",
            f"index={index_dir}",
            "replicaz=2",
        ],
        env=client_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "replicaz" in run.stdout + run.stderr


def sample_config() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())


def test_serve_deploy_with_the_sample_config_counts_both_replicas(serve_port, index_dir, tmp_path):
    config = sample_config()
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}  # the proxy this session's Serve runs
    app = config["applications"][0]
    app["name"] = "ri-deploy"  # its own application: /metrics counts this one's replicas only
    app["args"]["index"] = str(index_dir)
    app["args"]["replica_cpus"] = 0  # two replicas on 2 cores, beside the session's tasks
    deployment = app["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 2
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [SERVE, "deploy", str(path), "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"],
        env=client_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
    url = f"http://127.0.0.1:{serve_port}"
    wait_for(url, "/search", json={"query": "warm up", "k": 1})
    deadline = time.monotonic() + 180
    while serve.status().applications["ri-deploy"].deployments["RagService"].replica_states.get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline, serve.status()
        time.sleep(1)

    sent = 40
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(sent):
            assert c.post("/search", json={"query": f"read a file {i}", "k": 2}).status_code == 200
    expected = sent + 1  # and the warm-up search
    line = 'rayindex_requests_total{endpoint="/search",status="200"}'
    # Ray exports every metric on its own schedule (every 2 s here, conftest): wait for all that is asserted,
    # not only the counter (the gauge once came a round later: a failure in a quiet run)
    deadline = time.monotonic() + 120
    while True:
        metrics = httpx.get(url + "/metrics", timeout=30).text
        counted = next((float(m.split()[-1]) for m in metrics.splitlines() if m.startswith(line + " ")), 0.0)
        serving = [float(m.split()[-1]) for m in metrics.splitlines() if m.startswith("rayindex_replicas_serving{")]
        exported = counted >= expected and sum(serving) >= 2 and "rayindex_request_latency_seconds_bucket" in metrics
        if exported or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert counted == expected, metrics
    assert "rayindex_request_latency_seconds_bucket" in metrics
    assert sum(serving) == 2, metrics  # both replicas report the version they serve
    per_replica = {
        s.labels["replica"]: s.value
        for f in agent_metrics()
        for s in f.samples
        if s.name == "ray_rayindex_requests_total"
        and s.labels.get("application") == "ri-deploy"
        and s.labels.get("endpoint") == "/search"
        and s.labels.get("status") == "200"
    }
    assert len(per_replica) == 2 and sum(per_replica.values()) == expected  # both replicas took searches
    serve.delete("ri-deploy")
