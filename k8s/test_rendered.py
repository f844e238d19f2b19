#!/usr/bin/env python3
"""Checks on the rendered Kubernetes manifests (output of `kubectl kustomize`).

    python3 k8s/test_rendered.py RENDERED.yaml [RENDERED.yaml ...]

Asserts, for every file, what the deployment relies on: NATS fsyncs every write
(sync_interval: always), runs 3 servers with probes, lame duck and a PDB; writers
create R3 streams; the reader keeps its view on its own volume under a durable
named after its pod; every workload has probes and a PDB and runs non-root with a
read-only root filesystem; the one HTTPRoute sends commands to the writer and
queries to the reader. Prints each check, ends with "N passed, N failed", and
exits 1 if any check failed. Needs PyYAML. If a nats-server binary is found
(.tools/bin/nats-server, $NATS_SERVER or PATH) the NATS config is also checked
with `nats-server -t`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("test_rendered.py: PyYAML missing; run: pip install pyyaml")

REPO = Path(__file__).resolve().parent.parent

PASSED = 0
FAILED = 0


def check(label: str, ok: bool, detail: str = "") -> bool:
    global PASSED, FAILED
    if ok:
        PASSED += 1
        print(f"  ok    {label}")
    else:
        FAILED += 1
        print(f"  FAIL  {label}{': ' + detail if detail else ''}")
    return ok


def find(docs, kind, name=None):
    out = [d for d in docs if d.get("kind") == kind
           and (name is None or d.get("metadata", {}).get("name") == name)]
    return out


def one(docs, kind, name):
    found = find(docs, kind, name)
    return found[0] if len(found) == 1 else None


def pod_spec(workload):
    return (workload or {}).get("spec", {}).get("template", {}).get("spec", {})


def container(workload, name):
    for c in pod_spec(workload).get("containers", []):
        if c.get("name") == name:
            return c
    return None


def env_of(c):
    return {e["name"]: e for e in (c or {}).get("env", [])}


def probe_path(c, probe):
    return ((c or {}).get(probe) or {}).get("httpGet", {}).get("path")


def selects(selector: dict, labels: dict) -> bool:
    ml = (selector or {}).get("matchLabels") or {}
    if not ml and not (selector or {}).get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in ml.items())


def active_lines(conf: str):
    """Config lines without comments."""
    return [re.sub(r"#.*", "", line).strip() for line in conf.splitlines()]


def nats_server_binary():
    for cand in (os.environ.get("NATS_SERVER"), str(REPO / ".tools/bin/nats-server"),
                 shutil.which("nats-server")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def check_nats(docs):
    sts = one(docs, "StatefulSet", "nats")
    if not check("NATS StatefulSet `nats` exists", sts is not None):
        return
    spec = sts["spec"]
    check("NATS StatefulSet has 3 replicas", spec.get("replicas") == 3, f"replicas={spec.get('replicas')}")
    check("NATS StatefulSet has JetStream volumeClaimTemplates",
          bool(spec.get("volumeClaimTemplates")))
    c = container(sts, "nats")
    if not check("NATS container `nats` exists", c is not None):
        return
    check("NATS image is nats:2.15.1-alpine", c.get("image") == "nats:2.15.1-alpine", c.get("image"))
    check("NATS liveness probe on /healthz?js-enabled-only=true",
          probe_path(c, "livenessProbe") == "/healthz?js-enabled-only=true", str(probe_path(c, "livenessProbe")))
    check("NATS readiness probe on /healthz?js-server-only=true",
          probe_path(c, "readinessProbe") == "/healthz?js-server-only=true", str(probe_path(c, "readinessProbe")))
    check("NATS startup probe on /healthz", probe_path(c, "startupProbe") == "/healthz",
          str(probe_path(c, "startupProbe")))
    pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command", [])
    check("NATS preStop sends lame duck (ldm) signal to the pid file",
          "nats-server" in pre and any("ldm=/var/run/nats/nats.pid" in a for a in pre), str(pre))
    pod_name = env_of(c).get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    check("NATS POD_NAME env from metadata.name", pod_name == "metadata.name", str(pod_name))
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    vct_names = {v["metadata"]["name"] for v in spec.get("volumeClaimTemplates", [])}
    check("NATS /data is mounted from a volumeClaimTemplate", mounts.get("/data") in vct_names, str(mounts))

    # The ConfigMap actually mounted by the StatefulSet.
    cm_name = None
    for v in pod_spec(sts).get("volumes", []):
        if v.get("name") == mounts.get("/etc/nats-config") and "configMap" in v:
            cm_name = v["configMap"]["name"]
    cm = one(docs, "ConfigMap", cm_name) if cm_name else None
    conf = (cm or {}).get("data", {}).get("nats.conf")
    if not check("NATS ConfigMap with nats.conf is mounted at /etc/nats-config", conf is not None,
                 f"configMap={cm_name}"):
        return
    args = c.get("args", []) + c.get("command", [])
    check("NATS runs with --config /etc/nats-config/nats.conf",
          "/etc/nats-config/nats.conf" in args, str(args))
    lines = active_lines(conf)
    check("NATS config: sync_interval: always", "sync_interval: always" in lines)
    check("NATS config: jetstream store_dir: /data", "store_dir: /data" in lines)
    check("NATS config: server_name: $POD_NAME", "server_name: $POD_NAME" in lines)
    check("NATS config: pid_file /var/run/nats/nats.pid",
          any(re.fullmatch(r'pid_file:\s*"?/var/run/nats/nats\.pid"?', l) for l in lines))
    check("NATS config: lame_duck_duration set", any(l.startswith("lame_duck_duration:") for l in lines))
    check("NATS config: http monitoring on 8222",
          "http_port: 8222" in lines or any(re.fullmatch(r"http:\s*\S*:?8222", l) for l in lines))
    routes = [f"nats://nats-{i}.nats-headless:6222" for i in range(3)]
    check("NATS config: routes to nats-{0,1,2}.nats-headless:6222", all(r in lines for r in routes))

    # Least privilege: the mounted accounts.conf is nats/accounts.conf itself.
    accounts = (cm or {}).get("data", {}).get("accounts.conf")
    shipped = (REPO / "nats/accounts.conf").read_text(encoding="utf-8")
    check("NATS ConfigMap accounts.conf is nats/accounts.conf", accounts == shipped)
    check("NATS config includes ./accounts.conf", "include ./accounts.conf" in lines)
    check("NATS config: jetstream max_file_store set",
          any(l.startswith("max_file_store:") for l in lines))
    env = env_of(c)
    secret_env = {name: e for name, e in env.items() if "secretKeyRef" in (e.get("valueFrom") or {})}
    check("NATS user passwords come from a Secret",
          {f"COFFER_NATS_{r}_PASSWORD" for r in ("SETUP", "WRITER", "READER")} <= set(secret_env),
          str(sorted(secret_env)))
    limit = (((c.get("resources") or {}).get("limits") or {}).get("memory"))
    gomem = env.get("GOMEMLIMIT", {}).get("value")
    check("NATS GOMEMLIMIT is a value below the memory limit",
          gomem is not None and limit is not None and size_bytes(gomem) < size_bytes(limit),
          f"GOMEMLIMIT={gomem} limit={limit}")
    store = env.get("JS_MAX_FILE_STORE", {}).get("value")
    claim = (spec.get("volumeClaimTemplates") or [{}])[0].get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
    check("NATS max_file_store below the JetStream volume",
          store is not None and claim is not None and size_bytes(store) < size_bytes(claim),
          f"max_file_store={store} volume={claim}")
    check("NATS fsGroupChangePolicy OnRootMismatch",
          (pod_spec(sts).get("securityContext") or {}).get("fsGroupChangePolicy") == "OnRootMismatch")

    nats_bin = nats_server_binary()
    if nats_bin:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in ((cm or {}).get("data") or {}).items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            p = Path(tmp) / "nats.conf"
            variables = {name: e["value"] for name, e in env.items() if "value" in e}
            variables.update({name: "checked-password" for name in secret_env})
            res = subprocess.run([nats_bin, "-t", "-c", str(p)], capture_output=True, text=True,
                                 env={**os.environ, **variables, "POD_NAME": "nats-0"}, check=False)
            check(f"NATS config accepted by `{nats_bin} -t`", res.returncode == 0,
                  (res.stdout + res.stderr).strip())
    else:
        print("  skip  `nats-server -t` on the NATS config (no nats-server binary found)")

    headless = one(docs, "Service", spec.get("serviceName"))
    check("NATS headless Service `nats-headless` (serviceName, clusterIP None, publishNotReadyAddresses)",
          headless is not None and spec.get("serviceName") == "nats-headless"
          and headless["spec"].get("clusterIP") == "None"
          and headless["spec"].get("publishNotReadyAddresses") is True)
    client = one(docs, "Service", "nats")
    check("NATS client Service `nats` on 4222",
          client is not None and any(p.get("port") == 4222 for p in client["spec"].get("ports", [])))


def size_bytes(text: str) -> float:
    """A Kubernetes quantity or NATS size (900MiB, 1Gi, 9G, 45G) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|[KMGT]B?)?", str(text).strip())
    if not match:
        return float("nan")
    number, unit = float(match.group(1)), (match.group(2) or "").rstrip("B")
    powers = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return number * powers.get(unit, float("nan"))


