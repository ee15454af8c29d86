# syntax=docker/dockerfile:1
# kiln's slim runtime with vLLM on NVIDIA GPUs: `python -m runtime supervise` serving SageMaker's /opt/ml/model on
# port 8080. Build from the repository root with runtime/images/build.sh vllm-cuda (README, "Runtime image").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. kiln's wheel with only artifacts/ and runtime/: build/, quantize/, compile/ and conf/ never enter the build.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts/ artifacts/
COPY runtime/ runtime/
RUN python runtime/images/wheel.py /wheels

# 2. The environment: kiln's `runtime` extra and this engine's extra, nothing else (no Hydra, no quantization or
# compile libraries). PyPI's vllm wheel brings its CUDA torch and the CUDA libraries (nvidia-* wheels), so the
# base image needs no CUDA toolkit; the host's driver is mounted by the NVIDIA container runtime.
FROM ${PYTHON_IMAGE} AS venv
RUN python -m venv /opt/kiln
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -- /wheels/kiln-*.whl \
    && /opt/kiln/bin/pip install "$1[runtime,vllm-cuda]"

# 3. The image: the environment, the `serve` entrypoint, a non-root user.
FROM ${PYTHON_IMAGE}
# g++: Triton compiles its CUDA launcher stubs with the system C compiler when vLLM first runs a kernel, and
# torch.compile's inductor needs it too. Unpinned: Debian's security updates replace the old versions in the
# archive, so a pinned version stops installing.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 kiln && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin kiln
COPY --from=venv /opt/kiln /opt/kiln
COPY runtime/images/serve /usr/local/bin/serve
# NVIDIA_*: what the NVIDIA container runtime reads to mount the GPUs and the driver's compute libraries (the
# nvidia/cuda images set the same). PATH: `serve`'s `python` is the environment's. HOME: the kiln cache (pulled
# artifacts, engine logs, the writable compile cache) lives in ~/.cache/kiln; KILN_CACHE moves it.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/kiln/bin:$PATH \
    HOME=/home/kiln \
    PYTHONUNBUFFERED=1
# Numeric, so a platform that refuses root images (Kubernetes' runAsNonRoot) can tell it is not root.
USER 1000:1000
WORKDIR /home/kiln
EXPOSE 8080
CMD ["serve"]
