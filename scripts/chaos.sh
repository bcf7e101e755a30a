#!/usr/bin/env bash
# Seeded fault-schedule runs (examples/chaos.rs): a seed generates a workload and
# a fault schedule; a producer with its relay and two consumers run it as separate
# processes against a real ActiveMQ and a real database while the faults strike;
# a checker reads what the system recorded and says what became of every event.
#
#   scripts/chaos.sh --seed 42 --minutes 2                one run on SQLite
#   scripts/chaos.sh --seed 42 --minutes 2 --db all       the same seed on each database
#   scripts/chaos.sh --seed 42 --minutes 1 --seeds 5      seeds 42..46
#   scripts/chaos.sh --seed 42 --minutes 1 --exclude swallow,oversize
#
# Options: --seed S (default: random), --minutes M (fault time, default 1),
# --db sqlite|postgres|mysql|all (default sqlite), --seeds N (runs of seeds
# S..S+N-1, default 1); anything else goes to `chaos run` (--exclude, --stall-bound,
# --memory-bound-mib, --keep). A failing run prints the line that replays it and
# keeps its run folder under target/chaos/. Exits 1 if any run failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '[chaos.sh] %s\n' "$*"; }

seed=""
minutes=1
db=sqlite
seeds=1
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --db) db=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [ -z "$seed" ]; then
  seed=$(( (RANDOM << 15) | RANDOM ))
fi
case "$db" in
  all) dbs=(sqlite postgres mysql) ;;
  sqlite|postgres|mysql) dbs=("$db") ;;
  *) echo "[chaos.sh] --db $db: use sqlite, postgres, mysql or all" >&2; exit 2 ;;
esac

if [ "${dbs[*]}" = sqlite ]; then
  bash scripts/setup.sh --broker
else
  bash scripts/setup.sh
fi
say "cargo build --examples --all-features"
cargo build --examples --all-features

target=${CARGO_TARGET_DIR:-target}
# The runs use their own link to the binary: the runner starts the services
# from its own path again and again, and a build during a long run must not
# swap the binary under them (the linker writes a new file, so the link keeps
# the old one; a copy where links do not work).
bin="$target/chaos/bin-$$"
mkdir -p "$bin"
ln -f "$target/debug/examples/chaos" "$bin/chaos" 2>/dev/null ||
  cp "$target/debug/examples/chaos" "$bin/chaos"
trap 'rm -rf "$bin"' EXIT
failed=()
for ((n = 0; n < seeds; n++)); do
  s=$((seed + n))
  for d in "${dbs[@]}"; do
    say "seed $s on $d, faults for $minutes min"
    if ! "$bin/chaos" run --seed "$s" --db "$d" --minutes "$minutes" ${rest[@]+"${rest[@]}"}; then
      failed+=("--seed $s --db $d")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  say "failed runs:"
  for f in "${failed[@]}"; do
    say "  scripts/chaos.sh $f --minutes $minutes ${rest[*]+"${rest[*]}"}"
  done
  exit 1
fi
say "every run passed"
