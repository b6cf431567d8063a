"""Autoscaling, end to end on this machine: Ray's fake multi-node provider plays the cluster launcher.

A head (2 CPUs, no GPU) is started with an autoscaler whose config declares a GPU worker type
({"CPU": 2, "GPU": 1}, 0..2 workers, idle timeout 6 s). A real `rayindex build` runs against it in a
subprocess; the test watches the GCS's node table from another subprocess: a GPU worker is added
while the encoders wait for a GPU, the build publishes, and the worker is removed once idle.

The cluster is this module's own: its own GCS port, temp dir and process group, stopped by signalling
that group (never `ray stop`, which would stop every Ray on the machine). The test process itself
never connects to it (the session's Ray from conftest stays the only one in-process).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.util
import yaml

from helpers import build_args, client_env, free_port, ray_head, write_parquet

pytestmark = [pytest.mark.autoscaling, pytest.mark.slow]  # about 50 s

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
HEAD_CPUS = 2
GPU_WORKER = {"CPU": 2, "GPU": 1, "object_store_memory": 200 * 1024 * 1024}
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s, as Ray's own fake-cluster example uses

# Runs in a subprocess: every 0.5 s, one JSON line with the time and the alive nodes' GPUs.
POLLER = """
import json, sys, time
from ray._raylet import GcsClient
gcs = GcsClient(address=sys.argv[1])
with open(sys.argv[2], "a") as out:
    while True:
        try:
            nodes = gcs.get_all_node_info(timeout=5)
            alive = [{"id": nid.hex(), "gpus": info.resources_total.get("GPU", 0)} for nid, info in nodes.items() if
            info.state == 0]
            out.write(json.dumps({"t": time.time(), "alive": alive}) + "\\n")
        except Exception as exc:
            out.write(json.dumps({"t": time.time(), "error": str(exc)}) + "\\n")
        out.flush()
        time.sleep(0.5)
"""


def fake_cluster_config(gcs_address: str) -> dict:
    """The launcher's full key set, as Ray's fake_multi_node/example.yaml has it (the wheel ships no copy)."""
    return {
        "cluster_name": "rayindex-fake",
        "max_workers": 2,
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
            "gpu_worker": {"resources": dict(GPU_WORKER), "node_config": {}, "min_workers": 0, "max_workers": 2},
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


def alive_counts(samples: list[dict]) -> list[tuple[float, int, int]]:
    """(t, alive nodes, alive GPU nodes) of each sample that reached the GCS."""
    return [(s["t"], len(s["alive"]), sum(1 for n in s["alive"] if n["gpus"] > 0)) for s in samples if "alive" in s]


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_gpu_workers_added_for_encoding_and_removed_when_idle(fake_cluster, tmp_path, docs):
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:100])
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
        # no --gpu: RAYINDEX_GPU=1, as cluster.yaml's head exports it, makes the build ask for GPUs while none runs
        build = subprocess.run(
            [
                RAYINDEX,
                *build_args(corpus, out),
                "--ray-address",
                fake_cluster.address,
                "--shards",
                "2",
                "--index",
                "IVF4,Flat",
                "--quiet",
            ],
            env=dict(fake_cluster.env, RAYINDEX_GPU="1"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        built_at = time.time() - t0
        assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
        deadline = time.monotonic() + 90  # idle timeout 6 s, autoscaler updates every 1 s: plenty
        while time.monotonic() < deadline:
            counts = alive_counts(read_samples(samples_file))
            if any(gpus for _, _, gpus in counts) and counts[-1][1] == 1:
                break
            time.sleep(1)
    finally:
        poller.kill()
        poller.wait()
    counts = [(round(t - t0, 1), alive, gpus) for t, alive, gpus in alive_counts(read_samples(samples_file))]
    assert counts and counts[0][1] == 1 and counts[0][2] == 0, counts[:3]  # the head alone at the start
    added_at = next((t for t, _, gpus in counts if gpus), None)
    assert added_at is not None, f"no GPU worker was ever added; samples: {counts[::10]}"
    removed_at = next((t for t, alive, _ in counts if t > added_at and alive == 1), None)
    manifest = json.loads(next((out / "versions").glob("*/manifest.json")).read_text())
    print(
        f"\nfake cluster: GPU worker added at t={added_at}s, build done at t={built_at:.1f}s "
        f"(encode {manifest['timings_s']['encode']}s), worker removed at t={removed_at}s; "
        f"max alive nodes {max(alive for _, alive, _ in counts)}"
    )
    assert added_at < built_at, "the GPU worker came only after the build"
    assert removed_at is not None, (
        f"the GPU worker was not removed within 90 s of the build; last samples: {counts[-3:]}"
    )
    assert max(gpus for _, _, gpus in counts) <= 2  # never past the type's max_workers

    assert (
        manifest["model"]["device"] == "cpu" and not manifest["training"]["gpu"]
    )  # a fake GPU: torch and faiss on CPU
    assert manifest["status"] == "published" and (out / "CURRENT").read_text().strip() == manifest["run_id"]
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
