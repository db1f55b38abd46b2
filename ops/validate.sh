#!/usr/bin/env bash
# Validate the deployment files offline, with no container engine and no cluster:
#   - ops/compose/docker-compose.yml with Debian's docker-compose (`config -q`);
#   - every Kubernetes manifest in ops/k8s/ against the Kubernetes API schemas, strictly (unknown
#     fields are errors), with kubernetes-validate, which ships the schemas.
# Exits non-zero on the first failure. Needs `bash ops/setup.sh --dev` (both tools). CI runs it.
#   bash ops/validate.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if ! command -v docker-compose >/dev/null; then
  echo "validate: docker-compose is not installed (bash ops/setup.sh --dev installs it)" >&2
  exit 1
fi
docker-compose -f ops/compose/docker-compose.yml config -q
echo "validate: ops/compose/docker-compose.yml ok"

shopt -s nullglob
manifests=(ops/k8s/*.yaml)
if (( ${#manifests[@]} == 0 )); then
  echo "validate: no manifests in ops/k8s" >&2
  exit 1
fi
"$PY" -m kubernetes_validate --strict --quiet "${manifests[@]}"
echo "validate: ${#manifests[@]} Kubernetes manifests ok (kubernetes-validate --strict)"
