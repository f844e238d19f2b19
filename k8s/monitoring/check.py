#!/usr/bin/env python3
"""Checks the monitoring kit in k8s/monitoring against promtool and against real services.

    python3 k8s/monitoring/check.py path/to/coffer        (`just monitoring-check`)

1. coffer-dashboard.json is what dashboard.py renders (regenerate it, do not edit it).
2. `promtool check rules` on the PrometheusRule's groups, and every dashboard query parses as
   PromQL (written as recording rules, Grafana's variables replaced).
3. `promtool test rules` runs rules.test.yaml: each alert fires, and stays quiet when it should.
4. Each alert's runbook_url points at a heading of docs/operations.md.
5. A real nats-server (with its monitoring port), writer and reader are started (free ports, a
   temporary directory), a little traffic is sent, and every `coffer_*` metric the rules or the
   dashboard name must be among the samples their /metrics export.

Needs promtool and grafanalib (`just test-tools` installs both into .tools/).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
METRIC = re.compile(r"\bcoffer_[a-z0-9_]+\b")
FAILED = []


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'}  {what}" + (f"\n        {detail}" if detail and not ok else ""))
    if not ok:
        FAILED.append(what)


def promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".tools/bin/promtool")
    if not Path(found).exists():
        sys.exit("promtool not found: `just test-tools` installs it into .tools/bin")
    return found


def rule_groups() -> list:
    document = yaml.safe_load((HERE / "prometheusrule.yaml").read_text())
    return document["spec"]["groups"]


def dashboard_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def check_dashboard_is_generated() -> dict:
    print("== coffer-dashboard.json is what dashboard.py renders")
    rendered = subprocess.run([sys.executable, str(HERE / "dashboard.py")], check=True,
                              capture_output=True, text=True).stdout
    committed = (HERE / "coffer-dashboard.json").read_text()
    check("coffer-dashboard.json is up to date "
          "(python3 k8s/monitoring/dashboard.py > k8s/monitoring/coffer-dashboard.json)",
          rendered == committed)
    return json.loads(rendered)


def check_promtool(dashboard: dict, work: Path) -> None:
    print("== promtool")
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(HERE / "rules.test.yaml", work / "rules.test.yaml")
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    check("promtool check rules (the PrometheusRule's groups)", result.returncode == 0,
          result.stdout + result.stderr)
    result = subprocess.run([promtool(), "test", "rules", "rules.test.yaml"], cwd=work,
                            capture_output=True, text=True)
    check("promtool test rules rules.test.yaml (each alert fires and stays quiet)",
          result.returncode == 0, result.stdout + result.stderr)
    # Grafana's variables are not PromQL: give them values a query could have.
    queries = [query.replace("$__rate_interval", "1m").replace("$namespace", "coffer")
               for query in dashboard_queries(dashboard)]
    recorded = work / "dashboard-queries.yaml"
    recorded.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": query} for index, query in enumerate(queries)]}]}))
    result = subprocess.run([promtool(), "check", "rules", str(recorded)], capture_output=True, text=True)
    check(f"every dashboard query is PromQL ({len(queries)} queries)", result.returncode == 0,
          result.stdout + result.stderr)


def github_anchor(heading: str) -> str:
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def check_runbooks() -> None:
    print("== runbooks")
    operations = (ROOT / "docs/operations.md").read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in operations.splitlines() if line.startswith("#")}
    for group in rule_groups():
        for rule in group["rules"]:
            url = rule.get("annotations", {}).get("runbook_url", "")
            path, _, anchor = url.partition("#")
            check(f"{rule['alert']}: runbook docs/operations.md#{anchor}",
                  path.endswith("/docs/operations.md") and anchor in anchors, url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def wait_for(what: str, condition, processes, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                sys.exit(f"{name} exited with {process.returncode} while waiting for {what}")
        if condition():
            return
        time.sleep(0.1)
    sys.exit(f"timed out after {seconds} s waiting for {what}")


def sample_names(exposition: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
            if line and not line.startswith("#")}


def check_metrics_exported(coffer: Path, dashboard: dict) -> None:
    print("== every metric named by the rules and the dashboard is exported by a real writer or reader")
    named = {name: "rules" for group in rule_groups() for rule in group["rules"]
             for name in METRIC.findall(rule["expr"])}
    for query in dashboard_queries(dashboard):
        for name in METRIC.findall(query):
            named.setdefault(name, "dashboard")
    nats_server = shutil.which("nats-server") or str(ROOT / ".tools/bin/nats-server")
    work = Path(tempfile.mkdtemp(prefix="coffer-monitoring-"))
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(work / f"{name}.log", "wb")
        processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **env})

    ok = False
    try:
        nats_port, monitor_port = free_port(), free_port()
        start("nats", [nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                       "-m", str(monitor_port), "-sd", str(work / "nats")], {})
        writer_url = f"http://127.0.0.1:{free_port()}"
        reader_url = f"http://127.0.0.1:{free_port()}"
        common = {"COFFER_NATS_URL": f"nats://127.0.0.1:{nats_port}", "RUST_LOG": "warn"}
        start("writer", [str(coffer), "writer"], {
            **common, "COFFER_HTTP_ADDR": writer_url.removeprefix("http://"),
            "COFFER_NATS_MONITOR_URLS": f"http://127.0.0.1:{monitor_port}"})
        start("reader", [str(coffer), "reader"], {
            **common, "COFFER_HTTP_ADDR": reader_url.removeprefix("http://"),
            "COFFER_DATA_DIR": str(work / "reader")})
        wait_for("the writer's /readyz", lambda: get(f"{writer_url}/readyz")[0] == 200, processes)
        post(f"{writer_url}/v1/accounts", {"account_id": "monitoring-a", "currency": "EUR"})
        post(f"{writer_url}/v1/accounts/monitoring-a/deposits", {"amount": 100})
        wait_for("the reader's /readyz", lambda: get(f"{reader_url}/readyz")[0] == 200, processes)
        # The writer reads /varz as it starts, then every 15 s.
        wait_for("the NATS store gauges",
                 lambda: "coffer_writer_nats_store_used_bytes{" in get(f"{writer_url}/metrics")[1],
                 processes, seconds=30)
        exported = sample_names(get(f"{writer_url}/metrics")[1]) | sample_names(get(f"{reader_url}/metrics")[1])
        check(f"the writer and reader export {len(exported)} samples", bool(exported))
        for name, where in sorted(named.items()):
            candidates = {name, f"{name}_bucket"}
            check(f"{name} ({where}) is exported", bool(candidates & exported))
        ok = not FAILED
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"service logs in {work}")


def main() -> int:
    coffer = Path(sys.argv[1] if len(sys.argv) > 1 else "target/debug/coffer").resolve()
    dashboard = check_dashboard_is_generated()
    with tempfile.TemporaryDirectory(prefix="coffer-promtool-") as work:
        check_promtool(dashboard, Path(work))
    check_runbooks()
    check_metrics_exported(coffer, dashboard)
    print(f"{len(FAILED)} failed" if FAILED else "monitoring: all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
