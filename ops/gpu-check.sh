#!/usr/bin/env bash
# Every training step of the gpu profile once on a CUDA device, in one process and a few minutes,
# with a table of wall time, peak GPU memory, dtypes, devices and losses (docs/training.md,
# "Checking a GPU"). The work is in bench/gpu_env.py and bench/gpu_check.py.
#   bash ops/gpu-check.sh prepare          # CPU machine, with a registry: the wheels a bare CUDA
#                                          # image lacks + SmolLM2's config/tokenizer -> .gpu-check/
#   bash ops/gpu-check.sh run [--large] [--out FILE]   # GPU machine, no network (carry .gpu-check)
#   bash ops/gpu-check.sh run --cpu        # the same code path on CPU, tiny (the suite runs it)
# PYTHON=... picks the interpreter (default: .venv/bin/python if there, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

case "${1:-}" in
  prepare)
    shift
    exec "$PYTHON" -m bench.gpu_env prepare "$@"
    ;;
  run)
    shift
    exec "$PYTHON" -m bench.gpu_check --wheels .gpu-check/wheels "$@"
    ;;
  *)
    echo "usage: ops/gpu-check.sh prepare | run [--cpu] [--large] [--out FILE]" >&2
    exit 2
    ;;
esac
