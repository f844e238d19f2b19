#!/usr/bin/env bash
# Runs scripts/bench_nats.py (nats-py) against nats-server (sync_interval: always), one writer and
# one reader on free ports in a temp dir, with group commit on and then off.
# Usage: scripts/bench-nats.sh path/to/coffer [clients]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
coffer="$(realpath "$1")"
clients="${2:-64}"
python="$root/.tools/venv/bin/python3"
[ -x "$python" ] || python3 -m venv "$root/.tools/venv"
"$python" -c 'import nats' 2>/dev/null || "$python" -m pip install --quiet nats-py==2.16.0
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() {
  local label="$1" messages_max="$2"
  local work nats_port http_port pids=()
  work="$(mktemp -d)"
  nats_port="$(free_port)"; http_port="$(free_port)"
  printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s/nats", sync_interval: always }\n' \
    "$nats_port" "$work" > "$work/nats.conf"
  "$root/.tools/bin/nats-server" -c "$work/nats.conf" > "$work/nats.log" 2>&1 & pids+=($!)
  sleep 0.5
  COFFER_NATS_URL="nats://127.0.0.1:$nats_port" COFFER_HTTP_ADDR="127.0.0.1:$http_port" \
    COFFER_GROUP_COMMIT_MESSAGES_MAX="$messages_max" RUST_LOG=warn "$coffer" writer > "$work/writer.log" 2>&1 & pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null && break; sleep 0.1; done
  echo "== $label"
  "$python" "$root/scripts/bench_nats.py" "nats://127.0.0.1:$nats_port" --clients "$clients"
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
run "group commit on (COFFER_GROUP_COMMIT_MESSAGES_MAX=1000)" 1000
run "group commit off (COFFER_GROUP_COMMIT_MESSAGES_MAX=1)" 1
