#!/usr/bin/env bash
# Runs Coffer locally: nats-server (JetStream data under ./data/nats), one writer and one reader.
# Ctrl-C stops everything. Usage: scripts/up.sh [path/to/coffer]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
coffer="${1:-target/debug/coffer}"
nats_server="$(command -v nats-server || echo "$root/.tools/bin/nats-server")"
mkdir -p data/nats data/reader data/logs

pids=()
stop() {
  local code="${1:-0}"
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped"
  exit "$code"
}
trap stop INT TERM EXIT

"$nats_server" -c nats/single.conf >data/logs/nats.log 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break
  sleep 0.1
done

COFFER_NATS_URL=nats://127.0.0.1:4222 COFFER_HTTP_ADDR=127.0.0.1:8080 \
  "$coffer" writer >data/logs/writer.log 2>&1 &
pids+=($!)
COFFER_NATS_URL=nats://127.0.0.1:4222 COFFER_HTTP_ADDR=127.0.0.1:8081 \
  COFFER_DATA_DIR=./data/reader COFFER_READER_NAME=reader \
  "$coffer" reader >data/logs/reader.log 2>&1 &
pids+=($!)

for url in http://127.0.0.1:8080/readyz http://127.0.0.1:8081/readyz; do
  ready=false
  for _ in $(seq 200); do
    if curl -fsS --max-time 2 "$url" >/dev/null 2>&1; then
      ready=true
      break
    fi
    sleep 0.1
  done
  if [ "$ready" != true ]; then
    echo "$url did not answer ready in 20 s; the logs (data/logs/):" >&2
    tail -n 20 data/logs/*.log >&2
    stop 1
  fi
done

cat <<MSG
Coffer is running (logs in data/logs/):
  writer (commands)  http://127.0.0.1:8080
  reader (queries)   http://127.0.0.1:8081
  NATS               nats://127.0.0.1:4222   (monitoring http://127.0.0.1:8222)

Try:
  curl -s -XPOST localhost:8080/v1/accounts -H 'Content-Type: application/json' -d '{"account_id":"alice","currency":"EUR"}'
  curl -s -XPOST localhost:8080/v1/accounts/alice/deposits -H 'Content-Type: application/json' -d '{"amount":500}' && curl -s localhost:8081/v1/accounts/alice

Press Ctrl-C to stop.
MSG
wait
