"""GPUs asked for: the encoder pool's size as the cluster grows (infra/actor_pool.py, stages/encode.py), and
the refusals instead of a silent CPU run or a silent hang: no GPU can come (infra/resources.py gpu_refusal, and
`rayindex build --gpu` on the session's CPU-only Ray), CUDA or FAISS unusable inside a real encoder actor on this
machine (infra/gpu.py). The fake multi-node cluster's side is tests/test_autoscaling.py."""

import subprocess
import sys
import time
from pathlib import Path

import faiss
import pytest
import ray
import torch

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.actor_pool import MIN_WAITING, creation_error, waiting_wanted
from rayindex.infra.gpu import cuda_problems, faiss_gpu_problems, require_faiss_gpu
from rayindex.infra.resources import (
    GPU_ON_CPU_ENV,
    NodeGroup,
    autoscaler_adds_nodes,
    gpu_on_cpu,
    gpu_refusal,
    gpu_wait_reason,
    max_resource,
)
from rayindex.stages import encode

from helpers import build_args, build_config, client_env, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
GPU_GROUPS = [
    NodeGroup("head", {"CPU": 8}, 0),
    NodeGroup("cpu_worker", {"CPU": 16}, 4),
    NodeGroup("gpu_worker", {"CPU": 8, "GPU": 1}, 3),
]


def test_the_pool_asks_for_encoders_while_shards_wait_and_never_past_its_ceiling():
    assert waiting_wanted(ceiling=3, unassigned=10, busy=0, started=0) == 3  # GPU workers 0..3: three asked at once
    assert waiting_wanted(3, 8, 2, 2) == 1 and waiting_wanted(3, 8, 3, 3) == 0  # the third arrives, no more asked
    assert waiting_wanted(3, 0, 2, 2) == 0  # no shard waits: nothing asked for, the waiting one is cancelled
    assert waiting_wanted(1000, 5000, 0, 0) == MIN_WAITING  # bounded, as the autoscaler's launches per round
    assert waiting_wanted(1000, 5000, 40, 40) == 40  # ... which grow with the cluster
    assert waiting_wanted(64, 1, 0, 0) == 1  # one shard: one encoder


def test_ceiling_from_encoders_else_the_autoscalers_node_types_else_the_shards():
    gpu = {"num_gpus": 1, "num_cpus": 8}
    assert encode.pool_ceiling(2, gpu, GPU_GROUPS, 10) == 2 and encode.pool_ceiling(20, gpu, None, 10) == 10
    assert encode.pool_ceiling(None, gpu, GPU_GROUPS, 10) == 3  # 3 GPU workers of one GPU each
    assert encode.pool_ceiling(None, {"num_cpus": 4}, GPU_GROUPS, 100) == (8 * 0 + 16 * 4 + 8 * 3) // 4
    assert encode.pool_ceiling(None, gpu, None, 10) == 10  # no node types reported: one per shard
    unbounded = [NodeGroup("gpu", {"CPU": 4, "GPU": 1}, -1)]
    assert max_resource(unbounded, "GPU") == float("inf") and encode.pool_ceiling(None, gpu, unbounded, 7) == 7
    # each GPU encoder takes its node's CPUs per GPU: from alive nodes, else from the reported GPU node types
    assert encode.cpus_per_gpu([{"Alive": True, "Resources": {"CPU": 2}}], GPU_GROUPS) == 8
    assert encode.cpus_per_gpu([{"Alive": True, "Resources": {"CPU": 12, "GPU": 4}}], GPU_GROUPS) == 3
    assert encode.cpus_per_gpu([], None) is None


def test_gpus_that_cannot_come_are_refused_at_once_naming_why():
    assert gpu_refusal(1, None, False, "h:1") is None  # here
    assert gpu_refusal(0, GPU_GROUPS, False, "h:1") is None  # an autoscaler may add one: wait (--gpu-wait)
    assert gpu_refusal(0, None, True, "h:1") is None  # RAYINDEX_GPU=1: the operator says GPU workers autoscale
    no_gpu_types = gpu_refusal(0, GPU_GROUPS[:2], True, "h:1")
    assert "none of its autoscaler's node types offers one (head {'CPU': 8}, cpu_worker {'CPU': 16})" in no_gpu_types
    alone = gpu_refusal(0, None, False, "h:1")
    assert "the Ray cluster at h:1 has no GPU node, and nothing says one can come" in alone and "--cpu" in alone
    capped = [NodeGroup("gpu_worker", {"CPU": 8, "GPU": 1}, 0)]  # a GPU type at max 0 offers none
    assert "offers one" in gpu_refusal(0, capped, True, "h:1")
    # no node types reported: RAYINDEX_GPU=1 is waited on under an autoscaler (Ray's v1), refused where Ray has none
    assert gpu_refusal(0, None, True, "h:1", adds_nodes=True) is None
    assert gpu_refusal(0, None, True, "h:1", adds_nodes=None) is None  # the monitor said nothing (yet): wait
    for declared in (True, False):
        no_autoscaler = gpu_refusal(0, None, declared, "h:1", adds_nodes=False)
        assert "the Ray cluster at h:1 has no GPU node and no autoscaler to add one" in no_autoscaler
        assert "started without an autoscaling config" in no_autoscaler and "--cpu" in no_autoscaler
    assert gpu_refusal(2, None, True, "h:1", adds_nodes=False) is None  # GPUs here: no autoscaler needed


def v1_status(*node_types: str, pending: tuple[str, ...] = ()) -> dict:
    """The status Ray's v1 monitor writes (autoscaler_report as AutoscalerSummary, asdict'd then JSON)."""
    return {
        "load_metrics_report": {"usage": {"CPU": [0.0, 2.0]}},
        "autoscaler_report": {
            "active_nodes": {t: 1 for t in node_types},
            "idle_nodes": None,
            "pending_nodes": [["i-0a1b", "10.0.0.9", t, "setting-up"] for t in pending],  # id, ip, type, status
            "pending_launches": {},
            "failed_nodes": [],
        },
    }