def check_roles(docs, prod: bool):
    """Least privilege in the manifests: each service runs as its NATS user with its own
    inbox prefix, `coffer setup` runs as a Job with the setup user, NetworkPolicies fence NATS."""
    for kind, name, cname, role in (("Deployment", "coffer-writer", "writer", "writer"),
                                    ("StatefulSet", "coffer-reader", "reader", "reader")):
        c = container(one(docs, kind, name), cname)
        env = env_of(c)
        check(f"{role} runs as NATS user {role}", env.get("COFFER_NATS_USER", {}).get("value") == role)
        check(f"{role} inbox prefix _INBOX_{role}",
              env.get("COFFER_NATS_INBOX_PREFIX", {}).get("value") == f"_INBOX_{role}")
        password = ((env.get("COFFER_NATS_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        check(f"{role} password from Secret coffer-nats-users",
              password.get("name") == "coffer-nats-users" and password.get("key") == f"{role}-password")
        volumes = {v["name"]: v for v in pod_spec(one(docs, kind, name)).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in (c or {}).get("volumeMounts", [])}
        projected = (volumes.get(mounts.get("/etc/coffer/nats")) or {}).get("projected")
        check(f"{role} mounts NATS TLS/creds Secrets as files at /etc/coffer/nats", projected is not None)
    job = one(docs, "Job", "coffer-setup")
    c = container(job, "setup") if job else None
    check("Job coffer-setup runs `coffer setup` as the setup user",
          c is not None and c.get("args") == ["setup"]
          and env_of(c).get("COFFER_NATS_USER", {}).get("value") == "setup")
    policy = one(docs, "NetworkPolicy", "nats")
    ingress = (policy or {}).get("spec", {}).get("ingress", [])
    ports = {p.get("port"): rule.get("from") for rule in ingress for p in rule.get("ports", [])}
    check("NetworkPolicy: NATS 4222 only from Coffer pods",
          ports.get(4222) == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "coffer"}}}],
          str(ports.get(4222)))
    check("NetworkPolicy: NATS 6222 only from NATS pods",
          ports.get(6222) == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}],
          str(ports.get(6222)))
    reader = one(docs, "StatefulSet", "coffer-reader")
    check("reader fsGroupChangePolicy OnRootMismatch",
          (pod_spec(reader).get("securityContext") or {}).get("fsGroupChangePolicy") == "OnRootMismatch")
    if prod:
        affinity = (pod_spec(one(docs, "StatefulSet", "nats")).get("affinity") or {}).get("podAntiAffinity") or {}
        check("prod: NATS pods never share a node (required anti-affinity)",
              bool(affinity.get("requiredDuringSchedulingIgnoredDuringExecution")), str(affinity))
        gw = find(docs, "Gateway")[0]
        listeners = gw["spec"].get("listeners", [])
        check("prod: the Gateway serves HTTPS only, with a certificate",
              listeners and all(l.get("protocol") == "HTTPS" and l.get("tls", {}).get("certificateRefs")
                                for l in listeners), str(listeners))


