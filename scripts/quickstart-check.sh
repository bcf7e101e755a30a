#!/usr/bin/env bash
# What a newcomer gets from the README: a new crate, outside this workspace,
# whose Cargo.toml is the README's dependency block (with `outbox` taken from
# this checkout by path) and whose src/main.rs is the README's quickstart,
# word for word. It gets a fresh lock (the newest versions the manifests
# allow, as `cargo add` would give), is built with RUSTFLAGS=-D warnings,
# and is run against an ActiveMQ on 127.0.0.1:61613: the one answering there,
# or one started with scripts/broker.sh (and stopped again afterwards). The
# run passes when the user it registers has its welcome-points row, then the
# program is stopped with SIGINT, as the quickstart expects, and must exit 0.
#
#   scripts/quickstart-check.sh            build and run
#   scripts/quickstart-check.sh --no-run   build only
#
# The crate is made in a temporary directory and removed afterwards; the
# build goes to target/quickstart-check (kept, so a second run is quick).
# When the package registry cannot be reached, the lock is this workspace's
# Cargo.lock instead of a fresh one, with a warning.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[quickstart-check] %s\n' "$*"; }
run=1
[ "${1:-}" = "--no-run" ] && run=0

crate=$(mktemp -d "${TMPDIR:-/tmp}/outbox-quickstart.XXXXXX")
started_broker=0
app=""
cleanup() {
  if [ -n "$app" ] && kill -0 "$app" 2>/dev/null; then kill "$app" 2>/dev/null || true; fi
  if [ "$started_broker" = 1 ]; then bash "$root/scripts/broker.sh" stop || true; fi
  rm -rf "$crate"
}
trap cleanup EXIT

# The README's blocks, found by their fences after the `## Quickstart` heading.
extract() { # $1: the fence's info string
  awk -v fence="\`\`\`$1" '
    /^## Quickstart/ { in_part = 1; next }
    in_part && /^## / { exit }
    in_part && $0 == fence { inside = 1; next }
    inside && /^```$/ { exit }
    inside { print }
  ' "$root/README.md"
}
deps=$(extract toml)
main=$(extract rust,no_run)
[ -n "$deps" ] || { say "no \`\`\`toml block in the README's Quickstart"; exit 1; }
[ -n "$main" ] || { say "no \`\`\`rust,no_run block in the README's Quickstart"; exit 1; }
grep -q '^\[dependencies\]' <<<"$deps" || { say "the toml block has no [dependencies]"; exit 1; }

mkdir -p "$crate/src"
{
  printf '[package]\nname = "quickstart"\nversion = "0.1.0"\nedition = "2024"\npublish = false\n\n'
  # `outbox = "…"` becomes this checkout.
  sed -E "s|^outbox = .*|outbox = { path = \"$root\" }|" <<<"$deps"
  # Not a member of any workspace above the temporary directory.
  printf '\n[workspace]\n'
} >"$crate/Cargo.toml"
printf '%s\n' "$main" >"$crate/src/main.rs"
say "crate in $crate:"
sed 's/^/    /' "$crate/Cargo.toml"

cd "$crate"
if cargo generate-lockfile 2>"$crate/lock.log"; then
  say "fresh lock: $(grep -c '^name = ' Cargo.lock) packages"
else
  cat "$crate/lock.log" >&2
  say "WARNING: no fresh lock (registry unreachable?); building on the workspace's Cargo.lock"
  cp "$root/Cargo.lock" Cargo.lock
fi

export CARGO_TARGET_DIR="$root/target/quickstart-check"
say "RUSTFLAGS=-D warnings cargo build"
RUSTFLAGS="-D warnings" cargo build
say "the quickstart builds without warnings"
[ "$run" = 1 ] || exit 0

stomp_up() { (exec 3<>/dev/tcp/127.0.0.1/61613) 2>/dev/null; }
if stomp_up; then
  say "using the broker answering on 127.0.0.1:61613"
else
  say "starting a broker (scripts/broker.sh start)"
  bash "$root/scripts/broker.sh" start
  started_broker=1
fi

say "running the quickstart"
RUST_LOG=info "$CARGO_TARGET_DIR/debug/quickstart" >"$crate/run.log" 2>&1 &
app=$!
points() {
  [ -f app.db ] || { echo 0; return; }
  sqlite3 app.db "SELECT COUNT(*) FROM welcome_points" 2>/dev/null || echo 0
}
for _ in $(seq 1 300); do
  [ "$(points)" -ge 1 ] && break
  kill -0 "$app" 2>/dev/null || break
  sleep 0.1
done
got=$(points)
if ! kill -0 "$app" 2>/dev/null; then
  cat "$crate/run.log" >&2
  say "FAILED: the quickstart exited before its event was applied"
  exit 1
fi
kill -INT "$app"
status=0
wait "$app" || status=$?
app=""
sed 's/^/    /' "$crate/run.log"
if [ "$got" -lt 1 ]; then
  say "FAILED: no welcome-points row after 30 s"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  say "FAILED: the quickstart exited with status $status after SIGINT"
  exit 1
fi
say "the quickstart ran: user registered, event published and applied ($got welcome-points row), clean exit on SIGINT"
