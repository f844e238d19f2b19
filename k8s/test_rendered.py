#!/usr/bin/env python3
"""Checks on the rendered Kubernetes manifests (output of `kubectl kustomize`).

    python3 k8s/test_rendered.py RENDERED.yaml [RENDERED.yaml ...]

Asserts, for every file, what the deployment relies on: NATS fsyncs every write
(sync_interval: always), runs 3 servers with probes, lame duck and a PDB; writers
create R3 streams; the reader keeps its view on its own volume under a durable
named after its pod; every workload has probes and a PDB and runs non-root with a
read-only root filesystem; the HTTPRoutes send queries to the reader and, only where the
overlay includes k8s/components/public-writes (dev), commands and GET /v1/events to the
writer (prod routes nothing to it); writer and reader read their bearer tokens from the
required Secret coffer-http-tokens; NetworkPolicies name every source (client pods, gateway
and monitoring namespaces) and limit the services' egress. Prints each check, ends with "N passed, N failed", and
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
    for expression in (selector or {}).get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if not {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
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
    check("NATS config: routes from COFFER_NATS_ROUTE_{0,1,2}",
          all(f"$COFFER_NATS_ROUTE_{i}" in lines for i in range(3)))
    check("NATS config: the cluster port requires the route user and password",
          re.search(r"cluster\s*\{[^}]*authorization\s*\{\s*user:\s*coffer-route\s+"
                    r"password:\s*\$COFFER_NATS_ROUTE_PASSWORD\s*\}", conf) is not None)

    # Least privilege: the mounted accounts.conf is nats/accounts.conf itself.
    accounts = (cm or {}).get("data", {}).get("accounts.conf")
    shipped = (REPO / "nats/accounts.conf").read_text(encoding="utf-8")
    check("NATS ConfigMap accounts.conf is nats/accounts.conf", accounts == shipped)
    check("NATS config includes ./accounts.conf", "include ./accounts.conf" in lines)
    check("NATS config: jetstream max_file_store set",
          any(l.startswith("max_file_store:") for l in lines))
    env = env_of(c)
    secret_env = {name: e for name, e in env.items() if "secretKeyRef" in (e.get("valueFrom") or {})}
    route_password = ((env.get("COFFER_NATS_ROUTE_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    check("NATS route password from Secret coffer-nats-users (route-password)",
          route_password.get("name") == "coffer-nats-users" and route_password.get("key") == "route-password")
    names = list(env)
    for i in range(3):
        url = env.get(f"COFFER_NATS_ROUTE_{i}", {}).get("value")
        check(f"route {i}: nats-{i}.nats-headless:6222 as coffer-route with the route password",
              url == f"nats://coffer-route:$(COFFER_NATS_ROUTE_PASSWORD)@nats-{i}.nats-headless:6222"
              and names.index("COFFER_NATS_ROUTE_PASSWORD") < names.index(f"COFFER_NATS_ROUTE_{i}"),
              str(url))
    # The servers hold bcrypt hashes of the users' passwords, never the passwords.
    for r, key in (("SETUP", "setup"), ("WRITER", "writer"), ("READER_0", "coffer-reader-0"),
                   ("READER_1", "coffer-reader-1"), ("READER_2", "coffer-reader-2")):
        ref = ((env.get(f"COFFER_NATS_{r}_PASSWORD_BCRYPT") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        value = (env.get(f"COFFER_NATS_{r}_PASSWORD") or {}).get("value")
        check(f"NATS {key}: a bcrypt hash from the Secret (key {key}-password-bcrypt), quoted",
              ref.get("name") == "coffer-nats-users" and ref.get("key") == f"{key}-password-bcrypt"
              and value == f'"$(COFFER_NATS_{r}_PASSWORD_BCRYPT)"'
              and names.index(f"COFFER_NATS_{r}_PASSWORD_BCRYPT") < names.index(f"COFFER_NATS_{r}_PASSWORD"),
              f"{ref} {value}")
    check("NATS pods get no user's plain password",
          not any(((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("key", "").endswith("-password")
                  and name != "COFFER_NATS_ROUTE_PASSWORD" for name, e in env.items()),
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
            # The certificate paths point at a CA and a servers' certificate made here, with the
            # names and usages the Certificate asks cert-manager for: nats-server -t loads them.
            tls_dir = Path(tmp) / "tls"
            made_certificates = make_test_certificates(tls_dir)
            for name, text in ((cm or {}).get("data") or {}).items():
                if made_certificates:
                    text = text.replace("/etc/nats-tls/", f"{tls_dir}/")
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            p = Path(tmp) / "nats.conf"
            # A real hash for the hashed ones: a bare one would be a variable reference to
            # nats-server, so this checks the quoting too.
            sample_hash = "$2b$11$iAgdSTfANdztFI7ytM.SleAEKEO74HO1OqIkaMDJ5DTyNxudiGd06"
            variables = {name: sample_hash if name.endswith("_BCRYPT") else "checked-password"
                         for name in secret_env}
            # Kubernetes expands $(NAME) of variables defined before it.
            for name, e in env.items():
                if "value" in e:
                    variables[name] = re.sub(r"\$\((\w+)\)",
                                             lambda m: variables.get(m.group(1), m.group(0)), e["value"])
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


def make_test_certificates(directory: Path) -> bool:
    """A CA, and a certificate from it for the names and usages of coffer-nats-server, as
    ca.crt, tls.crt and tls.key in `directory` (what cert-manager puts in the Secret)."""
    openssl = shutil.which("openssl")
    if not openssl:
        print("  skip  test certificates for `nats-server -t` (no openssl found)")
        return False
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    extensions = directory / "extensions"
    extensions.write_text("subjectAltName=DNS:nats,DNS:*.nats-headless\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n", encoding="utf-8")
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
         "-subj", "/CN=coffer-nats-ca"],
        [openssl, "req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=nats"],
        [openssl, "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "tls.crt", "-days", "1", "-extfile", str(extensions)],
    ]
    for step in steps:
        done = subprocess.run(step, cwd=directory, capture_output=True, text=True, check=False)
        if not check(f"test certificate: {' '.join(step[1:3])}", done.returncode == 0,
                     done.stderr.strip()):
            return False
    return True


def check_nats_tls(docs):
    """Clients and routes over TLS only, with certificates from the namespace's CA."""
    certificates = {c["metadata"]["name"]: c["spec"] for c in find(docs, "Certificate")}
    issuers = {i["metadata"]["name"]: i["spec"] for i in find(docs, "Issuer")}
    ca = certificates.get("coffer-nats-ca") or {}
    root = issuers.get((ca.get("issuerRef") or {}).get("name")) or {}
    check("NATS CA: a CA certificate, self-signed, in Secret coffer-nats-ca",
          ca.get("isCA") is True and "selfSigned" in root and ca.get("secretName") == "coffer-nats-ca",
          str(ca))
    ca_issuer = issuers.get("coffer-nats-ca") or {}
    check("NATS CA issuer signs from Secret coffer-nats-ca",
          (ca_issuer.get("ca") or {}).get("secretName") == "coffer-nats-ca", str(ca_issuer))
    server = certificates.get("coffer-nats-server") or {}
    client = certificates.get("coffer-nats-client") or {}
    for name, cert in (("coffer-nats-server", server), ("coffer-nats-client", client)):
        check(f"{name}: issued by the CA issuer, renewed before it ends",
              (cert.get("issuerRef") or {}).get("name") == "coffer-nats-ca"
              and (cert.get("issuerRef") or {}).get("kind", "Issuer") == "Issuer"
              and bool(cert.get("renewBefore")), str(cert))

    def covers(names, host):
        return any(n == host or (n.startswith("*.") and host.split(".", 1)[-1] == n[2:]
                                 and "." in host) for n in names)

    sts = one(docs, "StatefulSet", "nats")
    nats_env = env_of(container(sts, "nats"))
    route_hosts = [re.sub(r"^.*@|:\d+$", "", (nats_env.get(f"COFFER_NATS_ROUTE_{i}") or {}).get("value", ""))
                   for i in range(3)]
    client_hosts = set()
    clients = [("writer", one(docs, "Deployment", "coffer-writer"), "writer"),
               ("reader", one(docs, "StatefulSet", "coffer-reader"), "reader"),
               ("setup", one(docs, "Job", "coffer-setup"), "setup")]
    for what, workload, cname in clients:
        url = (env_of(container(workload, cname)).get("COFFER_NATS_URL") or {}).get("value", "")
        client_hosts.add(re.sub(r"^\w+://|:\d+$", "", url))
    names = server.get("dnsNames") or []
    check("coffer-nats-server names every route host and the clients' NATS host",
          all(covers(names, h) for h in route_hosts + sorted(client_hosts)) and all(route_hosts),
          f"dnsNames={names} routes={route_hosts} clients={sorted(client_hosts)}")
    check("coffer-nats-server serves and authenticates (routes check both ends)",
          {"server auth", "client auth"} <= set(server.get("usages") or []), str(server.get("usages")))
    check("coffer-nats-client is a client certificate in Secret coffer-nats-tls",
          "client auth" in (client.get("usages") or []) and client.get("secretName") == "coffer-nats-tls",
          str(client))

    # The servers: their certificate mounted where nats.conf reads it, TLS required on both ports.
    volumes = {v["name"]: v for v in pod_spec(sts).get("volumes", [])}
    c = container(sts, "nats") or {}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    tls_volume = (volumes.get(mounts.get("/etc/nats-tls")) or {}).get("secret") or {}
    check("NATS mounts Secret coffer-nats-server-tls (required) at /etc/nats-tls",
          tls_volume.get("secretName") == server.get("secretName") == "coffer-nats-server-tls"
          and tls_volume.get("optional") is False, str(tls_volume))
    cm_name = next((v["configMap"]["name"] for v in volumes.values() if "configMap" in v), None)
    conf = ((one(docs, "ConfigMap", cm_name) or {}).get("data") or {}).get("nats.conf", "")
    conf = "\n".join(active_lines(conf))
    tls_block = (r"tls\s*\{\s*cert_file:\s*/etc/nats-tls/tls\.crt\s+key_file:\s*/etc/nats-tls/tls\.key\s+"
                 r"ca_file:\s*/etc/nats-tls/ca\.crt\s+verify:\s*true\b")
    outside = re.sub(r"cluster\s*\{(?:[^{}]|\{[^{}]*\})*\}", "", conf)
    cluster = re.search(r"cluster\s*\{(?:[^{}]|\{[^{}]*\})*\}", conf)
    check("NATS config: clients over TLS with a verified client certificate",
          re.search(tls_block, outside) is not None)
    check("NATS config: routes over TLS, both ends verified",
          cluster is not None and re.search(tls_block, cluster.group(0)) is not None)
    check("NATS config: clients are not told the pods' addresses (the certificate names the Service)",
          cluster is not None and re.search(r"no_advertise:\s*true", cluster.group(0)) is not None)
    reloader = container(sts, "tls-reloader") or {}
    script = " ".join(reloader.get("args") or [])
    reloader_mounts = {m["mountPath"]: m["name"] for m in reloader.get("volumeMounts", [])}
    check("NATS tls-reloader: sees the server's process and reloads it when the certificate changes",
          pod_spec(sts).get("shareProcessNamespace") is True
          and "reload=/var/run/nats/nats.pid" in script and "/etc/nats-tls/tls.crt" in script
          and reloader_mounts.get("/etc/nats-tls") == mounts.get("/etc/nats-tls")
          and reloader_mounts.get("/var/run/nats") == mounts.get("/var/run/nats")
          and reloader.get("image") == c.get("image"), str(reloader)[:300])

    # Every client: TLS required, with the client certificate cert-manager keeps in coffer-nats-tls.
    for what, workload, cname in clients:
        cc = container(workload, cname) or {}
        env = env_of(cc)
        files = {k: (env.get(f"COFFER_NATS_TLS_{k}") or {}).get("value") for k in ("CA", "CERT", "KEY")}
        mount_of = {m["mountPath"]: m["name"] for m in cc.get("volumeMounts", [])}
        wanted = {"CA": "ca.crt", "CERT": "tls.crt", "KEY": "tls.key"}
        ok = True
        for key, path in files.items():
            if not path or Path(path).name != wanted[key]:
                ok = False
                continue
            volume = next((v for v in pod_spec(workload).get("volumes", [])
                           if v["name"] == mount_of.get(str(Path(path).parent))), {})
            sources = [volume.get("secret") or {}] + [
                src.get("secret") or {} for src in (volume.get("projected") or {}).get("sources", [])]
            ok = ok and any((src.get("secretName") or src.get("name")) == "coffer-nats-tls"
                            and src.get("optional") is False for src in sources)
        check(f"{what}: NATS over TLS with the client certificate from Secret coffer-nats-tls (required)",
              ok, str(files))


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
        volumes = {v["name"]: v for v in pod_spec(one(docs, kind, name)).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in (c or {}).get("volumeMounts", [])}
        if role == "writer":
            check("writer runs as NATS user writer", env.get("COFFER_NATS_USER", {}).get("value") == "writer")
            check("writer inbox prefix _INBOX_writer",
                  env.get("COFFER_NATS_INBOX_PREFIX", {}).get("value") == "_INBOX_writer")
            password = ((env.get("COFFER_NATS_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            check("writer password from Secret coffer-nats-users",
                  password.get("name") == "coffer-nats-users" and password.get("key") == "writer-password")
        else:
            # One NATS user per reader replica, named like the pod (COFFER_READER_NAME).
            check("each reader runs as its own NATS user (its pod name)",
                  env.get("COFFER_NATS_USER", {}).get("value") == "$(COFFER_READER_NAME)")
            check("each reader has its own inbox prefix",
                  env.get("COFFER_NATS_INBOX_PREFIX", {}).get("value") == "_INBOX_$(COFFER_READER_NAME)")
            check("each reader reads its own password file, copied for it",
                  env.get("COFFER_NATS_PASSWORD_FILE", {}).get("value") == "/etc/coffer/nats-user/password")
            names = list(env)
            check("COFFER_READER_NAME is defined before the variables that expand it",
                  "COFFER_READER_NAME" in names and "COFFER_NATS_USER" in names
                  and names.index("COFFER_READER_NAME") < names.index("COFFER_NATS_USER"))
            own = volumes.get(mounts.get("/etc/coffer/nats-user")) or {}
            check("the reader's password volume is memory-backed (an emptyDir, medium Memory)",
                  (own.get("emptyDir") or {}).get("medium") == "Memory", str(own))
            mounted_secrets = [(volumes.get(name) or {}).get("secret", {}).get("secretName")
                               for name in mounts.values()]
            check("the reader container mounts no Secret of NATS passwords",
                  "coffer-nats-users" not in mounted_secrets, str(mounted_secrets))
            inits = pod_spec(one(docs, kind, name)).get("initContainers", [])
            init = next((i for i in inits if i.get("name") == "own-nats-password"), {})
            init_mounts = {m["name"]: m for m in init.get("volumeMounts", [])}
            script = " ".join(init.get("command", []))
            pod_name = (((env_of(init).get("POD_NAME") or {}).get("valueFrom") or {})
                        .get("fieldRef") or {}).get("fieldPath")
            check("init container own-nats-password copies only the pod's own password "
                  "(POD_NAME from metadata.name) into the reader's volume",
                  '"/all/${POD_NAME}-password"' in script and "/own/password" in script
                  and pod_name == "metadata.name"
                  and init_mounts.get("nats-users", {}).get("readOnly") is True
                  and init_mounts.get("nats-users", {}).get("mountPath") == "/all"
                  and init_mounts.get(own and mounts.get("/etc/coffer/nats-user"), {}).get("mountPath") == "/own",
                  f"{script} {pod_name} {init_mounts}")
            secret = (volumes.get("nats-users") or {}).get("secret") or {}
            keys = [item.get("key") for item in secret.get("items", [])]
            check("the init container gets only the readers' NATS passwords",
                  secret.get("secretName") == "coffer-nats-users" and keys
                  and all(key.startswith("coffer-reader-") for key in keys), str(keys))
            replicas = one(docs, kind, name).get("spec", {}).get("replicas", 1)
            users = re.findall(r"user: (coffer-reader-\d+)", (REPO / "nats/accounts.conf").read_text())
            check(f"a NATS user and a mounted password for each of the {replicas} reader replicas",
                  all(f"coffer-reader-{n}" in users and f"coffer-reader-{n}-password" in keys
                      for n in range(replicas)), f"{users} {keys}")
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


def check_gateway(docs, public_writes: bool):
    """Queries are public through HTTPRoute `coffer`; commands and the event feed only through
    HTTPRoute `coffer-writes` (k8s/components/public-writes), which only dev includes."""
    gws = find(docs, "Gateway")
    routes = find(docs, "HTTPRoute")
    names = sorted(r["metadata"]["name"] for r in routes)
    want_names = ["coffer", "coffer-writes"] if public_writes else ["coffer"]
    check("one Gateway (the single HTTP entry point)", len(gws) == 1, f"{len(gws)} Gateway")
    check(f"HTTPRoutes are exactly {want_names}"
          + (" (public-writes component)" if public_writes else " (writes not public)"),
          names == want_names, str(names))
    if len(gws) != 1 or not routes:
        return
    gw = gws[0]
    for route in routes:
        name = route["metadata"]["name"]
        check(f"HTTPRoute {name} is gateway.networking.k8s.io/v1",
              gw["apiVersion"] == route["apiVersion"] == "gateway.networking.k8s.io/v1")
        parents = [p.get("name") for p in route["spec"].get("parentRefs", [])]
        check(f"HTTPRoute {name} attaches to the Gateway", gw["metadata"]["name"] in parents, str(parents))

    def backends(route):
        return [(ref.get("name"), ref.get("port")) for rule in route["spec"].get("rules", [])
                for ref in rule.get("backendRefs") or []]

    reads = one(docs, "HTTPRoute", "coffer")
    check("HTTPRoute coffer (the queries) sends nothing to coffer-writer",
          reads is not None and all(name != "coffer-writer" for name, _ in backends(reads)),
          str(backends(reads) if reads else None))
    if not public_writes:
        to_writer = [r["metadata"]["name"] for r in routes
                     if any(name == "coffer-writer" for name, _ in backends(r))]
        check("prod: no HTTPRoute has a backendRef to coffer-writer", not to_writer, str(to_writer))
    # Gateway API matching precedence holds across all the rules of the routes on a listener.
    rules = [rule for route in routes for rule in route["spec"].get("rules", [])]
    writer = [("coffer-writer", 8080)]
    reader = [("coffer-reader", 8081)]
    commands = writer if public_writes else None
    for method, path, want in [
        ("POST", "/v1/accounts", commands),
        ("POST", "/v1/accounts/acc-1/deposits", commands),
        ("POST", "/v1/transfers", commands),
        # Without the component, a reader answers it (404: it does not serve the feed).
        ("GET", "/v1/events", writer if public_writes else reader),
        ("GET", "/v1/accounts/acc-1", reader),
        ("GET", "/v1/accounts/acc-1/transactions", reader),
        ("GET", "/v1/transfers/t-1", reader),
        ("GET", "/metrics", None),
        ("GET", "/readyz", None),
    ]:
        got = route_backend(rules, method, path)
        where = f"{want[0][0]}:{want[0][1]}" if want else "not routed (stays inside the cluster)"
        check(f"HTTPRoutes: {method} {path} -> {where}", got == want, str(got))
    svcs = {s["metadata"]["name"]: {p.get("port") for p in s["spec"].get("ports", [])}
            for s in find(docs, "Service")}
    for rule in rules:
        for ref in rule.get("backendRefs") or []:
            check(f"HTTPRoute backend {ref.get('name')}:{ref.get('port')} is a Service port",
                  ref.get("port") in svcs.get(ref.get("name"), set()))


TOKEN_SECRET = "coffer-http-tokens"


def secret_file(workload, c, path):
    """The (Secret or ConfigMap name, key, optional, readOnly) behind the file PATH in container C:
    the volume mounted at a directory above PATH, a `secret`, `configMap` or a `projected`
    volume's secret source. None when nothing backs the file."""
    if not path:
        return None
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for m in (c or {}).get("volumeMounts", []):
        root = m.get("mountPath", "").rstrip("/") + "/"
        if not path.startswith(root) or m.get("subPath"):
            continue
        rel = path[len(root):]
        v = volumes.get(m.get("name")) or {}
        sources = []
        if "secret" in v:
            s = v["secret"]
            sources.append((s.get("secretName"), s.get("items"), s.get("optional")))
        for src in (v.get("projected") or {}).get("sources", []):
            if "secret" in src:
                s = src["secret"]
                sources.append((s.get("name"), s.get("items"), s.get("optional")))
        if "configMap" in v:
            s = v["configMap"]
            sources.append((s.get("name"), s.get("items"), s.get("optional")))
        for name, items, optional in sources:
            keys = {i.get("path"): i.get("key") for i in items} if items else None
            key = keys.get(rel) if keys is not None else rel
            if key:
                return name, key, optional, m.get("readOnly") is True
    return None


def check_http_tokens(docs, prod: bool):
    """Closed by default: every container serving an HTTP API reads its bearer token from the
    required Secret coffer-http-tokens, mounted read-only as a file."""
    for kind, name, cname, role in (("Deployment", "coffer-writer", "writer", "writer"),
                                    ("StatefulSet", "coffer-reader", "reader", "reader")):
        workload = one(docs, kind, name)
        c = container(workload, cname)
        env = env_of(c)
        path = env.get("COFFER_HTTP_TOKEN_FILE", {}).get("value")
        check(f"{role} has COFFER_HTTP_TOKEN_FILE", bool(path), str(path))
        check(f"{role} has no COFFER_HTTP_TOKEN variable (the token stays in the Secret's file)",
              "COFFER_HTTP_TOKEN" not in env)
        found = secret_file(workload, c, path)
        check(f"{role} token file is key {role}-token of Secret {TOKEN_SECRET}",
              found is not None and found[:2] == (TOKEN_SECRET, f"{role}-token"), str(found))
        check(f"{role} token Secret is required (optional not true: no Secret, no pod)",
              found is not None and found[2] is not True, str(found))
        check(f"{role} token volume mounted read-only", found is not None and found[3], str(found))
    serving = [(f"{w['metadata']['name']}/{c.get('name')}", env_of(c))
               for w in docs if w.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job")
               for c in pod_spec(w).get("containers", []) if "COFFER_HTTP_ADDR" in env_of(c)]
    unguarded = [who for who, env in serving if "COFFER_HTTP_TOKEN_FILE" not in env]
    check("every container with COFFER_HTTP_ADDR has COFFER_HTTP_TOKEN_FILE",
          len(serving) >= 2 and not unguarded,
          f"serving={[who for who, _ in serving]} unguarded={unguarded}")
    secret = one(docs, "Secret", TOKEN_SECRET)
    if prod:
        check(f"prod: Secret {TOKEN_SECRET} is not shipped (the operator creates it)", secret is None)
    else:
        data = (secret or {}).get("data") or {}
        check(f"dev: Secret {TOKEN_SECRET} generated with writer-token and reader-token",
              all(data.get(k) for k in ("writer-token", "reader-token")), str(sorted(data)))


NATS_USERS = ["setup", "writer", "coffer-reader-0", "coffer-reader-1", "coffer-reader-2"]


def committed_text() -> str:
    """Every file of k8s/ that git tracks, to tell a generated credential from a committed one."""
    root = Path(__file__).resolve().parent
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "."], capture_output=True,
                            check=True).stdout.decode().split("\0")
    return "\n".join((root / name).read_text(errors="replace")
                     for name in listed if name and (root / name).is_file())