def check_pdb(docs, workload, what):
    labels = (workload or {}).get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    pdbs = [p for p in find(docs, "PodDisruptionBudget") if selects(p["spec"].get("selector"), labels)]
    check(f"PodDisruptionBudget selects the {what} pods", len(pdbs) == 1, f"{len(pdbs)} found")


def check_app_probes(c, what, readiness="/readyz"):
    check(f"{what} liveness probe on /healthz", probe_path(c, "livenessProbe") == "/healthz",
          str(probe_path(c, "livenessProbe")))
    check(f"{what} readiness probe on {readiness}", probe_path(c, "readinessProbe") == readiness,
          str(probe_path(c, "readinessProbe")))


def check_writer(docs):
    dep = one(docs, "Deployment", "coffer-writer")
    if not check("writer Deployment `coffer-writer` exists", dep is not None):
        return
    c = container(dep, "writer")
    if not check("writer container `writer` exists", c is not None):
        return
    check("writer runs `coffer writer`", c.get("args") == ["writer"], str(c.get("args")))
    env = env_of(c)
    check("writer logs JSON", env.get("COFFER_LOG_FORMAT", {}).get("value") == "json")
    check("writer COFFER_STREAM_REPLICAS=3", env.get("COFFER_STREAM_REPLICAS", {}).get("value") == "3",
          str(env.get("COFFER_STREAM_REPLICAS")))
    check("writer COFFER_NATS_URL=nats://nats:4222",
          env.get("COFFER_NATS_URL", {}).get("value") == "nats://nats:4222")
    check("writer COFFER_HTTP_ADDR=0.0.0.0:8080",
          env.get("COFFER_HTTP_ADDR", {}).get("value") == "0.0.0.0:8080")
    check_app_probes(c, "writer")
    check_pdb(docs, dep, "writer")
    tgps = pod_spec(dep).get("terminationGracePeriodSeconds")
    check("writer terminationGracePeriodSeconds >= 10 (contract: exit within 10 s)",
          isinstance(tgps, int) and tgps >= 10, str(tgps))
    svc = one(docs, "Service", "coffer-writer")
    check("Service `coffer-writer` on 8080",
          svc is not None and any(p.get("port") == 8080 for p in svc["spec"].get("ports", [])))


