"""Autoscaling, end to end on this machine: Ray's fake multi-node provider plays the cluster launcher.

A head (2 CPUs, no GPU) is started with an autoscaler whose config declares a GPU worker type
({"CPU": 2, "GPU": 1}, 0..3 workers, idle timeout 6 s). Real `rayindex build`s run against it in a
subprocess, with RAYINDEX_GPU=1 (as cluster.yaml's head exports it) and RAYINDEX_GPU_ON_CPU=1 (the fake GPUs
are resources, not devices: the encoders reserve them and run torch on the CPU); the test watches the GCS's
node and actor tables from another subprocess: the encoder pool grows to three GPU workers with an encoder
on each, the build publishes, and the workers are removed once idle. An encoder no GPU node can hold is
refused after --gpu-wait.

The cluster is this module's own: its own GCS port, temp dir and process group, stopped by signalling
that group (never `ray stop`, which would stop every Ray on the machine). The test process itself
never connects to it (the session's Ray from conftest stays the only one in-process).
"""

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.util
import yaml

from helpers import build_args, client_env, free_port, ray_head, write_parquet

pytestmark = [pytest.mark.autoscaling, pytest.mark.slow]  # about 90 s

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
HEAD_CPUS = 2
GPU_WORKER = {"CPU": 2, "GPU": 1, "object_store_memory": 200 * 1024 * 1024}
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s, as Ray's own fake-cluster example uses

GPU_WORKERS = 3
ENV = {"RAYINDEX_GPU": "1", "RAYINDEX_GPU_ON_CPU": "1"}

# Runs in a subprocess: every 0.5 s, one JSON line with the time, the alive nodes' GPUs and the encoder
# actors that are alive (constructed: the model loaded).
POLLER = """
import asyncio, json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import ActorTableData
ALIVE = ActorTableData.ALIVE
gcs = GcsClient(address=sys.argv[1])
async def actor_table():  # the client's async calls return futures of the running loop
    return await gcs.async_get_all_actor_info(timeout=5)
with open(sys.argv[2], "a") as out:
    while True:
        try:
            nodes = gcs.get_all_node_info(timeout=5)
            alive = [{"id": nid.hex(), "gpus": info.resources_total.get("GPU", 0)} for nid, info in nodes.items() if
            info.state == 0]
            actors = asyncio.run(actor_table())
            encoders = sum(1 for a in actors.values() if a.class_name == "ShardEncoder" and a.state == ALIVE)
            out.write(json.dumps({"t": time.time(), "alive": alive, "encoders": encoders}) + "\\n")
        except Exception as exc:
            out.write(json.dumps({"t": time.time(), "error": str(exc)}) + "\\n")
        out.flush()
        time.sleep(0.5)
"""


def fake_cluster_config(gcs_address: str) -> dict:
    """The launcher's full key set, as Ray's fake_multi_node/example.yaml has it (the wheel ships no copy)."""
    return {
        "cluster_name": "rayindex-fake",
        "max_workers": GPU_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider's workers join this GCS (default: port 6379)
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {
                "resources": dict(GPU_WORKER),
                "node_config": {},
                "min_workers": 0,
                "max_workers": GPU_WORKERS,
            },
        },
        "head_node_type": "ray.head.default",  # the name the fake provider gives its head
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def fake_cluster():
    """A head of the module's own whose autoscaler launches fake GPU workers (RAY_FAKE_CLUSTER)."""
    with tempfile.TemporaryDirectory(prefix="rayindex-as-") as config_dir:
        config = Path(config_dir) / "autoscaling.yaml"
        gcs_port = free_port()
        config.write_text(yaml.safe_dump(fake_cluster_config(f"{ray.util.get_node_ip_address()}:{gcs_port}")))
        env = dict(client_env(), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        with ray_head(
            f"--autoscaling-config={config}",
            f"--num-cpus={HEAD_CPUS}",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            env=env,
            port=gcs_port,
        ) as head:
            yield head


def alive_counts(samples: list[dict]) -> list[tuple[float, int, int, int]]:
    """(t, alive nodes, alive GPU nodes, alive encoders) of each sample that reached the GCS."""
    return [
        (s["t"], len(s["alive"]), sum(1 for n in s["alive"] if n["gpus"] > 0), s["encoders"])
        for s in samples
        if "alive" in s
    ]


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def build(cluster, corpus, out, *options: str) -> subprocess.CompletedProcess:
    """A real `rayindex build` against the fake cluster, no --gpu: RAYINDEX_GPU=1 asks for GPUs while none runs."""
    return subprocess.run(
        [RAYINDEX, *build_args(corpus, out), "--ray-address", cluster.address, "--index", "IVF4,Flat", *options],
        env=dict(cluster.env, **ENV),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_encoder_no_gpu_node_can_hold_is_refused_after_gpu_wait(fake_cluster, tmp_path, docs):
    """A GPU type exists, but none of its nodes can hold the encoder (64 CPUs asked, 2 a node): no GPU node
    joins, and the build says so after --gpu-wait 5s, with a line while it waits; never a silent hang."""
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:20])
    started = time.monotonic()
    run = build(fake_cluster, corpus, tmp_path / "out", "--gpu-wait", "5s", "--encoder-cpus", "64", "--quiet")
    took = time.monotonic() - started
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    assert re.search(r"encode: waiting for a GPU node, \d s of --gpu-wait 5 s", run.stderr), run.stderr[-3000:]
    assert "no GPU node joined the Ray cluster at" in run.stderr and "within --gpu-wait 5 s" in run.stderr
    # Ray's v1 autoscaler (this cluster's) reports no node types: the wait rests on RAYINDEX_GPU=1, and says so
    said = " ".join(run.stderr.split())  # the waiting line is wrapped to the console's width
    assert "this autoscaler (Ray's v1) does not report its node types" in said, run.stderr[-3000:]
    assert "or have no GPU node type (RAYINDEX_GPU=1 said it has one)" in said
    assert "Traceback" not in run.stderr and took < 60, took


