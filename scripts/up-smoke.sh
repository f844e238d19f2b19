#!/usr/bin/env bash
# The README's run command, checked: `./just up` builds and starts nats-server, a writer and a
# reader; the README's first requests are answered (open, deposit, read your write); Ctrl-C
# (SIGINT) stops everything. Used by .ci/run after the tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
log="$(mktemp)"
rm -rf data
setsid ./just up >"$log" 2>&1 &
leader=$!
stop() {
  kill -INT -- "-$leader" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$leader" 2>/dev/null || break; sleep 0.1; done
}
trap 'stop; cat "$log"; rm -f "$log"' EXIT
# The first run compiles the release build.
for _ in $(seq 1800); do
  grep -q "Coffer is running" "$log" && break
  kill -0 "$leader" 2>/dev/null || { echo "./just up exited" >&2; exit 1; }
  sleep 1
done
grep -q "Coffer is running" "$log" || { echo "./just up did not start in 30 minutes" >&2; exit 1; }
json='Content-Type: application/json'
curl -fsS -XPOST localhost:8080/v1/accounts -H "$json" -d '{"account_id":"alice","currency":"EUR"}'
echo
position="$(curl -fsS -XPOST localhost:8080/v1/accounts/alice/deposits -H "$json" \
  -H 'Idempotency-Key: first-deposit' -d '{"amount":500}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["position"])')"
balance="$(curl -fsS "localhost:8081/v1/accounts/alice?min_position=$position" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["balance"])')"
[ "$balance" = 500 ] || { echo "alice's balance is $balance, not 500" >&2; exit 1; }
stop
if kill -0 "$leader" 2>/dev/null; then
  echo "./just up did not stop on Ctrl-C" >&2
  exit 1
fi
grep -q "stopped" "$log" || { echo "up.sh did not report stopping" >&2; exit 1; }
echo "up-smoke: ./just up served the README's requests and stopped on Ctrl-C"