def test_whether_ray_has_an_autoscaler_is_read_from_its_v1_monitor():
    """A head started without an autoscaling config runs Ray's monitor read-only: each node its own type,
    `node_<id>`; an autoscaler (`ray up`, the fake multi-node provider, KubeRay's v1) names its node types."""
    ids = ["a1" * 14, "b2" * 14]
    assert autoscaler_adds_nodes(v1_status(f"node_{ids[0]}"), ids) is False  # `ray start --head`, `ray.init()`
    assert autoscaler_adds_nodes(v1_status(f"node_{ids[0]}", f"node_{ids[1]}"), ids) is False
    assert autoscaler_adds_nodes(v1_status("ray.head.default"), ids) is True  # GPU workers at 0: only the head
    assert autoscaler_adds_nodes(v1_status(f"node_{ids[0]}", pending=("gpu_worker",)), ids) is True
    assert autoscaler_adds_nodes(None, ids) is None  # no monitor status (yet, or a v2 autoscaler)
    assert autoscaler_adds_nodes({"load_metrics_report": {}}, ids) is None  # no autoscaler report in it
    assert "v1" in gpu_wait_reason(None) and "waits all of --gpu-wait" in gpu_wait_reason(None)
    assert gpu_wait_reason(GPU_GROUPS) == "the autoscaler's node type(s) gpu_worker offer GPUs"


def test_gpu_wait_takes_durations_and_gpu_on_cpu_is_explicit(monkeypatch):
    assert BuildConfig(inputs=["x"], gpu_wait="5s").gpu_wait == 5 and BuildConfig(inputs=["x"]).gpu_wait == 600
    with pytest.raises(ValueError, match="'soon' is not an interval"):
        BuildConfig(inputs=["x"], gpu_wait="soon")
    monkeypatch.delenv(GPU_ON_CPU_ENV, raising=False)
    assert gpu_on_cpu() is False  # never a default
    monkeypatch.setenv(GPU_ON_CPU_ENV, "1")
    assert gpu_on_cpu() is True
    monkeypatch.setenv(GPU_ON_CPU_ENV, "maybe")
    with pytest.raises(RayIndexError, match="RAYINDEX_GPU_ON_CPU='maybe': use 1"):
        gpu_on_cpu()


def test_what_keeps_torch_and_faiss_off_the_gpu_is_named():
    """On this machine (torch's CPU wheel, faiss-cpu): both named with their versions and builds."""
    assert cuda_problems(torch, None) == [f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"]
    assert faiss_gpu_problems(faiss) == [
        f"faiss {faiss.__version__} has no GPU support (the faiss-cpu build is installed, or shadows faiss-gpu)"
    ]
    with pytest.raises(RayIndexError, match=r"GPU asked for but unusable on node .* for training: faiss "):
        require_faiss_gpu()

    class CudaBuildWithoutDriver:  # a CUDA wheel where no driver is loaded: torch's own reason is quoted
        __version__ = "2.13.0+cu130"

        class version:
            cuda = "13.0"

        class cuda:
            is_available = staticmethod(lambda: False)

            @staticmethod
            def init():
                raise RuntimeError("Found no NVIDIA driver on your system. Please check ...")

    assert cuda_problems(CudaBuildWithoutDriver, None) == [
        "torch 2.13.0+cu130 (CUDA 13.0) cannot use a GPU: Found no NVIDIA driver on your system. Please check ...; "
        "NVIDIA driver: none loaded (/proc/driver/nvidia/version is missing)"
    ]


def test_an_encoder_given_a_gpu_it_cannot_use_refuses_naming_what_is_missing(ray_address, tmp_path):
    """A real ShardEncoder actor on this machine (no CUDA) told to use the GPU: its constructor refuses, and
    the pool hands over that message, not Ray's actor-death traceback."""
    config = build_config([tmp_path / "none.parquet"], tmp_path / "out")
    actor = ray.remote(encode.ShardEncoder).remote(config, True, 1)
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(actor.__ray_ready__.remote(), timeout=120)
    message = str(creation_error(died.value))
    assert message.startswith("GPU asked for but unusable on node ") and "for encoding: " in message
    assert f"torch {torch.__version__} is a CPU-only build" in message
    assert f"faiss {faiss.__version__} has no GPU support" in message
    assert "build on CPUs with --cpu" in message


@pytest.mark.parametrize("asked", ["--gpu", "RAYINDEX_GPU=1"])
def test_gpu_on_a_cluster_without_gpus_or_autoscaler_is_refused_within_a_minute(asked, ray_address, tmp_path, docs):
    """The session's Ray is a plain `ray start --head`: no GPU, and its monitor runs no autoscaler. Asked by the
    flag or by RAYINDEX_GPU=1 (which a v1 autoscaler's cluster would be waited on for), refused at once."""
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:10])
    env = {k: v for k, v in client_env().items() if k not in ("RAYINDEX_GPU", GPU_ON_CPU_ENV)}
    flag = [asked] if asked.startswith("--") else []
    if not flag:
        env["RAYINDEX_GPU"] = "1"
    started = time.monotonic()
    run = subprocess.run(
        [RAYINDEX, *build_args(corpus, tmp_path / "out", *flag, "--ray-address", ray_address, "--quiet")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr
    assert "has no GPU node and no autoscaler to add one" in run.stderr and "Traceback" not in run.stderr
    assert took < 60, f"refused after {took:.0f} s"
    print(f"\n{asked} without GPUs or autoscaler refused in {took:.1f} s")
