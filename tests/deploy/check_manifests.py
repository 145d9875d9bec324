#!/usr/bin/env python3
"""Asserts the security properties of keybroker's rendered Kubernetes manifests
(issue 10, deploy/README.md):

- every container (init and ephemeral ones too) of every pod template: not
  privileged, runAsNonRoot (its own or the pod's), runAsUser not 0,
  readOnlyRootFilesystem, allowPrivilegeEscalation false, capabilities drop ALL
  and add none, seccomp RuntimeDefault (its own or the pod's), cpu and memory
  requests and limits; no hostNetwork / hostPID / hostIPC;
- long-running workloads (Deployment, DaemonSet, StatefulSet): liveness and
  readiness probes on every container;
- RBAC: namespaced Roles only, no "*" in verbs, resources or apiGroups, only
  get / list / watch, and resourceNames on every rule.

Usage: check_manifests.py [--extract-configs DIR] RENDERED.yaml...
  --extract-configs writes the keybrokerd.toml of each ConfigMap to
  DIR/<file stem>.<configmap>.toml so the caller can run keybrokerd --check-config.
  --self-test checks that each rule above catches a broken copy of the input.
"""
import argparse
import copy
import os
import sys

import yaml

POD_TEMPLATE_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
LONG_RUNNING = {"Deployment", "DaemonSet", "StatefulSet"}
READ_VERBS = {"get", "list", "watch"}


def dig(obj, path):
    for p in path:
        obj = (obj or {}).get(p)
    return obj


def check_pod(kind, name, pod):
    errs = []
    where = f"{kind}/{name}"
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            errs.append(f"{where}: {host} is set")
    psc = pod.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        errs.append(f"{where}: pod runAsUser is 0")
    containers = [("container", c) for c in pod.get("containers") or []]
    containers += [("initContainer", c) for c in pod.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in pod.get("ephemeralContainers") or []]
    if not pod.get("containers"):
        errs.append(f"{where}: no containers")
    for what, c in containers:
        cw = f"{where} {what} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            errs.append(f"{cw}: privileged")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            errs.append(f"{cw}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            errs.append(f"{cw}: runs as uid 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            errs.append(f"{cw}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{cw}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            errs.append(f"{cw}: capabilities do not drop ALL")
        if caps.get("add"):
            errs.append(f"{cw}: capabilities add {caps['add']}")
        seccomp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            errs.append(f"{cw}: seccompProfile is not RuntimeDefault")
        if what != "ephemeralContainer":
            res = c.get("resources") or {}
            for section in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(section) or {}):
                        errs.append(f"{cw}: no {r} {section[:-1]}")
        if kind in LONG_RUNNING and what == "container":
            for probe in ("livenessProbe", "readinessProbe"):
                if not c.get(probe):
                    errs.append(f"{cw}: no {probe}")
    return errs


def check_rbac(doc):
    errs = []
    kind, name = doc["kind"], doc["metadata"]["name"]
    where = f"{kind}/{name}"
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        errs.append(f"{where}: cluster-wide RBAC; keybroker needs a namespaced Role only")
    if kind not in ("Role", "ClusterRole"):
        return errs
    rules = doc.get("rules") or []
    if not rules:
        errs.append(f"{where}: no rules")
    for i, rule in enumerate(rules):
        rw = f"{where} rule {i}"
        for field in ("verbs", "resources", "apiGroups"):
            if "*" in (rule.get(field) or []):
                errs.append(f"{rw}: '*' in {field}")
        if any("*" in r for r in rule.get("resources") or []):
            errs.append(f"{rw}: wildcard subresource in resources")
        extra = set(rule.get("verbs") or []) - READ_VERBS
        if extra:
            errs.append(f"{rw}: verbs beyond get/list/watch: {sorted(extra)}")
        if not rule.get("resourceNames"):
            errs.append(f"{rw}: no resourceNames (would cover every object of the kind)")
        if rule.get("nonResourceURLs"):
            errs.append(f"{rw}: nonResourceURLs")
    return errs


