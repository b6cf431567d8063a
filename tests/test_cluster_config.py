"""cluster.yaml against Ray's own launcher schema, its GPU worker type and setup commands; and how
pipelines/resources.py reads an autoscaler's node types (the live check is tests/test_autoscaling.py)."""

import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.resources import cluster_can_have_gpus, gpu_node_types, monitor_autoscaling_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_launcher_config(cluster_yaml):
    validate_config(cluster_yaml)  # as written
    prepared = prepare_config(cluster_yaml)  # what `ray up` validates, after merging Ray's AWS defaults
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] == "head"
    assert 0 < prepared["idle_timeout_minutes"] <= 10
    for local in cluster_yaml["file_mounts"].values():  # `ray up` runs from the repository root
        assert (ROOT / local).exists(), local


def test_the_validator_does_reject_a_broken_config(cluster_yaml):
    broken = yaml.safe_load(yaml.safe_dump(cluster_yaml))
    del broken["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_gpu_workers_start_at_zero_and_advertise_a_gpu(cluster_yaml):
    gpu = cluster_yaml["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith("g")
    assert cluster_yaml["available_node_types"]["cpu_worker"]["min_workers"] == 0
    assert not cluster_yaml["available_node_types"]["head"]["resources"].get("GPU")
    assert gpu_node_types(cluster_yaml) == ["gpu_worker"]  # what the build's GPU decision looks for


def test_setup_commands_install_the_gpu_extra_on_gpu_nodes_only(cluster_yaml):
    prepared = prepare_config(cluster_yaml)
    types = prepared["available_node_types"]
    gpu_setup = " ; ".join(types["gpu_worker"]["worker_setup_commands"])  # replaces the global ones on that type
    assert '$HOME/rayindex[gpu]"' in gpu_setup and "pip install torch==2.13.0" in gpu_setup
    assert "whl/cpu" not in gpu_setup  # PyPI's Linux torch: the CUDA build
    assert "pip uninstall -y faiss-cpu" in gpu_setup and "faiss-gpu" in gpu_setup
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):  # head, cpu_worker
        text = " ; ".join(commands)
        assert "[gpu]" not in text and 'pip install -e "$HOME/rayindex"' in text and "whl/cpu" in text
        assert "ray[default,serve]==2.60.0" in text
    assert "boto3" in " ".join(prepared["head_setup_commands"])
    # the head hands the autoscaler the bootstrap config that resources.monitor_autoscaling_config reads
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(prepared["head_start_ray_commands"])


def test_gpu_node_types_counts_only_worker_types_that_can_start():
    config = {
        "max_workers": 4,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"GPU": 1}},  # a running head's GPUs show in cluster_resources already
            "gpu_off": {"resources": {"GPU": 2}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 8}, "max_workers": 4},
            "gpu_default_max": {"resources": {"GPU": 1}},  # takes the global max_workers
        },
    }
    assert gpu_node_types(config) == ["gpu_default_max"]
    assert gpu_node_types(dict(config, max_workers=0)) == []
    assert gpu_node_types({}) == []


def test_monitor_autoscaling_config_reads_the_monitors_yaml(tmp_path):
    """A stand-in for Ray's autoscaler monitor: a process running a file named monitor.py with
    --autoscaling-config, as `ray start --head --autoscaling-config=...` starts it."""
    config = {"max_workers": 2, "head_node_type": "h", "available_node_types": {"g": {"resources": {"GPU": 1}, "node_config": {}}}}
    (tmp_path / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    script = tmp_path / "monitor.py"
    script.write_text("import time\ntime.sleep(60)\n")
    other = tmp_path / "other.py"
    other.write_text("import time\ntime.sleep(60)\n")
    monitor = subprocess.Popen([sys.executable, str(script), "--gcs-address=127.0.0.1:1", f"--autoscaling-config={tmp_path / 'autoscaling.yaml'}"])
    unrelated = subprocess.Popen([sys.executable, str(other), f"--autoscaling-config={tmp_path / 'autoscaling.yaml'}"])
    try:
        deadline = time.monotonic() + 10
        while (found := monitor_autoscaling_config(monitor.pid)) is None and time.monotonic() < deadline:
            time.sleep(0.1)  # until the child has exec'd
        assert found == config and gpu_node_types(found) == ["g"]
        assert monitor_autoscaling_config(unrelated.pid) is None  # a reused pid is not the monitor
    finally:
        monitor.kill()
        unrelated.kill()
        monitor.wait()
        unrelated.wait()
    assert monitor_autoscaling_config(monitor.pid) is None  # gone


def test_plain_local_ray_cannot_have_gpus(ray_address):
    """The session's `ray.init()` cluster: no GPUs, and no autoscaler that could add any."""
    assert cluster_can_have_gpus() is False