def check_dev_credentials(docs):
    """dev: the NATS passwords, their bcrypt hashes and the HTTP tokens are made on the machine
    (k8s/overlays/dev/make-secrets.py), none committed, each hash the password's."""
    import base64

    import bcrypt

    committed = committed_text()
    users = ((one(docs, "Secret", "coffer-nats-users") or {}).get("data")) or {}
    tokens = ((one(docs, "Secret", TOKEN_SECRET) or {}).get("data")) or {}
    plain = lambda data, key: base64.b64decode(data.get(key, "")).decode()
    values = [plain(users, f"{user}-password") for user in NATS_USERS]
    values += [plain(users, "route-password")]
    values += [plain(tokens, key) for key in ("writer-token", "reader-token")]
    check("dev: every NATS password, the route password and both tokens are random (>= 48 hex)",
          all(len(v) >= 48 and all(c in "0123456789abcdef" for c in v) for v in values))
    check("dev: no credential of the Secrets is in a committed file",
          all(v and v not in committed for v in values))
    for user in NATS_USERS:
        hashed = plain(users, f"{user}-password-bcrypt").encode()
        check(f"dev: {user}-password-bcrypt is a bcrypt hash (cost >= 11) of {user}-password",
              hashed.startswith(b"$2") and int(hashed.split(b"$")[2] or 0) >= 11
              and bcrypt.checkpw(plain(users, f"{user}-password").encode(), hashed))