def test_the_encoder_pool_grows_to_every_gpu_worker_and_lets_them_go(fake_cluster, tmp_path, docs):
    """GPU workers 0..3: three workers alive with an encoder on each at the same time, the build publishes,
    then every worker is removed once idle."""
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:240])
    out = tmp_path / "out"
    samples_file = tmp_path / "nodes.jsonl"
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, fake_cluster.address, str(samples_file)],
        env=fake_cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.time()
        run = build(fake_cluster, corpus, out, "--shards", "24", "--quiet")
        built_at = time.time() - t0
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        deadline = time.monotonic() + 90  # idle timeout 6 s, autoscaler updates every 1 s: plenty
        while time.monotonic() < deadline:
            counts = alive_counts(read_samples(samples_file))
            if any(gpus for _, _, gpus, _ in counts) and counts[-1][1] == 1:
                break
            time.sleep(1)
    finally:
        poller.kill()
        poller.wait()
    samples = read_samples(samples_file)
    counts = [(round(t - t0, 1), alive, gpus, enc) for t, alive, gpus, enc in alive_counts(samples)]
    assert counts and counts[0][1] == 1 and counts[0][2] == 0, (counts[:3], samples[:3])  # the head alone
    full_at = next((t for t, _, gpus, enc in counts if gpus == GPU_WORKERS and enc == GPU_WORKERS), None)
    assert full_at is not None, f"never {GPU_WORKERS} GPU workers with an encoder each; samples: {counts[::4]}"
    removed_at = next((t for t, alive, _, _ in counts if t > full_at and alive == 1), None)
    manifest = json.loads(next((out / "versions").glob("*/manifest.json")).read_text())
    print(
        f"\nfake cluster: {GPU_WORKERS} GPU workers with an encoder each at t={full_at}s, first worker at "
        f"t={next(t for t, _, gpus, _ in counts if gpus)}s, build done at t={built_at:.1f}s "
        f"(encode {manifest['timings_s']['encode']}s), all workers removed at t={removed_at}s"
    )
    assert full_at < built_at and removed_at is not None, f"not scaled down within 90 s: {counts[-3:]}"
    assert max(gpus for _, _, gpus, _ in counts) <= GPU_WORKERS  # never past the type's max_workers
    assert max(enc for _, _, _, enc in counts) <= GPU_WORKERS  # an encoder per GPU, no more

    # the fake GPUs are resources: RAYINDEX_GPU_ON_CPU=1 ran torch and faiss on the CPU, and the manifest says so
    assert manifest["model"]["device"] == "cpu" and not manifest["training"]["gpu"]
    assert any(w.startswith("RAYINDEX_GPU_ON_CPU=1: the encoders reserved GPUs") for w in manifest["warnings"])
    assert manifest["status"] == "published" and (out / "CURRENT").read_text().strip() == manifest["run_id"]
    assert manifest["counts"]["docs_encoded"] == 240 and len(manifest["shard_states"]) == 24
    target = docs[12]
    search = subprocess.run(
        [RAYINDEX, "search", "--index", str(out), "--json", "-k", "3", f"{target['title']}: {target['body']}"],
        env=fake_cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert search.returncode == 0, search.stderr[-3000:]
    assert json.loads(search.stdout)[0]["id"] == target["id"]