def check_reader(docs):
    sts = one(docs, "StatefulSet", "coffer-reader")
    if not check("reader StatefulSet `coffer-reader` exists", sts is not None):
        return
    c = container(sts, "reader")
    if not check("reader container `reader` exists", c is not None):
        return
    check("reader runs `coffer reader`", c.get("args") == ["reader"], str(c.get("args")))
    env = env_of(c)
    check("reader logs JSON", env.get("COFFER_LOG_FORMAT", {}).get("value") == "json")
    name_ref = env.get("COFFER_READER_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    check("reader COFFER_READER_NAME from metadata.name", name_ref == "metadata.name", str(name_ref))
    check("reader COFFER_STREAM_REPLICAS=3 (it may create the stream first)",
          env.get("COFFER_STREAM_REPLICAS", {}).get("value") == "3", str(env.get("COFFER_STREAM_REPLICAS")))
    data_dir = env.get("COFFER_DATA_DIR", {}).get("value")
    check("reader COFFER_DATA_DIR=/data", data_dir == "/data", str(data_dir))
    check("reader COFFER_HTTP_ADDR=0.0.0.0:8081",
          env.get("COFFER_HTTP_ADDR", {}).get("value") == "0.0.0.0:8081")
    vcts = {v["metadata"]["name"] for v in sts["spec"].get("volumeClaimTemplates", [])}
    check("reader has volumeClaimTemplates", bool(vcts))
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    check("reader COFFER_DATA_DIR is mounted from a volumeClaimTemplate",
          data_dir is not None and mounts.get(data_dir) in vcts, str(mounts))
    # Readers stay routable while NATS is down: their views are local.
    check_app_probes(c, "reader", readiness="/readyz?reads=1")
    check_pdb(docs, sts, "reader")
    headless = one(docs, "Service", sts["spec"].get("serviceName"))
    check("reader headless Service (StatefulSet serviceName, clusterIP None)",
          headless is not None and headless["spec"].get("clusterIP") == "None")
    svc = one(docs, "Service", "coffer-reader")
    check("Service `coffer-reader` on 8081",
          svc is not None and any(p.get("port") == 8081 for p in svc["spec"].get("ports", [])))


def check_security(docs):
    workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job")]
    check("at least 3 workloads (nats, writer, reader)", len(workloads) >= 3, str(len(workloads)))
    coffer_seen = 0
    for w in workloads:
        ps = pod_spec(w)
        psc = ps.get("securityContext") or {}
        for c in ps.get("containers", []) + ps.get("initContainers", []):
            sc = c.get("securityContext") or {}
            who = f"{w['kind']} {w['metadata']['name']} container {c.get('name')}"
            if "coffer" in str(c.get("image", "")):
                coffer_seen += 1
                check(f"{who}: image tag set by the overlay (not :latest)",
                      not str(c.get("image")).endswith(":latest"), c.get("image"))
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            check(f"{who}: runs as non-root (runAsNonRoot, numeric uid != 0)",
                  non_root and isinstance(uid, int) and uid != 0, f"runAsNonRoot={non_root} uid={uid}")
            check(f"{who}: readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True)
            check(f"{who}: allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False)
            check(f"{who}: capabilities drop ALL",
                  "ALL" in ((sc.get("capabilities") or {}).get("drop") or []))
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            check(f"{who}: seccompProfile RuntimeDefault", seccomp == "RuntimeDefault", str(seccomp))
    check("coffer containers found (writer, reader)", coffer_seen >= 2, str(coffer_seen))


def route_backend(rules, method, path):
    """The backend Gateway API precedence picks for METHOD PATH (Exact, then longest
    PathPrefix, then a method match), as (name, port), or None."""
    best = None
    for rule in rules:
        for m in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
            p = m.get("path") or {"type": "PathPrefix", "value": "/"}
            ptype, pval = p.get("type", "PathPrefix"), p.get("value", "/")
            if ptype == "Exact":
                if path != pval:
                    continue
                rank0 = 2
            elif ptype == "PathPrefix":
                prefix = pval.rstrip("/")
                if not (pval == "/" or path == prefix or path.startswith(prefix + "/")):
                    continue
                rank0 = 1
            else:
                continue
            if "method" in m and m["method"] != method:
                continue
            if m.get("headers") or m.get("queryParams"):
                continue
            rank = (rank0, len(pval), "method" in m)
            if best is None or rank > best[0]:
                refs = rule.get("backendRefs") or []
                best = (rank, [(r.get("name"), r.get("port")) for r in refs])
    return best[1] if best else None


def check_gateway(docs):
    gws = find(docs, "Gateway")
    routes = find(docs, "HTTPRoute")
    check("one Gateway and one HTTPRoute (the single HTTP entry point)", len(gws) == 1 and len(routes) == 1,
          f"{len(gws)} Gateway, {len(routes)} HTTPRoute")
    if len(gws) != 1 or len(routes) != 1:
        return
    gw, route = gws[0], routes[0]
    check("Gateway and HTTPRoute are gateway.networking.k8s.io/v1",
          gw["apiVersion"] == route["apiVersion"] == "gateway.networking.k8s.io/v1")
    parents = [p.get("name") for p in route["spec"].get("parentRefs", [])]
    check("HTTPRoute attaches to the Gateway", gw["metadata"]["name"] in parents, str(parents))
    rules = route["spec"].get("rules", [])
    writer = [("coffer-writer", 8080)]
    reader = [("coffer-reader", 8081)]
    for method, path, want in [
        ("POST", "/v1/accounts", writer),
        ("POST", "/v1/accounts/acc-1/deposits", writer),
        ("POST", "/v1/transfers", writer),
        ("GET", "/v1/events", writer),
        ("GET", "/v1/accounts/acc-1", reader),
        ("GET", "/v1/accounts/acc-1/transactions", reader),
        ("GET", "/v1/transfers/t-1", reader),
        ("GET", "/metrics", None),
        ("GET", "/readyz", None),
    ]:
        got = route_backend(rules, method, path)
        where = f"{want[0][0]}:{want[0][1]}" if want else "not routed (stays inside the cluster)"
        check(f"HTTPRoute: {method} {path} -> {where}", got == want, str(got))
    svcs = {s["metadata"]["name"]: {p.get("port") for p in s["spec"].get("ports", [])}
            for s in find(docs, "Service")}
    for rule in rules:
        for ref in rule.get("backendRefs") or []:
            check(f"HTTPRoute backend {ref.get('name')}:{ref.get('port')} is a Service port",
                  ref.get("port") in svcs.get(ref.get("name"), set()))


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        print(f"== {path}: {len(docs)} documents")
        check_nats(docs)
        check_pdb(docs, one(docs, "StatefulSet", "nats"), "NATS")
        nats_pdb = one(docs, "PodDisruptionBudget", "nats")
        check("NATS PDB maxUnavailable 1 (keeps a quorum of 2)",
              nats_pdb is not None and nats_pdb["spec"].get("maxUnavailable") == 1)
        check_writer(docs)
        check_reader(docs)
        check_security(docs)
        check_gateway(docs)
        check_roles(docs, prod="prod" in Path(path).name)
    print(f"{PASSED} passed, {FAILED} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
