# syntax=docker/dockerfile:1
# kiln's slim runtime with the neuron engine (vLLM Neuron on graphs NxD Inference compiled in the build) on AWS
# Inferentia2 / Trainium: `python -m runtime supervise` serving SageMaker's /opt/ml/model on port 8080. Build from the
# repository root with
#   runtime/images/build.sh neuron TAG --build-arg BASE_IMAGE=<AWS Neuron DLC of SDK 2.29 with vLLM Neuron>
# BASE_IMAGE has no default on purpose: the Neuron runtime, neuronx-cc, NxD Inference and vLLM Neuron come from AWS's
# Deep Learning Container (AWS's package index, not PyPI), for the SDK release kiln was written for (2.29). The base
# must have Python >= 3.11, and the container is run with the instance's /dev/neuron* devices.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BASE_IMAGE

# 1. kiln's wheel with only artifacts/ and runtime/: build/, quantize/, compile/ and conf/ never enter the build.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts/ artifacts/
COPY runtime/ runtime/
RUN python runtime/images/wheel.py /wheels

# 2. The image: a venv over the base image's Python (--system-site-packages: it sees the DLC's NxD Inference, vLLM
# 0.11 with the Neuron plugin and transformers 4.57), kiln's `runtime` extra and the neuron extra (already satisfied
# by the base), the `serve` entrypoint, a non-root user.
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}
RUN python3 -m venv --system-site-packages /opt/kiln
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -- /wheels/kiln-*.whl \
    && /opt/kiln/bin/pip install "$1[runtime,neuron]"
RUN groupadd --gid 1000 kiln && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin kiln
COPY runtime/images/serve /usr/local/bin/serve
ENV PATH=/opt/kiln/bin:$PATH \
    HOME=/home/kiln \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/kiln
EXPOSE 8080
CMD ["serve"]
