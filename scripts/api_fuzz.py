#!/usr/bin/env python3
"""Runs schemathesis against a real writer and reader (their own nats-server, free ports, a
temporary directory) with every check, as configured in schemathesis.toml. Exits non-zero when
schemathesis finds anything or cannot run.

Usage: scripts/api_fuzz.py path/to/coffer
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, name: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{name} was not ready within {seconds} s ({url})")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def seed(writer_url: str) -> int:
    """Opens the accounts, holds, transfer and transaction that schemathesis.toml's dictionaries name, so that
    generated requests reach the ledger's rules and not only 404s. Returns the last position."""
    for account, currency in [("fuzz-a", "EUR"), ("fuzz-b", "EUR"), ("fuzz-c", "USD")]:
        post(f"{writer_url}/v1/accounts", {"account_id": account, "currency": currency})
    post(f"{writer_url}/v1/accounts/fuzz-a/deposits", {"amount": 10**12})
    post(f"{writer_url}/v1/transfers", {"transfer_id": "fuzz-t1", "from": "fuzz-a", "to": "fuzz-b",
                                        "amount": 100})
    post(f"{writer_url}/v1/transactions", {"transaction_id": "fuzz-x1", "postings": [
        {"from": "fuzz-a", "to": "fuzz-b", "amount": 70}, {"from": "fuzz-b", "to": "fuzz-a", "amount": 5}]})
    last = 0
    for hold in range(1, 6):
        last = post(f"{writer_url}/v1/holds", {"hold_id": f"fuzz-h{hold}", "from": "fuzz-a",
                                               "to": "fuzz-b", "amount": 100})["position"]
    return last


def main() -> int:
    coffer = Path(sys.argv[1] if len(sys.argv) > 1 else "target/debug/coffer").resolve()
    schemathesis = shutil.which("st") or sys.exit("schemathesis (st) is not on PATH: just api-fuzz installs it")
    nats_server = shutil.which("nats-server") or str(ROOT / ".tools/bin/nats-server")
    work = Path(tempfile.mkdtemp(prefix="coffer-api-fuzz-"))
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(work / f"{name}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env})
        processes.append(process)
        return process

    try:
        nats_port = free_port()
        nats = start("nats", [nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                              "-sd", str(work / "nats")], {})
        nats_url = f"nats://127.0.0.1:{nats_port}"
        writer_url = f"http://127.0.0.1:{free_port()}"
        reader_url = f"http://127.0.0.1:{free_port()}"
        common = {"COFFER_NATS_URL": nats_url, "RUST_LOG": "warn"}
        writer = start("writer", [str(coffer), "writer"],
                       {**common, "COFFER_HTTP_ADDR": writer_url.removeprefix("http://")})
        reader = start("reader", [str(coffer), "reader"], {
            **common,
            "COFFER_HTTP_ADDR": reader_url.removeprefix("http://"),
            "COFFER_DATA_DIR": str(work / "reader"),
            # A position the view has not applied is answered 503 stale after this wait; short,
            # so the generated absurd positions do not make the run slow.
            "COFFER_MIN_POSITION_WAIT_MS": "300",
        })
        del nats
        wait_ready(f"{writer_url}/readyz", writer, "writer")
        last = seed(writer_url)
        wait_ready(f"{reader_url}/readyz", reader, "reader")
        wait_ready(f"{reader_url}/v1/holds/fuzz-h5?min_position={last}", reader, "reader")
        failed = False
        for name, url in [("writer", writer_url), ("reader", reader_url)]:
            print(f"== schemathesis against the {name} ({url}/openapi.json)", flush=True)
            result = subprocess.run([
                schemathesis, "--config-file", str(ROOT / "schemathesis.toml"), "run",
                f"{url}/openapi.json", "--url", url,
                "--report", "junit,ndjson", "--report-dir", str(work / name),
            ])
            failed |= result.returncode != 0
        if failed:
            print(f"schemathesis found problems; service logs in {work}", file=sys.stderr)
            return 1
        return 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if "failed" in locals() and not failed and not os.environ.get("COFFER_API_FUZZ_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