SIGNING_SECRET = "coffer-signing-key"
TRUSTED_CONFIGMAP = "coffer-trusted-keys"


def check_signing_keys(docs, prod: bool):
    """A NATS credential alone cannot forge the ledger: writers sign with a key from the required
    Secret coffer-signing-key, writers and readers check signatures against the required
    ConfigMap coffer-trusted-keys, and readers hold no signing key."""
    for kind, name, cname, signs in (("Deployment", "coffer-writer", "writer", True),
                                     ("StatefulSet", "coffer-reader", "reader", False)):
        workload = one(docs, kind, name)
        c = container(workload, cname)
        env = env_of(c)
        trusted = secret_file(workload, c, env.get("COFFER_TRUSTED_KEYS_FILE", {}).get("value"))
        check(f"{cname} checks signatures: COFFER_TRUSTED_KEYS_FILE is key trusted.keys of the "
              f"required ConfigMap {TRUSTED_CONFIGMAP}, read-only",
              trusted is not None and trusted[:2] == (TRUSTED_CONFIGMAP, "trusted.keys")
              and trusted[2] is not True and trusted[3], str(trusted))
        signing = secret_file(workload, c, env.get("COFFER_SIGNING_KEY_FILE", {}).get("value"))
        if signs:
            check(f"writer signs: COFFER_SIGNING_KEY_FILE is key signing.key of the required Secret "
                  f"{SIGNING_SECRET}, read-only",
                  signing is not None and signing[:2] == (SIGNING_SECRET, "signing.key")
                  and signing[2] is not True and signing[3], str(signing))
        else:
            mounted = {v.get("secret", {}).get("secretName") for v in pod_spec(workload).get("volumes", [])}
            check(f"{cname} holds no signing key", "COFFER_SIGNING_KEY_FILE" not in env
                  and SIGNING_SECRET not in mounted, str(mounted))
    secret = one(docs, "Secret", SIGNING_SECRET)
    config = one(docs, "ConfigMap", TRUSTED_CONFIGMAP)
    if prod:
        check(f"prod: Secret {SIGNING_SECRET} and ConfigMap {TRUSTED_CONFIGMAP} are not shipped "
              "(the operator creates them)", secret is None and config is None)
    else:
        check(f"dev: Secret {SIGNING_SECRET} and ConfigMap {TRUSTED_CONFIGMAP} generated",
              bool(((secret or {}).get("data") or {}).get("signing.key"))
              and "trusted.keys" in ((config or {}).get("data") or {}))


