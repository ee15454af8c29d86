# syntax=docker/dockerfile:1
# kiln's slim runtime with the tensorrt_llm engine (TensorRT-LLM 1.x's PyTorch backend) on NVIDIA GPUs:
# `python -m runtime supervise` serving SageMaker's /opt/ml/model on port 8080. Build from the repository root with
#   runtime/images/build.sh tensorrt-llm TAG --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:<1.2.1 tag>
# BASE_IMAGE has no default on purpose: TensorRT-LLM, its CUDA, TensorRT and MPI come from NVIDIA's own image (its
# wheels live on NVIDIA's index, not PyPI), and kiln was written for 1.2.1. The base must have Python >= 3.11.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BASE_IMAGE

# 1. kiln's wheel with only artifacts/ and runtime/: build/, quantize/, compile/ and conf/ never enter the build.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts/ artifacts/
COPY runtime/ runtime/
RUN python runtime/images/wheel.py /wheels

# 2. The image: a venv over the base image's Python (--system-site-packages: it sees the image's tensorrt_llm, torch
# and transformers 4.57.1), kiln's `runtime` extra and the tensorrt-llm extra (already satisfied by the base; pip
# installs only what kiln adds: FastAPI, uvicorn, prometheus-client, boto3 …), the `serve` entrypoint, a non-root user.
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}
RUN python3 -m venv --system-site-packages /opt/kiln
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -- /wheels/kiln-*.whl \
    && /opt/kiln/bin/pip install "$1[runtime,tensorrt-llm]"
RUN groupadd --gid 1000 kiln && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin kiln
COPY runtime/images/serve /usr/local/bin/serve
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/kiln/bin:$PATH \
    HOME=/home/kiln \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/kiln
EXPOSE 8080
CMD ["serve"]