def check(docs):
    errs = []
    pods = 0
    for doc in docs:
        kind = doc.get("kind")
        name = dig(doc, ("metadata", "name"))
        if kind in POD_TEMPLATE_PATHS:
            pod = dig(doc, POD_TEMPLATE_PATHS[kind])
            if not pod:
                errs.append(f"{kind}/{name}: no pod spec")
                continue
            pods += 1
            errs += check_pod(kind, name, pod)
        if kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
            errs += check_rbac(doc)
    return errs, pods


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def self_test(docs):
    """Each rule must reject a copy of the manifests broken in its way."""
    def first(kind):
        for i, d in enumerate(docs):
            if d.get("kind") == kind:
                return i
        return None

    breakers = []
    w = next((k for k in ("Deployment", "DaemonSet") if first(k) is not None), None)
    if w:
        def ctr(ds):
            return dig(ds[first(w)], POD_TEMPLATE_PATHS[w])["containers"][0]
        breakers += [
            ("privileged", lambda ds: ctr(ds)["securityContext"].update(privileged=True)),
            ("readOnlyRootFilesystem", lambda ds: ctr(ds)["securityContext"].update(readOnlyRootFilesystem=False)),
            ("allowPrivilegeEscalation", lambda ds: ctr(ds)["securityContext"].pop("allowPrivilegeEscalation")),
            ("runAsNonRoot", lambda ds: ctr(ds)["securityContext"].update(runAsNonRoot=False)),
            ("drop ALL", lambda ds: ctr(ds)["securityContext"]["capabilities"].update(drop=["NET_RAW"])),
            ("seccompProfile", lambda ds: ctr(ds)["securityContext"].update(seccompProfile={"type": "Unconfined"})),
            ("limits", lambda ds: ctr(ds)["resources"].pop("limits")),
            ("livenessProbe", lambda ds: ctr(ds).pop("livenessProbe")),
        ]
    if first("Role") is not None:
        def rule(ds):
            return ds[first("Role")]["rules"][0]
        breakers += [
            ("'*' in verbs", lambda ds: rule(ds).update(verbs=["*"])),
            ("'*' in resources", lambda ds: rule(ds).update(resources=["*"])),
            ("'*' in apiGroups", lambda ds: rule(ds).update(apiGroups=["*"])),
            ("resourceNames", lambda ds: rule(ds).pop("resourceNames")),
            ("write verbs", lambda ds: rule(ds)["verbs"].append("update")),
        ]
    missed = []
    for what, brk in breakers:
        broken = copy.deepcopy(docs)
        brk(broken)
        if not check(broken)[0]:
            missed.append(what)
    return len(breakers), missed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extract-configs")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    failed = False
    for path in args.files:
        docs = load(path)
        errs, pods = check(docs)
        roles = sum(1 for d in docs if d.get("kind") == "Role")
        for e in errs:
            print(f"FAIL {path}: {e}")
        if pods == 0 or roles == 0:
            print(f"FAIL {path}: expected workloads and a Role (found {pods} pod templates, {roles} Roles)")
            errs.append("empty")
        failed |= bool(errs)
        print(f"{'ok  ' if not errs else 'FAIL'} {path}: {pods} pod templates, {roles} Roles checked")
        if args.self_test:
            n, missed = self_test(docs)
            for m in missed:
                print(f"FAIL self-test {path}: a manifest broken in '{m}' passed")
            failed |= bool(missed)
            print(f"{'ok  ' if not missed else 'FAIL'} self-test {path}: {n - len(missed)}/{n} broken copies rejected")
        if args.extract_configs:
            os.makedirs(args.extract_configs, exist_ok=True)
            stem = os.path.splitext(os.path.basename(path))[0]
            for d in docs:
                if d.get("kind") == "ConfigMap" and "keybrokerd.toml" in (d.get("data") or {}):
                    out = os.path.join(args.extract_configs, f"{stem}.{d['metadata']['name']}.toml")
                    with open(out, "w") as f:
                        f.write(d["data"]["keybrokerd.toml"])
                    print(f"     {path}: ConfigMap {d['metadata']['name']} -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