def peer_key(peer) -> str:
    return yaml.safe_dump(peer, sort_keys=True)


def named_peer(peer) -> bool:
    """A peer that names its sources: an ipBlock, or a selector with labels or expressions
    (`podSelector: {}` or `namespaceSelector: {}` alone would be every pod / namespace)."""
    if "ipBlock" in peer:
        return True
    sels = [peer.get(k) for k in ("podSelector", "namespaceSelector") if k in peer]
    return bool(sels) and any((s or {}).get("matchLabels") or (s or {}).get("matchExpressions")
                              for s in sels)


CLIENT = {"podSelector": {"matchLabels": {"coffer.io/client": "true"}}}
GATEWAY = {"namespaceSelector": {"matchLabels": {"coffer.io/gateway": "true"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"coffer.io/monitoring": "true"}}}
EGRESS = [
    {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}],
     "ports": [{"port": 4222, "protocol": "TCP"}]},
    {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
    {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"coffer.io/otlp-collector": "true"}}}],
     "ports": [{"port": 4318, "protocol": "TCP"}]},
]


NATS_MONITOR = {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}],
                "ports": [{"port": 8222, "protocol": "TCP"}]}


def check_network_policies(docs, public_writes: bool, monitoring: bool = False):
    """Every ingress rule names its sources; the HTTP ports admit only the named clients; writers
    and readers send only to NATS, DNS and a labelled OTLP collector (and, with k8s/monitoring,
    writers to the NATS servers' monitoring port, which admits only them)."""
    policies = find(docs, "NetworkPolicy")
    for policy in policies:
        name = policy["metadata"]["name"]
        rules = policy["spec"].get("ingress") or []
        open_rules = [r for r in rules if not r.get("from") or not all(named_peer(p) for p in r["from"])]
        check(f"NetworkPolicy {name}: every ingress rule names its sources (no absent/empty from)",
              not open_rules, str(open_rules))
    for name, port, allowed in (
            ("coffer-writer", 8080, [CLIENT, MONITORING] + ([GATEWAY] if public_writes else [])),
            ("coffer-reader", 8081, [CLIENT, GATEWAY, MONITORING])):
        policy = one(docs, "NetworkPolicy", name)
        spec = (policy or {}).get("spec", {})
        pod = (spec.get("podSelector") or {}).get("matchLabels") or {}
        check(f"NetworkPolicy {name} selects the {name} pods, Ingress and Egress",
              pod == {"app.kubernetes.io/name": name}
              and {"Ingress", "Egress"} <= set(spec.get("policyTypes") or []), str(spec.get("policyTypes")))
        ingress = spec.get("ingress") or []
        peers = {peer_key(p) for r in ingress for p in r.get("from") or []}
        want = {peer_key(p) for p in allowed}
        labels = ", ".join(sorted(k for p in allowed for sel in p.values() for k in sel["matchLabels"]))
        check(f"NetworkPolicy {name}: ingress from exactly {labels}", peers == want,
              "\n" + "".join(sorted(peers)))
        ports = [p for r in ingress for p in r.get("ports") or [{}]]
        check(f"NetworkPolicy {name}: ingress on TCP {port} only",
              bool(ports) and all(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports),
              str(ports))
        egress = spec.get("egress")
        wanted = EGRESS + ([NATS_MONITOR] if monitoring and name == "coffer-writer" else [])
        check(f"NetworkPolicy {name}: egress only to NATS 4222, DNS 53, OTLP collector pods 4318"
              + (", NATS monitoring 8222" if len(wanted) > len(EGRESS) else ""),
              egress is not None and sorted(map(peer_key, egress)) == sorted(map(peer_key, wanted)),
              str(egress))
    nats = (one(docs, "NetworkPolicy", "nats") or {}).get("spec", {})
    monitor_rules = [r for r in nats.get("ingress") or []
                     if any(p.get("port") == 8222 for p in r.get("ports") or [])]
    writer_only = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "coffer-writer"}}}]
    check("NetworkPolicy nats: monitoring port 8222 " + ("only from the writers" if monitoring else "closed"),
          [r.get("from") for r in monitor_rules] == ([writer_only] if monitoring else []),
          str(monitor_rules))


