# syntax=docker/dockerfile:1
# kiln's slim runtime with the deepspeed engine (DeepSpeed-Inference's AutoTP under transformers' batching manager) on
# CPU: `python -m runtime supervise` serving SageMaker's /opt/ml/model on port 8080. Build from the repository root
# with runtime/images/build.sh deepspeed (README, "Runtime image").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. kiln's wheel with only artifacts/ and runtime/: build/, quantize/, compile/ and conf/ never enter the build.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts/ artifacts/
COPY runtime/ runtime/
RUN python runtime/images/wheel.py /wheels

# 2. The environment: the CPU torch kiln was measured with (PyTorch's CPU index: PyPI's torch is the CUDA build),
# then kiln's `runtime` extra and the deepspeed extra. DeepSpeed's sdist builds no ops at install (they compile on
# first use), so pip needs no torch in its build environment.
FROM ${PYTHON_IMAGE} AS venv
RUN python -m venv /opt/kiln
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -- /wheels/kiln-*.whl \
    && /opt/kiln/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && /opt/kiln/bin/pip install "$1[runtime,deepspeed]"

# 3. The image: the environment, the `serve` entrypoint, a non-root user.
FROM ${PYTHON_IMAGE}
# g++: DeepSpeed compiles its CPU ops (the shared-memory all-reduce of TP > 1) on first use. Unpinned: Debian's
# security updates replace the old versions in the archive, so a pinned version stops installing.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 kiln && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin kiln
COPY --from=venv /opt/kiln /opt/kiln
COPY runtime/images/serve /usr/local/bin/serve
ENV PATH=/opt/kiln/bin:$PATH \
    HOME=/home/kiln \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/kiln
EXPOSE 8080
CMD ["serve"]
