#!/usr/bin/env python3
"""Validate the custom-resource documents of a rendered manifest against the JSON
schemas in k8s/schemas/, and write the other documents out for kubernetes-validate.

kubernetes-validate only knows the built-in Kubernetes kinds: for a Gateway or an
HTTPRoute it prints a warning and passes. So k8s/check.sh splits them out here:

    python3 k8s/validate_crds.py RENDERED.yaml --rest-out BUILTIN.yaml

Every document whose API group has a schema directory entry
(k8s/schemas/<group>_<version>_<kind>.json) is validated with `jsonschema`
(Draft 2020-12). A document of a group listed in CRD_GROUPS without a schema is an
error: it would otherwise be checked by nothing. All other documents are written
to --rest-out. Exits 1 on any failure. Needs PyYAML and jsonschema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import jsonschema
    import yaml
except ImportError as exc:  # pragma: no cover
    sys.exit(f"validate_crds.py: {exc}; run: pip install jsonschema pyyaml")

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# API groups that are custom resources (not built into Kubernetes): their documents
# must be validated here.
CRD_GROUPS = {"gateway.networking.k8s.io", "monitoring.coreos.com", "cert-manager.io"}


def schema_path(api_version: str, kind: str) -> Path:
    group, _, version = api_version.rpartition("/")
    return SCHEMA_DIR / f"{group}_{version}_{kind.lower()}.json"


def describe(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{doc.get('kind', '?')} {ns + '/' if ns else ''}{name} ({doc.get('apiVersion', '?')})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rendered", help="multi-document YAML, e.g. kubectl kustomize output")
    parser.add_argument("--rest-out", required=True,
                        help="where to write the documents not validated here")
    args = parser.parse_args()

    with open(args.rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    failures = 0
    checked = 0
    rest = []
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            print(f"ERROR {args.rendered}: document without apiVersion/kind: {str(doc)[:80]}")
            failures += 1
            continue
        group = doc["apiVersion"].rpartition("/")[0]
        path = schema_path(doc["apiVersion"], doc["kind"])
        if not path.exists():
            if group in CRD_GROUPS:
                print(f"ERROR {describe(doc)}: custom resource without a schema ({path.name} missing)")
                failures += 1
            else:
                rest.append(doc)
            continue
        schema = json.loads(path.read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        checked += 1
        if errors:
            failures += 1
            for err in errors:
                where = ".".join(str(p) for p in err.absolute_path) or "(document)"
                print(f"ERROR {describe(doc)}: {where}: {err.message}")
        else:
            print(f"OK    {describe(doc)}: jsonschema against k8s/schemas/{path.name}")

    with open(args.rest_out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(rest, f, sort_keys=False)
    kinds = ", ".join(sorted({f"{d['kind']}" for d in rest}))
    print(f"      {len(rest)} built-in documents left for kubernetes-validate ({kinds})")
    print(f"      {checked} custom-resource documents checked by jsonschema, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
