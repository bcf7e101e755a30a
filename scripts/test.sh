#!/usr/bin/env bash
# The test suite: installs and starts what is missing (scripts/setup.sh), then runs
# every test of the workspace with all features against a real ActiveMQ, PostgreSQL,
# MariaDB and SQLite, and finally the doc tests.
#
#   scripts/test.sh                   everything
#   scripts/test.sh harness_          extra arguments go to the test runner (here: a filter)
#
# Uses cargo-nextest when installed, otherwise cargo test.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '[test] %s\n' "$*"; }

bash scripts/setup.sh

status=0
if cargo nextest --version >/dev/null 2>&1; then
  say "cargo nextest run --workspace --all-features --no-fail-fast $*"
  cargo nextest run --workspace --all-features --no-fail-fast "$@" || status=$?
else
  say "cargo-nextest not found; cargo test --workspace --all-features --no-fail-fast $*"
  cargo test --workspace --all-features --no-fail-fast "$@" || status=$?
fi

# The library without its optional features (no `otel`, one database): what a
# default build compiles, and the tests that check nothing changes then.
say "cargo test -p outbox-engine --features sqlite --lib (optional features off)"
cargo test -p outbox-engine --features sqlite --lib || status=$?

say "cargo test --workspace --all-features --doc"
cargo test --workspace --all-features --doc || status=$?

if [ "$status" -eq 0 ]; then
  say "all tests passed"
else
  say "some tests failed (exit status $status); see the summaries above"
fi
exit "$status"