def check_monitoring(docs):
    """k8s/monitoring: the PodMonitor scrapes the writer and reader pods on a port they declare,
    the rules and the dashboard ConfigMap are there, and the writers read every NATS server."""
    monitor = one(docs, "PodMonitor", "coffer")
    spec = (monitor or {}).get("spec", {})
    for name, kind in (("coffer-writer", "Deployment"), ("coffer-reader", "StatefulSet")):
        workload = one(docs, kind, name)
        labels = workload["spec"]["template"]["metadata"]["labels"] if workload else {}
        check(f"PodMonitor coffer selects the {name} pods", selects(spec.get("selector") or {}, labels))
        c = container(workload, name.removeprefix("coffer-")) or {}
        ports = {p.get("name") for p in c.get("ports") or []}
        endpoints = spec.get("podMetricsEndpoints") or []
        check(f"PodMonitor coffer scrapes /metrics on a port {name} declares",
              bool(endpoints) and all(e.get("port") in ports and e.get("path") == "/metrics" for e in endpoints),
              f"{endpoints} against {ports}")
    rules = one(docs, "PrometheusRule", "coffer")
    alerts = [r for g in (rules or {}).get("spec", {}).get("groups", []) for r in g.get("rules", [])]
    check("PrometheusRule coffer: alerts, each with a severity and a runbook",
          bool(alerts) and all(r.get("labels", {}).get("severity") in ("warning", "critical")
                               and r.get("annotations", {}).get("runbook_url") for r in alerts))
    dashboard = one(docs, "ConfigMap", "coffer-dashboard")
    check("ConfigMap coffer-dashboard for Grafana's sidecar (label grafana_dashboard)",
          dashboard is not None and dashboard["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
          and "coffer-dashboard.json" in dashboard.get("data", {}))
    writer = one(docs, "Deployment", "coffer-writer")
    urls = env_of(container(writer, "writer")).get("COFFER_NATS_MONITOR_URLS", {}).get("value", "")
    replicas = (one(docs, "StatefulSet", "nats") or {}).get("spec", {}).get("replicas", 0)
    check("writers read every NATS server's /varz (COFFER_NATS_MONITOR_URLS)",
          sorted(urls.split(",")) == [f"http://nats-{i}.nats-headless:8222" for i in range(replicas)], urls)


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        print(f"== {path}: {len(docs)} documents")
        check_nats(docs)
        check_nats_tls(docs)
        check_pdb(docs, one(docs, "StatefulSet", "nats"), "NATS")
        nats_pdb = one(docs, "PodDisruptionBudget", "nats")
        check("NATS PDB maxUnavailable 1 (keeps a quorum of 2)",
              nats_pdb is not None and nats_pdb["spec"].get("maxUnavailable") == 1)
        check_writer(docs)
        check_reader(docs)
        check_security(docs)
        prod = "prod" in Path(path).name
        # Only dev lists k8s/components/public-writes: commands through the Gateway.
        check_gateway(docs, public_writes=not prod)
        check_http_tokens(docs, prod=prod)
        if not prod:
            check_dev_credentials(docs)
        check_signing_keys(docs, prod=prod)
        monitoring = "monitoring" in Path(path).name
        check_network_policies(docs, public_writes=not prod, monitoring=monitoring)
        if monitoring:
            check_monitoring(docs)
        check_roles(docs, prod=prod)
    print(f"{PASSED} passed, {FAILED} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
