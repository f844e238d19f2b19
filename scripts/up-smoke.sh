#!/usr/bin/env bash
# The README's run command, checked: `./just up` builds and starts nats-server, a writer and a
# reader; the README's first requests are answered (open, deposit, read your write); Ctrl-C
# (SIGINT) stops everything. Used by .ci/run after the tests. It starts from an empty ./data, so
# it refuses to run over an existing one unless COFFER_SMOKE_CLEAN_DATA=1 (CI's fresh clone).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ -e data ] && [ "${COFFER_SMOKE_CLEAN_DATA:-}" != 1 ]; then
  echo "./data exists (a local system's data): move it away, or set COFFER_SMOKE_CLEAN_DATA=1" >&2
  exit 1
fi
for port in 4222 8080 8081 8222; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already taken: a system is running here" >&2
    exit 1
  fi
done
rm -rf data
log="$(mktemp)"
setsid ./just up >"$log" 2>&1 &
leader=$!
# Ctrl-C to the whole group, then SIGKILL to whatever is left after 15 s.
stop() {
  kill -INT -- "-$leader" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 -- "-$leader" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$leader" 2>/dev/null || true
  return 1
}
trap 'stop || true; cat "$log"; rm -f "$log"' EXIT
# The first run compiles the debug build (shared with ./just test).
for _ in $(seq 1800); do
  grep -q "Coffer is running" "$log" && break
  kill -0 "$leader" 2>/dev/null || { echo "./just up exited" >&2; exit 1; }
  sleep 1
done
grep -q "Coffer is running" "$log" || { echo "./just up did not start in 30 minutes" >&2; exit 1; }
json='Content-Type: application/json'
curl -fsS --max-time 30 -XPOST localhost:8080/v1/accounts -H "$json" \
  -d '{"account_id":"alice","currency":"EUR"}'
echo
position="$(curl -fsS --max-time 30 -XPOST localhost:8080/v1/accounts/alice/deposits -H "$json" \
  -H 'Idempotency-Key: first-deposit' -d '{"amount":500}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["position"])')"
balance="$(curl -fsS --max-time 30 "localhost:8081/v1/accounts/alice?min_position=$position" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["balance"])')"
[ "$balance" = 500 ] || { echo "alice's balance is $balance, not 500" >&2; exit 1; }
if ! stop; then
  echo "./just up did not stop within 15 s of Ctrl-C" >&2
  exit 1
fi
grep -q "stopped" "$log" || { echo "up.sh did not report stopping" >&2; exit 1; }
echo "up-smoke: ./just up served the README's requests and stopped on Ctrl-C"
