#!/usr/bin/env bash
# The main job, for now: make sure ActiveMQ is installed, start the demo broker on
# 127.0.0.1:61613 (scripts/broker.sh; it keeps running, stop it with
# `scripts/broker.sh stop`) and print who the broker is.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '[demo] %s\n' "$*"; }

bash scripts/setup.sh --broker
bash scripts/broker.sh start
say "cargo run --example broker_info -- stomp://127.0.0.1:${STOMP_PORT:-61613}"
cargo run --example broker_info -- "stomp://127.0.0.1:${STOMP_PORT:-61613}"
