"""Whether this process can do the GPU work it was given: CUDA through torch (the encoders' forward pass)
and FAISS with GPU support (the train stage's k-means), each checked where it runs, on the GPU node.

Where a GPU was asked for, nothing falls back to the CPU: the encoder that found CUDA unusable refuses,
naming what is missing (the NVIDIA driver, a CUDA build of torch, faiss-gpu) and what to do; a build on
the CPU is asked for with --cpu. (0.1 picked the CPU quietly while holding the GPU: ~30 docs/s on one
CPU, the GPU idle, only the manifest's `device` field said so.)
"""

from __future__ import annotations

import platform
from pathlib import Path

from rayindex.errors import RayIndexError

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")  # the loaded NVIDIA kernel module's version line
WHAT_TO_DO = (
    "install on the GPU nodes the NVIDIA driver, a CUDA build of torch that this driver supports and "
    "faiss-gpu built for the same CUDA major (docs/operations.md, GPU clusters), or build on CPUs with --cpu"
)


def nvidia_driver() -> str | None:
    """The loaded NVIDIA driver's version line, or None when no driver is loaded on this node."""
    try:
        return DRIVER_VERSION_FILE.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def cuda_problems(torch, driver: str | None) -> list[str]:
    """What keeps torch from running on a GPU here (empty when it can): torch is a CPU-only build, or its
    CUDA runtime finds no usable driver or device (torch's own reason quoted)."""
    if torch.version.cuda is None:
        return [f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"]
    if torch.cuda.is_available():
        return []
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # torch says why: no driver, a driver too old for its CUDA, no device
        reason = str(exc).strip().splitlines()[0]
    return [
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use a GPU: {reason}; "
        f"NVIDIA driver: {driver or f'none loaded ({DRIVER_VERSION_FILE} is missing)'}"
    ]


def faiss_gpu_problems(faiss) -> list[str]:
    """What keeps FAISS from training on a GPU here (empty when it can): a CPU-only build (faiss-cpu
    installed, or shadowing faiss-gpu), or a GPU build that sees no device."""
    version = getattr(faiss, "__version__", "?")
    if not hasattr(faiss, "StandardGpuResources"):
        return [f"faiss {version} has no GPU support (the faiss-cpu build is installed, or shadows faiss-gpu)"]
    if faiss.get_num_gpus() < 1:
        return [
            f"faiss {version} is a GPU build but sees no GPU (faiss.get_num_gpus() is 0: its CUDA runtime "
            "and the driver do not match, or no device is visible)"
        ]
    return []


def refusal(problems: list[str], what: str) -> RayIndexError:
    node = platform.node()
    return RayIndexError(
        f"GPU asked for but unusable on node {node} for {what}: " + "; ".join(problems) + f". To fix: {WHAT_TO_DO}"
    )


def encoder_device(use_gpu: bool) -> str:
    """ "cuda" when the encoder was given a GPU and both torch and FAISS can use it, "cpu" when it was not
    given one; otherwise a RayIndexError naming what is missing. FAISS is checked here too, on the GPU node,
    so that a build that will train on a GPU is refused within a minute instead of after its encode."""
    if not use_gpu:
        return "cpu"
    import faiss
    import torch

    problems = cuda_problems(torch, nvidia_driver()) + faiss_gpu_problems(faiss)
    if problems:
        raise refusal(problems, "encoding")
    return "cuda"


def require_faiss_gpu() -> None:
    """The train task asked for a GPU: FAISS must be able to use it (never a quiet k-means on one CPU thread)."""
    import faiss

    problems = faiss_gpu_problems(faiss)
    if problems:
        raise refusal(problems, "training")
