# rayindex images, built from this checkout (docs/operations.md, "Images"):
#   docker build --target cpu -t rayindex:0.2.0 .        # head, CPU workers, serving
#   docker build --target gpu -t rayindex-gpu:0.2.0 .    # GPU workers (encode, train on GPU)
# Both start from Ray's own CPU image: Ubuntu 22.04 (glibc 2.35, which torch's manylinux_2_28 wheels
# need), Python 3.11, Ray 2.60.0, user `ray`, as KubeRay expects. The GPU image adds no CUDA toolkit:
# torch and faiss-gpu bring their CUDA 12.6 runtime as pip wheels (nvidia-cuda-runtime-cu12, cuBLAS),
# so the pairing is pinned by pip in one place (pyproject.toml's [gpu] extra) and the image needs only
# the host's driver (>= 560), which the NVIDIA container runtime mounts in. Checked without docker by
# tests/test_images.py (the pins equal pyproject's and cluster.yaml's).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE} AS source
# COPY --chown makes the folder it creates the user's too (WORKDIR would make it root's, and pip's build
# of the package writes there)
COPY --chown=ray:users pyproject.toml README.md /home/ray/rayindex/
COPY --chown=ray:users pipelines /home/ray/rayindex/pipelines
COPY --chown=ray:users jobs /home/ray/rayindex/jobs
WORKDIR /home/ray/rayindex
# Every Ray node started from these images runs Serve's HTTP proxy with rayindex's gate (docs/serving.md)
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rayindex.query.gate:middlewares

FROM source AS cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir '.[cpu]' \
    && rayindex --help > /dev/null

FROM source AS gpu
# what the NVIDIA container runtime mounts: the GPUs and the driver's compute libraries (CUDA images set these)
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
# faiss-gpu and faiss-cpu both install the module `faiss`: the [gpu] extra brings no faiss-cpu, and the
# build fails if anything did (faiss is not imported: its GPU libraries may need the driver, absent at build time)
RUN pip install --no-cache-dir torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126 \
    && pip install --no-cache-dir '.[gpu]' \
    && pip show --quiet faiss-gpu && ! pip show --quiet faiss-cpu 2> /dev/null \
    && rayindex --help > /dev/null
