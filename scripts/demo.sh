#!/usr/bin/env bash
# The main job: the reference scenario end to end. A user service registers users
# in DB1, a points service gives each of them one welcome-points row in DB2, and
# ActiveMQ carries the user.created events between them; at the end the demo
# compares the two databases (no user missing, none doubled).
#
#   scripts/demo.sh                     1000 users on two fresh SQLite files
#   scripts/demo.sh --crash             the same while the services are SIGKILLed and
#                                       restarted and the broker is restarted
#   scripts/demo.sh --users 5000 --rate 1000 --users-db postgres://postgres@127.0.0.1/db1
#
# It installs Java and ActiveMQ if missing (scripts/setup.sh --broker), builds the
# examples, and runs target/debug/examples/demo with the arguments given here
# (`scripts/demo.sh --help` lists them). The demo uses a broker that answers on
# 127.0.0.1:61613 (e.g. scripts/broker.sh start) and otherwise starts its own,
# which it stops at the end.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '[demo.sh] %s\n' "$*"; }

bash scripts/setup.sh --broker

if ! command -v cargo >/dev/null 2>&1; then
  echo "[demo.sh] cargo is missing: install a Rust toolchain (1.89 or newer), e.g. from https://rustup.rs" >&2
  exit 1
fi
say "cargo build --examples --all-features"
cargo build --examples --all-features

target=${CARGO_TARGET_DIR:-target}
say "$target/debug/examples/demo $*"
exec "$target/debug/examples/demo" "$@"
