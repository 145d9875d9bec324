#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests against the Kubernetes OpenAPI schema
with PyPI's kubernetes-validate, strictly (unknown fields are errors).

Usage: validate_manifests.py --kube-version 1.32 [--kube-version 1.37] FILE...

Custom resources (kinds from a CRD, e.g. cert-manager's Certificate) have no
schema in kubernetes-validate: they are skipped with a message, by API group, from
the list below. Any other resource without a schema is an error, not a warning
(the CLI only warns), so a typo in apiVersion or kind cannot pass.
"""
import argparse
import sys

import yaml
import kubernetes_validate.utils as kv

# API groups whose kinds come from CRDs we document; they are skipped, loudly.
CRD_GROUPS = {"cert-manager.io"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-version", action="append", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    failures = checked = skipped = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"FAIL {path}: no resources")
            failures += 1
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            group = doc.get("apiVersion", "").rpartition("/")[0]
            if group in CRD_GROUPS:
                print(f"SKIP {path}: {name} ({doc['apiVersion']}) is a custom resource; "
                      "kubernetes-validate has no schema for CRDs")
                skipped += 1
                continue
            for version in args.kube_version:
                try:
                    got = kv.validate(doc, version, strict=True)
                    checked += 1
                    print(f"ok   {path}: {name} against Kubernetes {got}")
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"FAIL {path}: {name} against Kubernetes {e.version}: {where}: {e.message}")
                    failures += 1
                except kv.SchemaNotFoundError as e:
                    print(f"FAIL {path}: {name}: {e.message}")
                    failures += 1
                except kv.VersionNotSupportedError:
                    print(f"FAIL kubernetes-validate does not know Kubernetes {version}")
                    return 2
    print(f"validate_manifests: {checked} validations passed, {failures} failed, {skipped} custom resources skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
