"""One CUDA pairing, installed the same way everywhere: pyproject.toml's extras (no FAISS in the base
install; [cpu] faiss-cpu, [gpu] faiss-gpu and the CUDA 12.6 torch it pairs with), the Dockerfile's cpu and
gpu images (read here, without docker) and cluster.yaml's setup commands install the same pins; a missing
FAISS or torch is one error line naming what to install."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config

from rayindex.errors import user_message

ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
# PyPI metadata, read 2026-12-05: faiss-gpu 1.15.1 (Meta's wheel, built with CUDA 12.6, sm_70..sm_89 and sm_90
# PTX) requires nvidia-cuda-runtime-cu12>=12.6,<13; PyPI's torch 2.13.0 requires cuda-toolkit==13.0.3 (the
# CUDA 13 build). PyTorch publishes torch 2.13.0 for CUDA 12.6 (cu126, legacy) and 13.0 (cu130, PyPI's).
FAISS_GPU = "faiss-gpu==1.15.1"
FAISS_GPU_CUDA = "12"  # major CUDA version of faiss-gpu 1.15.1's runtime
TORCH_GPU_INDEX = "https://download.pytorch.org/whl/cu126"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra(name: str) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, pyproject()["project"]["optional-dependencies"][name])}


def test_one_faiss_build_per_install_and_the_gpu_pairing():
    base = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    assert not {n for n in base if n.startswith("faiss")}  # both wheels own the module `faiss`: one, by extra
    assert set(extra("cpu")) == {"faiss-cpu"}
    gpu = extra("gpu")
    assert set(gpu) == {"faiss-gpu", "torch"} and str(gpu["faiss-gpu"]) == FAISS_GPU
    (torch,) = gpu["torch"].specifier
    # an exact local version: PyPI's torch 2.13.0 (CUDA 13) cannot satisfy it, so a plain install fails loudly
    assert torch.operator == "==" and torch.version == "2.13.0+cu126"
    assert torch.version.split("+cu")[1].startswith(FAISS_GPU_CUDA) and TORCH_GPU_INDEX.endswith("/cu126")
    # README's commands install [dev]: faiss-cpu, the suite's tools and the integrations' frameworks; a GPU machine
    # takes [gpu,test,langchain,llama-index,mcp]
    assert pyproject()["project"]["optional-dependencies"]["dev"] == ["rayindex[cpu,test,langchain,llama-index,mcp]"]
    assert not {n for n in extra("test") if n.startswith(("faiss", "torch"))}


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if found:
            current = found[1]
            stages[current] = []
        stages[current].append(line)
    return stages


def pip_installs(commands: list[str]) -> list[str]:
    """The `pip install` commands in shell commands (split on &&), flags that change nothing installed dropped,
    the checkout's path written `.`."""
    installs = []
    for command in commands:
        for part in command.split("&&"):
            part = " ".join(part.replace("--no-cache-dir", "").replace("-U ", "").split())
            if part.startswith("pip install"):
                installs.append(part.replace('-e "$HOME/rayindex', "'.").replace(']"', "]'"))
    return installs


def test_dockerfile_builds_cpu_and_gpu_images_from_ray_and_this_checkout():
    stages = dockerfile_stages()
    assert set(stages) == {"", "source", "cpu", "gpu"}
    assert stages[""] == [f"ARG RAY_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu"]
    copied = {path for line in stages["source"] if line.startswith("COPY") for path in line.split()[2:-1]}
    assert copied == {"pyproject.toml", "README.md", "pipelines", "jobs"}  # what `pip install .` and jobs/ need
    assert all((ROOT / path).exists() for path in copied)
    assert "ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rayindex.query.gate:middlewares" in stages["source"]
    runs = {
        name: [line.removeprefix("RUN ") for line in lines if line.startswith("RUN")] for name, lines in stages.items()
    }
    assert pip_installs(runs["cpu"]) == [
        f"pip install torch==2.13.0 --index-url {TORCH_CPU_INDEX}",
        "pip install '.[cpu]'",
    ]
    torch_gpu = str(extra("gpu")["torch"])
    assert pip_installs(runs["gpu"]) == [
        f"pip install {torch_gpu} --index-url {TORCH_GPU_INDEX}",
        "pip install '.[gpu]'",
    ]
    assert "! pip show --quiet faiss-cpu" in runs["gpu"][0]  # the gpu image fails to build with faiss-cpu in it
    for name in ("cpu", "gpu"):
        assert "rayindex --help" in runs[name][0]  # the console script (pyproject's project.scripts) works
    assert pyproject()["project"]["scripts"]["rayindex"] == "rayindex.cli:main"
    assert "ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility" in stages["gpu"]
    assert (ROOT / ".dockerignore").exists()


def test_cluster_yaml_installs_what_the_images_install():
    cluster = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    runs = {
        name: [line.removeprefix("RUN ") for line in lines if line.startswith("RUN")]
        for name, lines in dockerfile_stages().items()
    }
    ray = f'pip install "ray[default,serve]=={RAY_VERSION}"'
    gpu_setup = cluster["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    assert pip_installs(gpu_setup) == [ray, *pip_installs(runs["gpu"])]
    for setup in (cluster["worker_setup_commands"], cluster["head_setup_commands"]):  # cpu_worker, head
        assert pip_installs(setup)[:3] == [ray, *pip_installs(runs["cpu"])]
    images = {t["node_config"]["ImageId"] for t in cluster["available_node_types"].values()}
    # one image (the same Python on every node), Ubuntu 22.04: glibc 2.35 >= the 2.28 of torch's wheels
    assert images == {
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    }


def test_a_missing_faiss_is_one_line_naming_the_extra(tmp_path):
    """The command line where FAISS is not installed (a stand-in module raises what Python raises for an
    absent one): exit 1, one error line."""
    module = "faiss"
    (tmp_path / f"{module}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n"
    )
    index = tmp_path / "index"
    index.mkdir()
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT / 'pipelines'}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = ["rayindex", "search", "--index", str(index), "q"]
    code = f"import sys; sys.argv = {command!r}; from rayindex.cli import main; main()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert lines[0].startswith("error: No module named 'faiss': install one FAISS build: pip install 'rayindex[cpu]'")


def test_a_module_missing_on_a_worker_is_named_too():
    """A Ray task's failure carries the worker's exception as `cause` (RayTaskError)."""

    class TaskFailed(Exception):
        cause = ModuleNotFoundError("No module named 'torch'", name="torch")

    assert user_message(TaskFailed("Traceback ...")).startswith("No module named 'torch': install torch first")
    assert user_message(ModuleNotFoundError("No module named 'yaml'", name="yaml")).startswith("ModuleNotFoundError")


def test_the_docs_tell_the_commands_the_files_run():
    """What a user types, as README and docs/operations.md show it, is what the images and cluster.yaml run."""
    torch_gpu = str(extra("gpu")["torch"])
    readme, operations = (ROOT / "README.md").read_text(), (ROOT / "docs" / "operations.md").read_text()
    assert f"pip install {torch_gpu} --index-url {TORCH_GPU_INDEX} && pip install -e '.[gpu]'" in readme
    assert f"pip install {torch_gpu} --index-url {TORCH_GPU_INDEX}\npip install -e '.[gpu]'" in operations
    for text in (readme, operations):
        assert (
            "docker build --target gpu -t rayindex-gpu ." in text and "docker build --target cpu -t rayindex ." in text
        )
    assert "pip install -e '.[dev]'" in readme  # README's commands 1 and 2: faiss-cpu through [dev]
