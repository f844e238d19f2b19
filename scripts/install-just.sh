#!/usr/bin/env bash
# Installs the pinned `just` into .tools/bin from the PyPI wheel rust-just (a static binary):
# with pip when Python has it, else with curl from PyPI's JSON API, else with cargo.
set -euo pipefail

JUST_VERSION="1.59.0"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="$root/.tools/bin"
mkdir -p "$bin_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "installing just $JUST_VERSION into .tools/bin"
if python3 -m pip --version >/dev/null 2>&1 &&
  python3 -m pip download --quiet --no-deps --only-binary=:all: "rust-just==$JUST_VERSION" -d "$work"; then
  :
elif command -v curl >/dev/null 2>&1; then
  # The manylinux wheel for this machine from PyPI's simple index, checked against its sha256.
  link="$(curl -fsSL https://pypi.org/simple/rust-just/ |
    grep -o "href=\"[^\"]*rust_just-$JUST_VERSION-[^\"]*manylinux[^\"]*$(uname -m)[^\"]*\.whl#sha256=[0-9a-f]*\"" |
    head -n1 | sed 's/^href="//; s/"$//' || true)"
  [ -n "$link" ] || { echo "no rust-just $JUST_VERSION wheel for $(uname -m)" >&2; exit 1; }
  wheel="$work/$(basename "${link%%#*}")"
  curl -fsSL "${link%%#*}" -o "$wheel"
  echo "${link##*#sha256=}  $wheel" | sha256sum -c --quiet
else
  cargo install --quiet --locked --root "$root/.tools" --version "$JUST_VERSION" just
  "$bin_dir/just" --version
  exit 0
fi
python3 -m zipfile -e "$work"/rust_just-*.whl "$work/unpacked"
# Into place in one step: an interrupted install never leaves a half-written binary.
install -m 0755 "$work"/unpacked/rust_just-*.data/scripts/just "$bin_dir/just.new"
mv -f "$bin_dir/just.new" "$bin_dir/just"
"$bin_dir/just" --version
