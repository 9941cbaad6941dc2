#!/usr/bin/env bash
# The whole test suite: unit tests, golden fixtures, property tests, and integration tests against a
# real PostgreSQL cluster that the tests start themselves (initdb + pg_ctl on a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
. scripts/ensure-python.sh
. scripts/ensure-node.sh
# Builds are reused across runs (and CI runs on this machine); a cold build works too.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --check
cargo test --locked --all-targets -- --test-threads 2
