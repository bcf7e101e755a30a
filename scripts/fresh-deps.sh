#!/usr/bin/env bash
# Builds and lints the workspace on the newest dependency versions its
# manifests allow, as a user's fresh `cargo add outbox` gets them, without
# touching the committed Cargo.lock: the sources are copied to a scratch
# directory, `cargo update` runs there, then clippy with -D warnings.
#
#   scripts/fresh-deps.sh
#
# The build goes to target/fresh-deps (kept between runs, so only what
# changed is rebuilt). When the package registry cannot be reached, the
# check is skipped with a warning rather than failed: it is about what a
# fresh lock would hold, which cannot be known offline.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[fresh-deps] %s\n' "$*"; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/outbox-fresh-deps.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
# Everything but build output and history; the lock is copied, then updated.
tar -C "$root" --exclude=./target --exclude=./.git --exclude='./outbox-stomp/fuzz/target' \
  -cf - . | tar -C "$scratch" -xf -

cd "$scratch"
say "cargo update (in a copy; the committed Cargo.lock is unchanged)"
if ! cargo update 2>"$scratch/update.log"; then
  cat "$scratch/update.log" >&2
  say "WARNING: cargo update failed (registry unreachable?); newest-dependency check skipped"
  exit 0
fi
# What moved, for the log: one line per updated package.
grep -E '^\s*(Updating|Adding|Removing|Downgrading) ' "$scratch/update.log" | grep -v 'crates.io index' || say "nothing to update: the lock is current"

export CARGO_TARGET_DIR="$root/target/fresh-deps"
say "cargo clippy --workspace --all-targets --all-features -- -D warnings (newest dependencies)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
say "the newest compatible dependencies build without warnings"
