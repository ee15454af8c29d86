#!/usr/bin/env bash
# The GPU checks that need no network on the GPU machine, on its own CUDA torch: tests/test_gpu.py (the cuda key
# fields read off this GPU, the transformers engine serving on the GPU against the CPU).
#
#   bash tests/gpu/run.sh prepare   # here, with the package registries: kiln's pure-Python dependencies as wheels
#                                   # under .gpu/wheels (gitignored; about 45 MB: it travels with the checkout)
#   bash tests/gpu/run.sh           # on the GPU machine: a venv over its torch, those wheels, then pytest -m gpu
#
# Results go to $OUT (the device tool's output folder) when it is set, else .gpu/out.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=.gpu/wheels
# kiln[runtime] without boto3 (imported lazily, for S3 only), the build's Hydra for `python -m build model=tiny`, and
# the test tools. Compiled wheels are for this machine's Python (3.11): the GPU machine's python3 must match.
REQS=(fastapi uvicorn "pydantic>=2.9" prometheus-client "packaging>=24" tqdm "transformers==5.19.0" "tokenizers==0.23.3"
  "safetensors==0.8.0" "huggingface_hub>=1.0" httpx "hydra-core==1.3.8" "omegaconf>=2.3" pytest pytest-timeout openai
  psutil)

if [[ "${1:-}" == prepare ]]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python3 -m pip download -q -d "$WHEELS" "${REQS[@]}" 2>&1 | grep -v "^WARNING" || true
  # sdists (antlr4, Hydra's parser runtime) become wheels here: the GPU machine has no setuptools to build them with
  for sdist in "$WHEELS"/*.tar.gz; do
    [[ -e "$sdist" ]] || continue
    python3 -m pip wheel -q --no-deps -w "$WHEELS" "$sdist" 2>&1 | grep -v "^WARNING" || true
    rm "$sdist"
  done
  # torch stays out: the GPU machine's CUDA build is the one to test
  find "$WHEELS" \( -name 'torch-*' -o -name 'nvidia_*' -o -name 'triton-*' \) -delete
  du -sh "$WHEELS"
  exit 0
fi

OUT="${OUT:-.gpu/out}"
mkdir -p "$OUT"
python3 --version | tee "$OUT/device.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA torch here'; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/device.txt"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee -a "$OUT/device.txt"
VENV=.gpu/venv
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${REQS[@]}" 2>&1 | grep -v "^WARNING" || true
export PYTHONPATH="$PWD"  # kiln's packages from the checkout (the tests run the CLIs from its root)
export KILN_TOOLCHAIN_BUILD="$PWD/$VENV/bin/python"  # the build's stages run in this environment
"$VENV/bin/python" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py \
  --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
