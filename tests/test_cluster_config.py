"""cluster.yaml against Ray's own launcher schema, its GPU worker type and setup commands; and how a
build decides to use GPUs (infra/resources.py: --gpu/--cpu, RAYINDEX_GPU, the cluster's GPUs; the live
check is tests/test_autoscaling.py)."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rayindex.errors import UsageError
from rayindex.infra.resources import GPU_ENV, use_gpus

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
    for remote, local in cluster_yaml["file_mounts"].items():  # `ray up` runs from the repository root
        if local.startswith("~"):
            assert remote == local == "~/.ray/auth_token"  # the token, from the launching user's home
        else:
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
    # no GPU is visible before the autoscaler adds one: the head tells the build to ask for GPUs
    assert f" {GPU_ENV}=1 " in " ".join(cluster_yaml["head_start_ray_commands"])


def test_token_auth_on_every_node_and_the_dashboard_on_localhost(cluster_yaml):
    head, workers = (" ".join(cluster_yaml[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    for commands in (head, workers):
        assert "export RAY_AUTH_MODE=token" in commands
        assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rayindex.query.gate:middlewares" in commands
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_setup_commands_install_the_gpu_extra_on_gpu_nodes_only(cluster_yaml):
    """The exact pins, and that they equal the images', are tests/test_images.py's."""
    prepared = prepare_config(cluster_yaml)
    types = prepared["available_node_types"]
    gpu_setup = " ; ".join(types["gpu_worker"]["worker_setup_commands"])  # replaces the global ones on that type
    assert '$HOME/rayindex[gpu]"' in gpu_setup and "whl/cu126" in gpu_setup and "[cpu]" not in gpu_setup
    assert "whl/cpu" not in gpu_setup and "faiss-cpu" not in gpu_setup  # nothing brings faiss-cpu to remove
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):  # head, cpu_worker
        text = " ; ".join(commands)
        assert "[gpu]" not in text and 'pip install -e "$HOME/rayindex[cpu]"' in text and "whl/cpu" in text
        assert "ray[default,serve]==2.60.0" in text
    for commands in (
        prepared["head_setup_commands"],
        prepared["worker_setup_commands"],
        types["gpu_worker"]["worker_setup_commands"],
    ):
        assert (
            commands[0]
            == "grep -qx 'source ~/venv/bin/activate' ~/.bashrc || echo 'source ~/venv/bin/activate' >> ~/.bashrc"
        )
    assert "test -x ~/venv/bin/python || python3 -m venv ~/venv" in prepared["initialization_commands"]
    assert "boto3" in " ".join(prepared["head_setup_commands"])
    # RAYINDEX_GPU also in the head's login shells (ray exec, ray attach), not only what `ray start` starts
    assert f"echo 'export {GPU_ENV}=1' >> ~/.bashrc" in " ".join(prepared["head_setup_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(prepared["head_start_ray_commands"])


def test_gpu_decision_flag_then_environment_then_cluster(ray_address, monkeypatch):
    """The session's plain local Ray has no GPU: without a flag or RAYINDEX_GPU the build uses CPUs."""
    monkeypatch.delenv(GPU_ENV, raising=False)
    assert use_gpus(None) is False
    assert use_gpus(True) is True
    for value, expected in (("1", True), ("true", True), ("0", False), ("off", False)):
        monkeypatch.setenv(GPU_ENV, value)
        assert use_gpus(None) is expected
        assert use_gpus(not expected) is (not expected)  # the flag wins
    monkeypatch.setenv(GPU_ENV, "sometimes")
    with pytest.raises(UsageError, match="RAYINDEX_GPU='sometimes': use 1"):
        use_gpus(None)
