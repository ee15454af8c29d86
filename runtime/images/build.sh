#!/usr/bin/env bash
# Build kiln's runtime images: runtime/images/build.sh ENGINE [TAG] [docker buildx build args…]
#   ENGINE: vllm-cpu, vllm-cuda, deepspeed, tensorrt-llm or neuron (the last two need --build-arg BASE_IMAGE=…)
#   runtime/images/build.sh vllm-cpu                        # -> kiln-runtime:vllm-cpu, loaded into the local docker
#   runtime/images/build.sh vllm-cuda 123456789012.dkr.ecr.us-east-1.amazonaws.com/kiln:vllm-cuda --push
set -euo pipefail

# buildx's default provenance/SBOM attestations turn the pushed image into an OCI image index, which SageMaker
# refuses to create a model from; without them the push is a plain image manifest.
export BUILDX_NO_DEFAULT_ATTESTATIONS=1

engine="${1:?usage: $0 vllm-cpu|vllm-cuda|deepspeed|tensorrt-llm|neuron [TAG] [docker buildx build args…]}"
here="$(cd "$(dirname "$0")" && pwd)"
dockerfile="$here/$engine.Dockerfile"
[[ -f "$dockerfile" ]] || { echo "no image recipe $dockerfile; the engines with one: vllm-cpu, vllm-cuda, deepspeed, tensorrt-llm, neuron" >&2; exit 2; }
shift
tag="kiln-runtime:$engine"
if [[ $# -gt 0 && "$1" != -* ]]; then tag="$1"; shift; fi
# The context is the repository root: the Dockerfile copies artifacts/, runtime/, pyproject.toml and README.md
# from it (<name>.Dockerfile.dockerignore keeps the rest, .nox included, out of the upload).
args=(--file "$dockerfile" --tag "$tag" --provenance=false --sbom=false)
# --push leaves the image in the registry; without it, load it into the local docker.
[[ " $* " == *" --push "* ]] || args+=(--load)
exec docker buildx build "${args[@]}" "$@" "$here/../.."
